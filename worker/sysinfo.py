"""What a heartbeat says about the machine: GPUs from NVML, CPU and RAM from psutil."""

from __future__ import annotations

import contextlib
import logging

import psutil

log = logging.getLogger(__name__)


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
        out = []
        nv = self._nvml
        for i in range(self.gpu_count()):
            with contextlib.suppress(Exception):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                util = nv.nvmlDeviceGetUtilizationRates(h)
                temp = nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
                out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                            "utilization_pct": float(util.gpu), "memory_used_bytes": int(mem.used),
                            "memory_total_bytes": int(mem.total), "temperature_c": float(temp)})
        return out

    def __call__(self) -> dict:
        vm = psutil.virtual_memory()
        return {"gpus": self.gpus(), "cpu_pct": psutil.cpu_percent(None), "ram_used_bytes": int(vm.used),
                "ram_total_bytes": int(vm.total)}
