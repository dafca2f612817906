"""JSONL datasets in three shapes, tokenized for causal-LM LoRA training with loss on the response only.

One row per line; the shape is read from each row's keys:

* ``{"instruction": ..., "input": ... (optional), "output": ...}``: rendered with ``ALPACA_PROMPT``; the loss
  is on the output and the EOS that follows it.
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template when it
  has one, else with the plain template below; the loss is on every assistant message (and its end token).
  The last message must be the assistant's.
* ``{"text": ...}``: the loss is on every token.

The plain chat template, used when the tokenizer has none: each message becomes ``<|role|>\\n`` then its
content then ``\\n``; an assistant message's content is followed by the EOS token before the ``\\n``.

Rows are tokenized in segments (prompt text, response text) so that the prompt/response boundary is exact
whatever the tokenizer; a row whose response is cut away entirely by ``max_length`` is dropped, since it has
nothing to learn.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from schemas.job import TrainingSpec
from spooler.errors import Rejected

log = logging.getLogger(__name__)

IGNORE = -100  # the label torch's cross entropy skips
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Row:
    line: int  # 1-based line number in the file, for error messages
    shape: str  # "alpaca" | "chat" | "text"
    data: dict[str, Any]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (the model shifts); IGNORE where no loss is taken


@dataclass
class Splits:
    train: list[Example]
    eval: list[Example]
    dropped: int = 0  # rows with no response tokens left after truncation
    notes: list[str] = field(default_factory=list)


Segment = tuple[str | list[int], bool]  # text or token ids, and whether the loss is taken on it


# ── reading ──────────────────────────────────────────────────────────────────────────────────────────────
def read_rows(path: Path) -> list[Row]:
    """Parse and check every non-blank line; the first bad one is refused by its line number."""
    rows: list[Row] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise Rejected("dataset", f"line {number}: not UTF-8 text ({e.reason} at byte {e.start})") from e
            if text.strip():
                rows.append(_parse_line(text, number))
    return rows


def _parse_line(text: str, number: int) -> Row:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise Rejected("dataset", f"line {number}: not valid JSON ({e.msg} at column {e.colno}); "
                                  "each line must be one JSON object") from e
    if not isinstance(data, dict):
        raise Rejected("dataset", f"line {number}: a row must be a JSON object, not {type(data).__name__}")
    problem, shape = _shape_problem(data)
    if problem:
        raise Rejected("dataset", f"line {number}: {problem}")
    return Row(number, shape, data)


def _shape_problem(data: dict[str, Any]) -> tuple[str | None, str]:
    """(why the row is malformed or None, its shape)."""
    if "messages" in data:
        return _chat_problem(data["messages"]), "chat"
    if "instruction" in data or "output" in data:
        for key in ("instruction", "output"):
            if not isinstance(data.get(key), str) or not data[key]:
                return f"an instruction row needs a non-empty string \"{key}\"", "alpaca"
        if data.get("input") is not None and not isinstance(data["input"], str):
            return "\"input\" must be a string when given", "alpaca"
        return None, "alpaca"
    if "text" in data:
        ok = isinstance(data["text"], str) and data["text"].strip()
        return (None if ok else "\"text\" must be a non-empty string"), "text"
    keys = ", ".join(sorted(data)) or "none"
    return (f"a row needs \"instruction\" and \"output\", or \"messages\", or \"text\"; this one has keys: {keys}",
            "")


def _chat_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "\"messages\" must be a non-empty list of {\"role\", \"content\"} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} must be an object with string \"role\" and \"content\""
    if messages[-1]["role"] != "assistant":
        return "the last message must have role \"assistant\": it is the reply the model learns"
    return None


# ── splitting ────────────────────────────────────────────────────────────────────────────────────────────
def split_rows(rows: list[Row], eval_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A seeded split: the same file and seed always give the same eval rows. At least one row on each side."""
    if len(rows) < 2:
        raise Rejected("dataset", f"has {len(rows)} row(s); at least 2 are needed (one to train, one to evaluate)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * eval_fraction)))
    eval_idx = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in eval_idx], [r for i, r in enumerate(rows) if i in eval_idx]


# ── tokenizing ───────────────────────────────────────────────────────────────────────────────────────────
def segments(row: Row, tokenizer: Any) -> list[Segment]:
    """The row as (text or ids, trainable) pieces, ending with a trainable EOS where the format has none."""
    if row.shape == "text":
        return _with_eos(_bos(tokenizer) + [(row.data["text"], True)], tokenizer)
    if row.shape == "alpaca":
        d = row.data
        template = ALPACA_PROMPT_WITH_INPUT if d.get("input") else ALPACA_PROMPT
        prompt = template.format(instruction=d["instruction"], input=d.get("input") or "")
        return _with_eos(_bos(tokenizer) + [(prompt, False), (d["output"], True)], tokenizer)
    if getattr(tokenizer, "chat_template", None):
        return _with_eos(_templated_chat(row, tokenizer), tokenizer)
    return _bos(tokenizer) + _plain_chat(row.data["messages"], tokenizer)


