"""Checkpoints on the share, so that a killed job costs at most one checkpoint interval.

A checkpoint is a folder ``<attempt>/checkpoints/step-<N>/`` holding:

* ``adapter_model.safetensors``: the trainable weights (LoRA, DoRA magnitudes, modules_to_save);
* ``optimizer.pt``: the optimizer, scheduler and grad-scaler state, plain tensors and numbers only, loaded with
  ``torch.load(weights_only=True)`` so a planted pickle cannot run code;
* ``rng.pt``: the RNG states (python, torch CPU, CUDA), the same way;
* ``state.json`` (``schemas.checkpoint.CheckpointState``): the step, the data position and a fingerprint of the run.

It is written Maildir-style: everything into ``checkpoints/.step-<N>.<random>.tmp/``, fsynced, then one rename to
``step-<N>``. A crash leaves at most a dot folder that no reader picks. Only the two newest checkpoints of an
attempt are kept; older ones (the system's own scratch, never a person's file) are removed after the new one is in
place; those of another run (other data or settings) in the same attempt folder are left to it. A requeued job
looks through every attempt folder of its id and resumes from the newest checkpoint whose fingerprint matches,
whichever worker wrote it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schemas.checkpoint import CheckpointState
from schemas.job import JobSpec
from spooler.atomic import chmod_tree, dir_mode_for, fsync_tree, write_bytes

log = logging.getLogger(__name__)

KEEP = 2
STATE = "state.json"
WEIGHTS = "adapter_model.safetensors"


@dataclass
class Found:
    folder: Path
    state: CheckpointState


def fingerprint(job: JobSpec, dataset_sha256: str | None, world_size: int) -> str:
    """What must match for a checkpoint to continue this run: the data, the model, the LoRA shape and every
    training setting that changes the step sequence. Progress fields (id, priority, probes) do not count."""
    fixed = {"base_model": job.base_model, "dataset": dataset_sha256, "lora": job.lora.model_dump(mode="json"),
             "quantization": job.quantization.value, "world_size": world_size,
             "training": job.training.model_dump(mode="json", exclude={"checkpoint_every_steps",
                                                                      "checkpoint_every_minutes", "compile",
                                                                      "gradient_checkpointing"})}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()


def _step_of(folder: Path) -> int:
    try:
        return int(folder.name.removeprefix("step-"))
    except ValueError:
        return -1


def _read_state(folder: Path) -> CheckpointState | None:
    try:
        return CheckpointState.model_validate_json((folder / STATE).read_bytes())
    except (OSError, ValueError):
        return None  # half-copied, unreadable for a moment on the share, or not ours: not a checkpoint


def latest(result_dir: Path, fp: str) -> Found | None:
    """The newest complete checkpoint of this run in any attempt folder of the job, or None."""
    candidates = sorted(result_dir.glob("attempts/*/checkpoints/step-*"), key=_step_of, reverse=True)
    for folder in candidates:
        state = _read_state(folder)
        if state is None:
            continue
        if state.fingerprint != fp:
            log.warning("checkpoint %s is from a run with other settings or data: not resumed", folder)
            continue
        if (folder / WEIGHTS).is_file() and (folder / "optimizer.pt").is_file():
            return Found(folder, state)
    return None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": _python_rng(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = [torch.cuda.get_rng_state()]  # this process's GPU: a job runs on one per process
    return state


def _python_rng() -> list[int]:
    """Python's RNG state as plain ints, which ``weights_only`` loading accepts (a tuple of tuples may not)."""
    version, internal, gauss = random.getstate()
    return [version, *internal, -1 if gauss is None else 0]


def _set_python_rng(flat: list[int]) -> None:
    random.setstate((flat[0], tuple(flat[1:-1]), None))


def restore_rng(state: dict[str, Any]) -> None:
    _set_python_rng(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        # The first state is this process's GPU (older checkpoints held one per visible GPU, in order): setting
        # all of them failed with IndexError on a worker that sees fewer GPUs than the one that saved them.
        with contextlib.suppress(RuntimeError, IndexError):  # the data order does not depend on it
            torch.cuda.set_rng_state(state["cuda"][0])


def save(checkpoints: Path, state: CheckpointState, weights: dict[str, torch.Tensor], optim: dict[str, Any],
         file_mode: int) -> Path:
    """Write one checkpoint and drop the oldest beyond ``KEEP``. Returns the new folder."""
    from safetensors.torch import save_file

    if not checkpoints.is_dir():
        checkpoints.mkdir(exist_ok=True)  # not parents: a missing attempt folder means the share went away,
        # and rebuilding its path would write checkpoints onto the bare mount point's local disk
        os.chmod(checkpoints, dir_mode_for(file_mode))
    final = checkpoints / f"step-{state.step}"
    tmp = checkpoints / f".step-{state.step}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    torch.save(optim, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    write_bytes(tmp / STATE, state.model_dump_json(indent=2).encode(), file_mode)
    chmod_tree(tmp, file_mode)
    fsync_tree(tmp)
    if final.exists():
        earlier = _read_state(final)
        if earlier is None or earlier.fingerprint == state.fingerprint:
            shutil.rmtree(tmp)  # the same step again (a stop right after a periodic checkpoint): the older one stays
            return final
        # Another run's, in this attempt folder (other data, or the same job on fewer GPUs after a requeue): in
        # its place it dropped every new checkpoint of this step (audit, proven). Renamed, not removed: that run
        # may still resume from it (``latest`` reads its state, whatever the name after "step-").
        os.rename(final, checkpoints / f"step-{state.step}.{secrets.token_hex(4)}")
    os.replace(tmp, final)
    _prune(checkpoints, state.fingerprint)
    return final


def _prune(checkpoints: Path, fp: str) -> None:
    """Keep the newest KEEP of this run. Another run's are not this run's to judge (a requeue onto fewer GPUs
    changes the fingerprint, and hours of training may resume from them later): ranked by step with them, its
    higher steps were kept while every new checkpoint was removed as soon as it was written (audit, proven)."""
    done = sorted((p for p in checkpoints.glob("step-*") if (p / STATE).is_file()), key=_step_of)
    ours = [p for p in done if (st := _read_state(p)) is not None and st.fingerprint == fp]
    for old in ours[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def load(found: Found) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trainable weights, optimizer state, RNG state) of a checkpoint, loaded without running pickled code."""
    from safetensors.torch import load_file

    weights = load_file(str(found.folder / WEIGHTS))
    optim = torch.load(found.folder / "optimizer.pt", map_location="cpu", weights_only=True)
    rng = torch.load(found.folder / "rng.pt", map_location="cpu", weights_only=True)
    return weights, optim, rng
