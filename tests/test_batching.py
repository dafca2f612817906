"""Batches: packed rows never attend or predict across rows, every row is trained once per epoch, the order is a
function of (seed, epoch, world), and DDP ranks split one process's global batch. And the model's side: the
probe that tells whether a model keeps packed rows apart."""

from __future__ import annotations

import math
import random

import pytest

from worker.batching import Batcher
from worker.data import IGNORE, Example


def _examples(n: int = 300, seed: int = 0) -> list[Example]:
    rnd = random.Random(seed)
    out = []
    for k in range(n):
        length = max(3, min(64, int(rnd.lognormvariate(math.log(20), 0.6))))
        ids = [1000 * k + j for j in range(length)]  # ids tell which row and position a token came from
        out.append(Example(ids, [IGNORE] + ids[1:]))
    return out


def _rows(b: Batcher, epoch: int) -> list[list[int]]:
    return [row for step in b.epoch_plan(epoch) for row in step]


def test_packed_rows_fit_cover_every_row_once_and_are_dense() -> None:
    ex = _examples()
    b = Batcher(ex, 4, 64, 0, seed=3, packed=True)
    rows = _rows(b, 0)
    assert sorted(i for r in rows for i in r) == list(range(len(ex)))
    assert all(sum(len(ex[i].input_ids) for i in r) <= 64 for r in rows)
    fill = sum(len(e.input_ids) for e in ex) / (len(rows) * 64)
    assert fill > 0.9, fill


def test_packed_batch_resets_positions_and_masks_row_starts() -> None:
    ex = _examples(40)
    b = Batcher(ex, 2, 64, 0, seed=1, packed=True)
    batch = b.batch(0, 0)
    assert batch.attention_mask is None and batch.input_ids.shape == (2, 64)
    for r, members in enumerate(b.epoch_plan(0)[0]):
        at = 0
        for i in members:
            n = len(ex[i].input_ids)
            assert batch.input_ids[r, at:at + n].tolist() == ex[i].input_ids
            assert batch.position_ids[r, at:at + n].tolist() == list(range(n))
            assert batch.labels[r, at] == IGNORE  # never predicted from the row packed before it
            assert batch.labels[r, at + 1:at + n].tolist() == ex[i].labels[1:]
            at += n
        assert (batch.labels[r, at:] == IGNORE).all()
    assert batch.real_tokens == sum(len(ex[i].input_ids) for r in b.epoch_plan(0)[0] for i in r)
    assert batch.padded_tokens == 2 * 64


def test_padded_batches_are_length_grouped_and_cover_every_row() -> None:
    ex = _examples()
    b = Batcher(ex, 8, 64, 0, seed=2, packed=False)
    plan = b.epoch_plan(0)
    assert sorted(r[0] for step in plan for r in step) == list(range(len(ex)))
    pad = sum(b.batch(0, k).padded_tokens - b.batch(0, k).real_tokens for k in range(len(plan)))
    random_pad = 0
    order = list(range(len(ex)))
    random.Random(0).shuffle(order)
    for k in range(0, len(order), 8):
        lens = [len(ex[i].input_ids) for i in order[k:k + 8]]
        random_pad += max(lens) * len(lens) - sum(lens)
    assert pad < random_pad / 2, (pad, random_pad)


def test_order_depends_only_on_seed_epoch_and_world() -> None:
    ex = _examples()
    for packed in (True, False):
        a, b = Batcher(ex, 4, 64, 0, 7, packed), Batcher(ex, 4, 64, 0, 7, packed)
        assert a.epoch_plan(1) == b.epoch_plan(1)
        assert a.epoch_plan(0) != a.epoch_plan(1)
        assert Batcher(ex, 4, 64, 0, 8, packed).epoch_plan(0) != a.epoch_plan(0)


def test_ranks_split_the_global_batch_of_one_process() -> None:
    ex = _examples(64)
    one = Batcher(ex, 8, 64, 0, 5, packed=False)
    ranks = [Batcher(ex, 4, 64, 0, 5, packed=False, world=2, rank=r) for r in (0, 1)]
    for step in range(len(one.epoch_plan(0))):
        whole = one.batch(0, step)
        parts = [rk.batch(0, step) for rk in ranks]
        assert sum(p.real_tokens for p in parts) == whole.real_tokens
        got = sorted(t for p in parts for row in p.input_ids.tolist() for t in row if t != 0)
        assert got == sorted(t for row in whole.input_ids.tolist() for t in row if t != 0)


def test_every_target_weighs_the_same_over_an_epoch() -> None:
    """Length grouping makes steps of short rows and steps of long rows: their target counts differ several-fold,
    so the loss divides each step's sum by the epoch's mean count, the same for every step and every rank."""
    ex = _examples(300)
    for packed in (False, True):
        b = Batcher(ex, 8, 64, 0, seed=3, packed=packed)
        plan = b.epoch_plan(0)
        counts = [sum(len(ex[i].input_ids) - 1 for row in step for i in row) for step in plan]
        assert b.targets_per_step(0) == pytest.approx(sum(counts) / len(plan))
        assert sum(counts) == sum(len(e.input_ids) - 1 for e in ex)  # every target once, row starts excepted
        if not packed:
            assert max(counts) > 3 * min(counts), "grouping no longer makes uneven steps: the test says nothing"
        ranks = [Batcher(ex, 8, 64, 0, seed=3, packed=packed, world=2, rank=r) for r in (0, 1)]
        assert [r.targets_per_step(0) for r in ranks] == [ranks[0].targets_per_step(0)] * 2


# ── the model's side of packing ──────────────────────────────────────────────────────────────────────────────
ARCHS = {
    "llama": {}, "qwen3": {"head_dim": 16}, "mistral": {}, "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64}, "falcon": {},
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_probe_tells_models_that_keep_packed_rows_apart_from_those_that_mix_them(arch: str) -> None:
    """The probe against the ground truth: each document run alone. A model whose packed logits match those is
    fit to pack (the probe says None); OPT attends across rows, and the probe names that. Falcon did too up to
    transformers 5.23 and keeps them apart from 5.24: either way the probe must agree with the ground truth."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker.packprobe import packing_problem

    config = AutoConfig.for_model(arch, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  **ARCHS[arch])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 256, (1, 50))
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=torch.cat([torch.arange(20), torch.arange(30)])[None],
                       use_cache=False).logits
        alone = torch.cat([model(input_ids=ids[:, :20], use_cache=False).logits,
                           model(input_ids=ids[:, 20:], use_cache=False).logits], dim=1)
    keeps_apart = bool(torch.allclose(packed, alone, atol=1e-5))
    problem = packing_problem(model.train())
    if arch != "falcon":
        assert keeps_apart == (arch != "opt")
    assert (problem is None) == keeps_apart, problem
    assert problem is None or "attend to the rows before it" in problem
    assert model.training, "the probe left the model in eval mode"


def test_a_packed_rows_padded_tail_never_takes_a_position_past_the_longest_row() -> None:
    """The tail counted 0, 1, 2... to its end: with max_length 256 and rows of at most 36 tokens a GPT-2 of 128
    learned positions looked up position 136 and died in an IndexError (found by the length check's test)."""
    rows = [Example(list(range(3, 3 + n)), [IGNORE] + list(range(4, 3 + n))) for n in (36, 20, 12, 30)]
    batcher = Batcher(rows, 2, 256, 0, 0, packed=True)
    for index in range(batcher.steps_per_epoch()):
        batch = batcher.batch(0, index)
        assert batch.position_ids is not None and int(batch.position_ids.max()) < 36
