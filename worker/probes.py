"""Probe prompts answered by the base model and by the adapted one, side by side in result.json.

A person judges an adapter by reading what it says, not by its loss, so a few of their own prompts are
answered greedily (reproducible) before training and after it. The prompt is rendered as an instruction row
is rendered for training, so the adapted model sees the format it learned.
"""

from __future__ import annotations

from typing import Any

import torch

from schemas.result import ProbeOutput
from spooler.errors import Rejected
from worker.data import ALPACA_PROMPT, embedding_rows, pad_id_of
from worker.loop import evaluating

ANSWER_TOKENS = 64  # each answer's length: enough to read what the adapter learned, short beside training


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """BOS (when the tokenizer has one) then the alpaca prompt, exactly as ``worker.data.segments`` builds it."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode(ALPACA_PROMPT.format(instruction=prompt), add_special_tokens=False)


def generate_answers(model: Any, tokenizer: Any, prompts: list[str], device: str,
                     max_new_tokens: int = ANSWER_TOKENS) -> list[str]:
    """Greedy answers, one prompt at a time: no padding, so no dependence on the tokenizer's padding side.
    The model's train/eval mode is restored afterwards, since the 'before' probe runs ahead of training."""
    with evaluating(model):
        return [_answer(model, tokenizer, p, device, max_new_tokens) for p in prompts]


def _answer(model: Any, tokenizer: Any, prompt: str, device: str, max_new_tokens: int) -> str:
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], dtype=torch.long, device=device)
    pad = pad_id_of(tokenizer, embedding_rows(model))
    # use_cache: training turns the KV cache off in the model config; generation without it is quadratic.
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, use_cache=True)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def check_prompts(tokenizer: Any, prompts: list[str], context: int) -> None:
    """Refuse, before any weights are read, a prompt whose answer would run past the model's context. The last
    answer token is never fed back: a prompt of n tokens reaches position n + ANSWER_TOKENS - 2."""
    fits = context - ANSWER_TOKENS + 1
    for i, prompt in enumerate(prompts):
        n = len(prompt_ids(tokenizer, prompt))
        if n > fits:
            raise Rejected(f"probes.{i}", f"is {n} tokens; with its {ANSWER_TOKENS}-token answer it passes this "
                                          f"model's context of {context} tokens: shorten it to {max(0, fits)} "
                                          "tokens or less")


def pair(prompts: list[str], base_answers: list[str], adapted_answers: list[str]) -> list[ProbeOutput]:
    if not len(prompts) == len(base_answers) == len(adapted_answers):
        raise ValueError(f"{len(prompts)} prompts but {len(base_answers)} base and "
                         f"{len(adapted_answers)} adapted answers")
    return [ProbeOutput(prompt=p, base=b, adapted=a) for p, b, a in zip(prompts, base_answers, adapted_answers,
                                                                         strict=True)]
