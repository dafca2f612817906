"""What a heartbeat says about the machine: GPUs from NVML, CPU and RAM from psutil."""

from __future__ import annotations

import logging
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
    """Callable giving heartbeat fields. NVML is initialised once; without a driver the GPU list is empty."""

    def __init__(self) -> None:
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as e:  # no driver, no library, a container without /dev/nvidia*: all mean no GPUs
            log.debug("NVML unavailable: %s", e)
        psutil.cpu_percent(None)  # the first call only starts the measurement

    def gpu_count(self) -> int:
        if self._nvml is None:
            return 0
        try:
            return int(self._nvml.nvmlDeviceGetCount())
        except Exception:
            return 0

    def gpus(self) -> list[dict]:
        return read_gpus(self._nvml) if self._nvml is not None else []

    def __call__(self) -> dict:
        vm = psutil.virtual_memory()
        return {"gpus": self.gpus(), "cpu_pct": psutil.cpu_percent(None), "ram_used_bytes": int(vm.used),
                "ram_total_bytes": int(vm.total)}
