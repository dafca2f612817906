"""One LoRA training attempt, run in the worker's child process (``worker.horse``).

Order matters: the cheap checks that can refuse a job (model folder, dataset file, dataset rows, target
module names) all run before the model's weights are read, so a typo costs seconds, not a multi-minute load.

This module stays light (no torch at import): the daemon unpickles the ``TrainOutcome`` the child sends, and
that imports this module in the daemon, which must never load torch. The torch side is ``worker.engine`` and
``worker.loop``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.heartbeat import Progress
from schemas.job import JobSpec
from schemas.result import DataReport, Metrics, ProbeOutput
from worker.modelguard import check_adapter_dir, check_dataset_file, check_model_dir, check_registered_adapter
from worker.verify import hash_folder

if TYPE_CHECKING:
    from spooler.share import Share
    from worker.loop import Dist

log = logging.getLogger(__name__)


@dataclass
class TrainRequest:
    job: JobSpec  # validated; job.id is set
    model_dir: Path | None  # resolved inside the share; None only for verify/merge jobs that name no base
    datasets: list[Path]  # already resolved inside the share, in the job's order
    share_root: Path
    out_dir: Path  # this attempt's folder on the share (may not exist yet); the adapter goes to out_dir / "adapter"
    device: str  # "cpu" or "cuda"
    file_mode: int  # chmod for every file written (safetensors writes 0600; other share users must read them)
    parent_dir: Path | None = None  # the registered adapter job.parent names; set by check_inputs
    cache_dir: Path | None = None  # this machine's model cache; None: read the base from the share
    cpu_quantization: str = "plain"  # on CPU, a 4bit/8bit job: "plain" LoRA, or "bitsandbytes" as asked
    gpu_memory_gib: float | None = None  # the worker's cap on each GPU's memory; None: all of it


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
    quantization: str = "none"  # what the base was really loaded as (a CPU worker may train 4bit jobs plain)
    registered: str | None = None  # NAME/VERSION under adapters/, once registered


# ── entry point ──────────────────────────────────────────────────────────────────────────────────────────
def run_training(req: TrainRequest, report: Callable[[Progress], None],
                 should_stop: Callable[[], bool]) -> TrainOutcome:
    """Train one adapter and save it to ``req.out_dir / "adapter"``. Raises Rejected (bad input), Cancelled,
    or RuntimeError (training diverged, the saved adapter does not load). A ``devices: "all"`` job on several
    GPUs runs as torchrun ranks (``worker.ddp``), this process relaying; its outcome is the same.
    Verify and merge jobs run here too (``worker.adapter_jobs``), so they get the same child process."""
    if req.job.kind.value in ("verify", "merge"):
        from worker.adapter_jobs import run_adapter_job

        return run_adapter_job(req, report, should_stop)  # type: ignore[return-value]
    check_inputs(req)
    copying = every_second(report, req.job.id or "job", "copying")
    req.model_dir = local_model(req, lambda: copying() or should_stop())  # asked per 8 MB copied
    from worker import ddp  # light: torch only in the ranks, and to count GPUs

    world = ddp.processes(req.job.devices, req.device)
    outcome = (ddp.launch(req, world, report, should_stop) if world > 1
               else train_checked(req, report, should_stop))
    assert outcome is not None  # only DDP ranks other than 0 get None
    if note := ddp.one_gpu_note(req.job.devices, req.device):
        outcome.notes.append(note)
    if should_stop():  # cancelled, shut down, or orphaned while verifying: a version is for a job that ends here
        from spooler.errors import Cancelled

        raise Cancelled("stopped before registering the adapter")
    register(req, outcome)
    return outcome


def every_second(report: Callable[[Progress], None], job_id: str, phase: str) -> Callable[[], None]:
    """A tick for a long loop: reports ``phase`` at most once a second, so the worker sees the process advance
    (horse.py ends one that is silent for stall_minutes) without a message per row or per chunk."""
    last = -1.0

    def tick() -> None:
        nonlocal last
        if time.monotonic() - last >= 1.0:
            last = time.monotonic()
            report(Progress(job=job_id, phase=phase))

    return tick


def check_inputs(req: TrainRequest) -> None:
    """The cheap refusals (model folder, dataset files, the parent adapter), before anything heavy starts."""
    assert req.model_dir is not None  # a train job always names its base_model
    check_model_dir(req.model_dir, req.share_root)
    for path in req.datasets:
        check_dataset_file(path)
    if req.job.parent:
        req.parent_dir = check_parent(req)


def local_model(req: TrainRequest, should_stop: Callable[[], bool]) -> Path:
    """The base model's verified local copy, so an 8 GB load reads a local disk, not the network. A cache that
    cannot be used (full disk, no permission) is not worth failing the job for: train from the share."""
    assert req.model_dir is not None
    if req.cache_dir is None:
        return req.model_dir
    from worker.modelcache import CacheError, local_copy

    try:
        return local_copy(req.model_dir, req.cache_dir, should_stop=should_stop)
    except (CacheError, OSError) as e:  # OSError: a full disk or a read error while copying
        if should_stop():
            from spooler.errors import Cancelled

            raise Cancelled("stopped while copying the base model to the local cache") from None
        log.warning("job %s: model cache not used: %s; loading %s from the share", req.job.id, e, req.model_dir)
        return req.model_dir


def check_parent(req: TrainRequest) -> Path:
    """The parent's folder, once it is registered and was trained on this very base (by hash, not by name)."""
    from spooler import registry
    from spooler.errors import Rejected

    share = _share(req)
    if share is None:
        raise Rejected("parent", f"{req.share_root} is not a loraspool share, so it has no adapter registry")
    assert req.job.parent and req.job.base_model
    ref, folder = registry.loadable(share, req.job.parent, "parent")
    check_adapter_dir(folder, share.root, "parent")
    manifest = registry.read_manifest(share, ref)
    assert manifest is not None  # loadable checked it parses
    check_registered_adapter(folder, manifest.files, str(ref), "parent")
    base = registry.base_identity_of(share, req.job.base_model)
    if base.sha256 != manifest.base.sha256:
        raise Rejected("parent", f"{ref} was trained on {manifest.base.path} (sha256 {manifest.base.sha256[:12]}), "
                                 f"but base_model {req.job.base_model} hashes to {base.sha256[:12]}; continue it "
                                 f"on its own base")
    return folder


def _share(req: TrainRequest) -> Share | None:
    from spooler.share import Share, ShareError

    try:
        return Share.open(req.share_root)
    except ShareError:
        return None


def register(req: TrainRequest, outcome: TrainOutcome) -> None:
    """Register the adapter under adapters/ (idempotent per job id). A trained adapter is never lost to a failed
    registration: it still lands in results/<id>/adapter, and a note says how to register it by hand."""
    from spooler import registry

    share = _share(req)
    if share is None:  # a bare folder (tests of the recipe alone): no registry to write to
        log.info("job %s: %s is not a loraspool share; adapter not registered", req.job.id, req.share_root)
        return
    try:
        ref = registry.register_trained(share, req.job, outcome.adapter_dir, outcome.metrics, outcome.data,
                                        outcome.quantization, outcome.notes, outcome.files)
    except Exception as e:  # the training is done and good: report, do not fail it
        log.warning("job %s: adapter not registered: %s: %s", req.job.id, type(e).__name__, e)
        outcome.notes.append(f"not registered in adapters/ ({type(e).__name__}: {e}); register it with: "
                             f"loraspool register {req.job.id}")
        return
    outcome.registered = str(ref)


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
                        trained.resumed_from_step, trained.probes, trained.quantization)
