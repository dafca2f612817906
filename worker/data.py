"""JSONL datasets in four shapes, refined and tokenized for causal-LM LoRA training.

A dataset is one JSONL file or several, read in order and combined. One row per line; the shape is read from
each row's keys:

* ``{"instruction": ..., "input": ... (optional), "output": ...}``: rendered with ``ALPACA_PROMPT``; the loss
  is on the output and the EOS that follows it.
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template when it
  has one, else with the plain template below; the loss is on every assistant message (and its end token).
  The last message must be the assistant's.
* ``{"prompt": ..., "completion": ...}``: the two joined as they are (no separator is added, so end the prompt
  with one); the loss is on the completion and the EOS that follows it, never on the prompt.
* ``{"text": ...}``: the loss is on every token.

The plain chat template, used when the tokenizer has none: each message becomes ``<|role|>\\n`` then its
content then ``\\n``; an assistant message's content is followed by the EOS token before the ``\\n``.

A row's *text* is its string fields together: instruction + input + output, every message's content, prompt +
completion, or text. Refinement runs on the combined rows before the split, so that a duplicate cannot sit on
both sides of it, and each step is counted in a ``DataReport``:

1. malformed lines (bad UTF-8, bad JSON, no known shape) refuse the job by file and line number, or are
   counted in ``bad_rows`` and skipped when ``training.skip_bad_rows`` is on; blank lines are not rows;
2. ``empty``: rows whose text is only whitespace;
3. ``duplicates``: rows whose trained content (shape and the fields above, roles included; other keys ignored)
   equals an earlier row's; the first is kept;
4. ``too_short`` / ``too_long``: rows whose text has fewer than ``training.min_chars`` or more than
   ``training.max_chars`` characters;
5. the seeded split (``training.eval_fraction``, at least one row a side);
6. ``truncated``: rows cut to ``training.max_length`` tokens, kept; ``no_response``: rows whose response the
   cut removed entirely, dropped, since they have nothing to learn. If that empties one side of the split,
   the rows left are split again, with the same seed, and a note says so.

So ``rows_read`` = ``bad_rows`` + every dropped count + ``train_rows`` + ``eval_rows``. Rows are tokenized in
segments (prompt text, response text) so that the prompt/response boundary is exact whatever the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from schemas.job import TrainingSpec
from schemas.result import DataReport
from spooler.errors import Rejected
from spooler.jobfile import LONE_SURROGATE, encodable

if TYPE_CHECKING:
    from worker.tokencache import TokenCache

log = logging.getLogger(__name__)

T = TypeVar("T")
IGNORE = -100  # the label torch's cross entropy skips
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Row:
    line: int  # 1-based line number in the file, for error messages
    shape: str  # "alpaca" | "chat" | "prompt_completion" | "text"
    data: dict[str, Any]
    file: str = ""  # the file's name when the dataset has several, so a message says which one

    @property
    def where(self) -> str:
        return where(self.file, self.line)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (the model shifts); IGNORE where no loss is taken
    truncated: bool = False  # cut to max_length tokens


@dataclass
class Splits:
    train: list[Example]
    eval: list[Example]
    dropped: int = 0  # rows with no response tokens left after truncation
    notes: list[str] = field(default_factory=list)
    report: DataReport = field(default_factory=DataReport)


@dataclass
class Reading:
    """Every file's rows, in order, with what the result must say about the lines that were not rows."""

    rows: list[Row] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # why each skipped line was malformed, where it was
    sha256: str = ""
    sizes: list[int] = field(default_factory=list)  # each file's bytes: where one file ends and the next begins

    @property
    def lines(self) -> int:
        """Non-blank lines, good and bad: ``rows_read``."""
        return len(self.rows) + len(self.bad)


Segment = tuple[str | list[int], bool]  # text or token ids, and whether the loss is taken on it


