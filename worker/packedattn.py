"""Attention for packed rows on CPU: each document of a row attends within itself, in an SDPA call of its own.

transformers keeps packed documents apart with a block-diagonal causal mask over the whole row, built from the
position ids (``find_packed_sequence_indices``). With a mask, CPU SDPA computes every score of the row, and
with dropout (GPT-2 has 0.1) it takes its math path: the whole L x L scores, softmax and dropout mask, though a
row of three documents needs a third of them. One causal SDPA call per document computes exactly the entries
the mask keeps. Measured on 2 cores, forward and backward, 4 rows x 12 heads x 512 tokens in documents of 200,
150 and 162, q/k/v split from one projection as GPT-2 does: 0.41 s with the mask, 0.15 s per document (dropout
0.1); 0.13 s and 0.10 s without dropout.

It takes over only where it computes the same thing: no cache, queries as long as keys, a mask transformers
built for packed rows, position ids that restart, and no extra the plain path would honour (a sliding window,
soft-capping, a position bias); anything else goes to transformers' SDPA as it is. On CUDA the masked kernel
stays: dozens of small calls per layer are not obviously faster there, and a compiled body must not break its
graph on a Python loop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

NAME = "loraspool_packed_sdpa"
_PASSIVE = {"position_ids", "use_cache", "output_attentions"}  # keys whose presence changes nothing here


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


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; the output is (batch, length, heads, head_dim)."""
    bounds = _documents(module, query, key, attention_mask, is_causal, kwargs)
    if bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = key.shape[1] != query.shape[1]
    rows = []
    for b, edges in enumerate(bounds):
        rows.append(torch.cat([
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                           dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
            for s, e in zip(edges[:-1], edges[1:], strict=True)], dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _documents(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool | None, kwargs: dict[str, Any]) -> list[list[int]] | None:
    """Per row, the edges of its documents ([0, ..., length]); None when this is not a packed causal batch."""
    positions = kwargs.get("position_ids")
    extras = [k for k, v in kwargs.items() if k not in _PASSIVE and v is not None]
    length = query.shape[2]
    if (extras or mask is None or positions is None or is_causal is False or not getattr(module, "is_causal", True)
            or key.shape[2] != length or positions.shape[-1] != length or query.device.type != "cpu"):
        return None
    positions = positions.expand(query.shape[0], -1)
    restarts = torch.diff(positions, dim=-1) != 1
    if not bool(restarts.any()):
        return None
    return [[0, *(restarts[b].nonzero().flatten() + 1).tolist(), length] for b in range(positions.shape[0])]
