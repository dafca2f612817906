"""The worker daemon: ``Worker.work`` reads top to bottom like rq's.

    bootstrap   recover what this worker id held before a crash, start the heartbeat and the watcher
    loop        maintenance (reap stale workers) → stop requested? → intake → claim → perform
    teardown    release a held job, final heartbeat "stopped"

Broad exceptions are caught only at the loop boundary, with the job id in the log: no input can crash it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from schemas.heartbeat import Heartbeat, Progress, WorkerState
from schemas.result import AdapterInfo, Metrics, Result, Terminal
from spooler import atomic, cancel, claim, states
from spooler.clock import Clock, SystemClock, iso
from spooler.config import WorkerSettings, in_quiet_hours, model_allowed
from spooler.errors import ClaimLost, Rejected
from spooler.heartbeat import HeartbeatWriter
from spooler.intake import Intake
from spooler.jobfile import parse_spec
from spooler.paths import resolve_in_share
from spooler.reaper import Reaper, finish_conclusions, release
from spooler.share import Share, read_model
from spooler.submit import find_result
from spooler.watch import FolderWatcher
from worker import childenv, horse, scratch
from worker.adapter_jobs import AdapterJobOutcome
from worker.outbox import Outbox
from worker.sysinfo import SystemSampler

log = logging.getLogger(__name__)

PROGRESS_EVERY = 1.0
SWEEP_EVERY = 600.0  # seconds between looks for scratch folders a killed training child left (worker/scratch.py)
TAKE_PER_LOOP = 4  # inbox files accepted between two claims: each costs up to 2 x confirm_seconds


class WorkerError(Exception):
    """The worker cannot start; the message says what to change."""


class Worker:
    def __init__(self, share: Share, cfg: WorkerSettings, clock: Clock | None = None,
                 gpus: list[int | str] | None = None, watcher: FolderWatcher | None = None,
                 reaper: Reaper | None = None) -> None:
        self.share, self.cfg, self.id = share, cfg, cfg.id
        self.gpus = gpus  # this slot's GPUs (worker.slots); None: whatever the machine shows
        self.clock = clock or SystemClock()
        self.sampler = SystemSampler(share.settings.heartbeat_interval)
        self.device = self._pick_device(cfg.device)
        if childenv.prepare(self.device):  # once, before this worker starts a thread: see worker.childenv
            log.info("worker %s: CPU training processes start with %s=%s", self.id, childenv.TUNABLES,
                     os.environ[childenv.TUNABLES])
        self.hb = HeartbeatWriter(share, self.id, self.device, self.clock, cfg.fallback, self.sampler,
                                  local=None if cfg.fallback else cfg.cache_dir / f"heartbeat-{cfg.id}.json")
        self.reaper = reaper or Reaper(share, self.clock)  # shared by the slots of one machine (worker.slots)
        self.intake = Intake(share, self.id, self.clock)
        self.stopping = threading.Event()
        self._last_progress_write = -1e9
        self._missing_since: float | None = None
        self._last_phase = ""
        self._last_trouble = ""
        self._was_quiet = False
        self._start_trouble = ""
        self._progress_failing = False
        self.outbox = Outbox(cfg.cache_dir / "outbox" / cfg.id)
        self.watcher = watcher  # shared by the slots of one machine (worker.slots), or made in bootstrap
        self._owns_watcher = watcher is None
        self.wake: threading.Event | None = None
        self.unfit = False  # its device failed under it: it stopped taking jobs
        self._next_sweep = 0.0  # on the monotonic clock: the first pass sweeps
        self._next_busy_take = 0.0  # on the monotonic clock: when a job in hand next lets the inbox be looked at
        self._interrupted: set[str] = set()  # running files whose start a share outage cut short

    # ── lifecycle ───────────────────────────────────────────────────────────────────────────────────
    def work(self) -> int:
        """Run until asked to stop (or, with ``only_job``, until that job has a result). Returns an exit code."""
        self.bootstrap()
        try:
            while not self.stopping.is_set():
                self.maintenance()
                if self.cfg.only_job and self._only_job_done():
                    break
                try:
                    busy_inbox = self.intake.scan(limit=TAKE_PER_LOOP) >= TAKE_PER_LOOP
                except Exception as e:  # the loop boundary
                    self._trouble(e)
                    busy_inbox = False
                try:
                    job = self._next_job()
                    if self._last_trouble:
                        log.info("worker %s is taking jobs again", self.id)
                        self._last_trouble = ""
                except Exception as e:  # the loop boundary: a share hiccup or a bug must not stop the worker
                    self._trouble(e)
                    job = None
                if job is not None:
                    try:
                        self.perform(job)
                    except Exception as e:  # the loop boundary: no job may stop the worker, nor spin it
                        self._give_up_on(job, e)
                    continue
                if busy_inbox:
                    continue
                if not self.stopping.is_set():  # "stopping" stays until the last heartbeat
                    self.hb.state = WorkerState.paused if self._was_quiet else WorkerState.idle
                assert self.watcher is not None and self.wake is not None
                self.watcher.wait(self.wake, min(self.share.settings.rescan_interval,
                                                 self.share.settings.heartbeat_interval))
        finally:
            self.teardown()
        return self._exit_code()

    def _guarded(self, path: Path, step: Callable[[Path], object]) -> None:
        """One recovery step at start-up; a failure is logged and leaves the file where it is."""
        try:
            step(path)
        except Exception as e:
            log.warning("recovery of %s skipped: %s: %s [worker %s]", path, type(e).__name__, e, self.id)

    def _give_up_on(self, job: Path, e: Exception) -> None:
        """What a restart would do after a crash in ``perform``: the job back to the queue with its attempt
        counted, so a job that always crashes ends failed after max_attempts instead of running forever."""
        log.error("job %s crashed the worker's job handling: %s: %s; releasing it [worker %s]", job.name,
                  type(e).__name__, e, self.id, exc_info=True)
        try:
            release(self.share, job, self.id, self.clock, f"its handling crashed ({type(e).__name__})",
                    count_attempt=True)
        except Exception as again:  # the share is away: the job stays held and the next loop tries again
            self._trouble(again)
            self.stopping.wait(self.share.settings.heartbeat_interval)

    def _trouble(self, e: Exception) -> None:
        """Log a loop failure once per kind, not once a second, and let the loop wait before it tries again."""
        kind = f"{type(e).__name__}: {e}"
        if kind != self._last_trouble:
            log.warning("worker %s could not take jobs: %s; retrying (check the share is mounted and writable)",
                        self.id, kind, exc_info=not isinstance(e, OSError))
        self._last_trouble = kind

    def bootstrap(self) -> None:
        for folder in (self.share.running(self.id), self.share.intake(self.id)):
            self.share.makedirs(folder)
        self._refuse_twin()
        self.hb.start()
        log.info("worker %s started on %s: device %s, share %s", self.id, socket.gethostname(), self.device,
                 self.share.root)
        try:
            self._recover()
        except OSError as e:  # the share went away during start-up: the loop waits for it like any outage
            log.warning("start-up recovery stopped: %s: %s; it runs again at the next start [worker %s]",
                        type(e).__name__, e, self.id)
        if self.watcher is None:
            self.watcher = job_watcher(self.share, self.cfg)
            self.watcher.start()
            log.info("worker %s watching with the %s observer", self.id, self.watcher.mode)
        self.wake = self.watcher.subscribe()

    def _recover(self) -> None:
        """Finish what this worker id left when it died: held jobs back to the queue, its intake, and results
        whose concluder died between the commit and the final rename."""
        for path in claim.held(self.share, self.id):  # we died holding these: give them back, attempt + 1
            if self.outbox.kept(path.name) is not None:
                continue  # finished while the share was away: the loop delivers it
            self._guarded(path, lambda p: release(self.share, p, self.id, self.clock, "the worker restarted",
                                                  count_attempt=True))
        for path in sorted(self.share.intake(self.id).glob(f"*{states.TOKEN_SEP}*")):
            self._guarded(path, self.intake.process)
        finish_conclusions(self.share, self.id)

    def _refuse_twin(self) -> None:
        """Two live workers with one id would requeue each other's jobs at start-up. A heartbeat of our id that
        did not say "stopped" is either a crash we are recovering from or a twin: watch its seq briefly."""
        path = self.share.heartbeat_file(self.id)
        before = read_model(path, Heartbeat)
        if before is None or before.state is WorkerState.stopped:
            return
        self.clock.sleep(1.5 * before.interval + 0.5)
        after = read_model(path, Heartbeat)
        if after is not None and after.seq != before.seq:
            raise WorkerError(f"another worker with id {self.id!r} is running on {after.host} (pid {after.pid}); "
                              "start this one with a different --id")

    def teardown(self) -> None:
        if self.watcher is not None and self._owns_watcher:
            self.watcher.stop()
        kept = self._deliver_kept()
        # "stopped" tells observers to requeue our jobs at once. A job whose outcome we still hold must not run
        # again: "stopping" leaves the restart stale_after to deliver it first.
        self.hb.stop(WorkerState.stopping if kept else WorkerState.stopped)
        if self.cfg.fallback and not kept:  # each fallback has its own id: leave no empty folders behind
            for folder in (self.share.running(self.id), self.share.intake(self.id)):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: a job file in it stays for a restart or a reaper
        if kept:
            log.warning("worker %s stopped holding the outcome of job(s) %s in %s: start it again to deliver them; "
                        "after stale_after other workers run them again", self.id, ", ".join(kept),
                        self.outbox.folder)
        log.info("worker %s stopped", self.id)

    def _deliver_kept(self) -> list[str]:
        """One last try at the outcomes kept while the share was away; the ids of those still held."""
        held = []
        self._finish_kept_commits()
        try:
            for path in claim.held(self.share, self.id):
                key, result = states.QueueKey.parse(path.name), self.outbox.kept(path.name)
                if key is not None and result is not None:
                    self.deliver(path, key, result, retry=True)
                    if self.outbox.kept(path.name) is not None:
                        held.append(key.job_id)
        except OSError as e:  # the share is away: what the outbox holds is all we know
            log.warning("kept outcomes not delivered at stop: %s [worker %s]", e, self.id)
            held = [p.name for p in self.outbox.folder.glob("*.result.json")]
        return held

    def request_stop(self, why: str) -> None:
        """The one graceful stop, for SIGTERM, Ctrl-C and a Windows service stop alike: the training child
        checkpoints at its step, the job goes back to the queue, the last heartbeat says "stopped"."""
        log.info("worker %s got %s: finishing the current step, then stopping", self.id, why)
        self.hb.state = WorkerState.stopping  # the heartbeats until the last one ("stopped") say so
        self.stopping.set()
        if self.wake is not None:
            self.wake.set()

    def maintenance(self) -> None:
        try:
            self.reaper.due(self.id)
        except Exception as e:  # reaping is housekeeping: it must never stop this worker
            log.warning("could not check other workers' heartbeats: %s: %s [worker %s]", type(e).__name__, e,
                        self.id)
        with contextlib.suppress(OSError):  # the share is away: the next pass files them
            cancel.file_finished(self.share)
        self._finish_kept_commits()
        if self.clock.monotonic() >= self._next_sweep:
            self._next_sweep = self.clock.monotonic() + SWEEP_EVERY
            try:
                scratch.sweep()
            except Exception as e:  # housekeeping: it must never stop this worker
                log.warning("could not look for leftover scratch folders: %s: %s [worker %s]", type(e).__name__, e,
                            self.id)

    def _finish_kept_commits(self) -> None:
        """Outcomes kept locally whose job file has left our running folder for ``results/<id>/job.json``: the
        commit happened, and the share failed after it (a reply lost, then the last rename refused). No held file
        brings such a job back to ``perform``: finish it here, from the pending result the share keeps."""
        for path in sorted(self.outbox.folder.glob("*.result.json")):
            running_name = path.name.removesuffix(".result.json")
            key = states.QueueKey.parse(running_name)
            try:
                if key is None or (self.share.running(self.id) / running_name).exists() or \
                        not (self.share.result_dir(key.job_id) / "job.json").exists():
                    continue
                if states.complete_pending(self.share, key.job_id):
                    self.outbox.delivered(running_name)
                    log.info("job %s: its committed outcome is delivered [worker %s]", key.job_id, self.id)
            except OSError:
                return  # the share is still away: the next pass tries again

    # ── one job ─────────────────────────────────────────────────────────────────────────────────────
    def perform(self, running_file: Path) -> None:
        key = states.QueueKey.parse(running_file.name)
        assert key is not None
        kept = self.outbox.kept(running_file.name)
        if kept is not None:  # it finished while the share was away: deliver it, never run it again
            self.deliver(running_file, key, kept, retry=True)
            return
        self.hb.state, self.hb.job, self.hb.progress = WorkerState.busy, key.job_id, None
        started = self.clock.wall()
        source = states.read_origin(self.share, key.job_id).get("source_file")  # a file anyone could edit
        again = running_file.name in self._interrupted  # held through a share outage: not a second claim
        self._interrupted.discard(running_file.name)
        log.info("job %s %s, attempt %d [worker %s]", key.job_id, "taken up again" if again else "claimed",
                 key.attempt, self.id)
        base = Result(id=key.job_id, status=Terminal.failed, worker=self.id, host=socket.gethostname(),
                      device=self.device, fallback=self.cfg.fallback, attempts=key.attempt,
                      started_at=iso(started), source_file=source if isinstance(source, str) else None)
        try:
            result = self._run(running_file, key, base)
        except ClaimLost as e:
            log.warning("job %s dropped: %s [worker %s]", key.job_id, e, self.id)
            return
        except OSError as e:
            if self.share.reachable():  # a share that answers: the error is this job's; report it, do not loop
                log.exception("job %s failed on a file error [worker %s]", key.job_id, self.id)
                result = base.model_copy(update={"error": f"{type(e).__name__}: {e}; see the worker log"})
                self.deliver(running_file, key, result)
                return
            # the share went away under us: the job stays claimed, and the loop tries it again
            kind = f"{key.job_id}: {type(e).__name__}: {e}"
            if kind != self._start_trouble:  # once, not once a second while the share is away
                log.warning("job %s interrupted by the share: %s: %s; it stays claimed and runs again (from its last "
                            "checkpoint) when the share answers [worker %s]", key.job_id, type(e).__name__, e, self.id)
            self._start_trouble = kind
            self._interrupted.add(running_file.name)
            self.stopping.wait(self.share.settings.heartbeat_interval)
            return
        except Exception as e:  # the loop boundary: a bug in one job must not stop the worker
            log.exception("job %s crashed the worker's job handling [worker %s]", key.job_id, self.id)
            result = base.model_copy(update={"error": f"internal error: {e}; see the worker log"})
        finally:
            self.hb.job, self.hb.progress = None, None
        if result is None:  # released: a graceful stop, or another attempt after the child died
            return
        result.finished_at = iso(self.clock.wall())
        if result.status is Terminal.rejected:  # unlike a rejection at intake, this one has the job's own id
            result.error = f"{result.error}; the id {key.job_id!r} is used now: drop the fixed job under a new id"
        self.deliver(running_file, key, result)

    def deliver(self, running_file: Path, key: states.QueueKey, result: Result, retry: bool = False) -> None:
        """Write the outcome to the share. If the share is away, keep it locally: the job stays in our
        running folder, and the loop delivers it from there when the share answers again. The heartbeat names
        the job meanwhile: a worker found dead has the result of its heartbeat's job finished (spooler.reaper)."""
        self.hb.job = key.job_id
        try:
            self._deliver(running_file, key, result, retry)
        finally:
            self.hb.job = None

    def _deliver(self, running_file: Path, key: states.QueueKey, result: Result, retry: bool) -> None:
        try:
            states.conclude(self.share, running_file, result, by=self.id)
        except ClaimLost as e:
            log.warning("job %s outcome dropped: %s [worker %s]", key.job_id, e, self.id)
            self.outbox.delivered(running_file.name)
            return
        except Exception as e:  # the share failed under us
            if not retry and self.outbox.keep(running_file.name, result):  # logged once, not once per try
                log.error("job %s outcome could not be written: %s: %s; kept in %s and delivered when the share "
                          "answers [worker %s]", key.job_id, type(e).__name__, e, self.outbox.folder, self.id)
            self.stopping.wait(self.share.settings.heartbeat_interval)
            return
        self.outbox.delivered(running_file.name)
        self._last_progress(key.job_id, result)
        if retry:
            log.info("job %s: the outcome kept locally is delivered [worker %s]", key.job_id, self.id)
        cancel.file_request(self.share, key.job_id)  # cancelled, or asked for too late: filed with the result
        log.info("job %s %s%s [worker %s]", key.job_id, result.status.value,
                 f": {result.error}" if result.error else "", self.id)

    def _run(self, running_file: Path, key: states.QueueKey, base: Result) -> Result | None:
        unstarted = base.model_copy(update={"status": Terminal.cancelled, "error": "cancelled before it started"})
        cancelled = cancel.requested(self.share, key.job_id)
        try:
            spec = parse_spec(running_file.read_bytes(), f"{key.job_id}.json", self.share.settings.max_job_bytes)
            spec.id = key.job_id
            base.kind = spec.kind.value
            if cancelled:  # after the parse, so that the result says what kind of job was cancelled
                return unstarted.model_copy(update={"kind": base.kind})
            if spec.kind.value == "probe":
                return base.model_copy(update={"status": Terminal.succeeded, "metrics": Metrics(seconds=0.0)})
            model_dir = resolve_in_share(self.share.root, spec.base_model, "base_model") if spec.base_model else None
            datasets = [resolve_in_share(self.share.root, d, "dataset") for d in spec.dataset_files()]
            if model_dir is not None and (problem := model_allowed(self.cfg, self.share.root, model_dir)):
                raise Rejected("base_model", problem)
        except Rejected as e:
            return unstarted if cancelled else base.model_copy(update={"status": Terminal.rejected, "error": str(e)})
        out_dir = states.attempt_dir(self.share, key.job_id, key.attempt, self.id)
        request = {"job": spec, "model_dir": model_dir, "datasets": datasets, "share_root": self.share.root,
                   "out_dir": out_dir, "device": self.device, "file_mode": self.share.file_mode,
                   "cache_dir": self.cfg.cache_dir if self._caches_models() else None, "gpus": self.gpus,
                   "cpu_quantization": self.cfg.cpu_quantization,
                   "gpu_memory_gib": self.cfg.gpu_memory_gib}
        t0 = time.monotonic()
        outcome = horse.run(request, self._on_progress, lambda: self._should_stop(running_file, key.job_id),
                            stall_seconds=60 * self.cfg.stall_minutes or None)
        if outcome.kind in ("failed", "died") and not self.share.reachable():
            # The share went away under the training (its checkpoint or log write failed): not the job's fault.
            # Keep it claimed; it resumes from its last checkpoint when the share is back.
            raise OSError(f"the share went away during the job ({outcome.error})")
        return self._result_of(outcome, base, running_file, time.monotonic() - t0)

    def _result_of(self, out: horse.HorseResult, base: Result, running_file: Path, seconds: float) -> Result | None:
        if out.kind == "done" and isinstance(out.outcome, AdapterJobOutcome):  # verify and merge jobs
            return out.outcome.result(base)
        if out.kind == "done":
            o = out.outcome
            metrics = o.metrics.model_copy(update={"seconds": o.metrics.seconds or seconds})
            adapter = AdapterInfo(path=self.share.rel(self.share.result_dir(base.id) / "adapter"), files=o.files,
                                  size_bytes=o.size_bytes)
            return base.model_copy(update={"status": Terminal.succeeded, "metrics": metrics, "adapter": adapter,
                                           "notes": list(o.notes), "data": o.data, "probes": list(o.probes),
                                           "resumed_from_step": o.resumed_from_step, "registered": o.registered})
        if out.kind == "unfit":
            log.error("worker %s stops: %s. Job %s goes back to the queue for another worker [worker %s]", self.id,
                      out.error, base.id, self.id)
            self.unfit = True
            try:  # the job goes back whatever happens to the mark: a cache folder that refuses it is no job's fault
                self._device_failed_mark().parent.mkdir(parents=True, exist_ok=True)
                atomic.write_json(self._device_failed_mark(), {"at": iso(self.clock.wall()), "error": out.error})
            except OSError as e:
                log.warning("worker %s: the device-failed mark was not written (%s) [worker %s]", self.id, e, self.id)
            self.request_stop("its device failed")
            release(self.share, running_file, self.id, self.clock, f"its device failed: {out.error}",
                    count_attempt=False)
            return None
        if out.kind == "died" and self.stopping.is_set():  # the stop signal reached the child too
            out = horse.HorseResult("cancelled", error="shutdown")
        if out.kind == "died" and out.stop_reason in ("cancel", "lost"):  # it died while it was being stopped
            out = horse.HorseResult("cancelled", error=out.stop_reason)
        if out.kind == "died" and out.killed and base.kind == "train" and self._attempts_left(base):
            # Killed (the kernel's OOM killer, a person) or crashed in native code: not the job's own verdict, and
            # its checkpoints survive. Another attempt resumes from the newest; the last one fails with the cause.
            # A verify or merge job has no checkpoint: run again, it would most likely die the same way.
            release(self.share, running_file, self.id, self.clock, f"{out.error}; the next attempt resumes from its "
                    "newest checkpoint", count_attempt=True)
            return None
        if out.kind == "rejected":
            return base.model_copy(update={"status": Terminal.rejected, "error": f"{out.field}: {out.error}"})
        if out.kind == "cancelled":
            if out.error == "lost":
                raise ClaimLost("another worker took the job over while this one looked dead")
            if out.error == "shutdown":
                release(self.share, running_file, self.id, self.clock, "the worker is shutting down",
                        count_attempt=False)
                return None
            return base.model_copy(update={"status": Terminal.cancelled, "error": "cancelled by a person"})
        if out.kind == "died" and out.killed and base.kind == "train":
            last = f" (attempt {base.attempts} of {self.share.settings.max_attempts}, none left)"
            return base.model_copy(update={"status": Terminal.failed, "error": f"{out.error}{last}"})
        return base.model_copy(update={"status": Terminal.failed, "error": out.error})

    def _attempts_left(self, base: Result) -> bool:
        return (base.attempts or 1) < self.share.settings.max_attempts

    def _should_stop(self, running_file: Path, job_id: str) -> str | None:
        self.maintenance()
        if self.stopping.is_set():
            return "shutdown"
        try:
            if self._claim_gone(running_file):
                return "lost"
            if cancel.requested(self.share, job_id):
                return "cancel"
        except OSError:  # EIO, ENOTCONN...: a share hiccup is no reason to stop hours of training
            pass
        self._take_while_busy()  # last: a stop or cancel is never held up by the inbox (review)
        return None

    def _take_while_busy(self) -> None:
        """Inbox files are checked while a job trains, every rescan_interval: a job file with a typo waited for
        its "rejected" until the job in hand ended, hours on a GPU, and a good one showed "incoming" that long
        (walkthrough). Taking only queues or rejects; claims wait for the loop."""
        now = self.clock.monotonic()
        if now < self._next_busy_take:
            return
        self._next_busy_take = now + self.share.settings.rescan_interval
        try:
            self.intake.scan(limit=TAKE_PER_LOOP)
        except Exception as e:  # the job in hand goes on whatever the inbox holds
            self._trouble(e)

    def _claim_gone(self, running_file: Path) -> bool:
        """True once our running file has been missing for two heartbeat intervals while the share is reachable.
        A share that went away, or a listing cached for a moment, must not kill hours of training."""
        now = self.clock.monotonic()
        if running_file.exists() or not self.share.reachable():
            self._missing_since = None
            return False
        if self._missing_since is None:
            self._missing_since = now
        return now - self._missing_since >= 2 * self.share.settings.heartbeat_interval

    def _on_progress(self, progress: Progress) -> None:
        prev = self.hb.progress
        if prev is not None and prev.job == progress.job and progress.total_steps is None and prev.total_steps:
            # A phase after training (saving, verifying) reports no step: keep the last one, not "step 0".
            kept = ("step", "total_steps", "epoch", "loss", "tokens", "padded_tokens")
            progress = progress.model_copy(update={k: getattr(prev, k) for k in kept})
        self.hb.progress = progress
        now = self.clock.monotonic()
        if now - self._last_progress_write >= PROGRESS_EVERY or progress.phase != self._last_phase:
            self._last_progress_write, self._last_phase = now, progress.phase
            try:
                self.share.write_json(self.share.result_dir(progress.job) / "progress.json", progress)
                self._progress_failing = False
            except OSError as e:
                if not self._progress_failing:  # once per outage, not once a second
                    log.warning("progress of job %s not written: %s [worker %s]", progress.job, e, self.id)
                self._progress_failing = True

    def _last_progress(self, job_id: str, result: Result) -> None:
        """progress.json ends as "finished" with the last step, not as whatever phase last reported (it is
        written at most once a second, and the heartbeat's copy is already cleared)."""
        path = self.share.result_dir(job_id) / "progress.json"
        last = read_model(path, Progress)
        if last is None:  # a probe, or a job that never reported
            return
        steps = result.metrics.steps if result.metrics is not None else None
        update: dict[str, object] = {"phase": "finished", "eta_seconds": None}
        if steps:
            update["step"] = steps
            if result.status is Terminal.succeeded:
                update["total_steps"] = last.total_steps or steps
        with contextlib.suppress(OSError):  # best effort: the result is what counts
            self.share.write_json(path, last.model_copy(update=update))

    # ── helpers ─────────────────────────────────────────────────────────────────────────────────────
    def _device_failed_mark(self) -> Path:
        return self.cfg.cache_dir / f"device-failed-{self.cfg.id}.json"

    def _pick_device(self, wanted: str) -> str:
        """Checked once, at start: a worker that cannot train on its device must not claim jobs. It would fail
        every queued job for good (an id is used once), as after a driver update that broke CUDA. A GPU that
        failed under this worker (the mark) is not silently replaced by the CPU on the restart either: a
        driver update usually takes NVML with it, and "auto" would then see no GPU at all."""
        if wanted == "cpu":
            return "cpu"
        mark = states.read_json_object(self._device_failed_mark()) or None
        if wanted == "auto" and self.sampler.gpu_count() == 0 and mark is None:
            return "cpu"
        import torch  # only when a GPU is asked for, the NVIDIA driver shows one, or one failed here

        if torch.cuda.is_available():
            self._device_failed_mark().unlink(missing_ok=True)  # fixed: our own mark, nobody else's file
            return "cuda"
        if mark is not None:
            raise WorkerError(f"its GPU failed under it at {mark.get('at')} ({mark.get('error')}), and torch still "
                              "sees no CUDA GPU; it takes no job on CPU instead. Fix the GPU (see nvidia-smi), or "
                              "start it with --device cpu if CPU training is meant")
        why = ("this torch is a CPU-only build" if torch.version.cuda is None else
               "the NVIDIA driver is missing, not loaded, or not the one torch needs: see nvidia-smi")
        if wanted == "cuda":
            raise WorkerError(f"device cuda was asked for, but torch sees no CUDA GPU ({why}); fix that, or start the "
                              "worker with --device cpu")
        log.warning("worker %s: the NVIDIA driver shows %d GPU(s), but torch cannot use CUDA (%s): this worker trains "
                    "on its CPU. Fix that, or set device = \"cpu\" to mean it", self.cfg.id, self.sampler.gpu_count(),
                    why)
        return "cpu"

    def _caches_models(self) -> bool:
        """A submitter's one-off fallback run reads the base from the share: a laptop's disk is not a cache."""
        return self.cfg.cache_models and not self.cfg.fallback and not self.cfg.only_job

    def _next_job(self) -> Path | None:
        """In quiet hours only what this worker already holds (an outcome to deliver, a job an outage cut
        short) goes on; nothing new is claimed."""
        if self._quiet():
            return next(iter(claim.held(self.share, self.id)), None)
        return claim.next_job(self.share, self.id, self.cfg.only_job)

    def _quiet(self) -> bool:
        """No new claims in quiet hours (the desktop is someone's by day); intake and heartbeats go on."""
        quiet = bool(self.cfg.quiet_hours) and not self.cfg.only_job and in_quiet_hours(
            self.cfg, datetime.fromtimestamp(self.clock.wall()))
        if quiet != self._was_quiet:
            log.info("worker %s %s", self.id, f"in quiet hours ({self.cfg.quiet_hours}): taking no new jobs"
                     if quiet else "out of quiet hours: taking jobs")
            self._was_quiet = quiet
        return quiet

    def _only_job_done(self) -> bool:
        assert self.cfg.only_job is not None
        return find_result(self.share, self.cfg.only_job) is not None

    def _exit_code(self) -> int:
        if self.unfit:  # not 0: a service manager restarts it, and the start-up check says what is wrong
            return 1
        if not self.cfg.only_job:
            return 0
        result = find_result(self.share, self.cfg.only_job)
        return 0 if result is not None and result.status is Terminal.succeeded else 1


