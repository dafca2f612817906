"""Model shapes, a one-word-one-token tokenizer and synthetic rows for the training benchmarks.

The worker reads JSONL text and tokenizes it itself; the Hugging Face Trainer recipes take token ids. With a
word-level tokenizer (each whitespace-separated word ``wN`` is exactly one token) a row of L-2 words is exactly
L tokens once BOS and EOS are added, so every recipe trains on the same ids with the same length distribution
(the anchor's: lognormal, median ~180, clipped to 24..512).

Weights are random (seeded) from a config: nothing is downloaded, and throughput does not depend on their
values. Everything is built once into a cache folder and reused: a llama-8b build takes minutes.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.tinymodel import SHAPES as TINY_SHAPES

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"  # ids 0, 1, 2, as in worker.tinymodel
UNK = "<|unk|>"  # never produced (every word is in the vocabulary), but WordLevel needs one
MAX_WORDS = 4096  # a modest vocabulary: ids stay below every shape's vocab_size
ROWS = 4000
MAX_LENGTH = 512
DONE = "complete"  # marker file: a cache folder without it is a build that died half way
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class Shape:
    config: dict[str, Any]  # AutoConfig.for_model keyword arguments
    qv_targets: tuple[str, ...]  # what the seed recipe's q_proj/v_proj means in this architecture


def _tiny() -> dict[str, Any]:
    """worker.tinymodel's "tiny" as a Llama config, built the way tinymodel builds it."""
    s = TINY_SHAPES["tiny"]
    return dict(model_type="llama", hidden_size=s["hidden"], intermediate_size=s["hidden"] * 2,
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                vocab_size=s["vocab_size"], max_position_embeddings=2048, tie_word_embeddings=False)


SHAPES: dict[str, Shape] = {
    "tiny": Shape(_tiny(), ("q_proj", "v_proj")),
    # GPT-2 has one fused qkv Conv1D (c_attn): the nearest thing to q_proj/v_proj, and peft's own default.
    "gpt2-small": Shape(dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
                             n_positions=1024), ("c_attn",)),
    # The anchor's shapes (/work/shared/anchors/gpu_lora_baseline.py), verbatim.
    "qwen3-0.6b": Shape(dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                             tie_word_embeddings=True, max_position_embeddings=4096), ("q_proj", "v_proj")),
    "llama-8b": Shape(dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                           max_position_embeddings=4096), ("q_proj", "v_proj")),
}


def lengths(n: int, seed: int = 0) -> list[int]:
    """Instruction-tuning-like row lengths in tokens, exactly as the anchor draws them."""
    rnd = random.Random(seed)
    return [max(24, min(MAX_LENGTH, int(rnd.lognormvariate(math.log(180), 0.6)))) for _ in range(n)]


def n_words(shape: str) -> int:
    """Vocabulary size in words: specials + words + unk must fit in the model's embedding."""
    return min(MAX_WORDS, SHAPES[shape].config["vocab_size"] - 4)


def build_tokenizer(words: int) -> Any:
    """A WordLevel tokenizer over w0..w{words-1}, wrapped so AutoTokenizer loads it the ordinary way."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *(f"w{i}" for i in range(words)), UNK])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=4096)


def write_rows(path: Path, words: int, seed: int = 1) -> None:
    """ROWS lines of {"text": "w12 w7 ..."} with L-2 words each: the worker adds BOS and EOS to make L."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for length in lengths(ROWS):
            text = " ".join(f"w{rng.randrange(words)}" for _ in range(length - 2))
            f.write(json.dumps({"text": text}) + "\n")


def _save_weights(shape: str, folder: Path, device: str) -> None:
    """Random bf16 weights from the config, built on the GPU when there is one (an 8B init on CPU is slow)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**SHAPES[shape].config, **SPECIAL_IDS)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def paths(cache: Path, shape: str) -> tuple[Path, Path]:
    """(model folder, rows file) of ``shape`` in ``cache``."""
    return cache / shape / "model", cache / shape / "rows.jsonl"


def ensure(cache: Path, shape: str, device: str) -> tuple[Path, Path]:
    """Build the model folder and the rows for ``shape`` unless a complete build is cached; return their paths."""
    top = cache / shape
    if (top / DONE).exists():
        return paths(cache, shape)
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    staging = cache / f".{shape}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "model").mkdir(parents=True)
    words = n_words(shape)
    build_tokenizer(words).save_pretrained(staging / "model")
    _save_weights(shape, staging / "model", device)
    write_rows(staging / "rows.jsonl", words)
    (staging / DONE).write_text("")
    shutil.rmtree(top, ignore_errors=True)
    os.rename(staging, top)  # atomic: a reader sees a whole build or none
    return paths(cache, shape)
