"""The worker as a service. Linux: the unit is rendered, written and checked by ``systemd-analyze verify``.
Windows: the decisions in ``spooler.service_windows``, judged on PureWindowsPath with the win32 calls faked,
and the service's run/stop cycle with a real Worker on a real share (no pywin32 here)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath

import pytest

from schemas.heartbeat import Heartbeat, WorkerState
from spooler import service_linux as sl
from spooler import service_windows as sw
from spooler.share import Share, read_model
from tests.conftest import drop, wait_for

REPO = Path(__file__).resolve().parents[1]
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (bash deploy/setup.sh --test installs it)")


def real_exe() -> list[str]:
    script = Path(sys.executable).parent / "loraspool"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "spooler.cli"]


def verify_text(tmp_path: Path, text: str) -> tuple[int, str]:
    folder = tmp_path / "units"
    folder.mkdir(exist_ok=True)
    unit = folder / sl.UNIT_NAME
    unit.write_text(text)
    result = sl.verify(unit)
    assert result is not None
    return result


# ── Linux ───────────────────────────────────────────────────────────────────────────────────────────
def test_the_example_unit_is_what_install_writes() -> None:
    assert (REPO / "deploy" / "linux" / sl.UNIT_NAME).read_text() == sl.example(), (
        "deploy/linux/loraspool-worker.service is stale: regenerate it from spooler.service_linux.example()")


def test_unit_has_the_settings_the_issue_asks_for(tmp_path: Path) -> None:
    text = sl.render(sl.UnitSpec(share=tmp_path, worker_id="gpu-desk", exe=real_exe()))
    for line in ("Restart=on-failure", "User=loraspool", f"RequiresMountsFor={tmp_path}", "KillSignal=SIGTERM",
                 "TimeoutStopSec=300", "NoNewPrivileges=true", "ProtectSystem=strict", "CacheDirectory=loraspool",
                 f"ReadWritePaths={tmp_path}", "After=network-online.target remote-fs.target",
                 "Wants=network-online.target"):
        assert line in text.splitlines(), line
    assert f"worker --share {tmp_path} --id gpu-desk" in text


@needs_analyze
def test_rendered_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    text = sl.render(sl.UnitSpec(share=tmp_path, worker_id="gpu-desk", exe=real_exe()))
    assert verify_text(tmp_path, text) == (0, "")


@needs_analyze
def test_awkward_paths_are_quoted_for_systemd(tmp_path: Path) -> None:
    share = tmp_path / "ML share 100%"
    share.mkdir()
    text = sl.render(sl.UnitSpec(share=share, worker_id="w", exe=real_exe(), config=tmp_path / "a b.toml",
                                 writable=[tmp_path / "my cache", tmp_path / "logs"],
                                 environment={"LORASPOOL_CACHE_DIR": str(tmp_path / "my cache")}))
    assert verify_text(tmp_path, text) == (0, "")
    assert '"--share" ' not in text and f'--share "{share}"'.replace("%", "%%") in text


@needs_analyze
def test_systemd_analyze_does_catch_a_broken_unit(tmp_path: Path) -> None:
    """So the clean verdicts above mean something: a bad value and a missing program are reported."""
    text = sl.render(sl.UnitSpec(share=tmp_path, worker_id="w", exe=real_exe()))
    code, out = verify_text(tmp_path, text.replace("Restart=on-failure", "Restart=sometimes"))
    assert "sometimes" in out
    code, out = verify_text(tmp_path, text.replace(real_exe()[0], "/nonexistent/loraspool"))
    assert code != 0 and "/nonexistent/loraspool" in out


def test_home_venvs_get_a_readable_home(tmp_path: Path) -> None:
    text = sl.render(sl.UnitSpec(share=tmp_path, worker_id="w", exe=["/home/me/ls/.venv/bin/loraspool"]))
    assert "ProtectHome=read-only" in text


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASPOOL_")}
    return subprocess.run([sys.executable, "-m", "spooler.cli", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_install_status_uninstall_in_a_unit_dir(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    share = tmp_path / "share"
    share.mkdir()
    base = ("--unit-dir", str(units))
    out = run_cli("service", "install", "--share", str(share), "--id", "desk-1", "--user", "root", "--no-enable",
                  *base)
    assert out.returncode == 0, out.stderr
    unit = units / sl.UNIT_NAME
    text = unit.read_text()
    assert f"--share {share} --id desk-1" in text and "User=root" in text
    assert oct(unit.stat().st_mode & 0o777) == "0o644" and not list(units.glob(".*.tmp"))
    assert f"systemctl restart {sl.UNIT_NAME}" in out.stdout
    status = run_cli("service", "status", *base)
    assert f"unit file: {unit}" in status.stdout
    out = run_cli("service", "uninstall", *base)
    assert out.returncode == 0 and not unit.exists()
    assert "nothing to remove" in run_cli("service", "uninstall", *base).stdout


def test_install_gives_the_settings_folders_write_access(tmp_path: Path) -> None:
    units, share = tmp_path / "units", tmp_path / "share"
    units.mkdir()
    share.mkdir()
    toml = tmp_path / "loraspool.toml"
    toml.write_text('log_file = "logs/worker.log"\n')
    out = run_cli("service", "install", "--share", str(share), "--id", "w", "--user", "root", "--config", str(toml),
                  "--cache-dir", str(tmp_path / "cache"), "--unit-dir", str(units), "--no-enable")
    assert out.returncode == 0, out.stderr
    text = (units / sl.UNIT_NAME).read_text()
    assert f"ReadWritePaths={share} -{tmp_path / 'cache'} -{tmp_path / 'logs'}" in text
    assert f"Environment=LORASPOOL_CACHE_DIR={tmp_path / 'cache'}" in text  # a flag: the service must be told
    assert "LORASPOOL_LOG_FILE" not in text and f"--config {toml}" in text  # the file: it reads it itself
    assert (tmp_path / "logs").is_dir() and (tmp_path / "cache").is_dir()


@needs_analyze
def test_relative_paths_given_to_install_are_absolute_in_the_unit(tmp_path: Path) -> None:
    """Run from the folder that holds the config, as a person does: --config cfg/loraspool.toml, and a share
    named ../share inside it. systemd ignores relative and unnormalized paths in ReadWritePaths= and
    RequiresMountsFor= (losing the mount ordering), and the service starts in /."""
    units, cfg, share = tmp_path / "units", tmp_path / "cfg", tmp_path / "share"
    for folder in (units, cfg, share):
        folder.mkdir()
    (cfg / "loraspool.toml").write_text('share = "../share"\ncache_dir = "cache"\nlog_file = "logs/w.log"\n')
    out = subprocess.run([*real_exe(), "service", "install", "--id", "w", "--user", "root", "--config",
                          "cfg/loraspool.toml", "--unit-dir", str(units), "--no-enable"], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = (units / sl.UNIT_NAME).read_text()
    assert f"RequiresMountsFor={share}\n" in text and f"--config {cfg / 'loraspool.toml'}" in text
    assert f"ReadWritePaths={share} -{cfg / 'cache'} -{cfg / 'logs'}\n" in text
    assert sl.verify(units / sl.UNIT_NAME) == (0, "")


def test_install_refuses_what_would_fail_at_boot(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    out = run_cli("service", "install", "--share", str(tmp_path / "not-mounted"), "--id", "w",
                  "--user", "no-such-user-xyz", "--unit-dir", str(units), "--no-enable")
    assert out.returncode == 2 and not list(units.iterdir())
    assert "mount the share first" in out.stderr and "useradd --system" in out.stderr
    out = run_cli("service", "install", "--share", str(tmp_path), "--id", "bad id", "--unit-dir", str(units))
    assert out.returncode == 2 and "flag --id" in out.stderr


def test_a_unit_not_written_by_loraspool_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / sl.UNIT_NAME).write_text("[Unit]\nDescription=someone else's\n")
    with pytest.raises(sl.ServiceError, match="not written by loraspool"):
        sl.write_unit("x", tmp_path)
    with pytest.raises(sl.ServiceError, match="not written by loraspool"):
        sl.remove_unit(tmp_path)
    assert "someone else's" in (tmp_path / sl.UNIT_NAME).read_text()


# ── Windows, without Windows ────────────────────────────────────────────────────────────────────────
MAPPINGS = {"Z:": r"\\fileserver\ml", "Y:": ""}  # Y: is a network drive whose target Windows cannot say


def fake_mapped_drive(drive: str) -> str | None:
    return MAPPINGS.get(drive)


@pytest.mark.parametrize("share", [r"\\fileserver\ml\loraspool", "//fileserver/ml/loraspool",
                                   r"\\?\UNC\fileserver\ml\loraspool", r"D:\spool", r"\\?\D:\spool"])
def test_paths_a_service_can_use(share: str) -> None:
    assert sw.unc_problem(share, fake_mapped_drive) is None


def test_a_mapped_drive_is_caught_with_the_unc_to_use() -> None:
    problem = sw.unc_problem(r"Z:\loraspool", fake_mapped_drive)
    assert problem is not None and "mapped network drive" in problem
    assert r"--share \\fileserver\ml\loraspool" in problem
    unknown = sw.unc_problem(r"y:\spool", fake_mapped_drive)
    assert unknown is not None and "net use" in unknown and r"\\server\share\spool" in unknown


@pytest.mark.parametrize(("share", "words"), [(r"\\fileserver", "no share"), (r"spool\x", "not an absolute"),
                                              ("D:spool", "no '\\'"), (r"\\.\pipe\x", "device path")])
def test_paths_a_service_cannot_use(share: str, words: str) -> None:
    problem = sw.unc_problem(share, fake_mapped_drive)
    assert problem is not None and words in problem


def test_options_flags_and_environment() -> None:
    opts = sw.service_options(r"\\?\UNC\srv\ml\spool", "gpu-desk", None)
    assert opts == {"share": r"\\srv\ml\spool", "id": "gpu-desk"}
    assert sw.service_flags(opts) == {"share": r"\\srv\ml\spool", "id": "gpu-desk", "config": None}
    venv, repo = PureWindowsPath(r"C:\loraspool\.venv"), PureWindowsPath(r"C:\loraspool")
    env = sw.service_environment(venv, repo, r"C:\Windows\system32")
    assert env[0] == r"PYTHONPATH=C:\loraspool;C:\loraspool\.venv\Lib\site-packages"
    assert env[1].startswith(r"PATH=C:\loraspool\.venv\Lib\site-packages\pywin32_system32;")
    assert env[1].endswith(r";C:\Windows\system32")
    assert sw.account(None) is None and sw.account("svc-loraspool") == r".\svc-loraspool"
    assert sw.account(r"CORP\svc") == r"CORP\svc"
    assert [a[0] for a in sw.failure_actions()["Actions"]] == [1, 1, 1]


@pytest.fixture
def root_logger() -> Iterator[None]:
    """The runner configures logging as a service must; give the other tests their logging back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_service_stop_is_the_graceful_stop(share: Share, tmp_path: Path, root_logger: None) -> None:
    """SvcStop calls ServiceRunner.stop: the same Worker.request_stop as SIGTERM, ending in a final heartbeat."""
    (tmp_path / "loraspool.toml").write_text('device = "cpu"\nwatch = "polling"\n')
    runner = sw.ServiceRunner({"share": str(share.root), "id": "svc-w", "config": str(tmp_path / "loraspool.toml")},
                              default_log=tmp_path / "logs" / "worker.log")
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(runner.run()))
    thread.start()
    try:
        wait_for(lambda: share.heartbeat_file("svc-w").exists(), 60, "the service's first heartbeat")
        drop(share, "probe-svc.json", {"kind": "probe"})
        wait_for(lambda: (share.results / "probe-svc" / "result.json").exists(), 60, "the probe's result")
    finally:
        runner.stop("service stop")
        thread.join(timeout=60)
    assert codes == [0]
    hb = read_model(share.heartbeat_file("svc-w"), Heartbeat)
    assert hb is not None and hb.state is WorkerState.stopped
    recs = [json.loads(line) for line in (tmp_path / "logs" / "worker.log").read_text().splitlines()]
    assert any("got service stop" in r["message"] and r.get("worker") == "svc-w" for r in recs)


