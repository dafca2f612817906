"""Can two adapters be combined, and how risky is it? ``loraspool compat A B``.

Hard rules (any failure makes them incompatible): the same base (by hash when both have manifests), the rank
rules of the combination (linear, ties and dare_linear average A and B matrices, so the ranks must be equal;
cat and svd take any), the same target modules for the averaging combinations, and no module saved in full
(modules_to_save) by both.

The risk, 0 to 100, says how much the two updates will interfere where they meet:

    risk = 40 * overlap + overlap * (30 * norm_term + 30 * cosine_term)

- overlap: adapted modules both adapters touch / modules either touches. Disjoint adapters cannot interfere.
- norm_term: min(1, log10(median norm ratio)). ||scaling x B A|| per shared module, larger over smaller: at
  10x and more, one adapter drowns the other in a sum.
- cosine_term: mean |cosine similarity| of the two updates over shared modules. Near 0 they are independent;
  near -1 they cancel; near +1 they compound, so a weight-1 sum applies the same change twice.

The updates are never materialised: ||B A||^2 = tr((B^T B)(A A^T)) and <B1 A1, B2 A2> = tr((B1^T B2)(A2 A1^T)),
both r x r products, so 8B-model adapters compare in seconds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from schemas.adapter import Manifest
from schemas.verify import Check, CheckStatus, CompatReport
from worker.adapter_verify import LORA_KEY, PEFT_PREFIX
from worker.modelguard import read_lora_config

SAME_RANK = ("linear", "ties", "dare_linear")


@dataclass
class Side:
    label: str
    folder: Path
    manifest: Manifest | None
    weight: float = 1.0


def compat(a: Side, b: Side, combination: str = "cat") -> CompatReport:
    """The rules and the risk score for combining ``a`` and ``b`` with ``combination``."""
    ca, cb = read_lora_config(a.folder), read_lora_config(b.folder)
    if isinstance(ca, str) or isinstance(cb, str):
        why = ca if isinstance(ca, str) else cb
        return CompatReport(a=a.label, b=b.label, combination=combination, compatible=False, risk=100,
                            checks=[Check(name="config", status=CheckStatus.failed, reason=str(why))])
    checks = [_base_check(a, b, ca, cb), _rank_check(ca, cb, combination), _target_check(ca, cb, combination),
              _saved_check(ca, cb)]
    found = interference(updates(a.folder, ca), updates(b.folder, cb), a.weight, b.weight)
    compatible = not any(c.status is CheckStatus.failed for c in checks)
    reasons = list(found.reasons)
    if not compatible:
        reasons.insert(0, "incompatible: " + "; ".join(c.reason for c in checks if c.status is CheckStatus.failed))
    return CompatReport(a=a.label, b=b.label, combination=combination, compatible=compatible,
                        risk=found.risk if compatible else 100, checks=checks, overlap=round(found.overlap, 4),
                        norm_ratio=_round(found.ratio), cosine=_round(found.cosine), reasons=reasons)


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 4)


def _base_check(a: Side, b: Side, ca: dict[str, Any], cb: dict[str, Any]) -> Check:
    if a.manifest is not None and b.manifest is not None:
        same = a.manifest.base.sha256 == b.manifest.base.sha256
        return Check(name="base", status=CheckStatus.passed if same else CheckStatus.failed,
                     reason=f"same base by hash ({a.manifest.base.sha256[:12]})" if same else
                     f"different bases: {a.manifest.base.path} ({a.manifest.base.sha256[:12]}) and "
                     f"{b.manifest.base.path} ({b.manifest.base.sha256[:12]})")
    na, nb = ca.get("base_model_name_or_path"), cb.get("base_model_name_or_path")
    same = na == nb
    return Check(name="base", status=CheckStatus.passed if same else CheckStatus.failed,
                 reason=(f"same base by name only ({na}); without manifests the weights cannot be compared" if same
                         else f"different bases by name: {na} and {nb}"))


def _rank_check(ca: dict[str, Any], cb: dict[str, Any], combination: str) -> Check:
    ra, rb = int(ca.get("r", 0)), int(cb.get("r", 0))
    patterns = ca.get("rank_pattern") or cb.get("rank_pattern")
    if combination in SAME_RANK and (ra != rb or patterns):
        return Check(name="rank", status=CheckStatus.failed,
                     reason=f"{combination} needs equal ranks without rank patterns, got r={ra} and r={rb}; use cat "
                            "or svd")
    result = {"cat": f"rank {ra + rb} (the sum)", "svd": f"rank {max(ra, rb)} (the larger)"}.get(combination,
                                                                                                 f"rank {ra}")
    return Check(name="rank", status=CheckStatus.passed, reason=f"r={ra} and r={rb}: {combination} gives {result}")


def _targets(config: dict[str, Any]) -> set[str] | str:
    t = config.get("target_modules") or []
    return t if isinstance(t, str) else set(t)


def _target_check(ca: dict[str, Any], cb: dict[str, Any], combination: str) -> Check:
    ta, tb = _targets(ca), _targets(cb)
    if ta == tb:
        return Check(name="target-modules", status=CheckStatus.passed, reason=f"the same: {_show(ta)}")
    if combination in SAME_RANK:
        return Check(name="target-modules", status=CheckStatus.failed,
                     reason=f"{combination} needs the same target modules, got {_show(ta)} and {_show(tb)}")
    return Check(name="target-modules", status=CheckStatus.passed,
                 reason=f"differ ({_show(ta)} and {_show(tb)}); {combination} adapts the union")


def _show(t: set[str] | str) -> str:
    return t if isinstance(t, str) else ", ".join(sorted(t))


def _saved_check(ca: dict[str, Any], cb: dict[str, Any]) -> Check:
    both = set(ca.get("modules_to_save") or []) & set(cb.get("modules_to_save") or [])
    if both:
        return Check(name="modules-to-save", status=CheckStatus.failed,
                     reason=f"both save {', '.join(sorted(both))} in full; two full copies cannot be combined")
    return Check(name="modules-to-save", status=CheckStatus.passed, reason="no module saved in full by both")


def updates(folder: Path, config: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module: (A, B, scaling)} from the adapter's safetensors (never a pickle)."""
    from safetensors import safe_open

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                m = LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
                if m:
                    parts.setdefault(m["module"], {})[m["part"]] = f.get_tensor(key).double()
    r, alpha = int(config.get("r", 1)), float(config.get("lora_alpha", 1))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return {name: (p["lora_A"], p["lora_B"], scale) for name, p in parts.items() if {"lora_A", "lora_B"} <= p.keys()}