# ── reading ──────────────────────────────────────────────────────────────────────────────────────────────
def read_dataset(paths: list[Path], skip_bad_rows: bool = False) -> Reading:
    """Parse every file in order, hashing the bytes on the way so each file is read once."""
    reading, digest = Reading(), hashlib.sha256()
    for path, label in zip(paths, file_labels(paths), strict=True):
        _read_file(path, label, skip_bad_rows, reading, digest)
    reading.sha256 = digest.hexdigest()
    return reading


def read_rows(path: Path) -> list[Row]:
    """One file's rows; the first bad line is refused by its line number."""
    return read_dataset([path]).rows


def file_labels(paths: list[Path]) -> list[str]:
    """How messages name each file: nothing for a lone file, else its name (and position, if names repeat)."""
    if len(paths) == 1:
        return [""]
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{name} (file {i})" for i, name in enumerate(names, start=1)]


def where(label: str, line: int) -> str:
    """Where a person finds a line: ``b.jsonl line 7``, or ``line 7`` when the dataset is one file."""
    return f"{label} line {line}" if label else f"line {line}"


# One dataset line, at most. Lines are read into memory whole; a file with no line end (a 30 GB sparse file, a
# binary) would be read as one line until the OOM killer came. A real row is kilobytes.
MAX_LINE_BYTES = 16 * 1024 * 1024


def _read_file(path: Path, label: str, skip_bad_rows: bool, reading: Reading, digest: Any) -> None:
    reading.sizes.append(0)
    with open(path, "rb") as f:
        for number, raw in enumerate(_bounded_lines(f, digest, reading), start=1):
            try:
                if raw is None:
                    raise Rejected("dataset", f"{where(label, number)}: longer than {MAX_LINE_BYTES:,} bytes; "
                                              "one row per line, each a JSON object (is this a JSONL file?)")
                row = _parse_raw(raw, number, label)
            except Rejected as e:
                if not skip_bad_rows:
                    raise
                reading.bad.append(e.problem)
                continue
            if row is not None:
                reading.rows.append(row)


def _bounded_lines(f: Any, digest: Any, reading: Reading) -> Iterator[bytes | None]:
    """The file's lines, each hashed and counted; None for one longer than MAX_LINE_BYTES, whose rest is
    read past (hashed, never kept)."""
    while raw := f.readline(MAX_LINE_BYTES + 1):
        digest.update(raw)
        reading.sizes[-1] += len(raw)
        if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
            yield raw
            continue
        tail = raw
        while not tail.endswith(b"\n") and (tail := f.readline(2**20)):
            digest.update(tail)
            reading.sizes[-1] += len(tail)
        yield None


