"""Heartbeats and liveness across processes: kill -9, skewed clocks, dead workers' jobs, submitter fallback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schemas.heartbeat import Heartbeat, WorkerState
from schemas.result import Result, Terminal
from spooler import states
from spooler.clock import SkewedClock, SystemClock, iso, parse_iso
from spooler.heartbeat import Liveness, snapshot
from spooler.reaper import Reaper, reap
from spooler.share import Share, read_model
from tests.conftest import Procs, log_of, result_of, wait_for, wait_result

SITECUSTOMIZE = """
import os, time
import time_machine
_offset = float(os.environ["LORASPOOL_TEST_CLOCK_OFFSET"])
time_machine.travel(time.time() + _offset, tick=True).start()
"""


def skewed_env(tmp_path: Path, offset: float) -> dict[str, str]:
    """Run a process whose wall clock is ``offset`` seconds off, via time-machine (libfaketime breaks Python)."""
    site = tmp_path / "skew"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": str(site), "LORASPOOL_TEST_CLOCK_OFFSET": str(offset)}


def fake_dead_worker(share: Share, wid: str, job_id: str, attempt: int = 1) -> Path:
    """What a worker that lost power leaves behind: one last heartbeat and a claimed job."""
    share.write_json(share.heartbeat_file(wid), Heartbeat(
        worker=wid, seq=7, interval=share.settings.heartbeat_interval, state=WorkerState.busy,
        host="gpu-desk", pid=1, device="cuda", written_at=iso(time.time()), job=job_id))
    share.makedirs(share.running(wid))
    share.makedirs(share.result_dir(job_id))
    key = states.QueueKey(0, "20260101000000000", job_id, attempt)
    path = share.running(wid) / key.name
    path.write_text(json.dumps({"kind": "probe"}))
    return path


def test_killed_worker_goes_stale_within_stale_after(share: Share, procs: Procs) -> None:
    w = procs.worker(share, "w1")
    wait_for(lambda: share.heartbeat_file("w1").exists(), 30, "a heartbeat")
    live = Liveness(share, SystemClock())
    for _ in range(10):  # watch it beat for a while first, as a waiting submitter would
        assert not live.observe()["w1"].stale
        time.sleep(0.2)
    procs.kill9(w)
    killed = time.monotonic()
    view = wait_for(lambda: (v := live.observe()["w1"]).stale and v, 3 * share.settings.stale_after, "stale")
    took = time.monotonic() - killed
    assert took <= share.settings.stale_after + 2 * share.settings.heartbeat_interval, took
    assert view.confidence == "observed"


def test_worker_one_hour_behind_is_live(share: Share, procs: Procs, tmp_path: Path) -> None:
    procs.worker(share, "behind", env=skewed_env(tmp_path, -3600))
    hb = wait_for(lambda: read_model(share.heartbeat_file("behind"), Heartbeat), 30, "a heartbeat")
    written = parse_iso(hb.written_at)
    assert written is not None and 3500 < time.time() - written < 3700, "the worker's clock really is skewed"

    views = snapshot(share, SystemClock())
    assert not views["behind"].stale, views["behind"].reason
    live = Liveness(share, SystemClock())
    end = time.monotonic() + 2.5 * share.settings.stale_after
    while time.monotonic() < end:
        assert not live.observe()["behind"].stale
        time.sleep(0.2)

    status = procs.start("status", "--share", str(share.root), "--json", name="status")
    doc = json.loads(status.communicate(timeout=30)[0])
    assert [w["stale"] for w in doc["workers"] if w["id"] == "behind"] == [False]

    job = tmp_path / "probe1.json"
    job.write_text(json.dumps({"kind": "probe"}))
    sub = procs.start("submit", str(job), "--share", str(share.root), "--wait", name="submit")
    assert sub.wait(60) == 0, log_of(sub)
    r = result_of(share, "probe1")
    assert r.worker == "behind" and not r.fallback


def test_skewed_observer_does_not_take_a_live_worker_for_dead(share: Share, procs: Procs) -> None:
    """The reverse case, with an injected clock: the observer is an hour ahead of the worker."""
    procs.worker(share, "honest")
    wait_for(lambda: share.heartbeat_file("honest").exists(), 30, "a heartbeat")
    for offset in (3600, -3600):
        clock = SkewedClock(offset)
        assert not snapshot(share, clock)["honest"].stale
        live = Liveness(share, clock)
        end = time.monotonic() + 1.5 * share.settings.stale_after
        while time.monotonic() < end:
            assert not live.observe()["honest"].stale
            time.sleep(0.2)


def test_stale_workers_job_is_requeued_and_finished(share: Share, procs: Procs) -> None:
    fake_dead_worker(share, "gone", "orphaned")
    w = procs.worker(share, "w2")
    r = wait_result(share, "orphaned", 30)
    assert r.status.value == "succeeded" and r.worker == "w2" and r.attempts == 2
    assert "job orphaned requeued for attempt 2: worker gone" in log_of(w)


class HandClock(SystemClock):
    """Monotonic time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_the_slots_of_one_machine_reap_once_per_interval_between_them(share: Share) -> None:
    """Two slots (w, w-2) share one Reaper: after one of them reaped, the other does not read the heartbeats
    again within the interval; once the interval has passed, either one reaps."""
    clock = HandClock()
    reaper = Reaper(share, clock)
    fake_dead_worker(share, "gone", "first")
    reaper.due("w")  # the first look: gone's seq is new to us
    clock.now += share.settings.stale_after + 0.1
    reaper.due("w-2")
    assert not list(share.running("gone").iterdir()) and list(share.queue.glob("*_first.a2.json"))
    second = fake_dead_worker(share, "gone", "second")
    reaper.due("w")
    assert second.exists(), "reaped again within the interval"
    clock.now += share.settings.heartbeat_interval
    reaper.due("w")
    assert not second.exists() and list(share.queue.glob("*_second.a2.json"))


