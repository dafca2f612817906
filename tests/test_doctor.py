"""``loraspool doctor`` on real temp shares and real child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from spooler import doctor
from spooler.share import Share

GB = 1024**3


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_a_local_share_passes_and_is_left_as_it_was(share: Share, tmp_path: Path) -> None:
    (share.tmp / "a-persons-file").write_text("keep me")
    before = sorted(p.name for p in share.root.rglob("*"))
    checks = by_name(doctor.run_checks(share.root, tmp_path / "cache", packages=False))
    for name in ("share reachable", "share writable", "rename", "locks", "change notification", "clock offset",
                 "share free space", "cache free space"):
        assert checks[name].status == "ok", (name, checks[name])
    assert "native notification sees another process" in checks["change notification"].detail
    assert "kept out" in checks["locks"].detail
    assert sorted(p.name for p in share.root.rglob("*")) == before


def test_an_uninitialised_or_missing_share_fails_with_the_fix(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    checks = by_name(doctor.share_checks(bare))
    assert checks["share reachable"].status == "fail" and f"loraspool init {bare}" in checks["share reachable"].fix
    assert checks["rename"].status == "ok" and list(bare.iterdir()) == []
    gone = by_name(doctor.share_checks(tmp_path / "gone"))
    assert gone["share reachable"].status == "fail" and "mount the share" in gone["share reachable"].fix
    assert by_name(doctor.run_checks(None, None, packages=False))["share reachable"].status == "fail"


def test_clock_offset_is_a_warning(tmp_path: Path) -> None:
    ahead = doctor.clock_offset(tmp_path, now=lambda: time.time() - 120)
    assert ahead.status == "warn" and "ahead of" in ahead.detail and "NTP" in ahead.fix
    assert doctor.clock_offset(tmp_path).status == "ok"


def test_package_verdicts() -> None:
    missing = by_name(doctor.package_checks({"torch_error": "ModuleNotFoundError: torch"}, gpu_count=0))
    assert missing["torch"].status == "fail" and "deploy/setup.sh" in missing["torch"].fix
    assert missing["bitsandbytes"].status == "warn"
    cpu_build = by_name(doctor.package_checks({"torch": "2.13.0+cpu", "cuda": False}, gpu_count=2))
    assert cpu_build["torch"].status == "fail" and "CUDA build" in cpu_build["torch"].fix
    good = by_name(doctor.package_checks({"torch": "2.13.0", "cuda_build": "12.8", "cuda": True,
                                          "gpus": ["NVIDIA RTX 4090"], "bf16": True, "bitsandbytes": "0.48"},
                                         gpu_count=1))
    assert good["torch"].status == "ok" and "RTX 4090" in good["torch"].detail
    assert good["bitsandbytes"].status == "ok"
    cpu_only = by_name(doctor.package_checks({"torch": "2.13.0+cpu", "cuda": False}, gpu_count=0))
    assert cpu_only["torch"].status == "warn"


def test_gpu_memory_verdicts() -> None:
    checks = doctor.gpu_memory([{"index": 0, "name": "A", "memory_free_bytes": 20 * GB, "memory_total_bytes": 24 * GB},
                                {"index": 1, "name": "B", "memory_free_bytes": 2 * GB, "memory_total_bytes": 24 * GB},
                                {"index": 2, "name": "C", "memory_free_bytes": None, "memory_total_bytes": None}])
    assert [c.status for c in checks] == ["ok", "warn", "warn"] and "nvidia-smi" in checks[1].fix
    assert "does not report its memory" in checks[2].detail
    assert doctor.gpu_memory([])[0].status == "warn"


def test_doctor_cli_survives_a_broken_torch(share: Share, tmp_path: Path) -> None:
    """A torch that fails to import (no CUDA libraries, a half-finished install) is a line in the report."""
    fake = tmp_path / "fake-site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libcudart.so.12: cannot open shared object file')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASPOOL_")}
    env["PYTHONPATH"] = str(tmp_path / "fake-site")
    out = subprocess.run([sys.executable, "-m", "spooler.cli", "doctor", "--share", str(share.root), "--json"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).parents[1])
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    checks = {c["name"]: c for c in doc["checks"]}
    assert doc["ok"] is False and checks["torch"]["status"] == "fail"
    assert "libcudart" in checks["torch"]["detail"]
    assert checks["share reachable"]["status"] == "ok" and checks["rename"]["status"] == "ok"
    text = subprocess.run([sys.executable, "-m", "spooler.cli", "doctor", "--share", str(share.root)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).parents[1])
    assert "fix: install it into the worker's venv" in text.stdout and "to fix" in text.stdout


def test_a_gpu_that_does_not_report_a_field_stays_in_the_list() -> None:
    """NVML on some cards (laptops, WSL, vGPU) raises NotSupported for temperature or utilisation: that field is
    None, the GPU is still listed and valid in a heartbeat. A GPU whose handle cannot be had is left out. No
    driver exists on CI, so this NVML is a stand-in with the real library's call signatures."""
    from types import SimpleNamespace

    from schemas.heartbeat import GpuInfo
    from worker.sysinfo import read_gpus

    class NotSupported(Exception):
        pass

    def temperature(handle: int, sensor: int) -> int:
        if handle == 0:
            raise NotSupported("temperature")
        return 61

    def handle(i: int) -> int:
        if i == 2:
            raise NotSupported("handle")
        return i

    nv = SimpleNamespace(
        nvmlDeviceGetCount=lambda: 3, nvmlDeviceGetHandleByIndex=handle, NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetName=lambda h: b"RTX 3060" if h == 0 else "RTX 4090",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=1 * GB, free=11 * GB, total=12 * GB),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=37), nvmlDeviceGetTemperature=temperature)
    gpus = read_gpus(nv)
    assert [(g["index"], g["name"], g["temperature_c"]) for g in gpus] == [(0, "RTX 3060", None), (1, "RTX 4090", 61.0)]
    assert all(GpuInfo.model_validate(g).memory_free_bytes == 11 * GB for g in gpus)
    assert [c.status for c in doctor.gpu_memory(gpus)] == ["ok", "ok"]


