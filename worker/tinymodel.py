"""A tiny causal LM, its tokenizer and learnable datasets, all built on the spot with nothing downloaded.

Tests, the demo and the benchmarks need a real model folder that loads "the real way"
(``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``) but the machines that run them
have no hub access. So a byte-level BPE is trained on a small built-in corpus and a randomly initialised
(seeded) Llama-shaped model is saved beside it as safetensors. The datasets are templated facts the model can
learn in a few dozen steps, so "eval loss fell" is a meaningful check.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIALS = [PAD, BOS, EOS]  # ids 0, 1, 2
# A minimal chat template: role header, content, EOS after every turn, so a model learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# The "world" the datasets describe: a fixed mapping, so answers are predictable from questions.
THINGS = ["apple", "sky", "grass", "snow", "coal", "lemon", "cherry", "ocean", "cloud", "carrot", "plum", "banana",
          "frog", "rose", "night", "sun", "lime", "salt", "ink", "milk"]
COLORS = ["red", "blue", "green", "white", "black", "yellow", "red", "blue", "grey", "orange", "purple", "yellow",
          "green", "red", "black", "yellow", "green", "white", "black", "white"]
ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "duck", "goat", "pig", "fox", "owl"]
SOUNDS = ["meow", "woof", "neigh", "moo", "baa", "quack", "bleat", "oink", "yip", "hoot"]
FILLER = (
    "The quick brown fox jumps over the lazy dog. A worker trains a small adapter on a shared drive. "
    "Below is an instruction that describes a task. Write a response that completes the request. "
    "The answer is short and the question is simple. Every job has a model, a dataset and a result. "
    "What is the color of this thing? What does this animal say? Tell me about the world. "
)

Shape = Literal["alpaca", "chat", "text"]

# Named sizes for benchmarks: (hidden, layers, heads, vocab).
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "vocab_size": 512},
    "small": {"hidden": 256, "layers": 4, "heads": 8, "vocab_size": 2048},
    "medium": {"hidden": 768, "layers": 8, "heads": 12, "vocab_size": 8192},
}


def _corpus() -> list[str]:
    """Text for the BPE: every sentence shape the datasets use, so their tokens are short."""
    lines = [FILLER] * 4
    for thing, color in zip(THINGS, COLORS, strict=True):
        lines.append(f"What color is the {thing}? The {thing} is {color}.")
    for animal, sound in zip(ANIMALS, SOUNDS, strict=True):
        lines.append(f"What does the {animal} say? The {animal} says {sound}.")
    markers = ["### Instruction:\n", "### Input:\n", "### Response:\n", "<|user|>\n", "<|assistant|>\n", "<|system|>\n"]
    lines += markers * 8  # frequent enough that the prompt scaffolding gets merged into a few tokens
    return lines


def _build_tokenizer(vocab_size: int):  # -> PreTrainedTokenizerFast
    """A byte-level BPE (no unknown tokens possible) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=2048)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(arch: str, vocab_size: int, hidden: int, layers: int, heads: int):  # -> PretrainedConfig
    """A transformers config for ``arch`` (llama, mistral, qwen2: all have q/k/v/o and gate/up/down)."""
    if arch == "llama":  # imported directly: the Auto mapping costs over a second to import
        from transformers import LlamaConfig as config_class
    else:
        from transformers import AutoConfig

        config_class = AutoConfig.for_model(arch).__class__
    return config_class(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )


def build_tiny_model(folder: Path, *, vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4,
                     seed: int = 0, arch: str = "llama") -> Path:
    """Build and save a seeded random causal LM and its tokenizer into ``folder``; return ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size)
    config = _config(arch, len(tokenizer), hidden, layers, heads)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    log.info("built a tiny %s model (%d parameters) in %s", arch, model.num_parameters(), folder)
    return folder


def build_shape(folder: Path, shape_name: str, *, seed: int = 0) -> Path:
    """Build one of ``SHAPES`` (for benchmarks that want a bigger, still random, model)."""
    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; known: {', '.join(SHAPES)}")
    return build_tiny_model(folder, seed=seed, **SHAPES[shape_name])


def _row(shape: Shape, rng: random.Random) -> dict:
    """One templated fact in the given dataset shape."""
    if rng.random() < 0.6:
        i = rng.randrange(len(THINGS))
        question, answer = f"What color is the {THINGS[i]}?", f"The {THINGS[i]} is {COLORS[i]}."
        context = THINGS[i]
    else:
        i = rng.randrange(len(ANIMALS))
        question, answer = f"What does the {ANIMALS[i]} say?", f"The {ANIMALS[i]} says {SOUNDS[i]}."
        context = ANIMALS[i]
    if shape == "alpaca":
        row = {"instruction": question, "output": answer}
        if rng.random() < 0.5:
            row["input"] = context
        return row
    if shape == "chat":
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "Answer in one short sentence."})
        return {"messages": messages}
    if shape == "text":
        return {"text": f"{question} {answer}"}
    raise ValueError(f"unknown dataset shape {shape!r}; use alpaca, chat or text")


def write_dataset(path: Path, shape: Shape, rows: int, seed: int = 0) -> Path:
    """Write ``rows`` JSONL rows of templated facts in ``shape``; the loss on them falls within a few dozen steps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps(_row(shape, rng)) + "\n")
    return path