def test_a_stop_before_the_worker_exists_still_stops_it(share: Share) -> None:
    class FakeWorker:
        def __init__(self, *_: object) -> None:
            self.why: str | None = None

        def request_stop(self, why: str) -> None:
            self.why = why

        def work(self) -> int:
            return 0 if self.why == "service stop" else 1

    runner = sw.ServiceRunner({"share": str(share.root), "id": "w"}, make_worker=FakeWorker)
    runner.stop()
    assert runner.run() == 0


def test_a_service_with_bad_settings_exits_2_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                          root_logger: None) -> None:
    runner = sw.ServiceRunner({"share": str(tmp_path / "gone"), "id": "w", "config": None})
    assert runner.run() == 2
    assert "loraspool init" in caplog.text or "not a loraspool share" in caplog.text
    # Settings that do not even resolve: no log_file is known, and a service has no console. The default log
    # file gets it, where the Windows service's own error message ("see its log file") points.
    bad = tmp_path / "bad.toml"
    bad.write_text('share = "x"\nnot_a_setting = 1\n')
    default_log = tmp_path / "logs" / "worker.log"
    runner = sw.ServiceRunner({"share": None, "id": "w", "config": str(bad)}, default_log=default_log)
    assert runner.run() == 2
    assert "cannot start" in default_log.read_text() and "not_a_setting" in default_log.read_text()
