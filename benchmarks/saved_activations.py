"""Bytes kept for backward per token and layer, by tensor shape and dtype: where a step's activation memory goes.

Counted with saved-tensor hooks under autocast (CPU autocast by default: the same casts as cuda's, so the bytes are
the device's too), on a qwen3-0.6b-shaped layer with LoRA r=16 on all linear layers: as peft runs it, in the
worker's ``loop.MixedPrecision``, and with the worker's eager-mode ``fused.lean_activations`` as well. Parameters
and autocast's per-step weight casts are not per token and are left out. Memory, not time: eager mode, no compile.

usage: python benchmarks/saved_activations.py [--layers 2] [--tokens 512] [--vocab 4096] [--dropout 0] [--top 8]
"""

from __future__ import annotations

import argparse
import collections
import contextlib

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from worker.fused import lean_activations
from worker.loop import MixedPrecision

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, tie_word_embeddings=True)


def saved_per_token(layers: int, tokens: int, vocab: int, dropout: float, worker: bool,
                    lean: bool) -> collections.Counter:
    """Bytes saved for backward by the transformer body, per (shape, dtype), divided by tokens x layers."""
    config = AutoConfig.for_model("qwen3", num_hidden_layers=layers, vocab_size=vocab, **QWEN3_06B)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear"))
    if lean:
        lean_activations(model, "cpu", torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, tuple[int, ...], str]] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and tokens in t.shape:  # per-token tensors only
            seen[storage.data_ptr()] = (storage.nbytes(), tuple(t.shape), str(t.dtype).removeprefix("torch."))
        return t

    context = (MixedPrecision(model, "cpu", torch.bfloat16)() if worker
               else torch.autocast("cpu", dtype=torch.bfloat16))
    ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    with contextlib.ExitStack() as stack:
        stack.enter_context(context)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t))
        model.base_model.model.model(input_ids=ids)
    by: collections.Counter = collections.Counter()
    for nbytes, shape, dtype in seen.values():
        by[f"{shape} {dtype}"] += nbytes / tokens / layers
    return by


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096, help="the head is not counted; a small one builds faster")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (the job's lora.dropout)")
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args()
    for label, worker, lean in (("peft as it runs (input cast to fp32 and back)", False, False),
                                ("loop.MixedPrecision", True, False),
                                ("worker (MixedPrecision and fused.lean_activations)", True, True)):
        by = saved_per_token(a.layers, a.tokens, a.vocab, a.dropout, worker, lean)
        print(f"{label}: {sum(by.values()) / 1024:.1f} KiB per token and layer")
        for what, n in by.most_common(a.top):
            print(f"  {n / 1024:6.2f} KiB  {what}")


if __name__ == "__main__":
    main()
