"""The work horse: training runs in a child process, as rq runs a job.

The daemon never imports torch for a job. A CUDA OOM, a segfault in a kernel or a leaked GPU context kills
the child and fails that job; the daemon keeps heartbeating and goes on. Cancel and shutdown send the child a
"stop" message, which the training loop sees at its next step; a child that does not stop in
``STOP_GRACE`` seconds (stuck in a load, say) is terminated, then killed.

A child that reports nothing for ``stall_seconds`` in a phase that reports as it goes (``TICKING``: each 8 MB of
the base copied, each row tokenized, each step, each evaluation batch), or for ``SILENT_FACTOR`` times that in a
phase that does not (loading, saving, verifying, merging), is ended too, and its job fails. Job files
and model folders come from anyone: a chat template can loop for days in one row, and a hung driver never returns
from a step. Either would hold the GPU desktop, and every job queued behind it, for good.

A ``devices: "all"`` job on several GPUs trains in torchrun ranks that this child starts and relays for
(``worker.ddp``): the messages, the "stop" and the result kinds are the same; ranks that end without a word are
reported as "died".
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from typing import Any

from schemas.heartbeat import Progress
from spooler.errors import brief, first_line

log = logging.getLogger(__name__)

STOP_GRACE = 60.0
POLL = 0.5
# The phases that report as they go (worker.train.every_second, data.load_splits, Loop.evaluate and Loop.train):
# only in these is silence a stall. Loading weights, saving, hashing a base for the registry, verifying and
# merging report once and may then run for many minutes on a big model over the network.
TICKING = frozenset({"copying", "preparing", "eval-before", "training", "eval-after"})
# The others get SILENT_FACTOR times as long: long enough for a big base over the network, but not forever (a
# verify job's chat template or an adapter's target_modules regex can loop there too, on anyone's input).
SILENT_FACTOR = 4
# A child whose daemon was killed checkpoints at its next step and ends (``_Link``). One stuck where it never
# looks (a looping template, a hung load) would outlive it for good, holding the GPU: it is ended this long after.
def _orphan_grace() -> float:
    try:
        return float(os.environ.get("LORASPOOL_ORPHAN_GRACE", "600"))
    except ValueError:
        return 600.0


ORPHAN_GRACE = _orphan_grace()


@dataclass
class HorseResult:
    kind: str  # "done" | "rejected" | "cancelled" | "failed" | "died" | "unfit"
    outcome: Any = None  # worker.train.TrainOutcome when kind == "done"
    field: str | None = None
    error: str | None = None
    stop_reason: str | None = None  # what the daemon had asked when it ended ("cancel", "lost", "shutdown")
    killed: bool = False  # "died" by a signal (the OOM killer, a crash in native code), not an exit of its own


def visible_devices(gpus: list[int | str]) -> dict[str, str]:
    """The environment that shows a training process its slot's GPUs. NVML's numbers (``devices``, or every GPU
    dealt out) count in PCI bus order, as nvidia-smi does, so CUDA is told to count the same way, not
    fastest-first. Entries of the CUDA_VISIBLE_DEVICES the worker was started with (strings) are passed on as
    written, and read in the order it was started with."""
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    if all(isinstance(g, int) for g in gpus):
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env


def _child(request: dict[str, Any], conn: Connection) -> None:
    """Runs in the child. Everything it reports goes through ``conn``; it never writes a result itself."""
    gpus = request.pop("gpus", None)
    if gpus is not None:  # this slot's cards only, set before anything can import torch
        os.environ.update(visible_devices(gpus))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C or SIGTERM is the daemon's to handle, then ours
    for name in ("SIGTERM", "SIGHUP"):  # via "stop" (systemd, and a closing terminal, signal the whole group)
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    link = _Link(conn)
    threading.Thread(target=_end_if_orphaned, args=(link,), name="orphan-watch", daemon=True).start()
    from spooler.errors import Cancelled, DeviceUnavailable, Rejected
    from worker.ddp import RankFailed, RanksDied

    try:
        from worker.train import TrainRequest, run_training

        outcome = run_training(TrainRequest(**request), link.report, link.should_stop)
        link.send(("done", outcome))
    except Rejected as e:
        link.send(("rejected", e.field, e.problem))
    except Cancelled:
        link.send(("cancelled",))
    except DeviceUnavailable as e:
        link.send(("unfit", str(e)))
    except RanksDied as e:  # DDP ranks killed or crashed: what "died" means for one process
        link.send(("died", str(e)))
    except RankFailed as e:  # already described by the rank that raised
        link.send(("failed", str(e), e.remote_traceback))
    except BaseException as e:  # the child reports everything; the parent decides
        link.send(_report_of(e, traceback.format_exc()))


def _end_if_orphaned(link: _Link) -> None:
    """In the child: once the daemon is gone, allow ORPHAN_GRACE for the checkpoint at the next step, then exit.
    The parent's sentinel tells on POSIX and on Windows alike (where the parent's pid never changes), and marks
    the link orphaned, so the main thread learns it at its next step without reading the pipe."""
    parent = mp.parent_process()
    if parent is not None:
        mp_connection.wait([parent.sentinel])
    else:
        while not link.gone():
            time.sleep(2.0)
    link.orphaned = True
    time.sleep(ORPHAN_GRACE)
    os._exit(3)


class _Link:
    """The child's end of the pipe to the daemon, and what it means when the daemon is gone (kill -9): its job
    will be requeued elsewhere, so the child stops as for a shutdown, with a checkpoint at the next step, and
    the attempt a reaper starts resumes from there. Outside the steps it ends at once: nothing after training
    (saving, registering a version) may run for a job another worker takes over."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.parent_pid = conn, os.getppid()
        self.stopping = self.orphaned = False

    def gone(self) -> bool:
        # On Windows the ppid stays the dead parent's: a closed pipe (below) says it there.
        self.orphaned = self.orphaned or os.getppid() != self.parent_pid
        return self.orphaned

    def should_stop(self) -> bool:
        try:
            while not self.stopping and self.conn.poll():
                self.stopping = self.conn.recv() == "stop"
        except (EOFError, OSError):
            self.orphaned = True
        self.stopping = self.stopping or self.gone()
        return self.stopping

    def send(self, msg: tuple) -> None:
        try:
            self.conn.send(msg)
        except OSError:  # BrokenPipeError: nobody is listening any more
            self.orphaned = True

    def report(self, progress: Progress) -> None:
        if progress.phase != "training" and self.gone():
            raise SystemExit(3)
        self.send(("progress", progress))


