"""Leaner RMSNorm, SwiGLU and tanh-GELU for eager training: the same forward, with less kept for backward.

In eager mode autograd keeps every intermediate that some backward formula names. Two blocks of a llama-style
layer keep more than their gradients need (counted with ``benchmarks/saved_activations.py`` on a qwen3-0.6b
layer under bf16 autocast):

* an RMSNorm upcasts its bf16 input to fp32 and keeps that copy: 20 KiB per token and layer over the four norms
  of a qwen3 layer. Keeping the bf16 input and one fp32 ``rstd`` per row is enough to rebuild it;
* ``silu(gate) * up`` keeps gate, silu(gate) and up; silu(gate) is one cheap kernel to recompute;
* GPT-2's ``gelu_new`` (``NewGELUActivation``) writes the tanh GELU out in Python: eight kernels forward, more
  backward, and their intermediates kept. ``F.gelu(approximate="tanh")`` is the same formula in one kernel,
  keeping its input only: 82 against 29 ms forward and backward on a 2048 x 3072 fp32 tensor on 2 CPU cores.

torch.compile's partitioner makes such choices itself, so this is for the eager path only. A module is swapped
only when its own forward and the lean one agree on a sample here (``_same``): bit for bit for the norm and
SwiGLU, whose arithmetic is the model's own, and to rounding for the GELU (the fused kernel rounds once where the
Python formula rounds at every step). A norm that scales by ``1 + weight`` (gemma) or casts in another order is
left as it is, as is anything not recognised.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

log = logging.getLogger(__name__)


class _RMSNorm(torch.autograd.Function):
    """``weight * (x / rms(x)).to(x.dtype)``, the rms in fp32: the llama/qwen/mistral norm, computed as they do."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, weight, rstd = ctx.saved_tensors
        g = (grad * weight).float()  # the gradient at the normalised input, as autograd forms it
        xhat = x.float() * rstd
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), None, None


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``, keeping gate and up only; the gradients are autograd's own kernels, in its order."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def _norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def _gelu_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _is_norm(m: torch.nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "variance_epsilon", None), float)
            and isinstance(w, torch.nn.Parameter) and w.dim() == 1 and not w.requires_grad)


def _is_swiglu(m: torch.nn.Module) -> bool:
    act = getattr(m, "act_fn", None)
    return (all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def _is_gelu_tanh(m: torch.nn.Module) -> bool:
    return type(m).__name__ == "NewGELUActivation"


def _width(m: torch.nn.Module) -> int | None:
    if _is_gelu_tanh(m):
        return 64  # any width: the activation is elementwise
    if _is_norm(m):
        return int(m.weight.shape[0])
    width = getattr(m.gate_proj, "in_features", None)
    return int(width) if isinstance(width, int) else None


def _same(m: torch.nn.Module, lean: Any, device: str, dtype: torch.dtype, exact: bool) -> bool:
    """The module's forward and ``lean`` agree on a sample, with dropout off: exactly, or else to within a few
    units in the last place of ``dtype`` at the input's scale (an elementwise formula's rounding error)."""
    width = _width(m)
    if width is None:
        return False
    x = 3 * torch.randn(2, 5, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    was_training = m.training
    m.eval()
    try:
        with torch.no_grad():
            ours, theirs = lean(m, x), m(x)
            if exact:
                return torch.equal(ours, theirs)
            bound = 4 * torch.finfo(dtype).eps * (x.float().abs() + 1)
            return bool(((ours.float() - theirs.float()).abs() <= bound).all())
    except Exception as e:  # a module this does not understand: leave it as it is
        log.debug("not swapping %s: %s", type(m).__name__, e)
        return False
    finally:
        m.train(was_training)


def lean_activations(model: torch.nn.Module, device: str, dtype: torch.dtype) -> dict[str, int]:
    """Swap the forward of every RMSNorm, SwiGLU MLP and Python tanh-GELU of ``model`` (in place, weights and
    names untouched) whose output the lean version reproduces; returns how many of each were swapped."""
    swapped = {"RMSNorm": 0, "SwiGLU": 0, "GELU(tanh)": 0}
    kinds = (("RMSNorm", _is_norm, _norm_forward, True), ("SwiGLU", _is_swiglu, _mlp_forward, True),
             ("GELU(tanh)", _is_gelu_tanh, _gelu_forward, False))
    for m in model.modules():
        for kind, test, forward, exact in kinds:
            if test(m) and _same(m, forward, device, dtype, exact):
                m.forward = types.MethodType(forward, m)
                swapped[kind] += 1
    return swapped
