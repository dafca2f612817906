"""One LoRA training attempt, run in the worker's child process (``worker.horse``).

Order matters: the cheap checks that can refuse a job (model folder, dataset file, dataset rows, target
module names) all run before the model's weights are read, so a typo costs seconds, not a multi-minute load.

This module stays light (no torch at import): the daemon unpickles the ``TrainOutcome`` the child sends, and
that imports this module in the daemon, which must never load torch. The torch side is ``worker.engine`` and
``worker.loop``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.heartbeat import Progress
from schemas.job import JobSpec
from schemas.result import DataReport, Metrics, ProbeOutput
from worker.modelguard import check_dataset_file, check_model_dir
from worker.verify import hash_folder

if TYPE_CHECKING:
    from worker.loop import Dist


@dataclass
class TrainRequest:
    job: JobSpec  # validated; job.id is set
    model_dir: Path  # already resolved inside the share
    datasets: list[Path]  # already resolved inside the share, in the job's order
    share_root: Path
    out_dir: Path  # this attempt's folder on the share (may not exist yet); the adapter goes to out_dir / "adapter"
    device: str  # "cpu" or "cuda"
    file_mode: int  # chmod for every file written (safetensors writes 0600; other share users must read them)


@dataclass
class TrainOutcome:
    metrics: Metrics
    adapter_dir: Path
    files: dict[str, str]  # name relative to adapter_dir -> sha256 hex
    size_bytes: int
    notes: list[str] = field(default_factory=list)
    data: DataReport | None = None
    resumed_from_step: int | None = None
    probes: list[ProbeOutput] = field(default_factory=list)


# ── entry point ──────────────────────────────────────────────────────────────────────────────────────────
def run_training(req: TrainRequest, report: Callable[[Progress], None],
                 should_stop: Callable[[], bool]) -> TrainOutcome:
    """Train one adapter and save it to ``req.out_dir / "adapter"``. Raises Rejected (bad input), Cancelled,
    or RuntimeError (training diverged, the saved adapter does not load). A ``devices: "all"`` job on several
    GPUs runs as torchrun ranks (``worker.ddp``), this process relaying; its outcome is the same."""
    check_inputs(req)
    from worker import ddp  # light: torch only in the ranks, and to count GPUs

    world = ddp.processes(req.job.devices, req.device)
    if world > 1:
        return ddp.launch(req, world, report, should_stop)
    outcome = train_checked(req, report, should_stop)
    assert outcome is not None  # only DDP ranks other than 0 get None
    return outcome


def check_inputs(req: TrainRequest) -> None:
    """The cheap refusals (model folder, dataset files), before anything heavy starts."""
    check_model_dir(req.model_dir, req.share_root)
    for path in req.datasets:
        check_dataset_file(path)


def train_checked(req: TrainRequest, report: Callable[[Progress], None], should_stop: Callable[[], bool],
                  dist: Dist | None = None) -> TrainOutcome | None:
    """Train after ``check_inputs``, in this process: the whole job, or one DDP rank of it (``dist``).
    Returns None on DDP ranks other than 0, which write nothing."""
    started = time.monotonic()
    report(Progress(job=req.job.id or "job", phase="loading"))
    from worker.engine import train_adapter  # torch arrives here, in the training child only

    trained = train_adapter(req, report, should_stop, dist)
    if trained is None:
        return None
    files, size = hash_folder(trained.adapter_dir)
    trained.metrics.seconds = round(time.monotonic() - started, 3)
    return TrainOutcome(trained.metrics, trained.adapter_dir, files, size, trained.notes, trained.data,
                        trained.resumed_from_step, trained.probes)
