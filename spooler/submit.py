"""``loraspool submit``: validate, drop into the inbox by temp name plus rename, and optionally wait.

With ``--fallback auto``, when no worker's heartbeat is fresh, the submitter runs a local CPU worker that
claims the job like any other worker (the result says ``fallback: true``). While waiting it also watches
heartbeats: if the worker running the job goes stale, it requeues the job and falls back itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from schemas.heartbeat import Progress, WorkerState
from schemas.job import JobSpec
from schemas.result import Result, Terminal
from spooler import atomic, claim, states
from spooler.clock import Clock
from spooler.errors import Rejected
from spooler.heartbeat import Liveness, WorkerView, snapshot, watch_briefly
from spooler.jobfile import parse_spec
from spooler.paths import resolve_in_share
from spooler.reaper import reap
from spooler.share import Share, read_model

log = logging.getLogger(__name__)


# What a network file system says while its server or session is away (and a bare mount point says ENOENT,
# which Share.reachable tells apart).
OUTAGE_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOTCONN", "EIO", "ESTALE", "ETIMEDOUT", "ECONNABORTED", "ECONNRESET", "EHOSTDOWN", "EHOSTUNREACH", "ENETDOWN",
    "ENETUNREACH", "EREMOTEIO") if hasattr(errno, name))


class SubmitError(Exception):
    """The job was not submitted; the message says why and what to do."""


def drop(share: Share, job_file: Path, check_inputs: bool = True) -> str:
    """Validate ``job_file`` and place its bytes, unchanged, in the inbox. Returns the job id."""
    data = job_file.read_bytes()
    spec = parse_spec(data, job_file.name, share.settings.max_job_bytes)
    assert spec.id is not None
    if check_inputs and (problems := input_problems(share, spec)):
        # --no-check is for inputs on their way (a copy, a queued job that makes them), not for refused ones: the
        # worker rejects those all the same, and the id is used up (walkthrough).
        raise SubmitError(f"{'; '.join(p.text for p in problems)}. Nothing was submitted, so the id {spec.id!r} is "
                          "still free; fix the job or its inputs" +
                          (", or pass --no-check if an input is still being copied to the share or a queued job "
                           "makes it" if any(p.missing for p in problems) else ""))
    if share.result_dir(spec.id).exists() and not states.unfinished_reservation(share.result_dir(spec.id)):
        raise SubmitError(f"id {spec.id!r} is already used (results/{spec.id}/ exists); ids are never reused, "
                          "so set a new \"id\" in the job file")
    if share.cancel_file(spec.id).exists():  # the worker would cancel it before it starts
        raise SubmitError(f"a cancel request for id {spec.id!r} waits in cancel/{spec.id}.json (a `loraspool cancel "
                          f"{spec.id}` before the job arrived), so this job would be cancelled before it starts; if "
                          f"that request was a mistake delete cancel/{spec.id}.json, else set a new \"id\"")
    dest = share.inbox / f"{spec.id}.json"
    if dest.exists():
        raise SubmitError(f"inbox/{dest.name} is already waiting to be taken; set a new \"id\" in the job file")
    tmp = atomic.tmp_name(dest)  # a dot name ending .tmp: workers skip it until the rename
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with contextlib.suppress(OSError):
        os.chmod(tmp, share.file_mode)
    if not atomic.place_new(tmp, dest):  # a second submit of this id, at this very moment, got there first
        tmp.unlink()
        raise SubmitError(f"inbox/{dest.name} is already waiting to be taken; set a new \"id\" in the job file")
    atomic.fsync_dir(share.inbox)
    return spec.id


class InputProblem(NamedTuple):
    text: str
    missing: bool  # a copy still under way, or a queued job that makes it, would explain it


def input_problems(share: Share, spec: JobSpec) -> list[InputProblem]:
    """The worker would reject the job, burning its id, if its base model or dataset is not on the share, or is
    one the worker refuses (pickle weights, an empty dataset): say so now. Judged as this machine sees the share,
    with the worker's own path rules and its own pure-Python checks (``worker.modelguard`` imports no torch)."""
    from worker.modelguard import check_dataset_file, check_model_dir

    wanted = [("base_model", spec.base_model, "config.json")] if spec.base_model else []
    wanted += [("dataset", d, None) for d in spec.dataset_files()]
    problems = []
    for field, value, inside in wanted:
        try:
            path = resolve_in_share(share.root, value, field)
        except Rejected as e:
            # on its way, perhaps; a path out of the share is not
            problems.append(InputProblem(str(e), missing=not os.path.lexists(share.root / value)))
            continue
        if inside and not (path / inside).is_file():
            problems.append(InputProblem(f"{field}: {value!r} has no {inside}; point it at the model folder "
                                         "save_pretrained wrote", missing=True))
        elif not inside and not path.is_file():
            problems.append(InputProblem(f"{field}: {value!r} is not a file; name a JSONL file", missing=True))
        else:
            try:
                check_model_dir(path, share.root) if inside else check_dataset_file(path)
            except Rejected as e:
                problems.append(InputProblem(f"{field}: {value!r}: {e.problem}", missing=False))
    problems += [InputProblem(text, missing=True) for text in _unregistered(share, [("parent", spec.parent)] + [
        ("merge.adapters", ref) for ref in (spec.merge.adapters if spec.merge else [])])]
    return problems


