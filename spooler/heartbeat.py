"""Heartbeats: the writer a worker runs, and the liveness judgement every observer makes.

Clocks of different machines disagree, so no decision compares one machine's timestamp with another's clock.

* ``Liveness`` watches each heartbeat's ``seq`` and times its advance on the observer's own monotonic clock.
  A worker is stale when its seq has not moved for ``stale_after`` seconds of *our* time. This is the rule
  that requeues jobs. It needs to have watched for a while, so a fresh observer starts from ``snapshot``.
* ``snapshot`` answers at once for a one-shot ``loraspool status``. It touches a file on the share and
  compares that file's mtime with the heartbeat's: both are stamped by the file server on kernel SMB/NFS
  clients, so their difference is an age on one clock. Some clients (rclone, sshfs with some options) stamp
  mtimes with their own clock instead: when the heartbeat's mtime equals the writer's own ``written_at``, or our
  probe's mtime equals our own clock, the answer may rest on two clocks agreeing, and ``confidence`` says so.
  Only a share-clock answer seeds ``Liveness``, and a worker the seed calls dead is watched for about one of
  its intervals before that is believed: a client may cache a file's metadata, and show it older than it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from schemas.heartbeat import Heartbeat, Progress, WorkerState
from spooler import __version__, atomic
from spooler.clock import Clock, iso, parse_iso
from spooler.share import Share, read_model

log = logging.getLogger(__name__)

# confidence values, strongest first
OBSERVED = "observed"  # seq watched on our own monotonic clock
SHARE_CLOCK = "share-clock"  # both mtimes stamped by the file server
CLOCKS_AGREE = "clocks-agree"  # mtimes stamped by each client; right only if the two clocks agree
SHORT_WATCH = "short-watch"  # seq did not advance in about one interval of watching; suggestive, not proof
STARTING = "starting"  # this observer has not watched long enough to know


@dataclass
class WorkerView:
    """What an observer believes about one worker."""

    id: str
    heartbeat: Heartbeat | None
    stale: bool
    age: float | None  # seconds since the last heartbeat, when known
    confidence: str
    reason: str


class HeartbeatWriter:
    """Writes ``heartbeats/<id>.json`` every interval from its own thread, whatever the daemon is doing."""

    def __init__(self, share: Share, worker: str, device: str, clock: Clock, fallback: bool = False,
                 sample: Callable[[], dict] | None = None, local: Path | None = None) -> None:
        self.share, self.worker, self.device, self.clock, self.fallback = share, worker, device, clock, fallback
        self.local = local  # a copy on this machine's disk, readable while the share is away
        self.sample = sample or (lambda: {})
        self.state = WorkerState.starting
        self.job: str | None = None
        self.progress: Progress | None = None
        self.seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{worker}", daemon=True)
        self._failing = False

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self, final: WorkerState = WorkerState.stopped) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.state, self.job, self.progress = final, None, None
        self.beat()

    def beat(self) -> None:
        self.seq += 1
        record = Heartbeat(worker=self.worker, seq=self.seq, interval=self.share.settings.heartbeat_interval,
                           state=self.state, host=socket.gethostname(), pid=os.getpid(), device=self.device,
                           fallback=self.fallback, written_at=iso(self.clock.wall()), job=self.job,
                           progress=self.progress, version=__version__, **self.sample())
        self._write_local(record)
        try:
            self.share.write_json(self.share.heartbeat_file(self.worker), record)
        except OSError as e:
            if not self._failing:
                log.error("heartbeat cannot be written to %s: %s; is the share reachable? [worker %s]",
                          self.share.heartbeats, e, self.worker)
            self._failing = True
            return
        if self._failing:
            log.info("heartbeat written again [worker %s]", self.worker)
        self._failing = False

    def _write_local(self, record: Heartbeat) -> None:
        if self.local is None:
            return
        try:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self.local, record)
        except OSError as e:  # a full or read-only local disk: the share copy is the one that matters
            log.debug("local heartbeat %s not written: %s", self.local, e)

    def _run(self) -> None:
        while not self._stop.wait(self.share.settings.heartbeat_interval):
            try:
                self.beat()
            except Exception:  # the heartbeat must outlive any surprise in a sample
                log.exception("heartbeat failed [worker %s]", self.worker)


@dataclass
class _Track:
    seq: int | None
    changed: float  # our monotonic time when seq last changed (or when we first saw the worker)
    seeded: bool = False  # ``changed`` came from the share's clock, not from watching


@dataclass
class Liveness:
    """Stale-or-live from seq advances on our own monotonic clock."""

    share: Share
    clock: Clock
    _tracks: dict[str, _Track] = field(default_factory=dict)
    _first: float | None = None

    def observe(self, worker_ids: set[str] | None = None) -> dict[str, WorkerView]:
        """Read every heartbeat (and any worker named in ``worker_ids``) and judge each one."""
        now = self.clock.monotonic()
        beats = read_heartbeats(self.share)
        ids = set(beats) | (worker_ids or set())
        if self._first is None:
            self._first = now
            self._seed_from_snapshot(beats, now)
        views = {}
        for wid in sorted(ids):
            hb = beats.get(wid)
            seq = hb.seq if hb else None
            track = self._tracks.get(wid)
            if track is None:
                track = self._tracks[wid] = _Track(seq, now)
            elif seq is not None and seq != track.seq:
                track.seq, track.changed = seq, now
            views[wid] = self._judge(wid, hb, track, now)
        return views

    def _judge(self, wid: str, hb: Heartbeat | None, track: _Track, now: float) -> WorkerView:
        silent = now - track.changed
        stale_after = self.share.settings.stale_after
        if hb is not None and hb.state is WorkerState.stopped:
            return WorkerView(wid, hb, True, None, OBSERVED, "the worker said it stopped")
        stale = silent >= stale_after
        watched = now - (self._first or now)
        if stale and track.seeded and hb is not None and watched < _seed_check(hb, stale_after):
            return WorkerView(wid, hb, False, silent, STARTING,
                              f"the share's clock says seq {hb.seq} is {silent:.1f}s old; watching it advance before "
                              "believing that")
        if hb is None:
            reason = f"no heartbeat file for {silent:.0f}s"
        elif stale:
            reason = f"seq {hb.seq} has not advanced for {silent:.1f}s (stale after {stale_after:g}s)"
        else:
            reason = f"seq {hb.seq} advanced {silent:.1f}s ago"
        if silent < watched or watched >= stale_after:
            confidence = OBSERVED
        else:
            confidence = SHARE_CLOCK if track.seeded else STARTING
        return WorkerView(wid, hb, stale, silent, confidence, reason)

    def _seed_from_snapshot(self, beats: dict[str, Heartbeat], now: float) -> None:
        """Start each track at the age the share's clock gives, so a long-dead worker is not given a fresh
        ``stale_after`` of grace by every observer that starts up. Only trusted when the share stamps mtimes."""
        for view in snapshot(self.share, self.clock, beats).values():
            if view.heartbeat and view.age is not None and view.confidence == SHARE_CLOCK:
                self._tracks[view.id] = _Track(view.heartbeat.seq, now - view.age, seeded=True)


def _seed_check(hb: Heartbeat, stale_after: float) -> float:
    """How long a fresh observer watches a worker that file times call dead before it believes them. A client
    may show a heartbeat's metadata cached for seconds (NFS actimeo, SMB leases), older than the file is: a live
    worker's seq advances within about one of its intervals, a dead one's does not. Never longer than
    ``stale_after``, whatever interval a heartbeat file claims."""
    return min(1.5 * max(hb.interval, 0.0) + 0.5, stale_after)


def read_heartbeats(share: Share) -> dict[str, Heartbeat]:
    """Every worker's heartbeat, by the name of its file. A file whose name is not ``<its worker>.json`` is not
    a heartbeat: a copy ("gpu1 - Copy.json", a sync tool's conflict file) would freeze a live worker's seq, and
    a ``worker`` field of "../queue" would make that folder a worker's running folder."""
    beats: dict[str, Heartbeat] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(share.heartbeats):
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                hb = read_model(Path(entry.path), Heartbeat)
                if hb is not None and entry.name == f"{hb.worker}.json":
                    beats[hb.worker] = hb
    return beats


def share_now(share: Share) -> float | None:
    """The share's idea of 'now': the mtime of a file we just wrote there."""
    probe = share.tmp / f".clock-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        probe.write_bytes(b"")
        stamp = probe.stat().st_mtime
        probe.unlink()  # our own probe, never a person's file
        return stamp
    except OSError:
        return None


def snapshot(share: Share, clock: Clock, beats: dict[str, Heartbeat] | None = None) -> dict[str, WorkerView]:
    """A one-shot judgement from file times, without waiting. See the module docstring for the reasoning."""
    beats = read_heartbeats(share) if beats is None else beats
    before = clock.wall()
    ref = share_now(share)
    after = clock.wall()
    # Our probe's mtime is the server's clock only if it is off ours: a client that stamps its own files
    # (rclone) would give our clock back, and an age from it would compare our clock with the server's.
    by_server = ref is not None and not before - 2.0 <= ref <= after + 2.0
    views = {}
    stale_after = share.settings.stale_after
    for wid, hb in beats.items():
        try:
            mtime = share.heartbeat_file(wid).stat().st_mtime
        except OSError:
            continue
        if hb.state is WorkerState.stopped:
            views[wid] = WorkerView(wid, hb, True, None, OBSERVED, "the worker said it stopped")
            continue
        age = (ref if ref is not None else clock.wall()) - mtime
        written = parse_iso(hb.written_at)
        # When the mtime equals the writer's own clock, that client stamped it: the age then rests on the
        # writer's clock and ours (or the server's) agreeing, which we cannot know from one look.
        self_stamped = written is not None and abs(mtime - written) < 2.0
        # Without a probe the server stamped, the age is our wall clock against the share's: two clocks. (When
        # the server's clock and ours agree, this is right, but we cannot tell that from one look.)
        confidence = SHARE_CLOCK if by_server and not self_stamped else CLOCKS_AGREE
        stale = age >= stale_after
        reason = f"heartbeat file is {age:.1f}s old by the share's clock" if confidence == SHARE_CLOCK else (
            f"heartbeat file is {age:.1f}s old, if the worker's clock agrees with ours")
        views[wid] = WorkerView(wid, hb, stale, age, confidence, reason)
    return views


def watch_briefly(share: Share, clock: Clock, views: dict[str, WorkerView], limit: float) -> dict[str, WorkerView]:
    """For workers whose one-shot verdict from file times says stale, watch seq for about one heartbeat
    interval: an advancing seq proves the worker live far sooner than ``stale_after`` could. A verdict on the
    share's clock is watched too: a client may show a heartbeat's metadata cached, older than the file is."""
    doubtful = {w: v for w, v in views.items()
                if v.stale and v.confidence in (CLOCKS_AGREE, SHARE_CLOCK) and v.heartbeat}
    if not doubtful:
        return views
    wait = min(limit, 1.5 * max(v.heartbeat.interval for v in doubtful.values() if v.heartbeat) + 0.5)
    end = clock.monotonic() + wait
    while doubtful and clock.monotonic() < end:
        clock.sleep(0.25)
        beats = read_heartbeats(share)
        for wid, view in list(doubtful.items()):
            hb = beats.get(wid)
            if hb and view.heartbeat and hb.seq != view.heartbeat.seq:
                views[wid] = WorkerView(wid, hb, False, 0.0, OBSERVED, f"seq advanced to {hb.seq} while we watched")
                del doubtful[wid]
    for wid, view in doubtful.items():
        views[wid] = WorkerView(wid, view.heartbeat, True, view.age, SHORT_WATCH,
                                f"seq did not advance in {wait:.1f}s of watching; {view.reason}")
    return views
