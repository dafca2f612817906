"""The command line as people and scripts use it."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from schemas.export import DEFAULT_DIR, RECORDS, schema_text
from schemas.settings import ShareSettings
from spooler.share import Share, read_model
from tests.conftest import Procs, drop, make_share, wait_for


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spooler.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_init_is_idempotent_and_keeps_settings(tmp_path: Path) -> None:
    root = tmp_path / "s"
    assert run("init", str(root), "--heartbeat-interval", "3", "--stale-after", "20").returncode == 0
    (root / "inbox" / "mine.json").write_text('{"kind": "probe"}')
    assert run("init", str(root)).returncode == 0
    settings = read_model(root / "loraspool.json", ShareSettings)
    assert settings.heartbeat_interval == 3 and settings.stale_after == 20
    assert (root / "inbox" / "mine.json").read_text() == '{"kind": "probe"}'
    bad = run("init", str(root), "--stale-after", "1")
    assert bad.returncode == 2 and "at least twice heartbeat_interval" in bad.stderr
    refused = run("init", str(tmp_path / "new"), "--stale-after", "1")
    assert refused.returncode == 2 and not (tmp_path / "new").exists()  # a refused init leaves no folder
    modes = tmp_path / "modes"
    assert run("init", str(modes), "--file-mode", "0660", "--dir-mode", "0770").returncode == 0
    assert (read_model(modes / "loraspool.json", ShareSettings).file_mode, (modes / "queue").stat().st_mode & 0o777) \
        == ("0660", 0o770)


def test_init_leaves_settings_it_cannot_parse_as_they_are(tmp_path: Path) -> None:
    """A trailing comma in loraspool.json was taken for an empty file, and init wrote the defaults over the
    team's settings (audit, proven). It now refuses, says how to go on, and changes nothing."""
    root = tmp_path / "s"
    assert run("init", str(root), "--max-attempts", "7").returncode == 0
    for text in ('{"max_attempts": 7, "team_note": "ours",}', '[1, 2]'):
        (root / "loraspool.json").write_text(text)
        out = run("init", str(root), "--stale-after", "120")
        assert out.returncode == 2 and "it was left as it is: fix it by hand" in out.stderr, out.stderr
        assert (root / "loraspool.json").read_text() == text


def test_a_setting_from_a_newer_release_is_kept_and_does_not_stop_this_one(tmp_path: Path) -> None:
    """Every machine reads loraspool.json; one still on an older release must go on working after a newer one
    added a setting (it warns), and its init must not drop that setting when it rewrites the file."""
    root = tmp_path / "s"
    assert run("init", str(root)).returncode == 0
    raw = json.loads((root / "loraspool.json").read_text())
    (root / "loraspool.json").write_text(json.dumps({**raw, "from_the_future": {"x": 1}}))
    out = run("status", "--share", str(root), "--no-wait")
    assert out.returncode == 0 and "from_the_future are unknown to this loraspool and ignored" in out.stderr
    assert run("init", str(root), "--max-attempts", "5").returncode == 0
    kept = json.loads((root / "loraspool.json").read_text())
    assert kept["from_the_future"] == {"x": 1} and kept["max_attempts"] == 5
    assert "submit_fallback" not in kept  # a setting newer than the first release is written only once set
    (root / "loraspool.json").write_text(json.dumps({**kept, "layout_version": 2}))
    newer = run("status", "--share", str(root), "--no-wait")
    assert newer.returncode == 2 and "layout_version 2, newer than this loraspool knows (1)" in newer.stderr


def test_a_share_set_to_submit_fallback_never_keeps_jobs_for_the_worker(tmp_path: Path) -> None:
    """A planned stop of the GPU worker: submits that do not say --fallback leave their jobs in the spool."""
    root = tmp_path / "s"
    assert run("init", str(root), "--submit-fallback", "never").returncode == 0
    job = tmp_path / "later.json"
    job.write_text(json.dumps({"kind": "probe"}))
    out = run("submit", str(job), "--share", str(root))
    assert out.returncode == 0 and out.stdout == "later\n", out.stderr
    assert "submit_fallback = never" in out.stderr and (root / "inbox" / "later.json").exists()
    assert not (root / "results" / "later").exists()


def test_commands_explain_a_missing_share(tmp_path: Path) -> None:
    out = run("status", "--share", str(tmp_path / "nope"))
    assert out.returncode == 2 and "loraspool init" in out.stderr


