"""One job on every GPU of the worker (``devices: "all"``): torch DDP, one process per GPU, started by torchrun.

The daemon still knows a single training child (``worker.horse``). For a DDP job that child runs ``launch``,
which starts ``python -m torch.distributed.run --standalone ... -m worker.ddp TICKET`` and relays:

* every rank connects to a Unix socket in a private (0700) temp folder and says ``("hello", rank, pid)``; the
  messages are the horse's own (``multiprocessing.connection`` pickles over the socket);
* rank 0 sends ``("progress", Progress)`` at every step and its final word, ``("done", TrainOutcome)``,
  ``("rejected", field, problem)`` or ``("cancelled",)``; the other ranks end with the same words (their "done"
  carries None), and any rank that raises sends ``("failed", description, traceback)`` and exits 1;
* the daemon's "stop" goes to rank 0 over its socket, where ``should_stop`` sees it; ``Dist.agree`` then stops
  every rank at the same step, after rank 0's checkpoint, exactly as in one process;
* a rank whose socket closes (the horse child is gone) exits at its next ``should_stop``.

The launcher turns the final word back into what ``run_training`` returns or raises, so the daemon gets the same
result kinds as from one process; ranks that end without one are ``RanksDied`` (the horse reports "died").
torchrun runs in its own session, so a Ctrl-C meant for the daemon reaches the ranks only as the orderly "stop";
it gets SIGTERM if the horse child dies, and any rank still alive at the end is killed: none outlives the job.
A SIGTERM to every process (systemd's stop) does end the ranks at once: "died" while the daemon stops is a
shutdown to it, and the job resumes elsewhere from its last periodic checkpoint.

Light at import (no torch): the horse child imports it for every job; torch comes in the ranks, or to count GPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from schemas.heartbeat import Progress
from spooler.errors import Cancelled, Rejected
from worker import scratch
from worker.train import TrainOutcome, TrainRequest

log = logging.getLogger(__name__)

ENV_PROCS = "LORASPOOL_DDP_PROCS"
POLL = 0.5
EXIT_GRACE = 15.0  # after the final word, the ranks' own exit (tearing down the process group) may take this long
FAILURE_GRACE = 5.0  # after a rank's failure, the others' reports (usually "a peer went away") are collected this long


class RankFailed(RuntimeError):
    """A rank raised: ``str(e)`` is the description for the result, ``remote_traceback`` the ranks' tracebacks."""

    def __init__(self, description: str, remote_traceback: str = "") -> None:
        super().__init__(description)
        self.remote_traceback = remote_traceback


class RanksDied(RuntimeError):  # noqa: N818 - the name is the horse result it leads to
    """The ranks ended without a final word: killed (OOM killer, a signal) or crashed in native code."""


@dataclass
class Ticket:
    """What every rank reads from the file named on its command line."""

    request: TrainRequest
    socket: str


# ── how many processes ───────────────────────────────────────────────────────────────────────────────────
NO_NCCL = ('devices "all" trained on one GPU: several GPUs need NCCL, which PyTorch does not build for Windows; '
           "run the worker on Linux (or WSL) to use them together, or one job per GPU with max_concurrent_jobs")


def processes(devices: str, device: str, platform: str = sys.platform) -> int:
    """DDP processes for a job: one per visible GPU for ``devices: "all"`` on cuda, else 1 (a plain run). One on
    Windows, where torch has no NCCL (and Python no AF_UNIX for torchrun): the job says so (``NO_NCCL``).

    ``LORASPOOL_DDP_PROCS`` (worker environment) sets the count for ``"all"`` jobs instead, on any device: that is
    how the tests run two gloo processes on a CPU, and how a worker leaves some of its GPUs alone."""
    if devices != "all" or platform == "win32":
        return 1
    wanted = os.environ.get(ENV_PROCS, "").strip()
    count = _gpu_count() if device == "cuda" else 1
    if not wanted:
        return max(1, count)
    if not wanted.isdigit() or int(wanted) < 1:
        raise RuntimeError(f"{ENV_PROCS}={wanted!r} in the worker's environment: it must be a whole number >= 1")
    if device == "cuda" and int(wanted) > count:
        raise RuntimeError(f"{ENV_PROCS}={wanted} but this worker sees {count} GPU(s); lower it or unset it")
    return int(wanted)