def _gram(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> float:
    """<B1 A1, B2 A2>_F through r x r products."""
    return float(torch.trace((b1.T @ b2) @ (a2 @ a1.T)))


@dataclass
class Interference:
    overlap: float = 0.0
    ratio: float | None = None  # median larger/smaller update norm over shared modules
    cosine: float | None = None  # mean signed cosine
    mean_abs_cos: float = 0.0
    reasons: list[str] = field(default_factory=list)

    @property
    def risk(self) -> int:
        norm_term = min(1.0, math.log10(self.ratio)) if self.ratio and self.ratio > 1 else 0.0
        return min(100, round(40 * self.overlap + self.overlap * (30 * norm_term + 30 * self.mean_abs_cos)))


def interference(ua: dict, ub: dict, wa: float = 1.0, wb: float = 1.0) -> Interference:
    """Overlap, norm ratio and cosine of two adapters' updates (weighted by the merge weights)."""
    shared = sorted(set(ua) & set(ub))
    union = set(ua) | set(ub)
    found = Interference(overlap=len(shared) / len(union) if union else 0.0)
    if not shared:
        found.reasons.append("no module is adapted by both: the updates cannot interfere (+0)")
        return found
    ratios, cosines = [], []
    for name in shared:
        (a1, b1, s1), (a2, b2, s2) = ua[name], ub[name]
        raw1, raw2 = math.sqrt(max(_gram(a1, b1, a1, b1), 0.0)), math.sqrt(max(_gram(a2, b2, a2, b2), 0.0))
        n1, n2 = abs(wa) * s1 * raw1, abs(wb) * s2 * raw2
        ratios.append(max(n1, n2) / min(n1, n2) if min(n1, n2) > 0 else math.inf)
        if raw1 > 0 and raw2 > 0:
            cosines.append(math.copysign(1.0, wa * wb) * _gram(a1, b1, a2, b2) / (raw1 * raw2))
    found.ratio = statistics.median(ratios)
    if cosines:
        found.cosine = statistics.fmean(cosines)
        found.mean_abs_cos = statistics.fmean(abs(c) for c in cosines)
    found.reasons = _reasons(found, len(shared), len(union))
    return found


def _reasons(f: Interference, shared: int, union: int) -> list[str]:
    """What raised the risk, largest contribution first."""
    scored = [(40 * f.overlap, f"{shared} of {union} adapted modules are shared ({f.overlap:.0%})")]
    if f.ratio is not None and f.ratio > 1:
        scored.append((f.overlap * 30 * min(1.0, math.log10(f.ratio)),
                       f"median update norm ratio {f.ratio:.3g}x on shared modules: the larger dominates a sum"))
    if f.cosine is not None:
        how = ("opposed: they cancel" if f.cosine < -0.1 else
               "aligned: summed they apply the change twice; weights summing to 1 avoid that" if f.cosine > 0.1
               else "nearly orthogonal: independent")
        scored.append((f.overlap * 30 * f.mean_abs_cos, f"mean cosine {f.cosine:.3f} (mean |cos| "
                                                        f"{f.mean_abs_cos:.3f}), {how}"))
    return [f"{text} (+{points:.0f})" for points, text in sorted(scored, key=lambda s: -s[0])]