def test_a_share_folder_that_cannot_be_read_is_a_sentence_not_a_traceback(share: Share) -> None:
    (share.root / "running").rmdir()
    (share.root / "running").write_text("a file where a folder belongs")
    out = run("status", "--share", str(share.root))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "Not a directory" in out.stderr and "loraspool doctor" in out.stderr, out.stderr


def test_submit_wait_on_a_broken_share_folder_stops_with_a_sentence(share: Share, tmp_path: Path) -> None:
    """Not every OSError is an outage to wait out: running/ made a file fails the same way every round, and the
    wait would spin forever saying "the share does not answer" (review)."""
    (share.root / "running").rmdir()
    (share.root / "running").write_text("a file where a folder belongs")
    job = tmp_path / "p1.json"
    job.write_text(json.dumps({"kind": "probe"}))
    out = run("submit", str(job), "--share", str(share.root), "--wait", "--fallback", "never", timeout=60)
    assert out.returncode == 1 and "Not a directory" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_fifo_in_the_inbox_blocks_no_command(share: Share) -> None:
    """status, cancel and gc read inbox files; a FIFO named *.json held each in its open for good (review)."""
    import os

    os.mkfifo(share.inbox / "fifo.json")
    for args in (("status", "--no-wait"), ("cancel", "x"), ("gc",)):
        out = run(*args, "--share", str(share.root), timeout=30)
        assert out.returncode in (0, 1) and "Traceback" not in out.stderr, (args, out.stderr)


