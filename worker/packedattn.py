"""Attention for packed rows: each document of a row attends within itself, without a mask over the whole row.

transformers keeps packed documents apart with a block-diagonal causal mask over the whole row, built from the
position ids (``find_packed_sequence_indices``). A mask rules out the fast kernels:

* on CPU, SDPA with a mask computes every score of the row, and with dropout (GPT-2 has 0.1) it takes its math
  path: the whole L x L scores, softmax and dropout mask, though a row of three documents needs a third of them.
  One causal SDPA call per document computes exactly the entries the mask keeps. Measured on 2 cores, forward and
  backward, 4 rows x 12 heads x 512 tokens in documents of 200, 150 and 162, q/k/v split from one projection as
  GPT-2 does: 0.41 s with the mask, 0.15 s per document (dropout 0.1); 0.13 s and 0.10 s without dropout.
* on CUDA, a masked SDPA call cannot use the flash kernel; the memory-efficient one computes every block of the
  row and reads the mask. torch's flash varlen kernel (``torch.nn.attention.varlen``, torch 2.9 and later) takes
  the documents as cumulative lengths instead. An earlier H100 run put this at the heart of the worker's gap to
  the anchor recipe, which trains on unmasked rows (and so across documents): 24.4k against 29.5k tok/s eager,
  46.2k against 59.5k compiled.

How the pieces meet: the loss module (``loop.CausalLMLoss``) turns a packed batch's position ids into cumulative
document lengths (``cu_seqlens``) and passes them, with the chosen ``Varlen`` kernel, as keyword arguments that
transformers hands down to every attention call (its own names for them, as its flash-attention path uses). The
attention function registered here (``use_for_packed_rows``) runs the kernel where it computes the same thing as
the mask: no cache, queries as long as keys, a mask transformers built, no dropout the kernel cannot do, and no
extra that the plain path would honour (a sliding window, soft-capping, a position bias). Anything else goes to
transformers' SDPA as it is: evaluation's padded batches, generation, a model of another kind.

A kernel is used only after ``check`` has compared it, forward and backward, with a reference on the job's own
model, and has seen that every layer that takes it has the mask it stands for: the CUDA kernel cannot run on the
machines the tests run on, a torch whose kernel differs (a backend without grouped-query heads, an old
signature) must not train a job on another attention, and neither may a model whose mask is narrower than
causal within documents (llama4's chunks) without a keyword that says so.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from spooler.errors import brief

NAME = "loraspool_packed_sdpa"
VARLEN = "loraspool_varlen"  # the keyword that carries the chosen Varlen kernel down to the attention calls
AUDIT = "loraspool_audit"  # check's: sees the mask of every call the kernel takes
CU_SEQLENS = ("cu_seq_lens_q", "cu_seq_lens_k")
MAX_LENGTH = ("max_length_q", "max_length_k")
USE_FLASH = True  # benchmarks/train_throughput.py --no-varlen times the masked SDPA on a GPU that has the kernel
_PASSIVE = {"position_ids", "use_cache", "output_attentions", VARLEN, AUDIT, *CU_SEQLENS, *MAX_LENGTH}

# (query, key, value) as (tokens, heads, head_dim), cumulative document lengths (int32), longest document, scale,
# dropout -> the output as (tokens, heads, head_dim)
Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float, float], torch.Tensor]


@dataclass(frozen=True)
class Varlen:
    """An attention kernel over documents laid end to end, given by their cumulative lengths."""

    name: str  # in words, for the plan's notes and the log
    run: Run
    dropout: bool  # whether it applies attention dropout; one that does not is skipped when training has some


def use_for_packed_rows(model: Any) -> bool:
    """Switch ``model`` (a transformers model, before LoRA) from SDPA to this; False when it is not on SDPA."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same mask as SDPA: the fallback below needs it
    model.set_attn_implementation(NAME)
    return True


def uses_this(model: Any) -> bool:
    return getattr(model.config, "_attn_implementation", None) == NAME


