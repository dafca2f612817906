"""Scratch folders on this machine's own disk: a merge staged before it is registered, a DDP launch's socket.

Each is removed by the process that made it, unless that process is killed first (a cancel ends the training
child; kill -9 ends anything). The folder's name carries the maker's pid, so a worker's next maintenance pass can
tell a leftover from a folder still in use, and remove it. Only copies live here, never anything a person put on
the share, so removing a leftover loses nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

KINDS = ("merge", "ddp")
# A dead pid is the sign; the age guards a process of another pid namespace (a container) sharing this temp folder.
MIN_AGE = 600.0
_NAME = re.compile(rf"loraspool-({'|'.join(KINDS)})-(\d{{1,9}})-.+")  # a pid; more digits: not ours


def prefix(kind: str) -> str:
    """For ``tempfile.mkdtemp``/``TemporaryDirectory``: the kind and this process's pid."""
    assert kind in KINDS, kind
    return f"loraspool-{kind}-{os.getpid()}-"


def sweep(folder: Path | None = None, min_age: float = MIN_AGE) -> list[str]:
    """Remove scratch folders whose maker is dead and which are older than ``min_age``; their names."""
    folder = Path(folder or tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if (made := _NAME.fullmatch(entry.name)) and _left_over(entry, int(made[2]), min_age):
                shutil.rmtree(entry.path, ignore_errors=True)
                if not os.path.lexists(entry.path):
                    removed.append(entry.name)
    if removed:
        log.info("removed %d scratch folder(s) left by killed processes in %s: %s", len(removed), folder,
                 ", ".join(removed))
    return removed


def _left_over(entry: os.DirEntry, pid: int, min_age: float) -> bool:
    try:
        info = entry.stat(follow_symlinks=False)
        mine = not hasattr(os, "getuid") or info.st_uid == os.getuid()  # another account's is not ours to judge
        return (entry.is_dir(follow_symlinks=False) and mine and time.time() - info.st_mtime >= min_age
                and not psutil.pid_exists(pid))
    except (OSError, OverflowError, ValueError):  # an odd folder is left alone, never a crash of the worker
        return False