def _parse_raw(raw: bytes, number: int, label: str) -> Row | None:
    """The line's row, or None for a blank line."""
    try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise Rejected("dataset", f"{where(label, number)}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return _parse_line(text, number, label) if text.strip() else None


def _parse_line(text: str, number: int, label: str = "") -> Row:
    at = where(label, number)
    text = text.rstrip("\r\n")  # parsed with its line end, a line cut short would be "wrong" at column 1 of the next
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        ends = " (the line ends there: cut short?)" if e.pos >= len(text.rstrip()) else ""
        raise Rejected("dataset", f"{at}: not valid JSON ({e.msg} at column {e.pos + 1}{ends}); "
                                  "each line must be one JSON object") from e
    except (ValueError, RecursionError) as e:  # an integer of 5000 digits; nesting deeper than Python recurses
        raise Rejected("dataset", f"{at}: not a usable JSON value ({type(e).__name__}: {str(e)[:120]})") from None
    if (m := LONE_SURROGATE.search(text)) and not encodable(data):
        raise Rejected("dataset", f"{at}: {m.group(0)} is half of a UTF-16 pair, not a character; fix that text")
    if not isinstance(data, dict):
        raise Rejected("dataset", f"{at}: a row must be a JSON object, not {type(data).__name__}")
    problem, shape = _shape_problem(data)
    row = Row(number, shape, data, label)
    if not problem and not is_empty(row):  # a wholly blank row is refinement's to count, not an error
        problem = _blank_problem(row)
    if problem:
        raise Rejected("dataset", f"{at}: {problem}")
    return row


def _shape_problem(data: dict[str, Any]) -> tuple[str | None, str]:
    """(why the row is malformed or None, its shape). Only types here: blank values are judged later."""
    if "messages" in data:
        return _chat_problem(data["messages"]), "chat"
    if "instruction" in data or "output" in data:
        return _alpaca_problem(data), "alpaca"
    if "prompt" in data or "completion" in data:
        return _prompt_completion_problem(data), "prompt_completion"
    if "text" in data:
        return (None if isinstance(data["text"], str) else "\"text\" must be a non-empty string"), "text"
    keys = ", ".join(sorted(data)) or "none"
    return (f"a row needs \"instruction\" and \"output\", or \"messages\", or \"prompt\" and \"completion\", or "
            f"\"text\"; this one has keys: {keys}", "")


def _alpaca_problem(data: dict[str, Any]) -> str | None:
    problem = _strings_problem(data, ("instruction", "output"), "an instruction row")
    if problem is None and data.get("input") is not None and not isinstance(data["input"], str):
        return "\"input\" must be a string when given"
    return problem


def _prompt_completion_problem(data: dict[str, Any]) -> str | None:
    if not isinstance(data.get("prompt"), str):
        return "a prompt/completion row needs a string \"prompt\" (it may be empty)"
    return _strings_problem(data, ("completion",), "a prompt/completion row")


def _strings_problem(data: dict[str, Any], keys: tuple[str, ...], what: str) -> str | None:
    missing = next((k for k in keys if not isinstance(data.get(k), str)), None)
    return f"{what} needs a non-empty string \"{missing}\"" if missing else None


def _blank_problem(row: Row) -> str | None:
    """A row with some text but an empty required field: a mistake in the file, not an empty row."""
    required = {"alpaca": ("instruction", "output"), "prompt_completion": ("completion",)}.get(row.shape, ())
    blank = next((k for k in required if not row.data[k]), None)
    what = "an instruction row" if row.shape == "alpaca" else "a prompt/completion row"
    return f"{what} needs a non-empty string \"{blank}\"" if blank else None


def _chat_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "\"messages\" must be a non-empty list of {\"role\", \"content\"} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} must be an object with string \"role\" and \"content\""
    if messages[-1]["role"] != "assistant":
        return "the last message must have role \"assistant\": it is the reply the model learns"
    return None


# ── refining ─────────────────────────────────────────────────────────────────────────────────────────────
def texts(row: Row) -> list[str]:
    """The row's text, field by field: what emptiness and the character limits are judged on."""
    d = row.data
    if row.shape == "alpaca":
        return [d["instruction"], d.get("input") or "", d["output"]]
    if row.shape == "chat":
        return [m["content"] for m in d["messages"]]
    if row.shape == "prompt_completion":
        return [d["prompt"], d["completion"]]
    return [d["text"]]


def is_empty(row: Row) -> bool:
    return not any(s.strip() for s in texts(row))


def chars(row: Row) -> int:
    return sum(len(s) for s in texts(row))


def content_key(row: Row) -> str:
    """What the model would see of the row: two rows with the same key train the same way."""
    if row.shape == "chat":
        content: Any = [[m["role"], m["content"]] for m in row.data["messages"]]
    else:
        content = texts(row)
    return json.dumps([row.shape, content], ensure_ascii=False)


def refine(rows: list[Row], t: TrainingSpec, report: DataReport) -> list[Row]:
    """Drop empty, duplicate, too short and too long rows, in that order, counting each step in ``report``."""
    rows = _drop(rows, report, "empty", is_empty)
    rows = _drop(rows, report, "duplicates", _seen_before())
    rows = _drop(rows, report, "too_short", lambda r: chars(r) < t.min_chars)
    return _drop(rows, report, "too_long", lambda r: t.max_chars is not None and chars(r) > t.max_chars)


def _drop(rows: list[Row], report: DataReport, count: str, drop: Callable[[Row], bool]) -> list[Row]:
    kept = [r for r in rows if not drop(r)]
    setattr(report, count, getattr(report, count) + len(rows) - len(kept))
    return kept


def _seen_before() -> Callable[[Row], bool]:
    """A filter that passes the first row of each content and catches every later one."""
    seen: set[str] = set()

    def seen_before(row: Row) -> bool:
        key = content_key(row)
        if key in seen:
            return True
        seen.add(key)
        return False

    return seen_before


def removed_summary(report: DataReport, bad: list[str], t: TrainingSpec) -> str:
    """What reading and refinement took away, in words, for a person wondering where their rows went."""
    first_bad = f"; the first: {bad[0]}" if bad else ""
    steps = [(report.bad_rows, f"malformed (skipped by training.skip_bad_rows{first_bad})"),
             (report.empty, "empty"), (report.duplicates, "duplicates"),
             (report.too_short, f"shorter than training.min_chars={t.min_chars}"),
             (report.too_long, f"longer than training.max_chars={t.max_chars}"),
             (report.no_response, f"with no response left within training.max_length={t.max_length} tokens")]
    removed = [f"{n} {what}" for n, what in steps if n]
    return f"of {report.rows_read} rows read, " + (", ".join(removed) if removed else "none removed")


# ── splitting ────────────────────────────────────────────────────────────────────────────────────────────
def split_rows(rows: list[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
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
    d = row.data
    if row.shape == "text":
        return _with_eos(_bos(tokenizer) + [(d["text"], True)], tokenizer)
    if row.shape == "prompt_completion":
        return _with_eos(_bos(tokenizer) + [(d["prompt"], False), (d["completion"], True)], tokenizer)
    if row.shape == "alpaca":
        template = ALPACA_PROMPT_WITH_INPUT if d.get("input") else ALPACA_PROMPT
        prompt = template.format(instruction=d["instruction"], input=d.get("input") or "")
        return _with_eos(_bos(tokenizer) + [(prompt, False), (d["output"], True)], tokenizer)
    if getattr(tokenizer, "chat_template", None):
        return _with_eos(_templated_chat(row, tokenizer), tokenizer)
    return _bos(tokenizer) + _plain_chat(d["messages"], tokenizer)


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
        raise Rejected("dataset", f"{row.where}: the model's chat template cannot render this row: {e}") from e
    if parts is None:
        raise Rejected("dataset", f"{row.where}: the model's chat template does not render the conversation "
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
    return _cut(row_tokens(row, tokenizer), max_length)


def row_tokens(row: Row, tokenizer: Any) -> tuple[list[int], list[int]]:
    """The whole row's ids, and its labels: the id where it is trained, IGNORE elsewhere. (What
    ``worker.tokencache`` keeps: change this, and bump its FORMAT.)"""
    ids: list[int] = []
    labels: list[int] = []
    for piece, trainable in segments(row, tokenizer):
        piece_ids = piece if isinstance(piece, list) else tokenizer.encode(piece, add_special_tokens=False)
        ids += piece_ids
        labels += piece_ids if trainable else [IGNORE] * len(piece_ids)
    return ids, labels


def _cut(tokens: tuple[list[int], list[int]], max_length: int) -> Example:
    ids, labels = tokens
    return Example(ids[:max_length], labels[:max_length], len(ids) > max_length)


def _learnable(example: Example) -> bool:
    """True when some token after the first carries a label (the first is never predicted)."""
    return any(label != IGNORE for label in example.labels[1:])


def load_splits(paths: list[Path], tokenizer: Any, t: TrainingSpec, tick: Callable[[], None] = lambda: None,
                cache: Callable[[Reading], TokenCache] | None = None) -> Splits:
    """Read, refine, split and tokenize ``paths``, in that order; ``splits.report`` counts every step.
    ``tick`` is called per row tokenized: a large dataset is slow, and the worker must tell slow from stuck.
    ``cache`` opens the token cache of what was read (``worker.tokencache.for_dataset``)."""
    reading = read_dataset(paths, t.skip_bad_rows)
    tokens = cache(reading) if cache is not None else None
    report = DataReport(sha256=reading.sha256, rows_read=reading.lines, bad_rows=len(reading.bad))
    rows = refine(reading.rows, t, report)
    _check_enough(reading, rows, report, t)
    train_rows, eval_rows = split_rows(rows, t.eval_fraction, t.seed)
    train = _learnable_examples(train_rows, tokenizer, t.max_length, report, tick, tokens)
    evals = _learnable_examples(eval_rows, tokenizer, t.max_length, report, tick, tokens)
    if tokens is not None:
        tokens.save()
        report.tokens_cached = tokens.hits
    notes = _notes(report, reading.bad, t)
    if (not train or not evals) and len(train) + len(evals) >= 2:
        # Every row of one side lost its response to the cut, while enough are left to learn from: split those
        # again, with the same seed. A dataset that split well keeps its split (verify and resume rely on it).
        lost = "evaluation" if not evals else "training"
        train, evals = split_rows(train + evals, t.eval_fraction, t.seed)
        notes.append(f"every {lost} row of the seeded split lost its response at training.max_length="
                     f"{t.max_length}; the {len(train) + len(evals)} rows left were split again")
    report.train_rows, report.eval_rows = len(train), len(evals)
    if not train or not evals:
        raise Rejected("dataset", f"after cutting rows to training.max_length={t.max_length} tokens, "
                                  f"{len(train)} training and {len(evals)} evaluation rows have any "
                                  "response left; raise max_length or shorten the prompts "
                                  f"({removed_summary(report, reading.bad, t)})")
    return Splits(train, evals, report.no_response, notes, report)


def _check_enough(reading: Reading, rows: list[Row], report: DataReport, t: TrainingSpec) -> None:
    """Refuse a dataset that refinement left too small to split, saying what took the rows away."""
    if reading.bad and not reading.rows:
        raise Rejected("dataset", f"none of its {report.rows_read} rows is well-formed, so training.skip_bad_rows "
                                  f"left nothing to train on; the first: {reading.bad[0]}")
    if len(rows) < 2:
        raise Rejected("dataset", f"has {len(rows)} usable row(s) after refinement; at least 2 are needed (one to "
                                  f"train, one to evaluate): {removed_summary(report, reading.bad, t)}")


def _learnable_examples(rows: list[Row], tokenizer: Any, max_length: int, report: DataReport,
                        tick: Callable[[], None], cache: TokenCache | None) -> list[Example]:
    """The rows' examples, less those truncation left with nothing to learn; counts both in ``report``."""
    examples = []
    for row in rows:
        tick()
        tokens = (cache.tokens((row.file, row.line), lambda r=row: row_tokens(r, tokenizer)) if cache is not None
                  else row_tokens(row, tokenizer))
        examples.append(_cut(tokens, max_length))
    kept = [e for e in examples if _learnable(e)]
    report.no_response += len(examples) - len(kept)
    report.truncated += sum(e.truncated for e in kept)
    return kept


def _notes(report: DataReport, bad: list[str], t: TrainingSpec) -> list[str]:
    """What a person should hear about without reading the report: rows of theirs that did not train."""
    notes = []
    if report.bad_rows:
        notes.append(f"{report.bad_rows} malformed dataset line(s) skipped (training.skip_bad_rows); "
                     f"the first: {bad[0]}")
    if report.no_response:
        notes.append(f"{report.no_response} row(s) dropped: their prompt fills training.max_length={t.max_length} "
                     "tokens, leaving no response to learn")
    return notes


# ── batching ─────────────────────────────────────────────────────────────────────────────────────────────
def embedding_rows(model: Any) -> int:
    """The input embedding's rows, from its weight: LoRA on the embedding wraps it in a layer with no
    ``num_embeddings`` (review: probes and verification then failed on such jobs)."""
    return int(model.get_input_embeddings().weight.shape[0])


def pad_id_of(tokenizer: Any, rows: int | None = None) -> int:
    """The id to pad with; any id the embedding has works (pads are masked), the tokenizer's own pad is only the
    tidiest. ``rows``: the model's embedding rows. A pad token added to a tokenizer without resizing the model
    is past them, and looking it up ended the job in an IndexError (audit, proven)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None and (rows is None or 0 <= int(candidate) < rows):
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
