"""What a heartbeat says about the machine: GPUs from NVML, CPU and RAM from psutil."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

log = logging.getLogger(__name__)


def read_gpus(nv: Any) -> list[dict]:
    """Every GPU NVML shows, as ``GpuInfo`` fields. Each field is queried on its own: a card that does not report
    one (temperature on some laptops, utilisation under WSL or vGPU) leaves that field None, not itself out of the
    heartbeat. The worker's heartbeat and ``loraspool doctor`` both read GPUs here."""
    out = []
    try:
        count = int(nv.nvmlDeviceGetCount())
    except Exception:
        return []
    for i in range(count):
        try:
            h = nv.nvmlDeviceGetHandleByIndex(i)
            name = nv.nvmlDeviceGetName(h)
        except Exception:
            continue
        mem = _query(nv.nvmlDeviceGetMemoryInfo, h)
        util = _query(nv.nvmlDeviceGetUtilizationRates, h)
        temp = _query(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
        out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                    "utilization_pct": None if util is None else float(util.gpu),
                    "memory_used_bytes": None if mem is None else int(mem.used),
                    "memory_free_bytes": None if mem is None else int(mem.free),
                    "memory_total_bytes": None if mem is None else int(mem.total),
                    "temperature_c": None if temp is None else float(temp)})
    return out


def _query(call: Callable[..., Any], *args: Any) -> Any:
    try:
        return call(*args)
    except Exception:  # NVMLError_NotSupported and kin: this field is unknown on this card
        return None


class SystemSampler:
    """Callable giving heartbeat fields. NVML is initialised once; without a driver the GPU list is empty.

    GPUs are read in a thread of their own, and the heartbeat takes the last reading: an NVML call that hangs (a
    hung driver, a GPU falling off the bus) must not stop the heartbeat, or every observer would take this live
    worker for dead and requeue the job it is running. A reading older than ``STALE_READINGS`` intervals is
    dropped: the heartbeat then lists no GPUs rather than old numbers."""

    STALE_READINGS = 3

    def __init__(self, interval: float = 2.0, nvml: Any = None) -> None:
        self._nvml = nvml if nvml is not None else _init_nvml()
        self._interval = interval
        self._lock = threading.Lock()
        self._gpus: list[dict] = []
        self._read_at: float | None = None
        self._started = False
        self._first = threading.Event()
        psutil.cpu_percent(None)  # the first call only starts the measurement

    def gpu_count(self) -> int:
        if self._nvml is None:
            return 0
        try:
            return int(self._nvml.nvmlDeviceGetCount())
        except Exception:
            return 0

    def gpus(self) -> list[dict]:
        if self._nvml is None:
            return []
        with self._lock:
            starting = not self._started
            if starting:
                self._started = True
                threading.Thread(target=self._read_forever, name="nvml-reader", daemon=True).start()
        if starting:  # the first heartbeat lists GPUs too, unless NVML is slow to answer
            self._first.wait(self._interval)
        with self._lock:
            fresh = self._read_at is not None and \
                time.monotonic() - self._read_at < self.STALE_READINGS * self._interval
            return list(self._gpus) if fresh else []

    def _read_forever(self) -> None:
        while True:
            gpus = read_gpus(self._nvml)
            with self._lock:
                self._gpus, self._read_at = gpus, time.monotonic()
            self._first.set()
            time.sleep(self._interval)

    def __call__(self) -> dict:
        vm = psutil.virtual_memory()
        return {"gpus": self.gpus(), "cpu_pct": psutil.cpu_percent(None), "ram_used_bytes": int(vm.used),
                "ram_total_bytes": int(vm.total)}


def _init_nvml() -> Any:
    """pynvml, initialised, or None. No library (a machine without the NVIDIA driver) is normal; any other
    failure (a driver and library of different versions after an update, a boot race) means a GPU this worker
    will not see, so it is said once, loudly."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as e:
        quiet = type(e).__name__ in ("NVMLError_LibraryNotFound", "ImportError", "ModuleNotFoundError")
        log.log(logging.DEBUG if quiet else logging.WARNING,
                "NVML does not answer (%s: %s): GPUs are not listed in heartbeats and an auto worker trains on "
                "CPU; run nvidia-smi to see why (a driver updated without a reboot, say)", type(e).__name__, e)
        return None
