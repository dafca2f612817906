"""Logs: JSON lines to a rotated file, readable lines to stderr, job and worker ids as fields."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from spooler.logs import ids_in, setup_logging
from spooler.share import Share
from tests.conftest import drop


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_file_and_readable_stderr(tmp_path: Path, root_logger: logging.Logger,
                                       capsys: pytest.CaptureFixture) -> None:
    log_file = tmp_path / "logs" / "worker.log"
    assert setup_logging(False, log_file) is None
    log = logging.getLogger("worker.daemon")
    log.info("job %s claimed, attempt %d [worker %s]", "support-v3", 1, "gpu-desk")
    log.info("worker %s started on %s", "gpu-desk", "host")
    log.warning("cache is low", extra={"job": "j2", "free_gb": 3.5})
    log.debug("not shown without -v")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("job %s crashed the worker's job handling [worker %s]", "j3", "w")
    recs = lines(log_file)
    assert [r["message"] for r in recs][:2] == ["job support-v3 claimed, attempt 1 [worker gpu-desk]",
                                                "worker gpu-desk started on host"]
    assert (recs[0]["job"], recs[0]["worker"], recs[0]["level"], recs[0]["logger"]) == (
        "support-v3", "gpu-desk", "INFO", "worker.daemon")
    assert recs[0]["time"].endswith("Z") and "T" in recs[0]["time"]
    assert recs[1]["worker"] == "gpu-desk" and "job" not in recs[1]
    assert recs[2]["job"] == "j2" and recs[2]["free_gb"] == 3.5 and recs[2]["level"] == "WARNING"
    assert len(recs) == 4 and "ValueError: boom" in recs[3]["exc"] and recs[3]["job"] == "j3"
    err = capsys.readouterr().err
    assert "INFO job support-v3 claimed, attempt 1 [worker gpu-desk]" in err and not err.lstrip().startswith("{")


def test_verbose_shows_loraspools_debug_lines_not_watchdogs(tmp_path: Path, root_logger: logging.Logger) -> None:
    """-v flooded the log with one watchdog line per file event (operator user test)."""
    log_file = tmp_path / "w.log"
    setup_logging(True, log_file)
    logging.getLogger("worker.daemon").debug("ours")
    logging.getLogger("watchdog.observers.inotify_buffer").debug("in-event <InotifyEvent: src_path=b'x'>")
    assert [r["message"] for r in lines(log_file)] == ["ours"]


def test_ids_only_from_the_daemons_wording() -> None:
    assert ids_in("no worker answered in 60s") == {}
    assert ids_in("another worker with id 'x' is running") == {}
    assert ids_in("job a.b_c-1: failed [worker w-2]") == {"job": "a.b_c-1", "worker": "w-2"}


def test_rotation_keeps_the_backups_asked_for(tmp_path: Path, root_logger: logging.Logger) -> None:
    log_file = tmp_path / "w.log"
    setup_logging(False, log_file, max_bytes=2000, backups=2)
    for i in range(200):
        logging.getLogger("t").info("line %d of padding padding padding padding", i)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["w.log", "w.log.1", "w.log.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    assert lines(log_file)[-1]["message"] == "line 199 of padding padding padding padding"


def test_calling_twice_replaces_its_own_handlers(tmp_path: Path, root_logger: logging.Logger) -> None:
    setup_logging(False, tmp_path / "a.log")
    setup_logging(True, tmp_path / "b.log")
    logging.getLogger("t").debug("once")
    assert (tmp_path / "a.log").read_text() == ""
    assert [r["message"] for r in lines(tmp_path / "b.log")] == ["once"]


def test_an_unwritable_log_file_is_reported_not_fatal(tmp_path: Path, root_logger: logging.Logger) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    problem = setup_logging(False, blocker / "sub" / "w.log")
    assert problem is not None and "logging to stderr only" in problem


def test_worker_writes_json_lines_with_ids(share: Share, tmp_path: Path) -> None:
    drop(share, "probe-1.json", {"kind": "probe"})
    log_file = tmp_path / "worker.jsonl"
    out = subprocess.run([sys.executable, "-m", "spooler.cli", "worker", "--share", str(share.root), "--id", "w1",
                          "--device", "cpu", "--only", "probe-1", "--log-file", str(log_file)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    recs = lines(log_file)
    claimed = [r for r in recs if "claimed" in r["message"]]
    assert claimed and claimed[0]["job"] == "probe-1" and claimed[0]["worker"] == "w1"
    assert "job probe-1 claimed" in out.stderr
