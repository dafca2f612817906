"""``loraspool cancel ID``: a queued job is cancelled at once, a running one at its next step.

The request is a file, ``cancel/<id>.json``, so it works whoever holds the job and wherever they are. A queued
job is cancelled here by the same rename a worker would use to claim it: exactly one of us wins. If a worker
wins, the request file is what it sees at its next step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from pathlib import Path

from schemas.job import SAFE_ID
from schemas.result import Result, Terminal
from spooler import atomic, claim, states
from spooler.clock import Clock, iso
from spooler.errors import ClaimLost, Rejected
from spooler.intake import Intake
from spooler.jobfile import decode, looks_temporary, parse_spec, read_limited
from spooler.share import Share, read_model

log = logging.getLogger(__name__)


def request_cancel(share: Share, job_id: str, clock: Clock) -> str:
    """Cancel ``job_id``; returns a sentence for the person saying what happened."""
    if (done := _ended(share, job_id)) is not None:
        return f"job {job_id} already ended: {done.status.value}"
    me = f"cancel-{socket.gethostname()}-{os.getpid()}"
    share.write_json(share.cancel_file(job_id), {"id": job_id, "by": me, "at": iso(clock.wall())})
    _accept_from_inbox(share, job_id, me, clock)
    with contextlib.suppress(OSError):  # our intake folder, once empty: every reaper would watch it for good
        share.intake(me).rmdir()
    for key, path in claim.queued(share):
        if key.job_id == job_id:
            return _cancel_queued(share, path, key, me, clock)
    if any(key.job_id == job_id for _, key, _ in claim.running(share)):
        return f"job {job_id} is running; its worker will stop it at the next step"
    if (done := _ended(share, job_id)) is not None:  # it ended while we looked: the request came too late
        file_request(share, job_id)
        return f"job {job_id} already ended: {done.status.value}"
    return (f"job {job_id} is not in the inbox, queued or running; the request stays in cancel/{job_id}.json, so a "
            "job still arriving under that id (a copy in progress, or one another machine wrote that this one does "
            f"not see yet) is cancelled before it starts. If the id was a typo, delete cancel/{job_id}.json")


def _ended(share: Share, job_id: str) -> Result | None:
    with contextlib.suppress(OSError):  # committed by a worker that died before writing its result
        states.complete_pending(share, job_id)
    return read_model(share.result_dir(job_id) / "result.json", Result)


def _cancel_queued(share: Share, path: Path, key: states.QueueKey, me: str, clock: Clock) -> str:
    now = iso(clock.wall())
    result = Result(id=key.job_id, status=Terminal.cancelled, error=f"cancelled by a person ({me}) while queued",
                    attempts=key.attempt - 1, finished_at=now, kind=_kind(share, path, key.job_id))
    try:
        states.conclude(share, path, result, by=me)
    except ClaimLost:
        return f"job {key.job_id} was just claimed by a worker; it will stop at its next step"
    file_request(share, key.job_id)
    log.info("job %s cancelled while queued [%s]", key.job_id, me)
    return f"job {key.job_id} cancelled"


def _kind(share: Share, path: Path, job_id: str) -> str | None:
    """The queued job's kind, for the result; None when its file cannot be read (a worker may just have won it)."""
    limit = share.settings.max_job_bytes
    try:
        return parse_spec(read_limited(path, limit), f"{job_id}.json", limit).kind.value
    except (OSError, Rejected):
        return None


FILING = ".filing."  # cancel/.filing.<hex>.<job id>: a request on its way to its result folder


def file_request(share: Share, job_id: str) -> None:
    """Move a request whose job has ended next to its result, rather than delete it: a person's file. One that came
    too late stays a record that it was asked for. Never over an earlier request (two people, one job).

    The request first leaves the name people write to, by one rename, for a name only this call uses: filing it
    from ``cancel/<id>.json`` itself ended with an unlink of that name, which removed a new request a person
    wrote there in between (the last note). Two workers filing one request: one rename finds it gone."""
    held = share.cancel / f"{FILING}{uuid.uuid4().hex[:8]}.{job_id}"
    with contextlib.suppress(OSError):
        os.rename(share.cancel_file(job_id), held)
        _file_held(held, share.result_dir(job_id))


def _file_held(held: Path, folder: Path) -> None:
    if not atomic.place_new(held, folder / "cancel-request.json"):
        os.rename(held, folder / f"cancel-request.{uuid.uuid4().hex[:8]}.json")


def file_finished(share: Share) -> None:
    """File the requests whose job ended before a worker saw them (it finished first, or was rejected): left in
    ``cancel/``, each would be checked at every pass, for good. And those a filer left on their way (the share
    failed, or the worker died, between its two renames)."""
    try:
        names = [e.name for e in os.scandir(share.cancel)]
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(FILING):
            job_id = name.split(".", 3)[-1]
            if SAFE_ID.match(job_id):
                with contextlib.suppress(OSError):
                    _file_held(share.cancel / name, share.result_dir(job_id))
        elif name.endswith(".json"):
            job_id = name.removesuffix(".json")
            if SAFE_ID.match(job_id) and (share.result_dir(job_id) / "result.json").exists():
                file_request(share, job_id)


def requested(share: Share, job_id: str) -> bool:
    return share.cancel_file(job_id).exists()


def _accept_from_inbox(share: Share, job_id: str, me: str, clock: Clock) -> None:
    """A job still in the inbox has no queue entry yet: accept it now, so it can be cancelled at once. Only a
    file that reads whole: one that does not may be a copy still arriving, and the worker's intake waits for it
    to settle before it calls it bad."""
    intake = Intake(share, me, clock)
    limit = share.settings.max_job_bytes
    for path in share.inbox.glob("*.json"):
        if looks_temporary(path.name):
            continue
        try:
            named = decode(read_limited(path, limit), limit).get("id")
        except (OSError, Rejected):
            continue
        if (named if isinstance(named, str) else path.stem) == job_id:
            intake.take(path)
