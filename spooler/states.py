"""The job state machine, written down once.

A job's state is the folder its file is in; every transition is one rename of that file (or one exclusive
mkdir, or one atomic write), so the file system is the state machine and a crash leaves each job in exactly
one state. The original bytes a person dropped travel unchanged from ``inbox/`` to ``results/<id>/job.json``.
share-layout.md explains why each step is safe on SMB and NFS.

    inbox/x.json ──grab──▶ intake/<w>/<tok>__x.json ──enqueue──▶ queue/<key>.json ──claim──▶ running/<w>/<key>.json
          │                        │ reject                        │ cancel_queued              │ conclude / requeue
          ▼                        ▼                               ▼                            ▼
    (cancel grabs too)      results/<id>/job.json + result.json (terminal: succeeded|failed|cancelled|rejected)
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from schemas.result import Result, Terminal
from spooler import atomic
from spooler.errors import ClaimLost
from spooler.paths import link_below
from spooler.share import Share

log = logging.getLogger(__name__)


class JobState(str, Enum):
    incoming = "incoming"  # inbox/: dropped by a person, maybe still being copied
    accepting = "accepting"  # intake/<worker>/: grabbed by one process, being validated
    queued = "queued"  # queue/: valid, id reserved, waiting for a worker
    running = "running"  # running/<worker>/: claimed by exactly one worker
    succeeded = Terminal.succeeded.value
    failed = Terminal.failed.value
    cancelled = Terminal.cancelled.value
    rejected = Terminal.rejected.value


# queue/ and running/ names: <1000 - priority>_<accepted, writer's wall clock>_<id>.a<attempt>.json, so that
# sorting the folder gives the dequeue order (higher priority first, then first come) like huey's FileStorage.
# The clock only orders; it decides nothing.
KEY = re.compile(r"^(?P<pri>\d{4})_(?P<stamp>\d{17})_(?P<id>[A-Za-z0-9][A-Za-z0-9._-]*)\.a(?P<attempt>\d+)\.json$")
TOKEN_SEP = "__"
ORIGIN = "origin.json"
_SAFE = re.compile(r"[^A-Za-z0-9_-]")  # a concluder's name in a file name
PENDING_SUFFIX = ".pending"


@dataclass(frozen=True)
class QueueKey:
    priority: int
    stamp: str
    job_id: str
    attempt: int

    @classmethod
    def parse(cls, name: str) -> QueueKey | None:
        m = KEY.match(name)
        if not m:
            return None
        return cls(1000 - int(m["pri"]), m["stamp"], m["id"], int(m["attempt"]))

    @property
    def name(self) -> str:
        return f"{1000 - self.priority:04d}_{self.stamp}_{self.job_id}.a{self.attempt}.json"

    def with_attempt(self, attempt: int) -> QueueKey:
        return QueueKey(self.priority, self.stamp, self.job_id, attempt)


def source_name(intake_file: Path) -> str:
    """The inbox name a grabbed file arrived as."""
    return intake_file.name.split(TOKEN_SEP, 1)[-1]


# ── transitions ───────────────────────────────────────────────────────────────────────────────────────


def grab(share: Share, inbox_file: Path, worker: str) -> Path | None:
    """incoming → accepting. Exactly one process ends up with the file; the others get None.

    The token in the new name makes this grab unique, so the id reservation can tell our own half-finished
    intake (after a crash) from another job that wants the same id.
    """
    dest = share.makedirs(share.intake(worker)) / f"{uuid.uuid4().hex[:12]}{TOKEN_SEP}{inbox_file.name}"
    return _move(share, inbox_file, dest)


def reserve(share: Share, job_id: str, intake_file: Path, worker: str) -> bool:
    """Reserve ``results/<id>/`` (mkdir, origin.json, confirmed): an id is used once, ever. True if it is ours."""
    folder = share.result_dir(job_id)
    try:
        folder.mkdir()
    except FileExistsError:
        # Empty: a reserver died between mkdir and origin.json, or is between them now. A live one writes within
        # moments: still empty after stale_after (on our own clock), it is abandoned, and the id would be lost for
        # good. Two takers left then are settled by the confirmation below, as two mkdirs that both "won".
        for pause in (0.0, share.settings.stale_after):
            time.sleep(pause)
            origin = read_json_object(folder / ORIGIN, strict=True)
            if origin or not unfinished_reservation(folder):
                return origin.get("token") == intake_file.name  # ours: our own grab, resumed after a crash
    with contextlib.suppress(OSError):
        os.chmod(folder, share.dir_mode)
    share.write_json(folder / ORIGIN, {"token": intake_file.name, "source_file": source_name(intake_file),
                                       "accepted_by": worker})
    # rclone's SMB client reports "already exists" as success, so two racing mkdirs can both "win". The last
    # origin.json written is the reservation: look again after a pause, and yield if it is not ours.
    return _confirmed(share, lambda: read_json_object(folder / ORIGIN, strict=True).get("token") == intake_file.name,
                      folder)


def unfinished_reservation(folder: Path) -> bool:
    """A results folder holding nothing but temp leftovers: a reservation nobody finished."""
    return all(e.name.startswith(".") and e.name.endswith(".tmp") for e in os.scandir(folder))


def enqueue(share: Share, intake_file: Path, key: QueueKey) -> Path:
    """accepting → queued."""
    dest = share.queue / key.name
    os.rename(intake_file, dest)
    atomic.fsync_dir(share.queue)
    return dest


def claim(share: Share, queue_file: Path, worker: str) -> Path | None:
    """queued → running. The rename is the source of truth: byte-range locks may be ignored by the share
    (CIFS nobrl, NFS without lockd), but the server puts a file in one folder only.

    What a client is *told* can be wrong both ways. NFS may retransmit a rename whose reply was lost, and the
    retry fails although the first one won. An SMB rename is open-rename-close, so two clients that opened the
    source together can both be told they won, and the file ends in the later one's folder. So the answer is
    whether the file is in our folder after a pause, as the server lists it."""
    return _move(share, queue_file, share.running(worker) / queue_file.name)


def _move(share: Share, src: Path, dest: Path) -> Path | None:
    """One transition by rename, judged by where the server lists the file afterwards (see ``claim``)."""
    with contextlib.suppress(FileNotFoundError):
        os.rename(src, dest)
    atomic.fsync_dir(dest.parent)
    return dest if _confirmed(share, lambda: dest.name in os.listdir(dest.parent), dest.parent) else None


def _confirmed(share: Share, check: Callable[[], bool], folder: Path) -> bool:
    """``check()`` after ``confirm_seconds``. Listing ``folder`` first refreshes an SMB client's view of it.
    A share that cannot answer raises (OSError): not knowing is not a "no". Every caller's file is then where
    its next pass looks again (the intake folder, the running folder, the dead worker's folder)."""
    if share.settings.confirm_seconds:
        time.sleep(share.settings.confirm_seconds)
    os.listdir(folder)
    return check()


def requeue(share: Share, running_file: Path, attempt: int) -> Path | None:
    """running → queued, for another attempt. None if someone else moved it first."""
    key = QueueKey.parse(running_file.name)
    assert key is not None
    return _move(share, running_file, share.queue / key.with_attempt(attempt).name)


def attempt_dir(share: Share, job_id: str, attempt: int, worker: str) -> Path:
    """Where one attempt trains and checkpoints. Its adapter moves to ``results/<id>/adapter`` on success."""
    return share.result_dir(job_id) / "attempts" / f"a{attempt}-{worker}"


# What an attempt leaves for people, moved next to result.json when the job concludes; the adapter only on success.
OUTPUTS = ("adapter", "metrics.jsonl", "loss.png", "train.log")


def conclude(share: Share, src: Path, result: Result, *, by: str) -> None:
    """accepting|queued|running → terminal. Raises ClaimLost if ``src`` is no longer ours.

    Three steps, each atomic: (1) the result is written beside its final name as a pending file; (2) the job
    file is renamed into ``results/<id>/job.json``, which is the commit and fences off a worker that was
    presumed dead while it was only slow; (3) the attempt's outputs (adapter, metrics, loss plot, log) and the
    pending result are renamed into place.
    A crash after (2) leaves a pending file that ``complete_pending`` finishes; it never leaves two results.
    ``by``: the process concluding, named in the pending file: a reaper failing a job for its worker writes the
    same attempt and worker as that worker's own result, and only the concluder tells the two apart.
    """
    folder = share.makedirs(share.result_dir(result.id))
    key = QueueKey.parse(src.name)  # the attempt of the file committed: a queued job cancelled has not run it
    tag = f"a{key.attempt if key else 0}.{_SAFE.sub('_', by)}"
    pending = folder / f".result.{uuid.uuid4().hex[:12]}.{tag}.json{PENDING_SUFFIX}"
    ours = share.write_json(pending, result)
    job_json = folder / "job.json"
    if job_json.exists():  # never overwrite a person's bytes; cannot happen unless ids were reused by hand
        job_json = folder / f"job.{uuid.uuid4().hex[:8]}.json"
    try:
        os.rename(src, job_json)
    except OSError as e:
        # Whatever the error (ENOENT, EIO, a dropped session), the rename may have happened: an error is not a "no".
        try:
            committed = _committed(share, folder, job_json.name, pending, ours)
        except OSError:
            raise e from None  # cannot tell now: the pending file stays, and complete_pending settles it later
        if not committed:
            # Ours to remove only when the job file is seen elsewhere: committed by another concluder, or moved
            # on. A listing cached from before the rename that did happen also says "not committed", and removing
            # the pending file then lost the result for good (audit: the job file in results/, no result, nothing
            # left to run). Kept, it is harmless: complete_pending acts only once job.json is there, and a pending
            # file never outranks a later attempt's, nor its worker's own conclusion, which publishes its own.
            if _seen(share, src, folder, job_json.name):
                with contextlib.suppress(OSError):
                    os.unlink(pending)
            if isinstance(e, FileNotFoundError):
                raise ClaimLost(f"{src.name} was moved away (requeued by another worker?)") from None
            raise
    else:
        # A "yes" is not proof either: as with a claim, a racing rename of the same file (a claim of a job being
        # cancelled, a requeue of one concluding) can be told it won too on SMB, and the file ends in its folder.
        # Cannot tell (OSError): the pending file stays, and complete_pending settles it once job.json is seen.
        if not _confirmed(share, lambda: job_json.name in os.listdir(folder), folder):
            if not _moved_on(share, src):  # a listing cached from before our rename: not knowing is no "no"
                raise OSError(errno.ESTALE, f"cannot tell yet whether the commit of {src.name} took: the share "
                                            "lists neither it nor where a racing rename would have put it")
            with contextlib.suppress(OSError):
                os.unlink(pending)
            raise ClaimLost(f"{src.name} was moved on by a racing rename (claimed or requeued meanwhile)")
    atomic.fsync_dir(folder)
    if not _finalize(share, folder, pending) and _read_bytes(folder / "result.json") not in (ours, None):
        # Another concluder's outcome was published first (a tie two renames were both told they won): the job's
        # result is that one, and this concluder must not report its own as the job's (audit).
        raise ClaimLost(f"{src.name}: another process's outcome was published as the job's result first")


def _moved_on(share: Share, src: Path) -> bool:
    """Whether the job's file is in the queue or a running folder, where a racing claim or requeue puts it. Not
    under a name a cached listing may still show: ``src`` itself (audit), and for a running job its name in the
    queue before its claim (review); a racing requeue gives it a new attempt, so a new name."""
    key = QueueKey.parse(src.name)
    running = src.parent != share.queue
    folders = [share.queue, *(Path(e.path) for e in os.scandir(share.root / "running") if e.is_dir())]
    return key is not None and any(
        (k := QueueKey.parse(n)) is not None and k.job_id == key.job_id and (f / n) != src
        and not (running and n == src.name and f == share.queue) for f in folders for n in os.listdir(f))


def _seen(share: Share, src: Path, folder: Path, job_json: str) -> bool:
    """After a failed commit rename that did not take by the listings: is the job's file positively elsewhere,
    committed by another concluder or moved on? Not "still where it was": a cached listing says that of a rename
    that took as well (review, proven). An error is a "cannot tell"."""
    try:
        return job_json in os.listdir(folder) or _moved_on(share, src)
    except OSError:
        return False


def _committed(share: Share, folder: Path, job_json: str, pending: Path, ours: bytes) -> bool:
    """After ENOENT from the commit: did it happen anyway? NFS retransmits a rename whose reply was lost, and
    the retry fails although the first one won. It did if the job file is in place, no other attempt's result
    is out, and ours is the latest attempt's pending result (the only one that can commit; see
    ``_committed_pending``)."""
    def done() -> bool:
        names = os.listdir(folder)
        if job_json not in names:
            return False
        if pending.name not in names:  # someone's complete_pending finished the job meanwhile: with ours?
            return "result.json" in names and _read_bytes(folder / "result.json") == ours
        if "result.json" in names:  # another attempt's result is out, and ours still pending: not ours
            return False
        mine = (_attempts_of(pending), _concluder_of(pending))
        others = [p for p in folder.glob(f".result.*.json{PENDING_SUFFIX}") if p.name != pending.name]
        # Strictly the latest attempt; a tie counts only for our own retry of one outcome.
        return all(_attempts_of(o) < mine[0] or (_attempts_of(o), _concluder_of(o)) == mine for o in others)

    return _confirmed(share, done, folder)


def _committed_pending(folder: Path) -> Path | None:
    """The pending result of the attempt that committed, among those an earlier concluder left after a crash.
    Only the job's latest attempt can commit: a new attempt exists only once the previous one's file was moved
    away, and a committed job file is never requeued. So it is a pending file with the most attempts. Two of one
    attempt are one concluder's retries of one outcome, or the worker's own and a reaper's that failed the job
    for it while it looked dead, their commits racing; their names cannot say which won. The worker's own
    outcome is then the one finished: a trained, verified adapter is not thrown away for a guess that the worker
    had died (the reaper that lost cleans up its file; one left by a crash is never published over it)."""
    pendings = sorted(folder.glob(f".result.*.json{PENDING_SUFFIX}"))
    return max(pendings, key=lambda p: (_attempts_of(p), _by_its_worker(p)), default=None)


def _by_its_worker(pending: Path) -> bool:
    """Whether a pending result was concluded by the worker that ran the attempt, not for it."""
    worker = read_json_object(pending).get("worker")
    return isinstance(worker, str) and _concluder_of(pending) == _SAFE.sub("_", worker)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _name_parts(pending: Path) -> list[str]:
    """``.result.<random>.a<attempt>.<concluder>.json.pending`` as [random, a<attempt>, concluder]; an older name
    (``.result.<random>[.<concluder>].json.pending``) gives fewer parts."""
    return pending.name.removeprefix(".result.").removesuffix(f".json{PENDING_SUFFIX}").split(".", 2)


def _concluder_of(pending: Path) -> str:
    """Who wrote a pending result ("" in an older name)."""
    parts = _name_parts(pending)
    return parts[-1] if len(parts) > 1 else ""


def _attempts_of(pending: Path) -> int:
    """The attempt of the job file its concluder committed, from its name: a job cancelled while queued for its
    attempt N has run N - 1 (the result's ``attempts``), and must outrank attempt N - 1's own leftover result.
    An older name gives the result's ``attempts``."""
    parts = _name_parts(pending)
    if len(parts) == 3 and re.fullmatch(r"a\d{1,6}", parts[1]):
        return int(parts[1][1:])
    attempts = read_json_object(pending).get("attempts")
    return attempts if isinstance(attempts, int) else 0


def complete_pending(share: Share, job_id: str) -> bool:
    """Finish step (3) of ``conclude`` for a job whose concluder died after its commit. Idempotent."""
    folder = share.result_dir(job_id)
    final = folder / "result.json"
    # job.json first, then the pending files: a committing attempt writes its pending file before its commit, so
    # once job.json is seen the committed pending file is in the listing (listed first, a dead attempt's older
    # file could be all there was, and be published).
    if final.exists() or not (folder / "job.json").exists():
        return final.exists()
    pending = _committed_pending(folder)
    if pending is not None:
        _finalize(share, folder, pending)
    return final.exists()


def _finalize(share: Share, folder: Path, pending: Path) -> bool:
    """Step (3) of ``conclude``: outputs into place, then the pending result. Never replaces a result. Whether
    this pending result became result.json."""
    record = read_json_object(pending)
    if record.get("worker"):
        attempt = attempt_dir(share, folder.name, int(record.get("attempts") or 0), record["worker"])
        for name in OUTPUTS if record.get("adapter") else OUTPUTS[1:]:
            try:
                if link := link_below(share.root, attempt / name) or link_below(share.root, folder / name):
                    log.warning("job %s: %s not moved: %s is a link, which the spool never moves through",
                                folder.name, name, link)
                    continue
                _move_output(attempt / name, folder / name)
            except OSError as e:
                if not share.reachable():
                    raise  # the share went away: the whole step is tried again when it answers
                # The job is committed: an odd output (a file where a folder was made) must not keep its result
                # from ever being written, and every submitter waiting on it with it.
                log.warning("job %s: %s not moved: %s: %s", folder.name, name, type(e).__name__, e)
    placed = False
    with contextlib.suppress(FileNotFoundError):  # another process completed it first
        placed = atomic.place_new(pending, folder / "result.json")  # write-once: never replaced by a later one
    atomic.fsync_dir(folder)
    return placed


def _move_output(src: Path, dest: Path) -> None:
    if dest.exists() or not src.exists():
        return
    try:
        os.rename(src, dest)  # write-once: dest does not exist, so nothing is replaced
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOENT):
            raise


def read_origin(share: Share, job_id: str) -> dict:
    return read_json_object(share.result_dir(job_id) / ORIGIN)


def read_json_object(path: Path, *, strict: bool = False) -> dict:
    """The JSON object in ``path``; {} when it is missing, unreadable or not an object (anyone can write it).
    ``strict``: a read that fails otherwise than "missing" (EIO, a dropped session) raises, where not knowing
    must not count as a "no": the id reservation, whose "not ours" would reject a valid job, its id used up."""
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except OSError:
        if strict:
            raise
        return {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