def _unregistered(share: Share, refs: list[tuple[str, str | None]]) -> list[str]:
    """Adapter versions a job names (NAME/vN) that the registry does not hold."""
    from schemas.job import ref_problem
    from spooler import registry

    out = []
    for field, ref in refs:
        if ref and ref_problem(ref) is None and registry.read_manifest(share, registry.Ref.parse(ref)) is None:
            out.append(f"{field}: {ref!r} is not registered on this share (loraspool adapters lists what is)")
    return out


def find_result(share: Share, job_id: str) -> Result | None:
    """The job's result, including a rejection filed under a fallback id (see share-layout.md)."""
    result = read_model(share.result_dir(job_id) / "result.json", Result)
    if result is not None:
        return result
    for path in share.results.glob(f"rejected-{job_id}-*/result.json"):
        rejected = read_model(path, Result)
        if rejected is not None and rejected.source_file == f"{job_id}.json":
            return rejected
    return None


def live_workers(share: Share, clock: Clock) -> list[WorkerView]:
    """Workers live right now, by one look at file times and, where that rests on clocks agreeing, a brief
    watch of their seq (about one heartbeat interval, far shorter than stale_after)."""
    views = watch_briefly(share, clock, snapshot(share, clock), limit=share.settings.stale_after / 2)
    return [v for v in views.values() if not v.stale and not (v.heartbeat and v.heartbeat.fallback)]


def fallback_command(share: Share, job_id: str) -> list[str]:
    worker_id = f"{socket.gethostname().split('.')[0][:40]}-fallback-{os.getpid()}"
    worker_id = "".join(c if c.isalnum() or c in "._-" else "-" for c in worker_id).strip("-._")
    return [sys.executable, "-m", "spooler.cli", "worker", "--share", str(share.root), "--device", "cpu",
            "--id", worker_id, "--only", job_id, "--fallback"]


