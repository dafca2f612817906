"""Prove an adapter is what it claims: every check reports pass, fail or skip, with the reason.

    files          every file against the manifest's sha256 and size
    safetensors    no pickle file; each header parses; float dtypes; no empty tensor; no NaN/Inf; no lora_B all
                   zeros (an adapter that never trained: peft starts every lora_B at zero)
    keys           every key maps to a real module of the base with the right shape; no adapter key missing
                   (peft's "missing adapter keys" warning counts as a failure, not a warning)
    base-identity  the base's config and weights hash to the manifest's: a base of the same shapes but other
                   weights loads without complaint and gives wrong answers, so only the hash catches it
    load           base + adapter run a forward pass with finite logits
    eval           with a dataset: the eval loss, against the manifest's number within a tolerance

A folder made elsewhere has no manifest: the checks that need one are skipped and listed as skipped. Nothing
here ever unpickles: pickle files are reported and never opened, and peft reads only the safetensors file.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from schemas.adapter import MANIFEST, Manifest
from schemas.job import TrainingSpec
from schemas.verify import ChainReport, Check, CheckStatus, VerifyReport
from spooler.errors import Rejected, brief
from worker.modelguard import PICKLE_SUFFIXES, check_adapter_dir, read_header, read_lora_config
from worker.verify import base_identity, compare_files

if TYPE_CHECKING:
    from spooler.share import Share

log = logging.getLogger(__name__)

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.weight)?$")
EMBED_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
DORA_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$")
PROBE_LEN = 16
SHOWN = 3  # problems named in a reason; the rest are counted


@dataclass
class Target:
    """One adapter to verify, with everything the checks need found out beforehand."""

    label: str  # NAME/VERSION, or the folder as given
    folder: Path
    manifest: Manifest | None
    base_dir: Path | None  # None when it cannot be found; base_why says why
    base_label: str
    base_why: str = ""
    cache_file: Path | None = None  # the share's base hash cache, when the base is on the share
    rehash: bool = False
    dataset: list[Path] = field(default_factory=list)
    tolerance: float = 0.05


def _check(name: str, problems: list[str], ok: str) -> Check:
    if not problems:
        return Check(name=name, status=CheckStatus.passed, reason=ok)
    more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
    return Check(name=name, status=CheckStatus.failed, reason="; ".join(problems[:SHOWN]) + more)


def _skip(name: str, why: str) -> Check:
    return Check(name=name, status=CheckStatus.skipped, reason=why)


class Bases:
    """One base model kept loaded from one adapter to the next: the versions of a chain are nearly always trained
    on one base, and loading it is most of a verify's time (an 8B base is 16 GB of reads).

    PEFT wraps the base in place, so after each adapter the wrapping is undone (``unload``), and the base is kept
    only if every parameter and buffer is still the very tensor it was. An adapter with ``modules_to_save``
    unloads to its own trained copy of those modules: that base is dropped, and the next adapter gets a fresh one.
    """

    def __init__(self) -> None:
        self._key: tuple[str, str] | None = None
        self._model: torch.nn.Module | None = None
        self._tensors: dict[str, int] = {}

    def take(self, base_dir: Path, device: str) -> torch.nn.Module:
        """The base to wrap: the kept one when it is this folder on this device, else one loaded now."""
        from schemas.job import Quantization
        from worker.engine import load_model, plan_for

        key = (os.path.realpath(base_dir), device)
        model, self._model = self._model, None
        if model is not None and key == self._key:
            return model
        del model  # another base: let it go before the next one is read
        model = load_model(base_dir, plan_for(Quantization.none, device))
        self._key, self._tensors = key, _tensor_ids(model)
        return model

    def give_back(self, peft_model: Any) -> None:
        """Keep the base under ``peft_model`` for the next adapter, if unloading gives it back untouched."""
        try:
            base = peft_model.unload()
        except Exception:  # a model that will not unwrap is not kept: the next adapter loads a fresh base
            return
        if _tensor_ids(base) == self._tensors:
            self._model = base


def _tensor_ids(model: torch.nn.Module) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def verify(target: Target, device: str = "cpu", bases: Bases | None = None) -> VerifyReport:
    """Run every check on ``target``; ``ok`` is True only when none failed. ``bases`` keeps the base loaded for
    the next call (``verify_chain``)."""
    checks = [check_files(target)]
    safe, tensors = check_safetensors(target.folder)
    checks.append(safe)
    checks.append(check_base_identity(target))
    if not tensors:
        why = "no safetensors weights to load (see the safetensors check)"
        checks += [_skip("keys", why), _skip("load", why), _skip("eval", why)]
    elif target.base_dir is None:
        checks += [Check(name=n, status=CheckStatus.failed, reason=target.base_why) for n in ("keys", "load")]
        checks.append(_skip("eval", target.base_why))
    else:
        checks += _load_checks(target, tensors, device, bases or Bases())
    order = ["files", "safetensors", "keys", "base-identity", "load", "eval"]
    checks.sort(key=lambda c: order.index(c.name))
    ok = not any(c.status is CheckStatus.failed for c in checks)
    log.info("adapter %s verified: %s", target.label, "all checks passed" if ok else
             "FAILED " + ", ".join(c.name for c in checks if c.status is CheckStatus.failed))
    return VerifyReport(target=target.label, base=target.base_label, ok=ok, checks=checks)


# ── 1. files ─────────────────────────────────────────────────────────────────────────────────────────────
def check_files(target: Target) -> Check:
    if target.manifest is None:
        return _skip("files", f"no {MANIFEST}: a plain PEFT folder, nothing to compare the files with")
    problems = compare_files(target.folder, target.manifest.files, skip=(MANIFEST,))
    return _check("files", problems, f"{len(target.manifest.files)} files match the manifest's sha256 and size")


# ── 2. safetensors ───────────────────────────────────────────────────────────────────────────────────────
def check_safetensors(folder: Path) -> tuple[Check, dict[str, torch.Tensor]]:
    """The check, and the adapter's tensors when they are safe to use (empty when they are not)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    pickles = [p.name for p in files if p.name.endswith(PICKLE_SUFFIXES)]
    problems = [f"{n} is a pickle file: loading it could run code, so it is never opened; save the adapter "
                "with save_pretrained (safetensors)" for n in pickles]
    weights = [p for p in files if p.name.endswith(".safetensors")]
    if not weights:
        return _check("safetensors", problems + ["no *.safetensors file"], ""), {}
    tensors: dict[str, torch.Tensor] = {}
    parsed = True
    for path in weights:
        found, trouble = _read_tensors(path)
        parsed = parsed and found is not None
        tensors.update(found or {})
        problems += trouble
    usable = tensors if parsed else {}
    return _check("safetensors", problems, f"{len(tensors)} tensors in {len(weights)} safetensors file(s): float, "
                                           "non-empty, finite, every lora_B trained"), usable


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
    """The file's tensors (None when it does not parse) and what is wrong with them."""
    from safetensors import safe_open

    try:
        header = read_header(path)
    except (OSError, ValueError) as e:
        return None, [f"{path.name}: header does not parse: {e}"]
    problems = [f"{path.name}: {k} is {v['dtype']}, not a float dtype" for k, v in header.items()
                if v["dtype"] not in FLOAT_DTYPES]
    problems += [f"{path.name}: {k} is empty (shape {v['shape']})" for k, v in header.items()
                 if math.prod(v["shape"]) == 0]
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # the library's own parse: any failure means the file is not usable
        return None, [f"{path.name}: not safetensors that load ({type(e).__name__}: {e})"]
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel() and not torch.isfinite(t.float()).all():
            problems.append(f"{key} has NaN or Inf values")
        if _is_b(key) and t.numel() and not t.float().abs().sum():
            problems.append(f"{key} is all zeros: this adapter was never trained (peft starts lora_B at 0)")
    return tensors, problems