def test_an_nvml_call_that_hangs_does_not_stop_the_heartbeat() -> None:
    """A hung driver can leave an NVML call blocked for good. The heartbeat read GPUs in its own thread and would
    stop with it, and every observer would requeue the job this live worker runs. GPUs are now read in a
    thread of their own; the heartbeat lists the last reading while it is fresh, and none after. The NVML here
    is a stand-in with the real library's call signatures, one whose memory query blocks after three answers."""
    import threading
    import time
    from types import SimpleNamespace

    from worker.sysinfo import SystemSampler

    answers, hang = [], threading.Event()

    def memory(handle: int) -> SimpleNamespace:
        answers.append(handle)
        if len(answers) > 3:
            hang.wait()  # never set: the call never returns
        return SimpleNamespace(used=1 * GB, free=11 * GB, total=12 * GB)

    nv = SimpleNamespace(
        nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: i, NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetName=lambda h: "RTX 3090", nvmlDeviceGetMemoryInfo=memory,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=50), nvmlDeviceGetTemperature=lambda h, s: 60)
    sampler = SystemSampler(interval=0.05, nvml=nv)
    assert sampler()["gpus"][0]["name"] == "RTX 3090"  # the first heartbeat waits for the first reading
    samples: list[dict] = []

    def beat() -> None:
        for _ in range(40):
            samples.append(sampler())
            time.sleep(0.05)

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    beating.join(timeout=60)
    assert not beating.is_alive(), "the heartbeat's sampling blocked on NVML"
    assert len(answers) == 4  # the reader asked a fourth time, and hangs there
    listed = [bool(s["gpus"]) for s in samples]
    assert True in listed and listed[-1] is False, listed  # the readings while NVML answered, then none