def job_watcher(share: Share, cfg: WorkerSettings) -> FolderWatcher:
    """What a worker watches: new jobs (inbox), accepted ones (queue) and cancel requests."""
    return FolderWatcher([share.inbox, share.queue, share.cancel], cfg.watch, share.settings.poll_interval)


def run_worker(share: Share, cfg: WorkerSettings, clock: Clock | None = None) -> int:
    from worker.slots import Slots

    try:
        slots = Slots(share, cfg, clock)
        install_signal_handlers(slots.request_stop)
        log.debug("pid %d", os.getpid())
        return slots.work()
    except WorkerError as e:
        log.error("worker %s cannot start: %s", cfg.id, e)
        return 2


def install_signal_handlers(request_stop: Callable[[str], None]) -> None:
    """SIGTERM (systemd), Ctrl-C and SIGHUP (the terminal or SSH session of a foreground worker closed) all mean
    the graceful stop; without it a hang-up killed the worker mid-step, and the job lost its attempt. A worker
    started under nohup keeps ignoring SIGHUP. A Windows service is never sent these: its stop calls
    ``request_stop`` itself."""
    asked: list[str] = []

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if asked and signum == signal.SIGINT:  # a person pressed Ctrl-C again: they want out now
            log.warning("second %s: exiting now. The training process, left alone, checkpoints at its next step and "
                        "ends; the job goes back to the queue when this worker (or a reaper) next looks", name)
            os._exit(130)
        asked.append(name)
        request_stop(name)

    signal.signal(signal.SIGINT, handler)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, handler)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, handler)  # not under nohup, which asked for the hang-up to be ignored