def _is_b(key: str) -> bool:
    return ".lora_B" in key or ".lora_embedding_B" in key


# ── 3. keys (static part: against the base's structure, no weights needed) ──────────────────────────────
def key_problems(tensors: dict[str, torch.Tensor], base_dir: Path, config: dict[str, Any]) -> list[str]:
    """Keys that name no module of the base, shapes that do not fit it, and adapted modules with no weights."""
    from worker.engine import meta_model

    model = meta_model(base_dir)
    modules = dict(model.named_modules())
    params = {n: p.shape for n, p in model.named_parameters()}
    problems: list[str] = []
    seen: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, t in sorted(tensors.items()):
        if not key.startswith(PEFT_PREFIX):
            problems.append(f"{key} lacks peft's {PEFT_PREFIX!r} prefix")
            continue
        problems += _key_problem(key.removeprefix(PEFT_PREFIX), tuple(t.shape), modules, params, seen)
    problems += _pair_problems(seen)
    problems += _missing(config, modules, seen)
    return problems


def _key_problem(key: str, shape: tuple[int, ...], modules: dict[str, torch.nn.Module],
                 params: dict[str, torch.Size], seen: dict[str, dict[str, tuple[int, ...]]]) -> list[str]:
    m = LORA_KEY.match(key) or EMBED_KEY.match(key) or DORA_KEY.match(key)
    if m is None:
        bare = key.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
        if bare in params:  # a module saved in full (modules_to_save)
            return [] if tuple(params[bare]) == shape else [f"{key}: shape {list(shape)}, the base's "
                                                             f"{bare} is {list(params[bare])}"]
        return [f"{key} maps to nothing in the base model (no such module or parameter)"]
    name = m["module"]
    module = modules.get(name)
    if module is None:
        return [f"{key}: the base model has no module {name!r}"]
    part = m.groupdict().get("part") or "magnitude"
    seen.setdefault(name, {})[part] = shape
    return _shape_problem(key, part, shape, module)


