"""Waking up when a folder changes, on local disks and on network shares.

inotify (watchdog's native observer on Linux) never sees a file that another machine wrote to an SMB or NFS
mount: the client kernel only reports its own changes. On those filesystems we use watchdog's polling
observer. Either way the caller rescans every ``rescan_interval`` too, because a poll can miss a file that
came and went, and attribute caches (NFS ``actimeo``, SMB leases) can hide one for seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Literal

import psutil
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

log = logging.getLogger(__name__)


class _NoStopNoise(logging.Filter):
    """watchdog's inotify emitter logs an ERROR when an event arrives while its observer is being stopped
    (harmless: we are stopping). A worker log should show ERROR only where a person must act."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_NoStopNoise())

WatchMode = Literal["auto", "native", "polling"]
NETWORK_FS = ("cifs", "smb", "smb2", "smb3", "smbfs", "nfs", "nfs4", "9p", "afs", "ceph", "glusterfs",
              "lustre", "davfs", "fuse", "fuse.rclone", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse")


def filesystem_type(path: Path) -> str:
    """The fstype of the mount holding ``path`` ('' when unknown)."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    for part in psutil.disk_partitions(all=True):
        mp = part.mountpoint
        if (real == mp or real.startswith(mp.rstrip(os.sep) + os.sep)) and len(mp) > len(best):
            best, fstype = mp, part.fstype
    return fstype.lower()


def is_network(path: Path) -> bool:
    if sys.platform == "win32":
        return str(path).startswith("\\\\")  # a UNC path; mapped drives are refused elsewhere
    fstype = filesystem_type(path)
    return fstype in NETWORK_FS or fstype.startswith("fuse")


def choose_mode(path: Path, mode: WatchMode) -> Literal["native", "polling"]:
    if mode != "auto":
        return mode
    return "polling" if is_network(path) else "native"


class _Wake(FileSystemEventHandler):
    def __init__(self, events: list[threading.Event]) -> None:
        self.events = events

    def on_any_event(self, event: FileSystemEvent) -> None:
        for e in list(self.events):
            e.set()


class FolderWatcher:
    """Sets every subscriber's event on any change in the watched folders; ``wait`` on one returns on a change or
    a timeout. One watcher serves all the slots of a worker (``subscribe``): a polling observer lists and stats
    the folders every ``poll_interval`` over the network, and N slots each polling would multiply that load."""

    def __init__(self, folders: list[Path], mode: WatchMode, poll_interval: float) -> None:
        self.mode: Literal["native", "polling", "rescan"] = choose_mode(folders[0], mode)
        self._events: list[threading.Event] = []
        self.observer: BaseObserver = (
            PollingObserver(timeout=poll_interval) if self.mode == "polling" else Observer()
        )
        handler = _Wake(self._events)
        for folder in folders:
            self.observer.schedule(handler, str(folder), recursive=False)

    def subscribe(self) -> threading.Event:
        """An event of one's own: set by every change, cleared only by its owner's ``wait``."""
        event = threading.Event()
        self._events.append(event)
        return event

    def start(self) -> None:
        """Start watching; a folder that is gone (the share dropped during start-up) leaves only the rescans,
        which the caller does anyway, rather than stopping the worker."""
        self.observer.daemon = True
        try:
            self.observer.start()
        except OSError as e:
            log.warning("cannot watch the share's folders (%s: %s): finding jobs by rescanning only",
                        type(e).__name__, e)
            self.mode = "rescan"

    def stop(self) -> None:
        if self.mode == "rescan":  # never started
            return
        self.observer.stop()
        self.observer.join(timeout=5)

    @staticmethod
    def wait(event: threading.Event, timeout: float) -> bool:
        """Whether a change (or a ``set`` by the owner) came within ``timeout``; clears it for the next wait."""
        woke = event.wait(timeout)
        event.clear()
        return woke