def one_gpu_note(devices: str, device: str, platform: str = sys.platform) -> str | None:
    """``NO_NCCL`` when ``processes`` gave a devices "all" job one process only for want of NCCL (Windows)."""
    if platform == "win32" and devices == "all" and device == "cuda" and _gpu_count() > 1:
        return NO_NCCL
    return None


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


# ── the launcher, in the horse child ─────────────────────────────────────────────────────────────────────
def launch(req: TrainRequest, world: int, report: Callable[[Progress], None],
           should_stop: Callable[[], bool]) -> TrainOutcome:
    """Train ``req`` as ``world`` torchrun ranks; returns or raises what ``run_training`` would in one process."""
    started = time.monotonic()
    # Removed at the end, and its ticket and socket as soon as every rank has connected: a horse child killed
    # (kill -9) after that leaves only torchrun's small log folder behind.
    tmp = Path(tempfile.mkdtemp(prefix=scratch.prefix("ddp")))
    try:
        server = _listen(tmp / "sock")
        ticket = tmp / "ticket.pkl"
        ticket.write_bytes(pickle.dumps(Ticket(req, str(tmp / "sock"))))
        relay = _Relay(server, _torchrun(world, ticket, tmp / "torchrun"), world, ticket, report, should_stop)
        try:
            outcome = relay.run()
        except RankFailed:
            _log_other_ranks(req, relay.troubles, world)
            raise
        finally:
            relay.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    outcome.metrics.seconds = round(time.monotonic() - started, 3)
    kind = "GPUs (nccl)" if req.device == "cuda" else "CPU processes (gloo)"
    outcome.notes.append(f"trained with DDP on {world} {kind}")
    return outcome


