"""Share outages at the worst moment: the job is done and its outcome cannot be written.

The worker runs in-process here so the outage can be placed exactly between the run and the write; the
share, the folders and the outcome files are real.
"""

from __future__ import annotations

import errno
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from schemas.heartbeat import Heartbeat
from schemas.result import Result
from spooler import claim, states
from spooler.clock import SkewedClock
from spooler.config import WorkerSettings
from spooler.share import Share, read_model
from tests.conftest import Procs, drop, log_of, result_of, wait_for
from worker.daemon import Worker


def _worker(share: Share, cache: Path, clock: SkewedClock | None = None) -> Worker:
    return Worker(share, WorkerSettings(share=share.root, id="w1", device="cpu", cache_dir=cache), clock)


def _performed_while_results_refuse(share: Share, w: Worker, name: str) -> tuple[Path, Path]:
    """Drop, accept and claim a probe, make every write under results/ fail (as on a share that went read-only),
    and perform it. Returns the held job file and where results/ went (rename it back to end the outage)."""
    drop(share, f"{name}.json", {"kind": "probe"})
    w.intake.scan()
    job = claim.next_job(share, "w1")
    assert job is not None
    away = share.root / "results-away"
    share.results.rename(away)
    share.results.write_text("not a folder: every write under results/ fails")
    w.perform(job)
    return job, away


def _outage_ends(share: Share, away: Path) -> None:
    share.results.unlink()
    away.rename(share.results)


def test_outcome_written_while_the_share_refuses_is_kept_locally_and_delivered_once(share: Share,
                                                                                   tmp_path: Path) -> None:
    w = _worker(share, tmp_path / "cache")
    job, away = _performed_while_results_refuse(share, w, "late")

    kept = list((tmp_path / "cache" / "outbox" / "w1").glob("*.result.json"))
    assert len(kept) == 1 and job.exists(), "the outcome waits locally; the job stays claimed"
    first = Result.model_validate_json(kept[0].read_bytes())

    # A restart (an hour later by its clock) must not requeue a job whose outcome is kept, nor run it again.
    restarted = _worker(share, tmp_path / "cache", SkewedClock(3600))
    restarted._recover()
    assert job.exists()

    _outage_ends(share, away)
    restarted.perform(job)

    result = read_model(share.result_dir("late") / "result.json", Result)
    assert result is not None and result.status.value == "succeeded"
    assert (result.started_at, result.finished_at) == (first.started_at, first.finished_at), "not run again"
    assert not job.exists() and not list((tmp_path / "cache" / "outbox" / "w1").glob("*"))