def cu_seqlens(positions: torch.Tensor) -> torch.Tensor:
    """Where each document starts in the flattened batch, and the total: a document starts with each row and
    wherever the position does not go on by one (the rule transformers builds its block-diagonal mask by)."""
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = torch.diff(positions, dim=-1) != 1
    edges = starts.flatten().nonzero().flatten()
    return torch.cat([edges, edges.new_tensor([positions.numel()])]).to(torch.int32)


def kwargs_for(kernel: Varlen, positions: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments a model's forward takes to run ``kernel`` on a packed batch. The longest document
    sizes the flash kernel's grid: the row length would launch idle blocks for every short document. (A compiled
    body takes it as a symbol after the first batch: tested, two graphs for any number of layouts.)"""
    cu = cu_seqlens(positions)
    longest = int(torch.diff(cu).max())
    return {VARLEN: kernel, CU_SEQLENS[0]: cu, CU_SEQLENS[1]: cu, MAX_LENGTH[0]: longest, MAX_LENGTH[1]: longest}


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; the output is (batch, length, heads, head_dim)."""
    kernel: Varlen | None = kwargs.get(VARLEN)
    if kernel is None or not _fits(module, query, key, attention_mask, dropout, is_causal, kernel, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        plain = {k: v for k, v in kwargs.items() if k not in (VARLEN, AUDIT)}
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **plain)
    batch, heads, length, dim = query.shape
    if (audit := kwargs.get(AUDIT)) is not None:
        audit(attention_mask, kwargs[CU_SEQLENS[0]], batch, length)
    scale = scaling if scaling is not None else dim ** -0.5

    def tokens(t: torch.Tensor) -> torch.Tensor:  # (batch, heads, length, dim) -> (batch * length, heads, dim)
        return t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[-1])

    out = kernel.run(tokens(query), tokens(key), tokens(value), kwargs[CU_SEQLENS[0]], kwargs[MAX_LENGTH[0]],
                     scale, dropout)
    return out.view(batch, length, heads, value.shape[-1]), None


def _fits(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float,
          is_causal: bool | None, kernel: Varlen, kwargs: dict[str, Any]) -> bool:
    """Whether ``kernel`` over the documents computes what the mask transformers built does. (``check`` also
    compares the masks themselves: a mask can be narrower than causal with no keyword saying so.)"""
    length = query.shape[2]
    extras = [k for k, v in kwargs.items() if _changes_attention(k, v, length)]
    return not (extras or mask is None or kwargs.get(CU_SEQLENS[0]) is None or is_causal is False
                or not getattr(module, "is_causal", True) or key.shape[2] != length
                or (dropout > 0 and not kernel.dropout))


def _changes_attention(key: str, value: Any, length: int) -> bool:
    """Whether a keyword an attention call gets asks for something beyond causal attention within documents: not
    an unset one (None, or False as MoE models pass ``output_router_logits``), nor a sliding window no row is
    long enough to reach (transformers lets a query see keys less than ``sliding_window`` back)."""
    if key in _PASSIVE or value is None or value is False:
        return False
    return not (key == "sliding_window" and isinstance(value, int) and value >= length)


