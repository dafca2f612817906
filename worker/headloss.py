"""The LM head's loss: ``lm_head(hidden)`` and its cross-entropy, without the logits of the whole batch.

A 150k vocabulary makes the logits the largest tensor of a step (batch × length × vocab, fp32 for the loss), so
the labelled positions go through the head in chunks. Three ways, chosen per call:

* a frozen head on CUDA with liger-kernel installed (``pip install 'loraspool[cuda]'``): liger's fused linear
  cross-entropy, one Triton kernel per small chunk for the softmax and its gradient. Its logits never leave bf16
  memory and it reads them once, where the torch chunks below pass over fp32 logits about eight times. It is used
  only after ``check_fused`` found it to give the same loss and gradient as ``_FrozenHeadCE`` on the job's model;
* a frozen head otherwise: ``_FrozenHeadCE``, torch chunks whose gradient is formed in forward;
* a head that trains (LoRA on it, ``modules_to_save``): each chunk checkpointed, recomputed in backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from spooler.errors import brief

LOSS_CHUNK = 4096  # labelled positions per LM-head chunk: 4096 x 152k fp32 logits is 2.5 GB at most
USE_LIGER = True  # benchmarks/train_throughput.py --no-liger times the torch chunks on a machine that has it

# (h, weight, bias, y) -> the summed loss, differentiable in h
Fused = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


def _head_ce(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


class _FrozenHeadCE(torch.autograd.Function):
    """The summed cross-entropy of ``F.linear(h, weight, bias)`` against ``y`` when the head does not train, with
    the gradient at ``h`` formed in forward, chunk by chunk: ``(softmax - onehot) @ weight``. Nothing else needs
    the logits, so each chunk's are freed at once and never recomputed. The checkpointed chunks ran the head
    twice forward and once backward; on gpt2-small on CPU that second forward was a tenth of the step. The
    gradient is held in ``h``'s dtype, as autograd would hand it back; backward only scales it."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                y: torch.Tensor) -> torch.Tensor:
        grad = torch.empty_like(h)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], LOSS_CHUNK):
            ys = y[start:start + LOSS_CHUNK]
            logits = F.linear(h[start:start + LOSS_CHUNK], weight, bias)  # autocast applies here, as in head(h)
            z = logits.float()  # may be ``logits`` itself: everything below is in place, as it is not needed
            picked = z.gather(1, ys[:, None])
            top = z.amax(dim=-1, keepdim=True)
            sums = z.sub_(top).exp_().sum(dim=-1, keepdim=True)  # in place: half the time of logsumexp on CPU
            total += (top + sums.log() - picked).sum()
            z.div_(sums)  # the softmax
            z[torch.arange(ys.shape[0], device=ys.device), ys] -= 1
            grad[start:start + LOSS_CHUNK] = z.to(logits.dtype) @ weight
            del logits, z
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * g, None, None, None


def _own_fused(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return _FrozenHeadCE.apply(h, weight, bias, y)


def frozen_linear(head: Any) -> bool:
    """A plain ``nn.Linear`` that does not train and whose forward nothing hooks: ``F.linear`` on its weights is
    exactly its forward. A head that trains (LoRA on it, ``modules_to_save``) or is wrapped keeps autograd."""
    if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return False
    return not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad)


def chunked_ce(head: Any, h: torch.Tensor, y: torch.Tensor, fused: Fused | None = None) -> torch.Tensor:
    """The summed cross-entropy of ``head(h)`` against ``y``; ``fused`` is the checked kernel, if any."""
    if torch.is_grad_enabled() and h.requires_grad and frozen_linear(head):
        # No labelled position at all (not expected: such rows are dropped): liger divides by the row count.
        return (fused if fused is not None and h.shape[0] else _own_fused)(h, head.weight, head.bias, y)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], LOSS_CHUNK):
        hs, ys = h[start:start + LOSS_CHUNK], y[start:start + LOSS_CHUNK]
        # Recomputed in backward: otherwise every chunk's fp32 logits stay alive until backward, as if unchunked.
        part = (torch.utils.checkpoint.checkpoint(_head_ce, head, hs, ys, use_reentrant=False)
                if torch.is_grad_enabled() else _head_ce(head, hs, ys))
        total = total + part
    return total


def fused_kernel(device: str) -> tuple[Fused | None, str]:
    """liger-kernel's fused linear cross-entropy where it can run, else None; and which, or why not, in words."""
    if device != "cuda" or not USE_LIGER:
        return None, "torch chunks"
    try:  # a Triton or torch it does not support may fail at import: then the torch chunks, with the reason
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None, "torch chunks (pip install 'loraspool[cuda]' adds liger-kernel's fused kernel)"
    except Exception as e:
        return None, f"torch chunks: liger-kernel did not import ({type(e).__name__}: {e})"

    def liger(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        return liger_fused_linear_cross_entropy(h, weight, y, bias=bias, reduction="sum")

    return liger, "liger-kernel's fused linear cross-entropy"


def _loss_and_grad(kernel: Fused, head: torch.nn.Linear, h: torch.Tensor,
                   y: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = h.detach().clone().requires_grad_()
    loss = kernel(x, head.weight, head.bias, y)
    # Scaled, as training's loss is (divided by a token count, then by a GradScaler's factor): a kernel may take
    # another path in backward when the gradient coming in is not exactly 1 (liger multiplies only then).
    (grad,) = torch.autograd.grad(loss * 0.25, x)
    return float(loss.detach()), grad.float() * 4


def check_fused(kernel: Fused, head: torch.nn.Linear, h: torch.Tensor, y: torch.Tensor) -> str | None:
    """None when ``kernel`` gives ``_FrozenHeadCE``'s loss and gradient at ``h`` (the job's own hidden states);
    otherwise why not. A kernel built for other versions of torch or Triton, or a head it does not handle (a
    bias, a dtype), must not train the job on another objective."""
    try:
        with torch.enable_grad():
            loss, grad = _loss_and_grad(kernel, head, h, y)
            own_loss, own_grad = _loss_and_grad(_own_fused, head, h, y)
    except Exception as e:
        return f"it failed on this model ({brief(e)})"
    exact = (h.dtype == torch.float32 and head.weight.dtype == torch.float32
             and not torch.is_autocast_enabled(h.device.type))
    tolerance = 1e-4 if exact else 2e-2  # bf16 logits rounded in another order
    loss_gap = abs(loss - own_loss) / max(abs(own_loss), 1e-12)
    grad_gap = float((grad - own_grad).norm() / own_grad.norm().clamp_min(1e-12))
    if loss_gap <= tolerance and grad_gap <= tolerance:
        return None
    return f"its loss differs by {loss_gap:.2g} and its gradient by {grad_gap:.2g} from the torch chunks'"