def _report_of(e: BaseException, trace: str) -> tuple:
    """A CUDA error other than out-of-memory (an illegal address, a launch failure, a GPU off the bus) is the
    device's or the driver's, not the job's verdict, and its CUDA context dies with this process: reported as
    a crash, so the attempt counts and the next resumes from its checkpoint; the last fails, naming it."""
    text = str(e)
    # A device-side assert is the job's own (a token id past the embedding, a label out of range): not retried.
    if (type(e).__name__ == "AcceleratorError" or text.startswith("CUDA error")) and \
            "out of memory" not in text.lower() and "device-side assert" not in text:
        return ("died", f"the GPU failed: {brief(e)}", trace)
    return ("failed", _describe(e), trace)


def _describe(e: BaseException) -> str:
    name = type(e).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(e).lower():
        return (f"out of GPU memory ({first_line(e, 200) or name}): lower training.batch_size or "
                "training.max_length, or set quantization to \"4bit\"")
    # A torch error runs to pages (every dispatch key it tried): the result says which, in a line; the whole
    # text and its traceback go to the worker log and the attempt's train.log.
    return f"{brief(e, 500)} (the whole error and its traceback: the attempt's train.log, or the worker log)"


def run(request: dict[str, Any], on_progress: Callable[[Progress], None],
        poll: Callable[[], str | None], stall_seconds: float | None = None) -> HorseResult:
    """Run one training in a child. ``poll`` returns None to go on, or the reason to stop the child."""
    ctx = mp.get_context("spawn")  # fork would copy the daemon's threads and any CUDA state
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(request, child), name="loraspool-horse", daemon=True)
    proc.start()
    child.close()
    stop_sent_at: float | None = None
    stop_reason: str | None = None
    next_poll = heard = time.monotonic()
    phase = "starting"
    try:
        while True:
            msg = _recv(parent)
            if msg == _EOF:  # the child is gone without a last word: killed, or crashed in native code
                proc.join(10)
                code = proc.exitcode
                return HorseResult("died", error=_death(code), stop_reason=stop_reason,
                                   killed=code is not None and code < 0)
            if msg is not None and msg[0] != "progress":
                return _final(msg, stop_reason)
            if msg is not None:
                heard, phase = time.monotonic(), msg[1].phase
                on_progress(msg[1])
            # On the clock, not when the pipe is quiet: a fast child reports every few milliseconds.
            if time.monotonic() < next_poll:
                continue
            next_poll = time.monotonic() + POLL
            limit = (stall_seconds or 0) * (1 if phase in TICKING else SILENT_FACTOR)
            if stop_reason is None and limit and time.monotonic() - heard > limit:
                log.warning("job %s: the training process reported nothing for %gs in phase %s: killing it",
                            _job_id(request), limit, phase)
                proc.kill()  # it is stuck: a "stop" would never be read, and SIGTERM is ignored by design
                proc.join(10)
                return HorseResult("failed", error=_stalled(phase, limit))
            if stop_reason is None and (stop_reason := poll()) is not None:
                log.info("job %s: stopping the training process: %s", _job_id(request), stop_reason)
                _send(parent, "stop")
                stop_sent_at = time.monotonic()
            elif stop_sent_at is not None and time.monotonic() - stop_sent_at > STOP_GRACE:
                log.warning("job %s: the training process ignored stop (%s) for %gs: killing it", _job_id(request),
                            stop_reason, STOP_GRACE)
                _end(proc)
                return HorseResult("cancelled", error=stop_reason)
    finally:
        if proc.is_alive():
            _end(proc)
        parent.close()