def _shape_problem(key: str, part: str, shape: tuple[int, ...], module: torch.nn.Module) -> list[str]:
    if isinstance(module, torch.nn.Embedding):
        n_in, n_out = module.num_embeddings, module.embedding_dim
    else:
        n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if n_in is None or n_out is None:
        return [f"{key}: {type(module).__name__} is not a layer LoRA adapts"]
    want = {"lora_A": (None, n_in), "lora_B": (n_out, None), "lora_embedding_A": (None, n_in),
            "lora_embedding_B": (n_out, None), "magnitude": (n_out,)}[part]
    if len(shape) != len(want) or any(w is not None and w != s for w, s in zip(want, shape, strict=False)):
        shown = [w if w is not None else "r" for w in want]
        return [f"{key}: shape {list(shape)} does not fit the base's layer (expects {shown})"]
    return []


def _pair_problems(seen: dict[str, dict[str, tuple[int, ...]]]) -> list[str]:
    problems = []
    for name, parts in sorted(seen.items()):
        for a, b in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
            if (a in parts) != (b in parts):
                problems.append(f"{name}: has {a if a in parts else b} but no {b if a in parts else a}")
            elif a in parts and parts[a][0] != parts[b][-1]:
                problems.append(f"{name}: rank of {a} ({parts[a][0]}) differs from {b}'s ({parts[b][-1]})")
    return problems