def per_document_sdpa() -> Varlen:
    """One causal SDPA call per document: the CPU kernel (see the module's docstring for why)."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, _longest: int, scale: float,
            dropout: float) -> torch.Tensor:
        gqa = k.shape[1] != q.shape[1]
        edges = cu.tolist()

        def heads_first(t: torch.Tensor, s: int, e: int) -> torch.Tensor:  # (n, heads, dim) -> (1, heads, n, dim)
            return t[s:e].transpose(0, 1).unsqueeze(0)

        parts = [F.scaled_dot_product_attention(heads_first(q, s, e), heads_first(k, s, e), heads_first(v, s, e),
                                                dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa)
                 for s, e in zip(edges[:-1], edges[1:], strict=True)]
        return torch.cat(parts, dim=2)[0].transpose(0, 1)

    return Varlen("one SDPA call per packed document", run, dropout=True)


def flash_varlen() -> tuple[Varlen | None, str]:
    """torch's flash varlen kernel where this torch has one, else None; and which, or why not, in words. Its
    signature has changed between releases (``is_causal`` became ``window_size``; ``scale`` and ``enable_gqa``
    came later), so the call is fitted to the one installed."""
    if not USE_FLASH:
        return None, "masked SDPA"
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, "masked SDPA (torch 2.9 or later adds flash varlen attention for packed rows)"
    params = set(inspect.signature(varlen_attn).parameters)  # read here: a compiled model must not trace inspect
    causal: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    takes_scale, takes_gqa = "scale" in params, "enable_gqa" in params

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: float,
            _dropout: float) -> torch.Tensor:
        extra = dict(causal)
        if takes_scale:
            extra["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-6 * scale:
            raise ValueError(f"this torch's varlen_attn has no scale, and the model scales by {scale:.4g}")
        if k.shape[1] != q.shape[1] and takes_gqa:
            extra["enable_gqa"] = True
        # Without the argument (torch 2.9 to 2.11) grouped-query heads go in as they are: the flash kernel shares
        # them itself, forward and backward. Repeating them would keep copies for backward (3.5 GiB at qwen3-0.6b's
        # shape, for 32k tokens a step).
        return varlen_attn(q, k, v, cu, cu, longest, longest, **extra)

    return Varlen("flash varlen attention (torch.nn.attention.varlen)", run, dropout=False), ""


def kernel_for(device: str) -> tuple[Varlen | None, str]:
    """The kernel to check for ``device``, and its name; or None, and what runs instead, in words."""
    if device == "cpu":
        k = per_document_sdpa()
        return k, k.name
    if device == "cuda":
        k, why = flash_varlen()
        return k, k.name if k is not None else why
    return None, "masked SDPA"


def dropout_of(config: Any) -> float:
    """The attention dropout a model trains with, under the names transformers' configs give it."""
    return max(float(getattr(config, name, 0.0) or 0.0) for name in ("attention_dropout", "attn_pdrop"))


