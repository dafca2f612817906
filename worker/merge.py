"""Merging, always into something new: its inputs are never changed.

- ``into_base``: peft ``merge_and_unload`` folds one adapter into its base, saved as a new model folder
  (safetensors, the base's dtype, its tokenizer) with a ``manifest.json``. The merge is done in fp32 from the
  unquantized base weights (so a QLoRA adapter lands in full-precision weights, and the note says so), then the
  saved folder is loaded again and its logits on probe inputs are compared with adapter-on-base.
- ``combine``: peft ``add_weighted_adapter`` makes one adapter of several (linear, cat, svd, ties,
  dare_linear), registered as a new version with every input recorded as a parent.

A folder appears by one rename of a fully written temp folder, so a crash never leaves half a model under its
final name, and a name that exists is never replaced.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schemas.adapter import MANIFEST, BaseIdentity, Manifest, MergedModel, MergeInfo
from schemas.job import Quantization
from spooler.atomic import chmod_tree, dir_mode_for, fsync_dir, fsync_tree, makedirs, write_json
from spooler.clock import iso
from spooler.errors import Rejected
from worker.adapter_verify import logits_of, probe_ids
from worker.modelcache import TEMPLATE_DIR
from worker.modelguard import PICKLE_SUFFIXES
from worker.verify import BASE_CONFIG, BASE_INDEX, base_identity, file_entries

log = logging.getLogger(__name__)

DENSITY = 0.5  # ties and dare_linear: the fraction of each update kept, when the job gives none
FP32_TOL = 1e-4  # x max(1, largest |logit|): fp32 merge and save reproduce adapter-on-base closely
HALF_TOL = 2e-2  # the same for a base saved in bf16/fp16: rounding the merged weights costs more


@dataclass
class Input:
    label: str  # NAME/VERSION, or the folder
    folder: Path
    manifest: Manifest | None


def _plan(device: str) -> Any:
    from worker.engine import Plan

    return Plan(device, torch.float32, Quantization.none, [])


def _base_dtype(base_dir: Path) -> torch.dtype:
    """The dtype the base was saved in: the merged model is saved in it too."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


# ── into the base ────────────────────────────────────────────────────────────────────────────────────────
def into_base(adapter: Input, base_dir: Path, base: BaseIdentity, out_dir: Path, device: str = "cpu",
              file_mode: int = 0o664, job_id: str | None = None,
              before_publish: Callable[[], None] | None = None) -> MergedModel:
    """Merge ``adapter`` into the base and save it as the new folder ``out_dir`` (which must not exist)."""
    from peft import PeftModel

    from worker.engine import load_model

    _refuse_existing(out_dir, file_mode)
    model = PeftModel.from_pretrained(load_model(base_dir, _plan(device)), str(adapter.folder))
    model.eval()
    ids = probe_ids(model)
    expected = logits_of(model, ids, device)
    merged = model.merge_and_unload()
    dtype = _base_dtype(base_dir)
    staged = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        _save_model(merged.to(dtype), base_dir, staged)
        del merged, model
        diff = _reloaded_diff(staged, ids, expected, device)
        tol = (FP32_TOL if dtype == torch.float32 else HALF_TOL) * max(1.0, float(expected.abs().max()))
        if not diff <= tol:
            raise RuntimeError(f"the merged model's logits differ from adapter-on-base by {diff:.3g} (tolerance "
                               f"{tol:.3g}): the merge is wrong; nothing was written. Verify the adapter first")
        record = MergedModel(created_at=iso(time.time()), job_id=job_id, adapter=adapter.label,
                             adapter_files=adapter.manifest.files if adapter.manifest else file_entries(adapter.folder),
                             base=base, files=file_entries(staged), size_bytes=0, dtype=str(dtype).removeprefix(
                                 "torch."), max_logit_diff=diff, tolerance=tol, notes=_notes(adapter, dtype))
        record.size_bytes = sum(e.size for e in record.files.values())
        write_json(staged / MANIFEST, record, file_mode)
        if before_publish is not None:
            before_publish()  # may raise: the staged folder is then removed below
        _publish(staged, out_dir, file_mode)
    finally:
        if staged.exists():  # our own temp folder: never published, nobody else knows it
            shutil.rmtree(staged, ignore_errors=True)
    log.info("adapter %s merged into %s as %s (max logit diff %.3g)", adapter.label, base.path, out_dir, diff)
    return record


def _notes(adapter: Input, dtype: torch.dtype) -> list[str]:
    notes = [f"merged in fp32 from the base's full-precision weights, saved as {str(dtype).removeprefix('torch.')}"]
    quant = adapter.manifest.lora.quantization if adapter.manifest else "none"
    if quant != "none":
        notes.append(f"{adapter.label} was trained on a {quant}-quantized base (QLoRA): it is merged into the "
                     "unquantized base weights, so the merged model is not quantized and its outputs can differ "
                     "slightly from the quantized base + adapter it was trained with")
    return notes