def _bos(tokenizer: Any) -> list[Segment]:
    return [([tokenizer.bos_token_id], False)] if tokenizer.bos_token_id is not None else []


def _with_eos(parts: list[Segment], tokenizer: Any) -> list[Segment]:
    """Append a trainable EOS unless the last trainable piece already ends the turn with one."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return parts
    last = next((p for p, trainable in reversed(parts) if trainable), None)
    if isinstance(last, str) and tokenizer.eos_token and tokenizer.eos_token in last:
        return parts
    return [*parts, ([eos], True)]


def _plain_chat(messages: list[dict[str, str]], tokenizer: Any) -> list[Segment]:
    parts: list[Segment] = []
    for m in messages:
        parts.append((f"<|{m['role']}|>\n", False))
        if m["role"] == "assistant":
            parts.append((m["content"], True))
            if tokenizer.eos_token_id is not None:
                parts.append(([tokenizer.eos_token_id], True))
            parts.append(("\n", False))
        else:
            parts.append((m["content"] + "\n", False))
    return parts


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _templated_chat(row: Row, tokenizer: Any) -> list[Segment]:
    """Split the rendered chat at each assistant turn. Templates that do not render turn by turn (the text for
    the first k messages is not a prefix of the whole) fall back to learning the last assistant turn only."""
    messages = row.data["messages"]
    try:
        full = _render(tokenizer, messages, False)
        parts = _turn_segments(tokenizer, messages, full) or _last_turn_segments(tokenizer, messages, full)
    except Exception as e:  # a template may raise anything (jinja2 errors, its own raise_exception)
        raise Rejected("dataset", f"line {row.line}: the model's chat template cannot render this row: {e}") from e
    if parts is None:
        raise Rejected("dataset", f"line {row.line}: the model's chat template does not render the conversation "
                                  "as prompt + reply, so the reply cannot be told apart; use instruction rows")
    return parts


def _turn_segments(tokenizer: Any, messages: list[dict[str, str]], full: str) -> list[Segment] | None:
    """Prompt/reply pieces for every assistant turn, or None when the template is not prefix-stable."""
    parts: list[Segment] = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(prompt) and full.startswith(upto) and done <= len(prompt) <= len(upto)):
            return None
        parts += [(full[done:len(prompt)], False), (full[len(prompt):len(upto)], True)]
        done = len(upto)
    parts.append((full[done:], False))
    return [p for p in parts if p[0]]


def _last_turn_segments(tokenizer: Any, messages: list[dict[str, str]], full: str) -> list[Segment] | None:
    prompt = _render(tokenizer, messages[:-1], True)
    return [(prompt, False), (full[len(prompt):], True)] if full.startswith(prompt) else None


def tokenize(row: Row, tokenizer: Any, max_length: int) -> Example:
    """Token ids and labels for one row, cut to ``max_length`` tokens."""
    ids: list[int] = []
    labels: list[int] = []
    for piece, trainable in segments(row, tokenizer):
        piece_ids = piece if isinstance(piece, list) else tokenizer.encode(piece, add_special_tokens=False)
        ids += piece_ids
        labels += piece_ids if trainable else [IGNORE] * len(piece_ids)
    return Example(ids[:max_length], labels[:max_length])


def _learnable(example: Example) -> bool:
    """True when some token after the first carries a label (the first is never predicted)."""
    return any(label != IGNORE for label in example.labels[1:])


def load_splits(paths: list[Path], tokenizer: Any, t: TrainingSpec) -> Splits:
    """Read, split and tokenize ``paths``; drop rows left with nothing to learn after truncation."""
    max_length = t.max_length
    train_rows, eval_rows = split_rows([r for p in paths for r in read_rows(p)], t.eval_fraction, t.seed)
    train = [tokenize(r, tokenizer, max_length) for r in train_rows]
    evals = [tokenize(r, tokenizer, max_length) for r in eval_rows]
    kept_train, kept_eval = [e for e in train if _learnable(e)], [e for e in evals if _learnable(e)]
    dropped = len(train) + len(evals) - len(kept_train) - len(kept_eval)
    if not kept_train or not kept_eval:
        raise Rejected("dataset", f"after cutting rows to training.max_length={max_length} tokens, "
                                  f"{len(kept_train)} training and {len(kept_eval)} evaluation rows have any "
                                  "response left; raise max_length or shorten the prompts")
    splits = Splits(kept_train, kept_eval, dropped)
    if dropped:
        splits.notes.append(f"{dropped} row(s) dropped: their prompt fills training.max_length={max_length} "
                            "tokens, leaving no response to learn")
    return splits


# ── batching ─────────────────────────────────────────────────────────────────────────────────────────────
def pad_id_of(tokenizer: Any) -> int:
    """The id to pad with; any id works (pads are masked), the tokenizer's own pad is only the tidiest."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row in the batch (right padding): pads get attention 0 and label IGNORE."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