def test_output_into_a_closed_pipe_is_no_error(share: Share) -> None:
    """`loraspool status | head`: the reader left early. Not "Broken pipe; is the share mounted?", nor a traceback."""
    for i in range(40):
        drop(share, f"p{i}.json", {"kind": "probe"})
    proc = subprocess.Popen([sys.executable, "-m", "spooler.cli", "status", "--share", str(share.root), "--no-wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # type: ignore[union-attr]
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert proc.wait(60) == 1 and err == "", err


def test_ping_and_status(share: Share, procs: Procs) -> None:
    procs.worker(share, "w1")
    wait_for(lambda: share.heartbeat_file("w1").exists(), 30, "a heartbeat")
    out = run("ping", "--share", str(share.root))
    assert out.returncode == 0 and "succeeded by worker w1" in out.stdout, out.stderr
    drop(share, "waiting.json", {"kind": "train", "base_model": "m", "dataset": "d", "priority": -1})
    doc = json.loads(run("status", "--share", str(share.root), "--json").stdout)
    assert [(w["id"], w["stale"], w["device"]) for w in doc["workers"]] == [("w1", False, "cpu")]
    from spooler import __version__  # which release each machine runs, for an upgrade across machines

    assert doc["workers"][0]["version"] == __version__ != "unknown"
    assert run("--version").stdout == f"loraspool {__version__}\n"
    assert {j["state"] for j in doc["jobs"]} >= {"succeeded"}
    text = run("status", "--share", str(share.root)).stdout
    assert "w1" in text and "live" in text and "JOBS" in text


def test_ping_without_a_worker_says_so_and_leaves_no_probe_behind(share: Share) -> None:
    out = run("ping", "--share", str(share.root), "--timeout", "1")
    assert out.returncode == 1 and "no worker's heartbeat" in out.stderr and "no worker answered" in out.stderr
    assert list(share.inbox.iterdir()) == [] and "cancelled" in out.stderr, out.stderr


def test_submit_refuses_a_bad_job_locally(share: Share, tmp_path: Path) -> None:
    job = tmp_path / "bad.json"
    job.write_text(json.dumps({"kind": "train", "base_model": "m", "dataset": "d", "lora": {"rank": 8}}))
    out = run("submit", str(job), "--share", str(share.root))
    assert out.returncode == 2 and "lora.rank: unknown field" in out.stderr
    assert list(share.inbox.iterdir()) == []


def test_submit_refuses_a_used_id(share: Share, tmp_path: Path) -> None:
    share.write_json(share.makedirs(share.result_dir("taken")) / "origin.json", {"token": "x"})
    job = tmp_path / "taken.json"
    job.write_text(json.dumps({"kind": "probe"}))
    out = run("submit", str(job), "--share", str(share.root), "--fallback", "never")
    assert out.returncode == 2 and "already used" in out.stderr


def _submit_at_the_barrier(root: str, job: str, barrier: Any, said: Any) -> None:
    from spooler.submit import SubmitError, drop

    share = Share.open(root)
    barrier.wait()
    try:
        said.put((job, drop(share, Path(job), check_inputs=False)))
    except SubmitError as e:
        said.put((job, f"refused: {e}"))


def test_two_submits_of_one_id_at_one_moment_never_replace_each_other(tmp_path: Path) -> None:
    """Two people submit two files with the same id at the same moment: submit checked that inbox/<id>.json was
    free, then renamed onto it, which replaces on POSIX, so both were told "submitted" and one job was gone
    (29 of 30 tries, two processes on a barrier). Exactly one may win; the inbox holds its bytes."""
    ctx = multiprocessing.get_context("fork")
    for trial in range(6):
        share = make_share(tmp_path / f"share{trial}")
        jobs = {}
        for who in ("alice", "bob"):
            jobs[who] = tmp_path / f"{who}{trial}.json"
            jobs[who].write_text(json.dumps({"id": "nightly", "kind": "probe", "priority": len(who)}))
        barrier, said = ctx.Barrier(2), ctx.Queue()
        racers = [ctx.Process(target=_submit_at_the_barrier, args=(str(share.root), str(j), barrier, said))
                  for j in jobs.values()]
        for p in racers:
            p.start()
        answers = dict(said.get(timeout=30) for _ in racers)
        for p in racers:
            p.join(30)
        won = [job for job, answer in answers.items() if answer == "nightly"]
        assert len(won) == 1, answers
        assert (share.inbox / "nightly.json").read_bytes() == Path(won[0]).read_bytes()
        assert [p.name for p in share.inbox.iterdir()] == ["nightly.json"]  # no temp file left behind


def test_submit_refuses_an_id_a_pending_cancel_would_end(share: Share, tmp_path: Path) -> None:
    """A cancel for an id no job has yet stays for a job still arriving, so a later submit under that id (a typo
    in the cancel, an id used again) would end cancelled before it starts: submit says so and drops nothing."""
    said = run("cancel", "nosuchjob", "--share", str(share.root))
    assert said.returncode == 0 and "If the id was a typo, delete cancel/nosuchjob.json" in said.stdout, said
    job = tmp_path / "nosuchjob.json"
    job.write_text(json.dumps({"kind": "probe"}))
    out = run("submit", str(job), "--share", str(share.root), "--fallback", "never")
    assert out.returncode == 2 and "a cancel request for id 'nosuchjob' waits in cancel/nosuchjob.json" in out.stderr
    assert list(share.inbox.iterdir()) == []
    share.cancel_file("nosuchjob").unlink()  # the person deletes the mistaken request, as the message says
    out = run("submit", str(job), "--share", str(share.root), "--fallback", "never")
    assert out.returncode == 0 and (share.inbox / "nosuchjob.json").exists(), out.stderr


def test_submit_checks_the_inputs_are_on_the_share_before_it_uses_the_id(share: Share, tmp_path: Path) -> None:
    """A missing model or dataset would be rejected by the worker and burn the id: submit says so first."""
    (share.root / "models" / "m").mkdir()
    (share.root / "datasets" / "folder").mkdir()
    job = tmp_path / "early.json"
    job.write_text(json.dumps({"kind": "train", "base_model": "models/m", "parent": "support/v77",
                               "dataset": ["datasets/nope.jsonl", "datasets/folder"]}))
    out = run("submit", str(job), "--share", str(share.root), "--fallback", "never")
    assert out.returncode == 2 and list(share.inbox.iterdir()) == [], out.stderr
    for words in ("base_model: 'models/m' has no config.json", "dataset: 'datasets/nope.jsonl' does not exist on "
                  "the share", "dataset: 'datasets/folder' is not a file", "the id 'early' is still free",
                  "parent: 'support/v77' is not registered on this share"):
        assert words in out.stderr, out.stderr
    out = run("submit", str(job), "--share", str(share.root), "--fallback", "never", "--no-check")
    assert out.returncode == 0 and (share.inbox / "early.json").exists(), out.stderr
    # Inputs there, and refused by the worker's own checks: a pickle-only model, an empty dataset, a link out of
    # the share. Each was submitted and then rejected, its id used up, and --no-check was offered (walkthrough).
    (share.root / "models" / "m" / "config.json").write_text("{}")
    (share.root / "models" / "m" / "tokenizer.json").write_text("{}")
    (share.root / "models" / "m" / "pytorch_model.bin").write_bytes(b"\x80")
    (share.root / "datasets" / "empty.jsonl").write_text("")
    (share.root / "datasets" / "out.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    (tmp_path / "elsewhere.jsonl").write_text('{"text": "hi"}\n')
    job.write_text(json.dumps({"id": "refused", "kind": "train", "base_model": "models/m",
                               "dataset": ["datasets/empty.jsonl", "datasets/out.jsonl"]}))
    out = run("submit", str(job), "--share", str(share.root), "--fallback", "never")
    assert out.returncode == 2 and not (share.inbox / "refused.json").exists(), out.stderr
    for words in ("base_model: 'models/m': 'm' has only pickle weights", "dataset: 'datasets/empty.jsonl': "
                  "'empty.jsonl' is empty", "dataset: ", "outside the share", "the id 'refused' is still free"):
        assert words in out.stderr, out.stderr
    assert "--no-check" not in out.stderr, out.stderr


def test_json_schemas_are_up_to_date() -> None:
    for name, model in RECORDS.items():
        path = DEFAULT_DIR / f"{name}.schema.json"
        assert path.read_text() == schema_text(model), f"run: loraspool schema  ({path} is stale)"


def test_status_shows_a_running_jobs_speed_and_eta() -> None:
    """README promises tokens/s and ETA in status, not only in --json."""
    from spooler.status import render

    doc = {"workers": [], "jobs": [{"id": "j1", "state": "running", "worker": "w1", "progress": {
        "step": 690, "total_steps": 100000, "loss": 5.8431, "tokens_per_second": 35988.4, "eta_seconds": 11105}}]}
    assert "j1" in render(doc) and "on w1 step 690/100000 loss 5.843 35,988 tok/s ETA 3h05m" in render(doc)
    dead = {"id": "w1", "stale": True, "state": "busy", "device": "cuda", "job": "j1", "reason": "seq still for 40 s",
            "confidence": "observed"}
    shown = render({**doc, "workers": [dead]})  # its ETA is its last word, not a promise
    assert "ETA" not in shown and "j1" in shown and "its worker is stale: the job goes back to the queue" in shown


def test_the_demo_never_uses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    """``demo --keep`` pointed at a team's share set its stale_after to 10 s (their live workers looked dead),
    replaced datasets/demo.jsonl and started a worker that took their queued jobs (audit, proven)."""
    team = tmp_path / "team"
    assert run("init", str(team), "--stale-after", "600").returncode == 0
    (team / "datasets" / "demo.jsonl").write_text("ours\n")
    settings = (team / "loraspool.json").read_text()
    out = run("demo", "--keep", str(team), "--steps", "1")
    assert out.returncode == 2 and "was not made by loraspool demo" in out.stderr, out.stderr
    assert (team / "loraspool.json").read_text() == settings
    assert (team / "datasets" / "demo.jsonl").read_text() == "ours\n" and not (team / "models" / "tiny").exists()


def test_the_demo_runs_the_main_path_and_says_nothing_alarming(tmp_path: Path) -> None:
    """README's first command. A job submitted before the demo's worker wrote its first heartbeat made the
    waiter warn that no worker was live, which reads as a failure on a person's first run."""
    out = subprocess.run([sys.executable, "-m", "spooler.cli", "demo", "--keep", str(tmp_path / "demo"), "--steps",
                          "4"], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})  # its worker's model cache
    assert out.returncode == 0, out.stderr[-3000:]
    assert "demo-1 succeeded on cpu: eval loss" in out.stderr, out.stderr[-3000:]
    assert "WARNING" not in out.stderr and "no worker's heartbeat is fresh" not in out.stderr, out.stderr
    assert json.loads(out.stdout)["status"] == "succeeded"
    again = subprocess.run([sys.executable, "-m", "spooler.cli", "demo", "--keep", str(tmp_path / "demo"), "--steps",
                            "2"], capture_output=True, text=True, timeout=240,
                           env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})  # its own share: reused
    assert again.returncode == 0 and "demo-2 succeeded on cpu" in again.stderr, again.stderr[-3000:]