def test_a_worker_started_again_during_a_reap_keeps_the_job_it_claimed(share: Share) -> None:
    """A reaper judges every worker first and acts on each in turn, seconds later when it adopts a dead worker's
    intake. A worker that said "stopped" at that first look, started again meanwhile (systemctl restart), claims
    under its old name: the job it claimed must stay with it, not be requeued (or failed, on its last attempt)
    on the old verdict. The restart is made to land right after the first look."""
    clock = HandClock()
    orphan = fake_dead_worker(share, "gone", "orphaned")

    def beat(seq: int, state: WorkerState) -> None:
        share.write_json(share.heartbeat_file("w"), Heartbeat(
            worker="w", seq=seq, interval=share.settings.heartbeat_interval, state=state, host="gpu-desk", pid=seq,
            device="cuda", written_at=iso(time.time())))

    beat(40, WorkerState.stopped)
    share.makedirs(share.running("w"))
    claimed = share.running("w") / states.QueueKey(0, "20260101000000001", "fresh", 1).name

    class RestartAfterTheFirstLook(Liveness):
        looks = 0

        def observe(self, worker_ids: set[str] | None = None) -> dict:
            views = super().observe(worker_ids)
            self.looks += 1
            if self.looks == 1:  # w beats, then claims, as a starting worker does
                beat(1, WorkerState.idle)
                claimed.write_text(json.dumps({"kind": "probe"}))
            return views

    live = RestartAfterTheFirstLook(share, clock)
    assert reap(share, live, "observer", clock)["w"].stale  # the first look's verdict
    clock.now += share.settings.stale_after + 0.1
    beat(2, WorkerState.busy)  # alive: it beats on
    reap(share, live, "observer", clock)
    assert claimed.exists() and not list(share.queue.glob("*_fresh.*"))
    assert not orphan.exists() and list(share.queue.glob("*_orphaned.a2.json"))  # the dead one's job still moves


def test_a_heartbeat_file_speaks_only_for_the_worker_it_is_named_after(share: Share) -> None:
    """A frozen copy of a live worker's heartbeat ("live - Copy.json") does not make it look dead, and a file
    whose ``worker`` is "../queue" does not turn the queue into a dead worker's running folder."""
    clock = HandClock()
    running = fake_dead_worker(share, "live", "kept")
    (share.heartbeats / "live - Copy.json").write_bytes(share.heartbeat_file("live").read_bytes())
    queued = fake_dead_worker(share, "other", "waiting")
    queued = queued.rename(share.queue / queued.name)
    share.write_json(share.heartbeats / "junk.json", {**json.loads(share.heartbeat_file("other").read_text()),
                                                      "worker": "../queue", "state": "stopped"})
    live = Liveness(share, clock)
    for seq in range(8, 14):  # "live" beats on; the copy stays at seq 7
        beat = json.loads(share.heartbeat_file("live").read_text())
        share.write_json(share.heartbeat_file("live"), {**beat, "seq": seq})
        views = reap(share, live, "observer", clock)
        clock.now += share.settings.stale_after / 3
    assert not views["live"].stale and running.exists()
    assert "../queue" not in views and queued.exists()