def two_documents(ids: torch.Tensor, first: int | None = None) -> torch.Tensor:
    """Position ids that split the single row ``ids`` into two documents, the first ``first`` tokens long (by
    default the second is a little the longer)."""
    n = ids.shape[-1]
    first = max(1, n // 2 - 3) if first is None else first
    return torch.cat([torch.arange(first), torch.arange(n - first)]).to(ids.device).unsqueeze(0)


def block_diagonal(cu: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(batch, 1, length, length), True where a query may see a key: causal, within its own document."""
    starts = torch.zeros(batch * length, dtype=torch.long, device=cu.device)
    starts[cu[1:-1].long()] = 1
    doc = starts.cumsum(0).view(batch, length)
    i = torch.arange(length, device=cu.device)
    causal = i[None, :] <= i[:, None]
    return (causal & (doc[:, :, None] == doc[:, None, :])).unsqueeze(1)


class _Audit:
    """Counts the attention calls that take the kernel in ``check``'s run and whether each one's mask is exactly
    one causal block per document: a layer whose mask is narrower (chunked attention, a window no keyword names)
    would otherwise train on other attention, unseen by a reference that takes the same decisions."""

    def __init__(self) -> None:
        self.calls = 0
        self.other_masks = 0

    def __call__(self, mask: torch.Tensor, cu: torch.Tensor, batch: int, length: int) -> None:
        self.calls += 1  # _fits let no call without a mask through
        allowed = mask if mask.dtype == torch.bool else mask == 0  # an additive mask is 0 where it allows
        if not bool((allowed[..., :length, :length] == block_diagonal(cu, batch, length)).all()):
            self.other_masks += 1

    def verdict(self, rows: str) -> str | None:
        if self.calls == 0:
            return f"no layer of this model takes it on {rows} (its attention gets arguments the kernel does not " \
                   "apply)"
        if self.other_masks:
            return (f"{self.other_masks} of its {self.calls} attention calls on {rows} have a mask other than one "
                    "causal block per document (chunked or windowed attention)")
        return None


def check(kernel: Varlen, lm: torch.nn.Module, ids: torch.Tensor, reference: Varlen | None = None) -> str | None:
    """None when ``kernel`` gives the logits and input gradient of ``reference`` (None: transformers' masked
    path) on ``lm`` (the job's own model, its LoRA included, dropout off) for ``ids`` split into two documents,
    every layer that takes it having the mask it stands for; otherwise why not. On CUDA the reference is one
    SDPA call per document, whose flash kernel sums as the varlen one does: against the masked path's, bf16
    rounding through every layer would blur a real difference."""
    positions = two_documents(ids)
    audit = _Audit()

    def run(extra: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x = lm.get_input_embeddings()(ids).detach().requires_grad_()
        out = lm(inputs_embeds=x, position_ids=positions, use_cache=False, **extra).logits.float()
        weights = torch.linspace(-1.0, 1.0, out.numel(), device=out.device).view_as(out)  # every output counts
        (grad,) = torch.autograd.grad((out * weights).sum() * 0.25, x)
        return out.detach(), grad.float()

    try:
        with torch.enable_grad():
            out, grad = run({**kwargs_for(kernel, positions), AUDIT: audit})
            own_out, own_grad = run(kwargs_for(reference, positions) if reference is not None else {})
    except Exception as e:
        return f"it failed on this model ({brief(e)})"
    if problem := audit.verdict(f"{ids.shape[-1]}-token rows"):
        return problem
    exact = (lm.get_input_embeddings().weight.dtype == torch.float32
             and not torch.is_autocast_enabled(ids.device.type))
    tolerance = 1e-4 if exact else 2e-2  # bf16 attention summed in another order
    out_gap = float((out - own_out).norm() / own_out.norm().clamp_min(1e-12))
    grad_gap = float((grad - own_grad).norm() / own_grad.norm().clamp_min(1e-12))
    if out_gap <= tolerance and grad_gap <= tolerance:
        return None
    against = "the masked path's" if reference is None else f"those of {reference.name}"
    return f"its logits differ by {out_gap:.2g} and its input gradient by {grad_gap:.2g} from {against}"


def audit_rows(kernel: Varlen, lm: torch.nn.Module, ids: torch.Tensor, length: int) -> str | None:
    """None when, on a row of the training length (documents of ``length`` - 3 and 3 tokens), every attention
    call that takes ``kernel`` has its mask; otherwise why not. ``check``'s sample is short: a chunk or a window
    longer than it (llama4's 8192-token chunks, a window the attention call is not told of) would pass there
    and narrow the mask of the real rows. One forward without gradients, and without the logits of every row."""
    if length <= ids.shape[-1]:
        return None  # check saw rows this long
    row = ids.repeat(1, -(-length // ids.shape[-1]))[:, :length]
    positions = two_documents(row, first=length - 3)
    audit = _Audit()
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}
    try:
        with torch.no_grad():
            lm(input_ids=row, position_ids=positions, use_cache=False, **last, **kwargs_for(kernel, positions),
               **{AUDIT: audit})
    except Exception as e:
        return f"it failed on a {length}-token row ({brief(e)})"
    return audit.verdict(f"{length}-token rows")


def choose(lm: Any, device: str, ids: torch.Tensor, length: int | None = None) -> tuple[Varlen | None, str, str | None]:
    """The kernel packed batches of ``lm`` (the job's model, LoRA added, in eval mode) will use, once checked on
    ``ids`` and audited on rows of ``length`` tokens (the training rows'; None: as long as ``ids``); which
    attention runs, in words; and a note when a kernel was refused. Asked once, before training; never raises."""
    if not uses_this(lm):
        return None, f"transformers' {getattr(lm.config, '_attn_implementation', None)} attention", None
    try:
        kernel, which = kernel_for(device)
        if kernel is None:
            return None, which, None
        if (dropout := dropout_of(lm.config)) > 0 and not kernel.dropout:
            return None, "masked SDPA", f"{which} not used: the model trains with attention dropout " \
                                        f"{dropout:g}, which it does not apply"
        reference = None if device == "cpu" else per_document_sdpa()
        problem = check(kernel, lm, ids, reference) or audit_rows(kernel, lm, ids, length or ids.shape[-1])
    except Exception as e:  # a kernel or a config of a kind not foreseen: the masked path is always right
        which, problem = "attention by document", f"it could not be set up ({type(e).__name__}: {e})"
    if problem:
        return None, "masked SDPA", f"{which} not used: {problem}"
    return kernel, which, None