_EOF = ("eof",)


def _recv(conn: Connection) -> tuple | None:
    try:
        if conn.poll(POLL):
            return conn.recv()
    except (EOFError, OSError):
        return _EOF
    return None


def _send(conn: Connection, msg: str) -> None:
    with contextlib.suppress(BrokenPipeError, OSError):
        conn.send(msg)


def _final(msg: tuple, stop_reason: str | None) -> HorseResult:
    kind = msg[0]
    if kind == "done":
        return HorseResult("done", outcome=msg[1])
    if kind == "rejected":
        return HorseResult("rejected", field=msg[1], error=msg[2])
    if kind == "cancelled":
        return HorseResult("cancelled", error=stop_reason)
    if kind == "unfit":  # the worker's GPU is gone: the daemon gives the job back and stops
        return HorseResult("unfit", error=msg[1])
    if kind == "died":  # DDP ranks killed or crashed, or a CUDA fault (with its traceback)
        if len(msg) > 2:
            log.error("the training process's GPU failed: %s\n%s", msg[1], msg[2])
        return HorseResult("died", error=msg[1], stop_reason=stop_reason, killed=True)
    log.error("the training process failed: %s\n%s", msg[1], msg[2])
    return HorseResult("failed", error=msg[1])


def _job_id(request: dict[str, Any]) -> str:
    return str(getattr(request.get("job"), "id", None) or "?")


def _stalled(phase: str, seconds: float) -> str:
    return (f"the training process reported no progress for {seconds / 60:g} min (phase {phase!r}) and was ended. "
            "A chat template or dataset row that never finishes, or a hung GPU driver, looks like this; if that "
            "phase is honestly so slow (one enormous dataset row, a first compiled step), raise the worker's "
            "stall_minutes")


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = "; if the machine ran out of memory, lower training.batch_size or max_length" if -code == 9 else ""
        return f"the training process was killed by {name}{hint}"
    return f"the training process exited with code {code} without reporting a result; see the worker log"


def _end(proc: mp.process.BaseProcess) -> None:
    proc.terminate()
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
