"""Giving a stale worker's jobs back: rq's expiry plus cleanup, done by whoever notices first.

Every process that watches heartbeats (workers, a waiting submitter) runs ``reap``. It acts only on workers
that ``Liveness`` has judged stale on the observer's own monotonic clock. Each requeue is one rename, so two
observers reaping the same worker cannot both move a job; the loser's rename finds nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from schemas.heartbeat import WorkerState
from schemas.result import Result, Terminal
from spooler import claim, states
from spooler.clock import Clock, iso
from spooler.errors import ClaimLost
from spooler.heartbeat import Liveness, WorkerView
from spooler.intake import Intake
from spooler.share import Share

log = logging.getLogger(__name__)


class Reaper:
    """``reap`` at most once per heartbeat interval for all the slots of one machine (``worker.slots``): they
    share one view of the other workers, so the share's heartbeats are read once per interval, not once per slot,
    and two slots never race to requeue the same job."""

    def __init__(self, share: Share, clock: Clock) -> None:
        self.share, self.clock = share, clock
        self.liveness = Liveness(share, clock)
        self._lock = threading.Lock()
        self._last = -1e9
        self._swept: set[str] = set()  # dead workers whose committed results were looked for

    def due(self, me: str) -> None:
        """Reap now if no slot has in the last interval; a slot that finds another reaping goes on at once."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            now = self.clock.monotonic()
            if now - self._last < self.share.settings.heartbeat_interval:
                return
            self._last = now
            reap(self.share, self.liveness, me, self.clock, swept=self._swept)
        finally:
            self._lock.release()


def worker_dirs(share: Share, sub: str) -> set[str]:
    try:
        return {e.name for e in os.scandir(share.root / sub) if e.is_dir()}
    except FileNotFoundError:
        return set()


def reap(share: Share, liveness: Liveness, me: str, clock: Clock, adopt: bool = True,
         swept: set[str] | None = None) -> dict[str, WorkerView]:
    """Requeue (or fail, past max_attempts) the jobs of stale workers; a worker (``adopt``) also takes over
    their half-done intake. Submitters and cancel do not: their own intake folder has no heartbeat.
    With ``swept`` (a worker's), a worker found dead has the result of its last job finished if it died writing it."""
    views = liveness.observe(worker_dirs(share, "running") | worker_dirs(share, "intake"))
    for wid, first in views.items():
        if wid == me or not first.stale:
            continue
        held = claim.held(share, wid)
        # Judged again after the listing: the pass may have spent seconds on other workers since the first look,
        # and a worker restarted meanwhile claims under its old name. A worker beats before it claims, so jobs
        # listed before a look that still finds it dead were claimed by the life that ended.
        view = liveness.observe({wid}).get(wid, first)
        if not view.stale:
            log.info("worker %s is alive again (%s before); its jobs stay [worker %s]", wid, first.reason, me)
            continue
        for path in held:
            release(share, path, me, clock, view.reason, count_attempt=True)
        if adopt:
            _adopt_intake(share, wid, me, clock)
        hb = view.heartbeat
        if swept is not None and hb is not None and hb.job and hb.state is not WorkerState.stopped:
            # It may have died concluding the job its last heartbeat names: one folder looked at, once per life.
            life = f"{wid}@{hb.host}:{hb.pid}:{hb.job}"
            if life not in swept:
                swept.add(life)
                _finish_one(share, hb.job, me)
    return views


def finish_conclusions(share: Share, me: str) -> None:
    """Finish every result whose concluder died between the commit and the final rename (``states.conclude``):
    a worker's start-up pass over results/. A worker found dead has its last job looked at (``reap``)."""
    for folder in share.results.glob("*"):
        if any(folder.glob(f".result.*{states.PENDING_SUFFIX}")):
            _finish_one(share, folder.name, me)


def _finish_one(share: Share, job_id: str, me: str) -> None:
    try:
        if not (share.result_dir(job_id) / "result.json").exists() and states.complete_pending(share, job_id):
            log.warning("job %s: its result, committed by a worker that stopped before writing it, is written "
                        "[worker %s]", job_id, me)
    except Exception as e:  # an odd folder must not stop the rest, nor a worker's start; the next look tries again
        log.warning("results of %s not finished: %s: %s [worker %s]", job_id, type(e).__name__, e, me)


def release(share: Share, running_file: Path, me: str, clock: Clock, why: str, count_attempt: bool) -> None:
    """Give a running job back to the queue, or fail it once it has used up its attempts."""
    key = states.QueueKey.parse(running_file.name)
    if key is None:
        return
    owner = running_file.parent.name
    nxt = key.attempt + 1 if count_attempt else key.attempt
    if nxt <= share.settings.max_attempts:
        if states.requeue(share, running_file, nxt):
            log.warning("job %s requeued for attempt %d: worker %s: %s [worker %s]",
                        key.job_id, nxt, owner, why, me)
        return
    error = (f"worker {owner} stopped during attempt {key.attempt} of {share.settings.max_attempts} ({why}); "
             "no attempts are left: check that worker's log, then submit the job again under a new id")
    now = iso(clock.wall())
    result = Result(id=key.job_id, status=Terminal.failed, error=error, worker=owner, attempts=key.attempt,
                    finished_at=now)
    try:
        states.conclude(share, running_file, result, by=me)
        log.error("job %s failed: %s [worker %s]", key.job_id, error, me)
    except ClaimLost:
        pass  # another observer got there first


def _adopt_intake(share: Share, dead: str, me: str, clock: Clock) -> None:
    try:
        files = [Path(e.path) for e in os.scandir(share.intake(dead)) if not e.name.startswith(".")]
    except FileNotFoundError:
        return
    intake = Intake(share, me, clock)
    for path in files:
        dest = share.makedirs(share.intake(me)) / path.name  # keep the token: the id reservation knows it
        try:
            os.rename(path, dest)
            intake.process(dest)
        except Exception as e:  # one bad file must not stop the reaping of the rest
            log.warning("intake file %s of worker %s not taken over: %s: %s [worker %s]", path.name, dead,
                        type(e).__name__, e, me)
