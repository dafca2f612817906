"""Claiming the next job: queued → running, exactly once across machines.

filelock alone is not enough: CIFS mounted with ``nobrl`` and NFS without lockd ignore byte-range locks, and
two rclone mounts of one SMB share do not exclude each other at all. The rename in ``states.claim`` is the
source of truth; a loser of the race gets FileNotFoundError and moves on to the next name.
"""

from __future__ import annotations

import os
from pathlib import Path

from spooler import states
from spooler.share import Share


def queued(share: Share) -> list[tuple[states.QueueKey, Path]]:
    """Queue entries in dequeue order: highest priority first, then first accepted."""
    try:
        entries = list(os.scandir(share.queue))
    except FileNotFoundError:
        return []
    keyed = [(k, Path(e.path)) for e in entries if (k := states.QueueKey.parse(e.name))]
    return sorted(keyed, key=lambda kp: kp[1].name)


def next_job(share: Share, worker: str, only: str | None = None) -> Path | None:
    """The next job to run: one already in our running folder (a claim whose confirmation a cached listing
    hid from us), else the first queued job we can win. ``only`` restricts to one job id (the fallback)."""
    share.makedirs(share.running(worker))
    for path in held(share, worker):
        key = states.QueueKey.parse(path.name)
        if key is not None and only in (None, key.job_id):
            return path
    for key, path in queued(share):
        if only is not None and key.job_id != only:
            continue
        claimed = states.claim(share, path, worker)
        if claimed is not None:
            return claimed
    return None


def running(share: Share) -> list[tuple[str, states.QueueKey, Path]]:
    """Every claimed job as (worker, key, path), for status, cancel and a waiting submitter."""
    try:
        workers = sorted(e.name for e in os.scandir(share.root / "running") if e.is_dir())
    except FileNotFoundError:
        return []
    return [(w, k, p) for w in workers for p in held(share, w) if (k := states.QueueKey.parse(p.name))]


def held(share: Share, worker: str) -> list[Path]:
    """The jobs in running/<worker>/ (after a crash: the jobs this worker had claimed)."""
    try:
        return sorted(Path(e.path) for e in os.scandir(share.running(worker)) if states.QueueKey.parse(e.name))
    except FileNotFoundError:
        return []