def _missing(config: dict[str, Any], modules: dict[str, torch.nn.Module],
             seen: dict[str, dict[str, tuple[int, ...]]]) -> list[str]:
    """Modules the adapter config targets that have no weights in the file (peft would keep them at init)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    try:
        lora = LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__})
    except (TypeError, ValueError) as e:
        return [f"adapter_config.json is not a LoRA config peft accepts ({e})"]
    targeted = [n for n, m in modules.items() if n and isinstance(m, torch.nn.Linear | torch.nn.Embedding)
                and check_target_module_exists(lora, n)]
    return [f"{n}: targeted by adapter_config.json but has no adapter weights" for n in targeted if n not in seen]


# ── 4. base identity ─────────────────────────────────────────────────────────────────────────────────────
def check_base_identity(target: Target) -> Check:
    if target.manifest is None:
        return _skip("base-identity", f"no {MANIFEST}: nothing records which base it was trained on")
    if target.base_dir is None:
        return Check(name="base-identity", status=CheckStatus.failed, reason=target.base_why)
    want = target.manifest.base
    got = base_identity(target.base_dir, want.path, target.cache_file, target.rehash)
    if got.sha256 == want.sha256:
        return Check(name="base-identity", status=CheckStatus.passed,
                     reason=f"{target.base_label} hashes to the manifest's sha256 {want.sha256[:12]}")
    changed = sorted(n for n in set(want.files) | set(got.files) if want.files.get(n) != got.files.get(n))
    return Check(name="base-identity", status=CheckStatus.failed,
                 reason=f"{target.base_label} is not the base it was trained on ({want.path}): sha256 "
                        f"{got.sha256[:12]}, the manifest says {want.sha256[:12]} (differs in "
                        f"{', '.join(changed[:SHOW_FILES])}); a base with the same shapes loads but answers wrong")


SHOW_FILES = 4


# ── 3 (peft's view), 5 and 6: load it the way its users will ──────────────────────────────────────────────
def _load_checks(target: Target, tensors: dict[str, torch.Tensor], device: str, bases: Bases) -> list[Check]:
    assert target.base_dir is not None
    config = read_lora_config(target.folder)
    if isinstance(config, str):
        return [Check(name="keys", status=CheckStatus.failed, reason=config),
                Check(name="load", status=CheckStatus.failed, reason=config), _skip("eval", config)]
    try:
        static = key_problems(tensors, target.base_dir, config)
    except Exception as e:  # a base whose structure will not build is a finding, not a crash
        static = [f"the base's structure does not build ({type(e).__name__}: {e})"]
    model, peft_missing, load_error = _load(target, device, bases)
    keys = _check("keys", static + peft_missing, f"{len(tensors)} keys map to modules of {target.base_label} "
                                                 "with matching shapes; none missing")
    if model is None:
        return [keys, Check(name="load", status=CheckStatus.failed, reason=load_error),
                _skip("eval", "the adapter did not load")]
    load = _forward_check(model, device)
    checks = [keys, load, _eval_check(target, model, device)]
    bases.give_back(model)
    return checks


def _load(target: Target, device: str, bases: Bases) -> tuple[Any, list[str], str]:
    """(peft model or None, peft's missing-key complaints, why it did not load). A base that an adapter failed
    to load onto may be half wrapped: it is not given back."""
    from peft import PeftModel

    assert target.base_dir is not None
    try:
        base = bases.take(target.base_dir, device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, str(target.folder), is_trainable=False)
    except Exception as e:  # size mismatches, a config peft refuses, a corrupt file: all findings
        return None, [], f"base + adapter do not load: {brief(e, 400)}"
    missing = [f"peft: {str(w.message)[:300]}" for w in caught if "missing adapter keys" in str(w.message)]
    model.eval()
    return model, missing, ""


def probe_ids(model: Any) -> torch.Tensor:
    """A fixed token sequence every vocabulary has, so every run compares the same thing."""
    vocab = model.get_input_embeddings().num_embeddings
    return (torch.arange(PROBE_LEN) * 7 + 1).remainder(vocab).unsqueeze(0)


def logits_of(model: Any, ids: torch.Tensor, device: str) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(device)).logits.float().cpu()


def _forward_check(model: Any, device: str) -> Check:
    try:
        logits = logits_of(model, probe_ids(model), device)
    except Exception as e:
        return Check(name="load", status=CheckStatus.failed, reason=f"forward pass failed: {type(e).__name__}: {e}")
    if not torch.isfinite(logits).all():
        return Check(name="load", status=CheckStatus.failed, reason="base + adapter give NaN or Inf logits")
    return Check(name="load", status=CheckStatus.passed,
                 reason=f"base + adapter run a forward pass on {device}; logits finite")


def _eval_check(target: Target, model: Any, device: str) -> Check:
    if not target.dataset:
        return _skip("eval", "no dataset given (--dataset, or a verify job's dataset)")
    m = target.manifest
    settings = m.training if m is not None and m.training is not None else TrainingSpec()
    try:
        loss, same = eval_loss(model, target, settings, device)
    except Exception as e:  # a bad dataset row is a finding too
        return Check(name="eval", status=CheckStatus.failed, reason=f"{type(e).__name__}: {e}")
    want = m.metrics.eval_loss_after if m is not None and m.metrics is not None else None
    which = "its training eval split" if same else "the eval split of the given dataset"
    if want is None:
        ok = math.isfinite(loss)
        return Check(name="eval", status=CheckStatus.passed if ok else CheckStatus.failed,
                     reason=f"eval loss {loss:.4f} on {which}; no manifest number to compare with")
    ok = math.isfinite(loss) and abs(loss - want) <= target.tolerance * abs(want)
    verdict = "within" if ok else "outside"
    # A QLoRA number was measured on the quantized base; this one on the full base: a small gap is expected.
    quant = m.lora.quantization if m is not None and m.lora.quantization != "none" else None
    measured = f" (measured on the unquantized base; trained and measured on a {quant} base)" if quant else ""
    return Check(name="eval", status=CheckStatus.passed if ok else CheckStatus.failed,
                 reason=f"eval loss {loss:.4f} on {which}, the manifest says {want:.4f}: {verdict} "
                        f"{target.tolerance:.0%}{measured}")


def eval_loss(model: Any, target: Target, settings: TrainingSpec, device: str) -> tuple[float, bool]:
    """Mean loss per labelled token over the eval split the manifest's settings give (as training computed it),
    and whether the dataset is the one it was trained on."""
    from worker import data
    from worker.batching import collate_eval
    from worker.engine import load_tokenizer
    from worker.loop import CausalLMLoss

    assert target.base_dir is not None
    splits = data.load_splits(target.dataset, load_tokenizer(target.base_dir), settings)
    m = target.manifest
    same = m is not None and m.dataset is not None and m.dataset.sha256 == splits.report.sha256
    step = CausalLMLoss(model, chunked=False).eval()
    total, count = 0.0, 0
    pad = data.pad_id_of(load_tokenizer(target.base_dir), data.embedding_rows(model))
    with torch.no_grad():
        for start in range(0, len(splits.eval), settings.batch_size):
            b = collate_eval(splits.eval[start:start + settings.batch_size], pad).to(device)
            loss, n = step(b.input_ids, b.labels, b.attention_mask, b.position_ids)
            total, count = total + float(loss), count + int(n)
    return total / max(count, 1), same


# ── finding the base ─────────────────────────────────────────────────────────────────────────────────────
def find_base(folder: Path, manifest: Manifest | None, given: Path | None, share_root: Path | None
              ) -> tuple[Path | None, str, str]:
    """(base folder or None, its label, why it was not found). The order: --base, the manifest's base, the
    adapter config's ``base_model_name_or_path`` (relative to the share, else to the current folder)."""
    from spooler.errors import Rejected
    from worker.modelguard import check_model_dir

    if given is not None:
        candidate, label = Path(given), str(given)
    elif manifest is not None:
        candidate, label = (share_root or Path.cwd()) / manifest.base.path, manifest.base.path
    else:
        named = _config_base(folder)
        if not named:
            return None, "", "adapter_config.json names no base_model_name_or_path: pass --base DIR"
        root = share_root if share_root is not None and not os.path.isabs(named) else Path.cwd()
        candidate, label = root / named, named
    try:
        check_model_dir(candidate, share_root if share_root is not None else candidate)
    except Rejected as e:
        return None, label, f"base model {label!r}: {e.problem} (pass --base DIR to use another)"
    return candidate, label, ""


def _config_base(folder: Path) -> str | None:
    config = read_lora_config(folder)
    value = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return value if isinstance(value, str) and value else None


# ── targets: a registered version, or any folder ─────────────────────────────────────────────────────────
def registered_target(share: Share, text: str, field: str = "adapter", base: Path | None = None,
                      dataset: list[Path] | None = None, tolerance: float = 0.05, rehash: bool = False) -> Target:
    """A registered NAME/VERSION (Rejected(field) when it is not registered)."""
    from spooler import registry

    ref, folder = registry.resolve(share, text, field)
    manifest = registry.read_manifest(share, ref)
    if manifest is None:  # without it the files, base and lineage checks would be skipped, and a version pass
        raise Rejected(field, f"{ref}'s manifest.json does not parse as a version's manifest: the registry cannot "
                              "vouch for its files; register the adapter again (loraspool register), or verify its "
                              "folder by path")
    return _target(str(ref), folder, manifest, share, base, dataset, tolerance, rehash)


def folder_target(folder: Path, label: str, share: Share | None, base: Path | None = None,
                  dataset: list[Path] | None = None, tolerance: float = 0.05, rehash: bool = False) -> Target:
    """Any adapter folder; a manifest.json in it (a copied version) is used when it parses."""
    from spooler.share import read_model

    manifest = read_model(folder / MANIFEST, Manifest)
    return _target(label, folder, manifest, share, base, dataset, tolerance, rehash)


def _target(label: str, folder: Path, manifest: Manifest | None, share: Share | None, base: Path | None,
            dataset: list[Path] | None, tolerance: float, rehash: bool) -> Target:
    from spooler import registry

    root = share.root if share is not None else None
    base_dir, base_label, why = find_base(folder, manifest, base, root)
    cache = None
    if share is not None and manifest is not None and base_dir is not None and base is None:
        cache = registry.base_cache_file(share, manifest.base.path)  # only the share's own base shares its cache
    return Target(label=label, folder=folder, manifest=manifest, base_dir=base_dir, base_label=base_label,
                  base_why=why, cache_file=cache, rehash=rehash, dataset=list(dataset or []), tolerance=tolerance)


def verify_chain(share: Share, name: str, device: str = "cpu", dataset: list[Path] | None = None,
                 tolerance: float = 0.05, rehash: bool = False) -> ChainReport:
    """Every version of ``name`` and every ancestor they descend from, and each parent link."""
    from spooler import registry
    from spooler.errors import Rejected

    if not registry.numbers(share, name):
        raise Rejected("chain", f"no adapter named {name!r} is registered; see: loraspool adapters")
    found, _ = registry.manifests(share)
    by_ref = {str(r): m for r, m in found.items()}
    mine = [str(registry.Ref(name, n)) for n in registry.numbers(share, name)]
    lineage = sorted({*mine, *(a for r in mine for a in registry.ancestors(r, by_ref) if a in by_ref)})
    for ref in lineage:  # as a verify of one version checks it: no link out of the share, no FIFO to block on
        check_adapter_dir(registry.resolve(share, ref, "verify.chain")[1], share.root, "verify.chain")
    bases = Bases()
    reports = [verify(registered_target(share, ref, "chain", None, dataset, tolerance, rehash), device, bases)
               for ref in lineage]
    links = [link_check(ref, parent, by_ref) for ref in lineage if ref in by_ref for parent in by_ref[ref].parents]
    ok = all(r.ok for r in reports) and all(c.status is not CheckStatus.failed for c in links)
    return ChainReport(name=name, ok=ok, versions=reports, links=links)


def link_check(ref: str, parent: str, by_ref: dict[str, Manifest]) -> Check:
    """A parent link holds when the parent is registered, on the same base, and older than the child."""
    name = f"link {ref} -> {parent}"
    child, up = by_ref[ref], by_ref.get(parent)
    if up is None:
        return Check(name=name, status=CheckStatus.failed, reason=f"{parent} is not registered (or has no manifest)")
    if up.base.sha256 != child.base.sha256:
        return Check(name=name, status=CheckStatus.failed,
                     reason=f"{parent} was trained on another base ({up.base.path}, {up.base.sha256[:12]})")
    if up.created_at > child.created_at:
        return Check(name=name, status=CheckStatus.failed, reason=f"{parent} was registered after {ref}")
    return Check(name=name, status=CheckStatus.passed, reason="registered, same base, older")
