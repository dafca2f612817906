"""Several jobs at once on one machine: one ``Worker`` per slot, each with its own GPUs.

A desktop with two cards trains two jobs, one per card, by default (``max_concurrent_jobs`` says otherwise).
Each slot is a complete worker with its own id, heartbeat and running folder, so the claim protocol, the
reaper and ``loraspool status`` need no notion of slots: slot 1 is the configured id, the others add
``-2``, ``-3``, .... A slot's training child sees only its GPUs (``CUDA_VISIBLE_DEVICES``). The slots share one
folder watcher and one reaper: on a network share the folders are listed, and the heartbeats read, once per
interval, not once per slot.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

from spooler.clock import Clock, SystemClock
from spooler.config import WorkerSettings, concurrency, devices_problem, gpu_indices
from spooler.reaper import Reaper
from spooler.share import Share
from worker.daemon import Worker, job_watcher
from worker.sysinfo import SystemSampler

log = logging.getLogger(__name__)

Gpu = int | str  # an NVML index (devices, or every GPU), or an entry of an inherited CUDA_VISIBLE_DEVICES


def slot_gpus(gpus: list[Gpu], slots: int) -> list[list[Gpu] | None]:
    """GPUs per slot: dealt out in turn while there are at least as many GPUs as slots; with more slots than
    GPUs, one each in turn, so two slots share a card. (Each slot seeing all of them put every job on the first:
    a training process uses its first visible GPU.) None (no GPUs named): leave CUDA_VISIBLE_DEVICES as it is."""
    if not gpus:
        return [None] * slots
    if slots > len(gpus):
        return [[gpus[i % len(gpus)]] for i in range(slots)]
    return [gpus[i::slots] for i in range(slots)]


def inherited_gpus(env: Mapping[str, str]) -> list[str] | None:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` in the worker's own environment leaves it, as written there (numbers in
    the order its ``CUDA_DEVICE_ORDER`` gives, or UUIDs); None when it is not set. Like CUDA, the list ends at the
    first entry that names no device, so ``-1`` or an empty value hides them all."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries: list[str] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def slot_id(base: str, index: int) -> str:
    return base if index == 0 else f"{base[:60]}-{index + 1}"


class Slots:
    """The same face as ``Worker`` (``work``, ``request_stop``), for the CLI, systemd and the Windows service."""

    def __init__(self, share: Share, cfg: WorkerSettings, clock: Clock | None = None) -> None:
        gpu_count = SystemSampler().gpu_count()
        if problem := devices_problem(cfg, gpu_count):
            log.warning("worker %s: %s", cfg.id, problem)
        one_off = bool(cfg.only_job or cfg.fallback)  # a submitter's fallback runs its one job
        # A service started with CUDA_VISIBLE_DEVICES=1 keeps GPU 0 for someone else: the slots share out what it
        # leaves, each given a part of the same list, so CUDA reads them as the worker was started.
        inherited = inherited_gpus(os.environ) if cfg.devices is None and cfg.device != "cpu" else None
        if inherited is not None:
            log.info("worker %s: CUDA_VISIBLE_DEVICES=%s in its environment leaves it %d GPU(s)", cfg.id,
                     os.environ["CUDA_VISIBLE_DEVICES"], len(inherited))
        n = 1 if one_off else concurrency(cfg, gpu_count if inherited is None else len(inherited))
        gpus: list[Gpu] = []
        if inherited is not None and n > 1:
            gpus = [*inherited]
        elif inherited is None and (cfg.devices is not None or n > 1):
            gpus = [*gpu_indices(cfg, gpu_count)]
        if cfg.devices is not None and (hidden := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
            # devices counts as NVML does, and each slot sets the variable for its own training process.
            log.warning("worker %s: CUDA_VISIBLE_DEVICES=%s in its environment is overridden by devices in "
                        "loraspool.toml, numbered as nvidia-smi does; set one of the two", cfg.id, hidden)
        clock = clock or SystemClock()
        self.watcher = job_watcher(share, cfg) if n > 1 else None  # one for all slots: one poll of the share
        self.reaper = Reaper(share, clock)  # and one read of the heartbeats per interval
        self.workers = [Worker(share, cfg.model_copy(update={"id": slot_id(cfg.id, i)}), clock, gpus=g,
                               watcher=self.watcher, reaper=self.reaper)
                        for i, g in enumerate(slot_gpus(gpus, n))]
        if n > 1:
            log.info("worker %s runs %d jobs at once: %s", cfg.id, n,
                     ", ".join(f"{w.id} on {'GPU ' + ','.join(map(str, w.gpus)) if w.gpus else w.device}"
                               for w in self.workers))

    def request_stop(self, why: str) -> None:
        for w in self.workers:
            w.request_stop(why)

    def work(self) -> int:
        if len(self.workers) == 1:
            return self.workers[0].work()
        assert self.watcher is not None
        self.watcher.start()
        log.info("worker %s watching with the %s observer, for its %d slots", self.workers[0].cfg.id,
                 self.watcher.mode, len(self.workers))
        try:
            return self._run_slots()
        finally:
            self.watcher.stop()

    def _run_slots(self) -> int:
        codes: dict[str, int] = {}
        threads = [threading.Thread(target=self._run_slot, args=(w, codes), name=f"slot-{w.id}")
                   for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)  # short joins: the main thread must stay free to run the signal handlers
        return max(codes.values(), default=0)

    def _run_slot(self, worker: Worker, codes: dict[str, int]) -> None:
        try:
            codes[worker.id] = worker.work()
        except Exception:  # one slot's failure to start must not leave the others running unsupervised
            log.exception("worker %s stopped with an error; stopping the other slots", worker.id)
            codes[worker.id] = 2
            self.request_stop(f"slot {worker.id} failed")
