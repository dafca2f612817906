"""Worker settings: defaults < loraspool.toml < LORASPOOL_* < flags, every problem listed, and the helpers the
daemon asks (quiet hours, allowed model roots, concurrency)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, time
from pathlib import Path

import pytest

from spooler.config import (
    ConfigError,
    WorkerSettings,
    concurrency,
    default_cache_dir,
    default_config_path,
    devices_problem,
    gpu_indices,
    in_quiet_hours,
    model_allowed,
    resolve,
)
from spooler.share import Share

NO_FILE = {"default_config": Path("/nonexistent/loraspool.toml")}


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "loraspool.toml"
    path.write_text(text)
    return path


def settings(**values: object) -> WorkerSettings:
    return resolve({"share": "/s", **values}, {}, **NO_FILE)[0]


def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'share = "/from/file"\nid = "file-id"\ndevice = "cpu"\nquiet_hours = "22:00-07:00"\n'
                                "max_concurrent_jobs = 3\n")
    env = {"LORASPOOL_CONFIG": str(path), "LORASPOOL_WORKER_ID": "env-id", "LORASPOOL_DEVICE": "cuda"}
    cfg, src = resolve({"device": "auto"}, env)
    assert (str(cfg.share), cfg.id, cfg.device, cfg.quiet_hours, cfg.max_concurrent_jobs, cfg.watch) == (
        "/from/file", "env-id", "auto", "22:00-07:00", 3, "auto")
    assert src["share"] == f"file {path}" and src["id"] == "env LORASPOOL_WORKER_ID"
    assert src["device"] == "flag --device" and src["watch"] == "default"


def test_an_empty_quiet_hours_variable_clears_the_files_window(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'share = "/s"\nquiet_hours = "22:00-07:00"\n')
    cfg, src = resolve({}, {"LORASPOOL_CONFIG": str(path), "LORASPOOL_QUIET_HOURS": ""})
    assert cfg.quiet_hours is None and src["quiet_hours"] == "env LORASPOOL_QUIET_HOURS"
    cfg, _ = resolve({}, {"LORASPOOL_CONFIG": str(path), "LORASPOOL_WORKER_ID": ""})  # others: empty is unset
    assert cfg.quiet_hours == "22:00-07:00" and cfg.id


def test_config_flag_beats_config_env(tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('share = "/a"\n')
    b.write_text('share = "/b"\n')
    cfg, src = resolve({"config": a}, {"LORASPOOL_CONFIG": str(b)})
    assert str(cfg.share) == "/a" and src["share"] == f"file {a}"


def test_relative_paths_in_the_file_are_relative_to_it(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'share = "share"\ncache_dir = "cache"\nlog_file = "logs/worker.log"\n')
    cfg, _ = resolve({"config": path}, {})
    assert (cfg.share, cfg.cache_dir, cfg.log_file) == (tmp_path / "share", tmp_path / "cache",
                                                        tmp_path / "logs" / "worker.log")


def test_a_missing_default_file_is_fine_but_a_named_one_is_not(tmp_path: Path) -> None:
    cfg, src = resolve({"share": "/s"}, {}, default_config=tmp_path / "absent.toml")
    assert src["share"] == "flag --share" and cfg.device == "auto"
    with pytest.raises(ConfigError) as e:
        resolve({"share": "/s", "config": tmp_path / "absent.toml"}, {})
    assert "--config" in str(e.value) and "no such file" in str(e.value)
    with pytest.raises(ConfigError, match=r"\$LORASPOOL_CONFIG"):
        resolve({"share": "/s"}, {"LORASPOOL_CONFIG": str(tmp_path / "absent.toml")})


def test_every_problem_is_listed_with_where_it_came_from(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'devcies = [0]\nquiet_hours = "25:00-07:00"\nlog_backups = -1\nonly_job = "x"\n'
                                'allowed_model_roots = ["../up"]\n')
    env = {"LORASPOOL_MAX_CONCURRENT_JOBS": "0"}
    with pytest.raises(ConfigError) as e:
        resolve({"config": path, "id": "bad id"}, env)
    problems = e.value.problems
    text = "\n".join(problems)
    assert len(problems) == 8, text
    assert f"{path}: devcies: unknown key; did you mean 'devices'?" in problems
    assert any(p.startswith(f"{path}: only_job: unknown key") for p in problems)  # a flag, never a file setting
    assert "no share given" in text and "LORASPOOL_SHARE" in text
    assert f"file {path}: quiet_hours:" in text and "00:00-23:59" in text
    assert f"file {path}: log_backups:" in text
    assert f"file {path}: allowed_model_roots:" in text and "'..'" in text
    assert "env LORASPOOL_MAX_CONCURRENT_JOBS: max_concurrent_jobs:" in text
    assert "flag --id: id:" in text
    assert str(e.value).startswith("bad worker settings (8 problems):")


def test_bad_toml_is_reported_with_the_other_problems(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "share = \n")
    with pytest.raises(ConfigError) as e:
        resolve({"config": path, "devices": "x"}, {})
    assert any("not valid TOML" in p for p in e.value.problems)
    assert any("flag --devices" in p for p in e.value.problems)


def test_env_values_are_parsed() -> None:
    env = {"LORASPOOL_SHARE": "/s", "LORASPOOL_DEVICES": "1, 0", "LORASPOOL_ALLOWED_MODEL_ROOTS": "models,base\\x",
           "LORASPOOL_CACHE_MODELS": "false", "LORASPOOL_LOG_MAX_BYTES": "1048576",
           "LORASPOOL_QUIET_HOURS": " 9:05 - 17:30 "}
    cfg, src = resolve({}, env, **NO_FILE)
    assert cfg.devices == [1, 0] and cfg.allowed_model_roots == ["models", "base/x"]
    assert cfg.cache_models is False and cfg.log_max_bytes == 1048576 and cfg.quiet_hours == "09:05-17:30"
    assert src["devices"] == "env LORASPOOL_DEVICES"
    assert resolve({"devices": "all"}, env, **NO_FILE)[0].devices is None
    assert resolve({}, {**env, "LORASPOOL_GPU_MEMORY_GIB": "10.5"}, **NO_FILE)[0].gpu_memory_gib == 10.5
    for bad in ("0", "nan", "lots"):
        with pytest.raises(ConfigError, match="LORASPOOL_GPU_MEMORY_GIB"):
            resolve({}, {**env, "LORASPOOL_GPU_MEMORY_GIB": bad}, **NO_FILE)


@pytest.mark.parametrize(("value", "problem"), [("0,0", "distinct"), ("-1", "distinct"), ("7-9", "GPU numbers"),
                                                ([], "is empty")])
def test_bad_devices(value: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        settings(devices=value)


def test_equal_quiet_hours_are_refused() -> None:
    with pytest.raises(ConfigError, match="same time"):
        settings(quiet_hours="07:00-07:00")


def test_per_os_defaults() -> None:
    assert default_config_path({}, "linux") == Path("/etc/loraspool/loraspool.toml")
    win = default_config_path({"ProgramData": r"D:\PD"}, "win32")
    assert str(win).replace("/", "\\").endswith(r"D:\PD\loraspool\loraspool.toml".replace("/", "\\"))
    assert default_cache_dir({"CACHE_DIRECTORY": "/var/cache/loraspool"}, "linux") == Path("/var/cache/loraspool")
    assert default_cache_dir({"XDG_CACHE_HOME": "/x"}, "linux") == Path("/x/loraspool")
    cfg, src = resolve({"share": "/s"}, {"CACHE_DIRECTORY": "/var/cache/loraspool"}, **NO_FILE)
    assert cfg.cache_dir == Path("/var/cache/loraspool") and src["cache_dir"] == "default ($CACHE_DIRECTORY)"


@pytest.mark.parametrize(("window", "now", "quiet"), [
    ("22:00-07:00", time(23, 30), True), ("22:00-07:00", time(3, 0), True), ("22:00-07:00", time(7, 0), False),
    ("22:00-07:00", time(21, 59), False), ("22:00-07:00", time(22, 0), True), ("09:00-17:00", time(12, 0), True),
    ("09:00-17:00", time(17, 0), False), ("09:00-17:00", time(8, 59), False),
])
def test_quiet_hours_wrap_midnight(window: str, now: time, quiet: bool) -> None:
    assert in_quiet_hours(settings(quiet_hours=window), now) is quiet
    assert in_quiet_hours(settings(quiet_hours=window), datetime(2025, 1, 1, now.hour, now.minute)) is quiet


def test_no_quiet_hours_is_never_quiet() -> None:
    assert not in_quiet_hours(settings(), time(3, 0))


def test_model_roots(tmp_path: Path) -> None:
    share = tmp_path / "share"
    for d in ("models/a", "base/b", "other/c"):
        (share / d).mkdir(parents=True)
    (share / "models" / "link").symlink_to(share / "other" / "c")
    anywhere = settings()
    assert model_allowed(anywhere, share, share / "other" / "c") is None
    cfg = settings(allowed_model_roots=["models", str(share / "base")])
    assert model_allowed(cfg, share, share / "models" / "a") is None
    assert model_allowed(cfg, share, share / "base" / "b") is None
    problem = model_allowed(cfg, share, share / "other" / "c")
    assert problem is not None and "'other/c'" in problem and "loraspool config show says where it is set" in problem
    # A link inside an allowed root to a folder outside it is judged by where it leads.
    assert model_allowed(cfg, share, share / "models" / "link") is not None


def test_concurrency_and_devices() -> None:
    assert concurrency(settings(), 0) == 1
    assert concurrency(settings(), 2) == 2
    assert concurrency(settings(devices="1"), 2) == 1
    assert concurrency(settings(max_concurrent_jobs=3), 1) == 3
    assert concurrency(settings(device="cpu"), 4) == 1
    assert gpu_indices(settings(devices="0,3"), 2) == [0]
    assert "GPU 3" in (devices_problem(settings(devices="0,3"), 2) or "")
    assert devices_problem(settings(devices="0,1"), 2) is None
    assert "this machine has none that the NVIDIA driver shows" in (devices_problem(settings(devices="1"), 0) or "")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORASPOOL_")}
    return subprocess.run([sys.executable, "-m", "spooler.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})})


def test_config_show_says_where_each_value_came_from(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'share = "/mnt/share"\nquiet_hours = "22:00-07:00"\ndevices = [0]\n')
    out = run_cli("config", "show", "--json", "--id", "desk", env={"LORASPOOL_CONFIG": str(path),
                                                                    "LORASPOOL_WATCH": "polling"})
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["config_file"] == str(path) and doc["config_file_found"] is True
    assert doc["settings"]["share"] == "/mnt/share" and doc["settings"]["devices"] == [0]
    assert doc["sources"] == {**doc["sources"], "share": f"file {path}", "id": "flag --id",
                              "watch": "env LORASPOOL_WATCH", "device": "default"}
    assert "only_job" not in doc["settings"]
    text = run_cli("config", "show", "--config", str(path))
    assert text.returncode == 0 and "quiet_hours" in text.stdout and f"# file {path}" in text.stdout
    assert "from --config" in text.stdout


def test_config_show_and_worker_fail_with_every_problem(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'share = "/mnt/share"\nquiet = "22-07"\nmax_concurrent_jobs = 0\n')
    for cmd in (("config", "show"), ("worker",)):
        out = run_cli(*cmd, "--config", str(path))
        assert out.returncode == 2, out.stderr
        assert "2 problems" in out.stderr and "quiet: unknown key" in out.stderr
        assert "max_concurrent_jobs" in out.stderr


def test_the_example_in_deploy_readme_is_valid_and_complete(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "deploy" / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    path = write_toml(tmp_path, example)
    cfg, src = resolve({"config": path}, {})
    file_keys = {k for k in WorkerSettings.model_fields if k not in ("fallback", "only_job")}
    assert {k for k, v in src.items() if v == f"file {path}"} == file_keys
    assert cfg.quiet_hours == "22:00-07:00" and cfg.devices == [0, 1]


def test_each_slot_gets_its_own_gpu_or_one_in_turn() -> None:
    """With more slots than GPUs, each slot saw all of them and trained on the first: three jobs on GPU 0, GPU 1
    idle. Found by a review of the multi-GPU paths."""
    from worker.slots import slot_gpus

    assert slot_gpus([0, 1], 2) == [[0], [1]]
    assert slot_gpus([0, 1], 3) == [[0], [1], [0]]
    assert slot_gpus([0, 1, 2, 3], 2) == [[0, 2], [1, 3]]
    assert slot_gpus([], 2) == [None, None]


@pytest.mark.parametrize(("visible", "devices", "slots"), [
    (None, None, [[0], [1]]),  # every GPU NVML counts, one job each
    ("1", None, [None]),  # GPU 0 kept for someone else: one job, on what the variable leaves
    ("GPU-aaaa, GPU-bbbb", None, [["GPU-aaaa"], ["GPU-bbbb"]]),  # dealt out as written, UUIDs too
    ("0,-1,1", None, [None]),  # CUDA reads the list up to its first bad entry
    ("1", [0, 1], [[0], [1]]),  # devices in loraspool.toml is the worker's own setting: it wins, with a warning
])
def test_a_worker_started_with_cuda_visible_devices_uses_only_what_it_leaves(
        share: Share, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, visible: str | None,
        devices: list[int] | None, slots: list[list[object] | None]) -> None:
    """A service started with CUDA_VISIBLE_DEVICES=1 on a two-GPU desktop ran two jobs, one of them on GPU 0,
    which the variable was there to keep free. Now the slots share out what it leaves, and the training
    process of each gets its part of the same list, counted as the worker was started (horse.visible_devices)."""
    from worker import horse
    from worker.slots import Slots
    from worker.sysinfo import SystemSampler

    monkeypatch.setattr(SystemSampler, "gpu_count", lambda self: 2)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    cfg = WorkerSettings(share=share.root, id="desk", device="auto", cache_dir=tmp_path / "cache", devices=devices)
    workers = Slots(share, cfg).workers
    assert [w.gpus for w in workers] == slots
    assert [w.id for w in workers] == ["desk", "desk-2"][:len(slots)]
    assert horse.visible_devices([1]) == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert horse.visible_devices(["GPU-bbbb"]) == {"CUDA_VISIBLE_DEVICES": "GPU-bbbb"}
