"""From inbox to queue: settle, grab, validate, reserve the id, enqueue or reject.

A copy arrives in pieces. A file that parses as a whole job is complete (a JSON object cannot be cut short
and still parse) and is taken at once. A file that does not parse may still be arriving: it is rejected only
after its size and mtime have stayed the same for ``settle_seconds`` on this process's monotonic clock.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from schemas.result import Result, Terminal
from spooler import states
from spooler.clock import Clock, iso
from spooler.errors import Rejected
from spooler.jobfile import CutShort, looks_temporary, parse_spec, read_limited
from spooler.share import Share

log = logging.getLogger(__name__)

# A file whose JSON stops early (or runs into NUL bytes) is rejected only after it stayed unchanged this many times
# settle_seconds: a copy over a slow link can pause for longer than a settle, and one rejected mid-copy had its
# rest written into the rejected record, a whole and valid job marked rejected.
CUT_SHORT_SETTLE = 10


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float


@dataclass
class Intake:
    share: Share
    worker: str
    clock: Clock
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _failed: set[str] = field(default_factory=set)

    def scan(self, limit: int | None = None) -> int:
        """Take settled inbox files, at most ``limit`` of them, so a worker with a long inbox still claims work
        and hears a stop request between batches. Returns how many were taken (queued or rejected)."""
        taken = self._resume_own()
        try:
            entries = list(os.scandir(self.share.inbox))
        except FileNotFoundError:
            return taken
        names = set()
        for entry in sorted(entries, key=lambda e: e.name):
            if limit is not None and taken >= limit:
                return taken  # keep the settle records of the names not looked at this time
            if looks_temporary(entry.name):
                continue
            if not entry.is_file(follow_symlinks=False):  # never followed, never moved: say why it stays
                if entry.name.endswith(".json"):
                    self._once(entry.name, f"inbox/{entry.name} is {_not_a_file(entry)}, not a job file; it stays "
                                           "where it is, untaken: copy the job file itself into the inbox")
                continue
            names.add(entry.name)
            try:
                if self._ready(Path(entry.path)):
                    taken += self.take(Path(entry.path)) is not None
            except Exception as e:  # one odd file (a 250-byte name, say) must not block the files after it
                where = ("it stays in the inbox (rename it?)" if os.path.lexists(entry.path) else
                         f"it waits in intake/{self.worker}/ and is taken again at the next scan")
                self._once(entry.name, f"inbox/{entry.name} not taken: {type(e).__name__}: {e}; {where}")
        self._seen = {k: v for k, v in self._seen.items() if k in names}
        return taken

    def _resume_own(self) -> int:
        """Finish files this worker grabbed but did not see to queued or rejected (the share failed between the
        steps, or the reaper handed us a dead worker's): each scan tries again, as a restart would."""
        try:
            grabbed = sorted(e.name for e in os.scandir(self.share.intake(self.worker))
                             if states.TOKEN_SEP in e.name and not e.name.startswith("."))
        except FileNotFoundError:
            return 0
        taken = 0
        for name in grabbed:
            try:
                self.process(self.share.intake(self.worker) / name)
                taken += 1
            except Exception as e:  # the share is still failing: the next scan tries again
                self._once(name, f"intake/{self.worker}/{name} not finished: {type(e).__name__}: {e}; "
                                 "tried again at the next scan")
        return taken

    def _once(self, name: str, message: str) -> None:
        """A warning once per file, not once per scan."""
        if name not in self._failed:
            log.warning("%s [worker %s]", message, self.worker)
        self._failed.add(name)

    def _ready(self, path: Path) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        limit, settle = self.share.settings.max_job_bytes, self.share.settings.settle_seconds
        if st.st_size <= limit:
            try:
                parse_spec(path.read_bytes(), path.name, limit)
                return True
            except OSError:
                return False
            except CutShort:
                settle *= CUT_SHORT_SETTLE
            except Rejected as e:
                if e.field != "file":
                    return True  # it parsed whole, so it is complete; its content is what is wrong
        now = self.clock.monotonic()
        seen = self._seen.get(path.name)
        if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self._seen[path.name] = _Seen(st.st_size, st.st_mtime_ns, now)
            return False
        return now - seen.since >= settle

    def take(self, inbox_file: Path) -> str | None:
        """Grab one inbox file and see it to queued or rejected. Returns the job id, or None if lost."""
        grabbed = states.grab(self.share, inbox_file, self.worker)
        if grabbed is None:
            return None
        return self.process(grabbed)

    def process(self, grabbed: Path) -> str:
        """Validate a grabbed file. Also how a crashed grab is resumed, by this worker or its reaper."""
        source = states.source_name(grabbed)
        limit = self.share.settings.max_job_bytes
        try:
            data = read_limited(grabbed, limit)
            spec = parse_spec(data, source, limit)
        except Rejected as e:
            return self._reject(grabbed, _fallback_id(source, grabbed), e)
        assert spec.id is not None
        if not states.reserve(self.share, spec.id, grabbed, self.worker):
            why = Rejected("id", f"{spec.id!r} is already used by another job (results/{spec.id}/ exists); "
                                 "ids are never reused, so give this job a new id and drop it again")
            return self._reject(grabbed, _fallback_id(source, grabbed), why)
        key = states.QueueKey(spec.priority, _stamp(self.clock.wall()), spec.id, 1)
        states.enqueue(self.share, grabbed, key)
        log.info("job %s queued from inbox/%s [worker %s]", spec.id, source, self.worker)
        return spec.id

    def _reject(self, grabbed: Path, job_id: str, why: Rejected) -> str:
        if not states.reserve(self.share, job_id, grabbed, self.worker):
            job_id = f"{job_id}-{os.urandom(3).hex()}"
            states.reserve(self.share, job_id, grabbed, self.worker)
        now = iso(self.clock.wall())
        result = Result(id=job_id, status=Terminal.rejected, error=str(why), worker=self.worker,
                        started_at=now, finished_at=now, source_file=states.source_name(grabbed))
        states.conclude(self.share, grabbed, result, by=self.worker)
        log.warning("job %s rejected: %s [worker %s]", job_id, why, self.worker)
        return job_id


def _fallback_id(source: str, grabbed: Path) -> str:
    """An id for a record whose own id is unusable: readable, safe, and unique by the grab token."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(source).stem).strip("._-")[:40] or "job"
    token = grabbed.name.split(states.TOKEN_SEP, 1)[0][:8]
    return f"rejected-{stem}-{token}"


def _stamp(wall: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(wall)) + f"{int(wall * 1000) % 1000:03d}"


def _not_a_file(entry: os.DirEntry) -> str:
    if entry.is_symlink():
        return "a symbolic link"
    return "a folder" if entry.is_dir(follow_symlinks=False) else "not a regular file (a FIFO, socket or device)"