def _listen(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(64)
    return server


def _torchrun(world: int, ticket: Path, log_dir: Path) -> subprocess.Popen:
    """torchrun on this machine only (``--standalone``: a rendezvous on localhost), no restarts: a failed rank
    fails the attempt, and the spool's own retry resumes it from its checkpoint. The ranks' output goes where
    the horse's goes (the worker log); ``log_dir`` only keeps torchrun's own folders out of /tmp."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(world), "--max-restarts", "0", "--log-dir", str(log_dir),
           "-m", "worker.ddp", str(ticket)]
    # torchrun would set 1 thread per rank (and say so): share the cores instead, unless the worker's setting says.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // world))
    env = {**os.environ, **_loopback_env(), "OMP_NUM_THREADS": threads}
    return subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def _loopback_env() -> dict[str, str]:
    """Keep gloo's and NCCL's sockets on the loopback interface: one machine, nothing to reach elsewhere."""
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    if "lo" not in names:
        return {}
    return {k: os.environ.get(k, "lo") for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}


def _die_with_parent() -> None:
    """In torchrun, before exec: SIGTERM when the horse child dies, even by SIGKILL; torchrun then ends its ranks."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class _Relay:
    """Reads the ranks' messages, forwards progress, passes "stop" to rank 0, and ends with their final word.

    When a rank goes wrong the others soon fail too ("connection closed by peer") or are ended by torchrun, so the
    first trouble is the cause: a rank's "failed" (sent before it exits) or a rank whose socket closed without a
    word (killed, or crashed in native code: "died"). Within one read, a silent death counts first: the others'
    collective errors follow it, never the other way round."""

    def __init__(self, server: socket.socket, proc: subprocess.Popen, world: int, ticket: Path,
                 report: Callable[[Progress], None], should_stop: Callable[[], bool]) -> None:
        self.server, self.proc, self.world, self.ticket = server, proc, world, ticket
        self.report, self.should_stop = report, should_stop
        self.ranks: dict[Connection, int] = {}  # rank of each connection, -1 until its hello
        self.pids: list[int] = []
        self.spoke: set[Connection] = set()  # sent a final word or a failure: their end of file is no death
        self.stopping = False
        self.final: tuple | None = None
        self.troubles: list[tuple[int, str, str]] = []  # (rank, description or "", traceback), first first

    def run(self) -> TrainOutcome:
        troubled_at = 0.0
        while True:
            exited = self.proc.poll() is not None
            self._pump(POLL)
            while exited and self._readable():  # the ranks are gone: read everything they left
                self._pump(0.0)
            if self.final is not None:
                return _outcome_of(self.final)
            if self.troubles:
                troubled_at = troubled_at or time.monotonic()
                if exited or time.monotonic() - troubled_at > FAILURE_GRACE:
                    raise _verdict(self.troubles, self.world)
            elif exited:
                raise RanksDied(_death(f"torchrun exited with code {self.proc.returncode} before any result"))
            if not self.stopping and self.should_stop():
                self.stopping = True
                self._tell_rank0()

    def _readable(self) -> bool:
        return bool(self.ranks) and bool(wait(list(self.ranks), 0))

    def _pump(self, timeout: float) -> None:
        messages: list[tuple[Connection, tuple]] = []
        for ready in wait([self.server, *self.ranks], timeout):
            if ready is self.server:
                sock, _ = self.server.accept()
                self.ranks[Connection(sock.detach())] = -1
                continue
            assert isinstance(ready, Connection)
            try:
                messages.append((ready, ready.recv()))
            except (EOFError, OSError):
                self._closed(ready)  # before this read's messages: see the class docstring
        for conn, msg in messages:
            self._handle(conn, msg)

    def _handle(self, conn: Connection, msg: tuple) -> None:
        kind = msg[0]
        if kind == "hello":
            self.ranks[conn] = msg[1]
            self.pids.append(msg[2])
            if len(self.pids) == self.world:  # every rank has read its ticket and connected
                self.ticket.unlink(missing_ok=True)
                Path(self.server.getsockname()).unlink(missing_ok=True)
            if msg[1] == 0 and self.stopping:
                self._tell_rank0()
            return
        if kind == "progress":
            self.report(msg[1])
            return
        self.spoke.add(conn)
        if kind == "failed":
            self.troubles.append((self.ranks[conn], msg[1], msg[2]))
        elif self.final is None and msg != ("done", None):  # ranks other than 0 say ("done", None)
            self.final = msg  # done, rejected, cancelled: every rank that says one says the same

    def _closed(self, conn: Connection) -> None:
        rank = self.ranks.pop(conn)
        if conn not in self.spoke:
            self.troubles.append((rank, "", ""))
        conn.close()

    def _tell_rank0(self) -> None:
        for conn, rank in self.ranks.items():
            if rank == 0:
                with contextlib.suppress(OSError):
                    conn.send("stop")

    def close(self) -> None:
        """After a final word, let torchrun finish on its own for a while; then (or at once, when the relay itself
        is leaving, say because the daemon died) end it, and kill any rank it left behind."""
        try:
            self.proc.wait(EXIT_GRACE if self.final or self.troubles else 0.1)
        except subprocess.TimeoutExpired:
            self.proc.terminate()  # torchrun passes SIGTERM to its ranks, then SIGKILL
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _kill_leftovers(self.pids, self.ticket)
        for conn in self.ranks:
            conn.close()
        self.server.close()


def _kill_leftovers(pids: list[int], ticket: Path) -> None:
    """A rank torchrun could not end (stuck in a collective, or torchrun itself killed) must not hold a GPU."""
    import psutil

    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if str(ticket) in proc.cmdline():  # that rank still, not a new process that got its pid
                proc.kill()


def _log_other_ranks(req: TrainRequest, troubles: list[tuple[int, str, str]], world: int) -> None:
    """Rank 0 logs its own traceback into the attempt's train.log, which only it keeps open: the other ranks'
    go there too, so the log kept with the result says why the job failed, whichever rank raised."""
    from worker.outputs import TrainLog

    others = [(rank, tb) for rank, desc, tb in troubles if desc and rank != 0]
    if not others:
        return
    with contextlib.suppress(OSError), TrainLog(req.out_dir, file_mode=req.file_mode):
        for rank, tb in others:
            log.error("rank %d of %d failed: %s", rank, world, tb.strip())


def _outcome_of(msg: tuple) -> TrainOutcome:
    if msg[0] == "done":
        return msg[1]
    if msg[0] == "rejected":
        raise Rejected(msg[1], msg[2])
    raise Cancelled()


def _verdict(troubles: list[tuple[int, str, str]], world: int) -> RanksDied | RankFailed:
    """The first trouble decides the kind; the failures are the text, each description once with its ranks."""
    failures = [(rank, desc) for rank, desc, _ in troubles if desc]
    texts = dict.fromkeys(desc for _, desc in failures)
    said = [(desc, _ranks([r for r, d in failures if d == desc], world)) for desc in texts]
    first_rank, first_desc, _ = troubles[0]
    if not first_desc:  # what the others said is an echo: cut to its first line
        echo = "; ".join(f"{desc.splitlines()[0][:200]} ({ranks})" for desc, ranks in said)
        return RanksDied(_death(f"{_ranks([first_rank], world)} ended without a word")
                         + (f"; then the others reported: {echo}" if echo else ""))
    return RankFailed("; ".join(f"{desc} ({ranks})" for desc, ranks in said),
                      "\n".join(f"rank {rank}:\n{tb}" for rank, desc, tb in troubles if desc))


def _ranks(ranks: list[int], world: int) -> str:
    names = ", ".join("?" if r < 0 else str(r) for r in ranks)
    return f"rank{'s' if len(ranks) > 1 else ''} {names} of {world}"


def _death(what: str) -> str:
    return (f"a DDP training process died: {what} (killed, or crashed in native code); see the worker log, and if "
            "the machine ran out of memory, lower training.batch_size or training.max_length")


# ── a rank, in a torchrun worker ─────────────────────────────────────────────────────────────────────────
def main(argv: list[str] | None = None) -> int:
    """``python -m worker.ddp TICKET`` as a torchrun worker (RANK, WORLD_SIZE, LOCAL_RANK in the environment)."""
    args = sys.argv[1:] if argv is None else argv
    ticket: Ticket = pickle.loads(Path(args[0]).read_bytes())  # written by our own launcher, in a 0700 folder
    rank = int(os.environ["RANK"])
    conn = _connect(ticket.socket)
    _send(conn, ("hello", rank, os.getpid()))
    report = (lambda p: _send(conn, ("progress", p))) if rank == 0 else (lambda p: None)
    try:
        _send(conn, ("done", _train_rank(ticket.request, report, _stop_check(conn))))  # None on ranks but 0
        return 0
    except Rejected as e:
        _send(conn, ("rejected", e.field, e.problem))
    except Cancelled:
        _send(conn, ("cancelled",))
    except BaseException as e:  # the launcher decides; the exit code makes torchrun end the other ranks
        from worker.horse import _describe

        _send(conn, ("failed", _describe(e), traceback.format_exc()))
        return 1
    finally:
        conn.close()
    return 0


def _connect(path: str) -> Connection:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return Connection(sock.detach())


def _send(conn: Connection, msg: Any) -> None:
    with contextlib.suppress(OSError):
        conn.send(msg)


def _stop_check(conn: Connection) -> Callable[[], bool]:
    """``should_stop`` for a rank: "stop" from the launcher (only rank 0 gets one); a closed socket means the
    horse child is gone, and the rank exits as the horse child does when the daemon is gone."""
    stop = False

    def should_stop() -> bool:
        nonlocal stop
        try:
            while not stop and conn.poll():
                stop = conn.recv() == "stop"
        except (EOFError, OSError):
            raise SystemExit(3) from None
        return stop

    return should_stop


def _train_rank(req: TrainRequest, report: Callable[[Progress], None],
                should_stop: Callable[[], bool]) -> TrainOutcome | None:
    """Join the process group (nccl on cuda, one GPU per local rank; gloo on CPU) and train this rank's share."""
    import torch
    import torch.distributed as dist

    from worker.loop import Dist
    from worker.train import check_inputs, train_checked

    check_inputs(req)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if req.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if req.device == "cuda" else "gloo")
    outcome = train_checked(req, report, should_stop, Dist(world, rank))
    dist.destroy_process_group()  # only after a clean end: after an error a peer may be gone, and this could hang
    return outcome


if __name__ == "__main__":
    sys.exit(main())