def test_an_outcome_kept_after_its_commit_is_finished_by_the_live_worker(share: Share, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The share dropped after the commit, at the last rename (audit, proven): the job file had left the running
    folder, so no held file brought the kept outcome back to perform, and result.json waited for some worker's
    restart while submitters waited on it. The live worker's loop now finishes it from the pending result."""
    w = _worker(share, tmp_path / "cache")
    drop(share, "cut.json", {"kind": "probe"})
    w.intake.scan()
    job = claim.next_job(share, "w1")
    assert job is not None

    def outage(src: Path, dst: Path) -> bool:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    monkeypatch.setattr(states.atomic, "place_new", outage)
    w.perform(job)
    monkeypatch.undo()
    folder = share.result_dir("cut")
    assert not job.exists() and (folder / "job.json").exists() and not (folder / "result.json").exists()
    w.maintenance()
    result = read_model(folder / "result.json", Result)
    assert result is not None and result.status.value == "succeeded"
    assert not list((tmp_path / "cache" / "outbox" / "w1").glob("*"))


def test_a_worker_stopped_while_it_holds_an_outcome_does_not_give_its_job_away(share: Share,
                                                                             tmp_path: Path) -> None:
    """A stop while an outcome waits locally: the stop tries the share once more, and delivers if it answers.
    If it still refuses, the last heartbeat says "stopping", not "stopped" (which other workers take as leave
    to run the job again at once), and the job stays claimed for the restart to deliver."""
    for comes_back in (False, True):
        w = _worker(share, tmp_path / f"cache-{comes_back}")
        job, away = _performed_while_results_refuse(share, w, f"held-{comes_back}")
        if comes_back:
            _outage_ends(share, away)
        w.teardown()
        hb = read_model(share.heartbeat_file("w1"), Heartbeat)
        assert hb is not None and hb.state.value == ("stopped" if comes_back else "stopping")
        if comes_back:
            assert result_of(share, f"held-{comes_back}").status.value == "succeeded" and not job.exists()
        else:
            assert job.exists()
            _outage_ends(share, away)
            claim.held(share, "w1")[0].unlink()  # the next round starts with nothing held


def test_quiet_hours_take_no_new_jobs_but_accept_and_beat(share: Share, procs: Procs) -> None:
    now = datetime.now()
    span = f"{(now - timedelta(hours=1)):%H:%M}-{(now + timedelta(hours=1)):%H:%M}"  # may wrap midnight
    w = procs.worker(share, "q1", env={"LORASPOOL_QUIET_HOURS": span})
    wait_for(lambda: (hb := read_model(share.heartbeat_file("q1"), Heartbeat)) and hb.state.value == "paused", 30,
             "a paused heartbeat")
    drop(share, "later.json", {"kind": "probe"})
    wait_for(lambda: list(share.queue.glob("*later*")), 30, "the job to be accepted into the queue")
    time.sleep(1.0)  # several loops of the worker: none may claim it
    assert list(share.queue.glob("*later*")) and result_of(share, "later") is None
    assert log_of(w).count("in quiet hours") == 1, "one line per change, not one per loop"
    job = share.root / "tmp" / "w.json"
    job.write_text('{"kind": "probe"}')
    waiting = procs.start("submit", str(job), "--share", str(share.root), "--wait", "--fallback", "never",
                          name="submit")
    wait_for(lambda: "every live worker (q1) is in its quiet hours" in log_of(waiting), 60,
             "submit --wait to say why the job waits", explain=lambda: log_of(waiting))


def test_two_slots_run_two_jobs_at_once(train_share: Share, procs: Procs) -> None:
    """max_concurrent_jobs = 2 on a CPU worker: slots w and w-2, sharing one folder watcher. A probe dropped while
    a training job runs is answered by the other slot before the training ends."""
    from tests.conftest import train_job, wait_result

    w = procs.worker(train_share, "w", env={"LORASPOOL_MAX_CONCURRENT_JOBS": "2"})
    drop(train_share, "long.json", train_job("long", steps=400))

    def trainer() -> str | None:
        for wid in ("w", "w-2"):
            hb = read_model(train_share.heartbeat_file(wid), Heartbeat)
            if hb is not None and hb.job == "long":
                return wid
        return None

    busy = wait_for(trainer, 60, "a slot busy with the training job")
    drop(train_share, "quick.json", {"kind": "probe"})
    quick = wait_result(train_share, "quick", 60)
    assert quick.worker == ({"w", "w-2"} - {busy}).pop(), "the other slot answered"
    assert result_of(train_share, "long") is None, "while the training still ran"
    log = log_of(w)
    assert "runs 2 jobs at once" in log
    assert log.count("watching with the") == 1 and "observer, for its 2 slots" in log, "one watcher for both slots"


def test_training_interrupted_by_a_share_outage_resumes_instead_of_failing(train_share: Share, procs: Procs) -> None:
    from tests.conftest import train_job, wait_result

    w = procs.worker(train_share, "w")
    drop(train_share, "cut.json", train_job("cut", steps=150, checkpoint_every_steps=2))
    checkpoints = train_share.result_dir("cut") / "attempts"
    # A finished one: state.json is written inside the checkpoint's temp folder (".step-2.<random>.tmp") first.
    wait_for(lambda: [p for p in checkpoints.rglob("state.json") if not p.parent.name.startswith(".")], 120,
             "a first checkpoint")
    away = train_share.root.with_name("share-away")
    train_share.root.rename(away)  # the mount drops in the middle of the training
    time.sleep(3.0)
    away.rename(train_share.root)
    result = wait_result(train_share, "cut", 300)
    assert result.status.value == "succeeded", result.error
    log = log_of(w)
    assert log.count("interrupted by the share") == 1, log[-3000:]
    assert log.count("progress of job cut not written") <= 1, "one line per outage, not one per second"
    assert result.resumed_from_step, "it went on from its checkpoint"