class Waiter:
    """Waits for one job's result, reaping stale workers and starting the fallback when none is live."""

    def __init__(self, share: Share, job_id: str, clock: Clock, fallback: bool) -> None:
        self.share, self.job_id, self.clock, self.fallback = share, job_id, clock, fallback
        self.me = f"submit-{socket.gethostname().split('.')[0]}-{os.getpid()}"
        self.committed_seen: float | None = None  # when this waiter first saw job.json without a result
        self.liveness = Liveness(share, clock)
        self.proc: subprocess.Popen | None = None
        self.said_no_worker = False  # told the person that no worker is live (--fallback never)
        self.said_paused = False  # told the person that every live worker is in its quiet hours
        self.unreachable_since: float | None = None  # our monotonic time when the share stopped answering

    def start_fallback(self, why: str) -> None:
        if self.proc is None:
            log.warning("job %s: %s; running it on a local CPU worker", self.job_id, why)
            self.proc = subprocess.Popen(fallback_command(self.share, self.job_id))

    def updates(self, poll: float = 0.5) -> Iterator[tuple[str, Progress | None, Result | None]]:
        """Yields (state line, progress, result) until the result exists; the last item has the result."""
        try:
            with contextlib.suppress(OSError):  # the share just took the job; if it stops answering, _look says so
                if self.fallback and not live_workers(self.share, self.clock) and self.share.reachable():
                    self.start_fallback("no worker's heartbeat is fresh")
            while True:
                try:
                    update = self._look()
                except OSError as e:  # ENOTCONN, EIO...: the job goes on wherever it runs, so the wait does too
                    if e.errno not in OUTAGE_ERRNOS and self.share.reachable():
                        raise  # a folder of the share is not what it should be: waiting would not change that
                    update = (self._unreachable(e), None, None)
                else:
                    self._reachable()
                yield update
                if update[2] is not None:
                    return
                self.clock.sleep(poll)
        finally:
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=30)

    def _finish_committed(self) -> Result | None:
        """The job is committed (its job.json is in results/) and has had no result.json for stale_after on this
        waiter's clock: its worker stopped between the two. The live workers finish that when they find it dead;
        this waiter need not wait for them, or for none to come. Safe beside a concluder still at work (both finish
        one step with one pending file); a waiter that may not write there just goes on waiting."""
        if not (self.share.result_dir(self.job_id) / "job.json").exists():
            return None
        now = self.clock.monotonic()
        self.committed_seen = self.committed_seen if self.committed_seen is not None else now
        if now - self.committed_seen < self.share.settings.stale_after:
            return None
        with contextlib.suppress(OSError):
            if states.complete_pending(self.share, self.job_id):
                return find_result(self.share, self.job_id)
        return None

    def _look(self) -> tuple[str, Progress | None, Result | None]:
        """One round: the result if it exists, else reap, fall back if no worker is live, and say where the job is."""
        if not self.share.reachable():  # a dropped mount shows an empty spool: no worker, no job, no result
            raise _unmounted(self.share)
        result = find_result(self.share, self.job_id) or self._finish_committed()
        if result is not None:
            return "done", None, result
        views = reap(self.share, self.liveness, self.me, self.clock, adopt=False)
        if not self._any_live(views) and not self.share.reachable():
            raise _unmounted(self.share)  # it dropped while we looked: an empty view is no reason for a fallback
        if self.fallback and self.proc is None and not self._any_live(views):
            self.start_fallback("every worker's heartbeat went stale")
        elif not self.fallback and not self.said_no_worker and not self._any_live(views):
            self.said_no_worker = True
            log.warning("job %s: no worker's heartbeat is fresh, so it waits in the spool until a worker "
                        "starts (--fallback auto would run it on this machine's CPU)", self.job_id)
        self._say_if_all_paused(views)
        if self.proc is not None and self.proc.poll() not in (None, 0, 1):
            raise SubmitError(f"the local fallback worker exited with code {self.proc.returncode}; "
                              "see its log above")
        return self._state(), read_model(self.share.result_dir(self.job_id) / "progress.json", Progress), None

    def _unreachable(self, e: OSError) -> str:
        """Say once per outage that the share does not answer. No fallback starts meanwhile: heartbeats that
        cannot be read are not stale ones."""
        if self.unreachable_since is None:
            self.unreachable_since = self.clock.monotonic()
            log.warning("job %s: the share does not answer (%s); still waiting. The job goes on wherever it runs; "
                        "check the network drive if this lasts", self.job_id, e)
        return f"the share does not answer ({e.strerror or e})"

    def _reachable(self) -> None:
        if self.unreachable_since is not None:
            log.warning("job %s: the share answers again, after %.0f s", self.job_id,
                        self.clock.monotonic() - self.unreachable_since)
            self.unreachable_since = None

    def _say_if_all_paused(self, views: dict[str, WorkerView]) -> None:
        """Live workers in their quiet hours take no new job: say so once, or the wait looks stuck."""
        live = [v for v in views.values() if not v.stale and v.heartbeat and not v.heartbeat.fallback]
        if self.said_paused or not live or any(v.heartbeat.state is not WorkerState.paused for v in live):
            return
        self.said_paused = True
        log.warning("job %s: every live worker (%s) is in its quiet hours and takes no new job; it waits until one "
                    "resumes", self.job_id, ", ".join(sorted(v.id for v in live)))

    def _any_live(self, views: dict[str, WorkerView]) -> bool:
        return any(not v.stale and not (v.heartbeat and v.heartbeat.fallback) for v in views.values())

    def _state(self) -> str:
        for key, _path in claim.queued(self.share):
            if key.job_id == self.job_id:
                return f"queued (attempt {key.attempt})"
        for worker, key, _path in claim.running(self.share):
            if key.job_id == self.job_id:
                return f"running on {worker}"
        return "waiting to be taken from the inbox"


def _unmounted(share: Share) -> OSError:
    """What a look at a dropped mount raises: an empty spool there is an outage, not a fact."""
    return OSError(errno.ENOENT, "no settings file there; is the network drive mounted?", str(share.root))


def wait_for(share: Share, job_id: str, clock: Clock, fallback: bool, show: bool = True) -> Result:
    """Wait with a progress bar on stderr; returns the terminal result."""
    bar = _bar(job_id, show)
    try:
        for state, progress, result in Waiter(share, job_id, clock, fallback).updates():
            if result is not None:  # progress is written at most once a second: the result has the last step
                steps = result.metrics.steps if result.metrics is not None else None
                if steps and result.status is Terminal.succeeded:
                    bar.total = bar.total or steps
                    bar.n = bar.total
                bar.status = result.status.value
                bar.refresh()
                return result
            if progress is not None and progress.total_steps:
                bar.total = progress.total_steps
                bar.n = progress.step
            loss = f" loss {progress.loss:.3f}" if progress and progress.loss is not None else ""
            phase = f" {progress.phase}" if progress else ""
            bar.status = f"{state}{phase}{loss}"
            bar.refresh()
    finally:
        bar.close()
    raise AssertionError("unreachable")


def _bar(job_id: str, show: bool) -> Any:
    """tqdm with a ``{status}`` field: its own ``{postfix}`` always starts with ", "."""
    from tqdm import tqdm

    class Bar(tqdm):
        status = ""

        @property
        def format_dict(self) -> dict[str, Any]:
            return {**super().format_dict, "status": self.status}

    return Bar(total=None, desc=job_id, unit="step", file=sys.stderr, disable=not show, leave=True,
               bar_format="{desc} {n_fmt}/{total_fmt} |{bar:20}| {status}")


def exit_code(result: Result) -> int:
    return 0 if result.status is Terminal.succeeded else (2 if result.status is Terminal.rejected else 1)