def test_an_observer_whose_client_stamps_its_own_files_seeds_no_verdict(share: Share,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An observer on rclone (its client stamps mtimes with its own clock, an hour ahead here) looks at a worker
    on kernel SMB (the server stamps its heartbeat; the worker's own clock is 2 minutes off). The probe's mtime
    is then the observer's clock, and its difference from the heartbeat's mtime an hour of clock skew, not an
    age: a fresh reaper must not take the worker for dead on that one look. (The self-stamping client is
    simulated: share_now returns the observer's clock, as rclone's VFS would stamp it.)"""
    from spooler import heartbeat

    running = fake_dead_worker(share, "smb", "long")
    beat = json.loads(share.heartbeat_file("smb").read_text())
    share.write_json(share.heartbeat_file("smb"), {**beat, "written_at": iso(time.time() - 120)})
    clock = SkewedClock(3600)
    monkeypatch.setattr(heartbeat, "share_now", lambda share: clock.wall())
    views = reap(share, Liveness(share, clock), "observer", clock)
    assert not views["smb"].stale and running.exists(), views["smb"].reason


@pytest.mark.parametrize("alive", [True, False])
def test_a_fresh_observer_watches_before_believing_a_cached_old_file_time(share: Share, alive: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The server stamps mtimes (its clock 30 s ahead of ours, simulated as the self-stamping test does), and a
    live worker's heartbeat shows a file time three stale_afters old: metadata a client cached (NFS actimeo, SMB
    leases). A fresh reaper took that age as the truth and requeued the live worker's job at its first look. Now
    it watches the seq for about one interval: a live worker keeps its job, a dead one loses it, still far sooner
    than stale_after of watching would allow."""
    from spooler import heartbeat

    running = fake_dead_worker(share, "cached", "busy-job")
    monkeypatch.setattr(heartbeat, "share_now", lambda share: time.time() + 30)

    def cached_old() -> None:
        old = time.time() + 30 - 3 * share.settings.stale_after
        os.utime(share.heartbeat_file("cached"), (old, old))

    cached_old()
    clock = HandClock()
    live = Liveness(share, clock)
    first = reap(share, live, "observer", clock)["cached"]
    assert not first.stale and running.exists(), first.reason
    if alive:
        beat = json.loads(share.heartbeat_file("cached").read_text())
        share.write_json(share.heartbeat_file("cached"), {**beat, "seq": beat["seq"] + 1})
        cached_old()
    clock.now += 1.5 * share.settings.heartbeat_interval + 0.6
    second = reap(share, live, "observer", clock)["cached"]
    assert second.stale is not alive and running.exists() is alive, second.reason
    assert 1.5 * share.settings.heartbeat_interval + 0.6 < share.settings.stale_after


def test_a_one_shot_verdict_on_the_shares_clock_is_watched_before_it_says_dead(share: Share) -> None:
    """status and submit's fallback choice take one look at file times. A share-clock age was believed at once,
    but a client may show a heartbeat's metadata cached, older than it is (review): a live worker was counted
    dead, and submit started a CPU fallback beside it. Its seq is watched first now, as a clocks-agree one is."""
    import threading

    from spooler.heartbeat import SHARE_CLOCK, WorkerView, watch_briefly

    fake_dead_worker(share, "cached", "busy-job")
    hb = read_model(share.heartbeat_file("cached"), Heartbeat)
    assert hb is not None
    views = {"cached": WorkerView("cached", hb, True, 3 * share.settings.stale_after, SHARE_CLOCK, "old, by the share")}
    beats = threading.Timer(0.3, lambda: share.write_json(share.heartbeat_file("cached"), hb.model_copy(
        update={"seq": hb.seq + 1})))
    beats.start()
    try:
        view = watch_briefly(share, SystemClock(), views, limit=share.settings.stale_after / 2)["cached"]
    finally:
        beats.join()
    assert not view.stale and view.confidence == "observed", view.reason


def test_a_mount_that_drops_while_the_waiter_looks_starts_no_fallback(share: Share,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The share answered at the start of a look and dropped before the heartbeats were read: they read as none,
    no worker looked live, and submit --fallback auto started a CPU worker beside the live GPU one (seen in a CI
    run of test_smb's mount-drop test). An empty view from a share that no longer answers is an outage."""
    from spooler.submit import Waiter

    answers = iter([True, False])
    monkeypatch.setattr(Share, "reachable", lambda self: next(answers, False))
    waiter = Waiter(share, "mine", HandClock(), fallback=True)
    started: list[str] = []
    monkeypatch.setattr(waiter, "start_fallback", started.append)
    with pytest.raises(OSError, match="is the network drive mounted"):
        waiter._look()
    assert started == []


def test_job_fails_after_max_attempts(share: Share, procs: Procs) -> None:
    fake_dead_worker(share, "gone", "unlucky", attempt=share.settings.max_attempts)
    procs.worker(share, "w2")
    r = wait_result(share, "unlucky", 30)
    assert r.status.value == "failed" and r.attempts == share.settings.max_attempts
    assert "worker gone stopped during attempt 3 of 3" in r.error and "submit the job again" in r.error


def test_submit_falls_back_to_local_cpu_worker(share: Share, procs: Procs, tmp_path: Path) -> None:
    fake_dead_worker(share, "gpu-desk", "someone-elses")  # a stale heartbeat, and no live worker
    share.write_json(share.heartbeat_file("gpu-desk"), read_model(share.heartbeat_file("gpu-desk"), Heartbeat))
    time.sleep(share.settings.stale_after + 0.5)  # its heartbeat file is now old by the share's clock
    job = tmp_path / "fb.json"
    job.write_text(json.dumps({"kind": "probe"}))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "spooler.cli", "submit", str(job), "--share", str(share.root)],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    r = result_of(share, "fb")
    assert r.fallback and r.device == "cpu" and r.status.value == "succeeded"
    assert r.worker.startswith(socket.gethostname().split(".")[0][:40])
    assert time.monotonic() - t0 < 60
    # Each fallback has an id of its own: once it stopped it leaves no folder behind, and status hides it.
    assert not share.running(r.worker).exists() and not share.intake(r.worker).exists()
    shown = subprocess.run([sys.executable, "-m", "spooler.cli", "status", "--share", str(share.root)],
                           capture_output=True, text=True, timeout=60).stdout
    assert "(1 stopped fallback worker not shown; see --json)" in shown and r.worker not in shown.split("JOBS")[0]


def test_submit_never_falls_back_when_told_not_to(share: Share, tmp_path: Path) -> None:
    job = tmp_path / "nofb.json"
    job.write_text(json.dumps({"kind": "probe"}))
    out = subprocess.run([sys.executable, "-m", "spooler.cli", "submit", str(job), "--share", str(share.root),
                          "--fallback", "never"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "nofb"
    assert (share.inbox / "nofb.json").exists() and result_of(share, "nofb") is None


def test_waiting_with_no_worker_says_so_and_ctrl_c_says_where_the_job_is(share: Share, tmp_path: Path) -> None:
    """--fallback never with no live worker: the wait says why nothing moves; Ctrl-C leaves the job queued and
    says how to follow or end it."""
    job, err = tmp_path / "idle.json", tmp_path / "submit.err"
    job.write_text(json.dumps({"kind": "probe"}))
    with open(err, "wb") as f:
        sub = subprocess.Popen([sys.executable, "-m", "spooler.cli", "submit", str(job), "--share", str(share.root),
                                "--wait", "--fallback", "never"], stderr=f, stdout=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        wait_for(lambda: "no worker's heartbeat is fresh, so it waits in the spool" in err.read_text(), 60,
                 "the no-worker warning", explain=err.read_text)
        sub.send_signal(signal.SIGINT)
        try:
            assert sub.wait(30) == 130
        except subprocess.TimeoutExpired:  # seen twice in loaded local runs: where every thread stands, then fail
            sub.send_signal(signal.SIGABRT)
            sub.wait(10)
            pytest.fail(f"submit --wait did not exit 30 s after Ctrl-C; its stderr:\n{err.read_text()[-6000:]}")
    finally:
        if sub.poll() is None:
            sub.kill()
    text = err.read_text()
    assert "stopped waiting. Job idle stays in the spool" in text and "loraspool cancel idle" in text, text
    assert "Traceback" not in text, text


def test_second_worker_with_the_same_id_refuses_to_start(share: Share, procs: Procs) -> None:
    first = procs.worker(share, "twin")
    wait_for(lambda: share.heartbeat_file("twin").exists(), 30, "a heartbeat")
    second = procs.worker(share, "twin")
    assert second.wait(30) == 2
    assert "another worker with id 'twin' is running" in log_of(second)
    assert first.poll() is None


@pytest.mark.parametrize("mode", ["native", "polling"])
def test_watcher_start_survives_a_vanished_share(tmp_path: Path, mode: str) -> None:
    """Found in a loaded test run: the share dropped while a worker started, and starting the watcher raised,
    which stopped the worker. Now it falls back to the rescans the loop does anyway."""
    from spooler.watch import FolderWatcher

    inbox = tmp_path / "share" / "inbox"
    inbox.mkdir(parents=True)
    watcher = FolderWatcher([inbox], mode, 0.1)  # type: ignore[arg-type]
    inbox.rmdir()
    watcher.start()
    assert watcher.mode == "rescan"
    assert watcher.wait(watcher.subscribe(), 0.05) is False
    watcher.stop()


def test_worker_outlives_the_share_going_away_and_coming_back(share: Share, procs: Procs) -> None:
    w = procs.worker(share, "w1")
    wait_for(lambda: "watching with the" in log_of(w), 30, "the worker to finish starting")
    away = share.root.with_name("share-away")
    share.root.rename(away)  # the server rebooted, or the mount dropped
    local = procs.logdir / "cache" / "loraspool" / "heartbeat-w1.json"  # the worker's cache_dir (conftest)
    seq_then = json.loads(local.read_text())["seq"]
    time.sleep(2.0)
    assert not share.root.exists(), "the worker must not rebuild a share on the local disk"
    assert json.loads(local.read_text())["seq"] > seq_then, "the heartbeat goes on locally while the share is away"
    away.rename(share.root)
    (share.inbox / "back.json").write_text(json.dumps({"kind": "probe"}))
    assert wait_result(share, "back", 30).status.value == "succeeded"
    assert w.poll() is None
    wait_for(lambda: "heartbeat written again" in log_of(w), 10, "the heartbeat to resume")
    log = log_of(w)
    assert log.count("heartbeat cannot be written") == 1, "one line per state change, not one per beat"
    assert log.count("could not take jobs") == 1 and "taking jobs again" in log


def _committed_by_a_dead_worker(share: Share, wid: str, job_id: str) -> None:
    """What a worker that lost power between the commit and the final rename leaves (``states.conclude`` steps 1
    and 2): the job file in results/<id>/job.json, the result still a pending file, nothing in running/."""
    running = fake_dead_worker(share, wid, job_id)
    result = Result(id=job_id, status=Terminal.succeeded, worker=wid, attempts=1, kind="probe")
    share.write_json(share.result_dir(job_id) / f".result.0123456789ab.json{states.PENDING_SUFFIX}", result)
    os.rename(running, share.result_dir(job_id) / "job.json")


def test_a_live_worker_writes_the_result_a_dead_worker_committed(share: Share, procs: Procs) -> None:
    """Found by kill -9 inside conclude: only a worker's start-up finished such a result, so with the other
    workers running the job had none, its cancel never ended and its submitter waited for good."""
    w = procs.worker(share, "w2")
    wait_for(lambda: share.heartbeat_file("w2").exists(), 30, "w2's heartbeat")
    _committed_by_a_dead_worker(share, "gone", "half-done")
    r = wait_result(share, "half-done", 30)
    assert (r.status.value, r.worker) == ("succeeded", "gone")
    assert "job half-done: its result, committed by a worker that stopped before writing it, is written" in log_of(w)


def test_a_waiting_submitter_writes_its_jobs_committed_result(share: Share) -> None:
    """No live worker to find the dead one: the submitter waiting on the job finishes the step itself."""
    from spooler.submit import Waiter

    _committed_by_a_dead_worker(share, "gone", "mine")
    clock = HandClock()
    waiter = Waiter(share, "mine", clock, fallback=False)
    assert waiter._look()[0] != "done"  # a concluder may be at work: not within stale_after of the first look
    clock.now += share.settings.stale_after
    state, _, r = waiter._look()
    assert state == "done" and r is not None and (r.status.value, r.worker) == ("succeeded", "gone")
    assert result_of(share, "mine") == r


def test_cancelling_a_job_its_dead_worker_committed_says_how_it_ended(share: Share) -> None:
    from spooler.cancel import request_cancel

    _committed_by_a_dead_worker(share, "gone", "ended")
    assert request_cancel(share, "ended", SystemClock()) == "job ended already ended: succeeded"
    assert not share.cancel_file("ended").exists()