def _refuse_existing(out_dir: Path, file_mode: int) -> None:
    if os.path.lexists(out_dir):  # a dangling link too: exists() says no, and the rename onto it then fails
        parts = out_dir.parts  # merge.output is under models/: name it from there, as the person wrote it
        shown = "/".join(parts[len(parts) - 1 - parts[::-1].index("models"):]) if "models" in parts else out_dir.name
        raise Rejected("merge.output", f"{shown!r} already exists; a merge never replaces a folder: name "
                                       "another output")
    makedirs(out_dir.parent, dir_mode_for(file_mode))


def _save_model(model: torch.nn.Module, base_dir: Path, staged: Path) -> None:
    """The merged weights (safetensors), plus the base's other files, so the folder is a whole model: tokenizer,
    chat templates (named ones in additional_chat_templates/ too), special tokens, and the licence and notice
    files a derivative must carry. Never its weights or config (the merge writes its own), a pickle, or code."""
    model.save_pretrained(staged)
    skip = (BASE_CONFIG, BASE_INDEX, "generation_config.json", MANIFEST)
    for path in sorted(base_dir.iterdir()):
        if (path.is_file() and not path.name.startswith(".") and path.name not in skip
                and not path.name.endswith((".safetensors", ".py", *PICKLE_SUFFIXES))):
            shutil.copyfile(path, staged / path.name)
    templates = base_dir / TEMPLATE_DIR
    for path in sorted(templates.glob("*.jinja")) if templates.is_dir() else []:
        (staged / TEMPLATE_DIR).mkdir(exist_ok=True)
        shutil.copyfile(path, staged / TEMPLATE_DIR / path.name)


def _reloaded_diff(staged: Path, ids: torch.Tensor, expected: torch.Tensor, device: str) -> float:
    """Load the saved folder the way its users will and compare its logits with adapter-on-base."""
    from worker.engine import load_model

    reloaded = load_model(staged, _plan(device))
    reloaded.eval()
    got = logits_of(reloaded, ids, device)
    return float((got - expected).abs().max())


def _publish(staged: Path, out_dir: Path, file_mode: int) -> None:
    chmod_tree(staged, file_mode)
    fsync_tree(staged)
    try:
        os.rename(staged, out_dir)
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise Rejected("merge.output", f"{out_dir.name!r} appeared while merging (another merge?); nothing "
                                           "was replaced: name another output") from None
        raise
    fsync_dir(out_dir.parent)


# ── several adapters into one ────────────────────────────────────────────────────────────────────────────
def combine(inputs: list[Input], base_dir: Path, base_rel: str, weights: list[float], combination: str,
            density: float | None, out_dir: Path, device: str = "cpu", seed: int = 0) -> None:
    """Write the combined adapter (safetensors + adapter_config.json) into ``out_dir``, to be registered."""
    from peft import PeftModel

    from worker.engine import load_model

    names = [f"in{i}" for i in range(len(inputs))]
    model = PeftModel.from_pretrained(load_model(base_dir, _plan(device)), str(inputs[0].folder),
                                      adapter_name=names[0])
    for name, item in zip(names[1:], inputs[1:], strict=True):
        model.load_adapter(str(item.folder), adapter_name=name)
    torch.manual_seed(seed)  # dare_linear drops at random: the same job gives the same adapter
    kwargs: dict[str, Any] = {"density": density or DENSITY} if combination in ("ties", "dare_linear") else {}
    try:
        model.add_weighted_adapter(names, weights, "default", combination_type=combination, **kwargs)
    except ValueError as e:  # peft's own rules (ranks, target types, modules_to_save)
        raise Rejected("merge.combination", f"peft refuses {combination}: {e}; see: loraspool compat") from None
    model.set_adapter("default")  # before the inputs go: peft warns when the active adapter is deleted
    for name in names:
        model.delete_adapter(name)
    model.peft_config["default"].base_model_name_or_path = base_rel  # share-relative, like a trained one
    model.save_pretrained(out_dir, save_embedding_layers=False)


def check_same_base(inputs: list[Input], base_dir: Path, cache_file: Path | None) -> BaseIdentity:
    """Every input was trained on one base, and that base on disk is still it (by hash)."""
    first = inputs[0].manifest
    assert first is not None
    for item in inputs[1:]:
        assert item.manifest is not None
        if item.manifest.base.sha256 != first.base.sha256:
            raise Rejected("merge.adapters", f"{item.label} was trained on {item.manifest.base.path} "
                                             f"({item.manifest.base.sha256[:12]}), {inputs[0].label} on "
                                             f"{first.base.path} ({first.base.sha256[:12]}): only adapters of one "
                                             "base merge")
    now = base_identity(base_dir, first.base.path, cache_file)
    if now.sha256 != first.base.sha256:
        raise Rejected("merge.adapters", f"the base {first.base.path} has changed since {inputs[0].label} was "
                                         f"trained (sha256 {now.sha256[:12]}, was {first.base.sha256[:12]}); "
                                         "restore the original base first")
    return now


def merge_info(combination: str, weights: list[float], density: float | None) -> MergeInfo:
    used = (density or DENSITY) if combination in ("ties", "dare_linear") else None
    return MergeInfo(combination=combination, weights=weights, density=used)
