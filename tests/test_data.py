"""Datasets on CPU with the tiny real tokenizer: every row shape trains on the right tokens, refinement counts what
it removes, several files combine, bad lines are named (or counted), and the split is stable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from schemas.job import TrainingSpec
from schemas.result import DataReport
from spooler.errors import Rejected
from worker import data
from worker.data import IGNORE
from worker.tinymodel import write_dataset

LONG = "Describe the world in detail please: " * 3  # 111 characters, well over 40 tokens


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def spec(**fields: Any) -> TrainingSpec:
    return TrainingSpec(**{"max_length": 64, **fields})


def write_jsonl(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    """Rows as JSON lines; a str is written as it is, so a test can plant blank or broken lines."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def assert_labels(ex: data.Example, n_prompt: int, response: list[int]) -> None:
    """Nothing learned on the first ``n_prompt`` tokens, ``response`` learned as itself, nothing after it."""
    end = n_prompt + len(response)
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.input_ids[n_prompt:end] == ex.labels[n_prompt:end] == response
    assert ex.labels[end:] == [IGNORE] * (len(ex.labels) - end)


def texts_of(tok: Any, splits: data.Splits) -> str:
    return "\n".join(tok.decode(e.input_ids) for e in splits.train + splits.eval)


# ── shapes and labels ────────────────────────────────────────────────────────────────────────────────────
SHAPES = {
    "alpaca": {"instruction": "What color is the sky?", "input": "sky", "output": "The sky is blue."},
    "chat": {"messages": [{"role": "user", "content": "What does the cow say?"},
                          {"role": "assistant", "content": "The cow says moo."}]},
    "prompt_completion": {"prompt": "What color is the snow? ", "completion": "The snow is white."},
    "text": {"text": "What does the duck say? The duck says quack."},
}


@pytest.fixture
def parsed(tmp_path: Path) -> dict[str, data.Row]:
    rows = data.read_dataset([write_jsonl(tmp_path / "shapes.jsonl", list(SHAPES.values()))]).rows
    assert [r.shape for r in rows] == list(SHAPES)
    return {r.shape: r for r in rows}


def test_alpaca_learns_output_and_eos(tok: Any, parsed: dict[str, data.Row]) -> None:
    prompt = data.ALPACA_PROMPT_WITH_INPUT.format(instruction="What color is the sky?", input="sky")
    ex = data.tokenize(parsed["alpaca"], tok, 512)
    assert ex.input_ids[0] == tok.bos_token_id
    assert_labels(ex, 1 + len(encode(tok, prompt)), [*encode(tok, "The sky is blue."), tok.eos_token_id])
    assert len(ex.input_ids) == 1 + len(encode(tok, prompt)) + len(encode(tok, "The sky is blue.")) + 1


def test_alpaca_without_input_uses_the_short_prompt(tok: Any) -> None:
    row = data.Row(1, "alpaca", {"instruction": "Hi?", "output": "Hello."})
    n_prompt = 1 + len(encode(tok, data.ALPACA_PROMPT.format(instruction="Hi?")))
    assert_labels(data.tokenize(row, tok, 512), n_prompt, [*encode(tok, "Hello."), tok.eos_token_id])


def test_prompt_completion_learns_the_completion_and_eos_only(tok: Any, parsed: dict[str, data.Row]) -> None:
    ex = data.tokenize(parsed["prompt_completion"], tok, 512)
    prompt = encode(tok, "What color is the snow? ")
    assert ex.input_ids[:1 + len(prompt)] == [tok.bos_token_id, *prompt]
    assert_labels(ex, 1 + len(prompt), [*encode(tok, "The snow is white."), tok.eos_token_id])


def test_text_learns_every_token_and_eos(tok: Any, parsed: dict[str, data.Row]) -> None:
    ex = data.tokenize(parsed["text"], tok, 512)
    assert ex.input_ids == [tok.bos_token_id, *encode(tok, SHAPES["text"]["text"]), tok.eos_token_id]
    assert ex.labels[0] == IGNORE  # the BOS is never predicted: nothing comes before it
    assert ex.labels[1:] == ex.input_ids[1:]


def test_chat_with_the_models_template_learns_the_reply_only(tok: Any, parsed: dict[str, data.Row]) -> None:
    messages = SHAPES["chat"]["messages"]
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    response = encode(tok, full[len(prompt):])
    assert response[:-2] == encode(tok, "The cow says moo.") and tok.eos_token_id in response
    assert_labels(data.tokenize(parsed["chat"], tok, 512), len(encode(tok, prompt)), response)


def test_chat_with_the_plain_template_learns_the_reply_only(tok: Any, parsed: dict[str, data.Row]) -> None:
    template, tok.chat_template = tok.chat_template, None  # the tokenizer is shared: put it back afterwards
    try:
        ex = data.tokenize(parsed["chat"], tok, 512)
    finally:
        tok.chat_template = template
    n_prompt = next(i for i, label in enumerate(ex.labels) if label != IGNORE)
    assert tok.decode(ex.input_ids[:n_prompt]) == "<|bos|><|user|>\nWhat does the cow say?\n<|assistant|>\n"
    assert_labels(ex, n_prompt, [*encode(tok, "The cow says moo."), tok.eos_token_id])
    assert tok.decode(ex.input_ids[-1:]) == "\n"  # the turn's closing newline is template, not reply


def test_multi_turn_chat_learns_every_assistant_turn(tok: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cow?"},
                {"role": "assistant", "content": "Moo."}, {"role": "user", "content": "The duck?"},
                {"role": "assistant", "content": "Quack."}]
    ex = data.tokenize(data.Row(1, "chat", {"messages": messages}), tok, 512)
    learned = [i for i, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE]
    assert all(label in (IGNORE, i) for i, label in zip(ex.input_ids, ex.labels, strict=True))
    assert tok.decode(learned).replace("\n", "") == "Moo.<|eos|>Quack.<|eos|>"


# ── refinement ───────────────────────────────────────────────────────────────────────────────────────────
GOOD = [{"text": f"What color is the {thing}? The {thing} is {color}."}
        for thing, color in [("apple", "red"), ("sky", "blue"), ("grass", "green"), ("snow", "white"),
                             ("coal", "black"), ("lemon", "yellow"), ("plum", "purple"), ("ink", "black")]]
ALPACA = {"instruction": "What color is the sky?", "output": "The sky is blue."}
CHAT = SHAPES["chat"]


def refinement_lines() -> list[dict[str, Any] | str]:
    """24 rows (and 2 blank lines, which are not rows), each kind in a known number."""
    good = [*GOOD, ALPACA, CHAT, {"prompt": "Tell me: ", "completion": "The frog is green."}]  # 11
    empty = [{"text": "  \n "}, {"instruction": "", "output": " "},
             {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}]}]  # 3
    duplicates = [GOOD[0], {"output": ALPACA["output"], "id": 7, "input": "", "instruction": ALPACA["instruction"]},
                  CHAT]  # 3: key order, an empty input and extra keys do not change what is trained
    too_short = [{"text": "Hi there"}, {"prompt": "a", "completion": "b"}]  # 2: under min_chars=10
    too_long = [{"text": "x" * 151}]  # 1: over max_chars=150
    truncated = [{"text": LONG}, {"prompt": "Tell me about the world. ", "completion": LONG}]  # 2: over 40 tokens
    no_response = [{"instruction": LONG, "output": "Yes."}, {"prompt": LONG, "completion": "No."}]  # 2
    return [*good[:4], "", *empty, *duplicates, *good[4:], "   ", *too_short, *too_long, *truncated, *no_response]


def test_refinement_counts_every_step(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", refinement_lines())
    t = spec(min_chars=10, max_chars=150, max_length=40, eval_fraction=0.25)
    splits = data.load_splits([path], tok, t)
    r = splits.report
    assert (r.rows_read, r.bad_rows, r.empty, r.duplicates, r.too_short, r.too_long) == (24, 0, 3, 3, 2, 1)
    assert (r.truncated, r.no_response) == (2, 2)
    assert (r.train_rows, r.eval_rows) == (len(splits.train), len(splits.eval))
    assert r.train_rows + r.eval_rows == 24 - 3 - 3 - 2 - 1 - 2 == 13
    assert r.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and r.files == []
    assert sum(len(e.input_ids) == 40 for e in splits.train + splits.eval) == 2
    assert all(len(e.input_ids) <= 40 for e in splits.train + splits.eval)
    assert isinstance(r, DataReport) and splits.dropped == 2
    assert splits.notes == ["2 row(s) dropped: their prompt fills training.max_length=40 tokens, leaving no response "
                            "to learn"]


def test_refinement_happens_before_the_split(tmp_path: Path, tok: Any) -> None:
    """Copies of a row are one row by the time the split sees them, so they cannot sit on both sides."""
    path = write_jsonl(tmp_path / "copies.jsonl", [GOOD[0]] * 10 + [GOOD[1]] * 10)
    splits = data.load_splits([path], tok, spec(eval_fraction=0.5))
    assert (splits.report.duplicates, len(splits.train), len(splits.eval)) == (18, 1, 1)
    assert texts_of(tok, splits).count("apple") == 2 and texts_of(tok, splits).count("sky") == 2


def test_too_few_rows_after_refinement_says_what_was_removed(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "thin.jsonl", [GOOD[0], GOOD[0], {"text": " "}, {"text": "Hi"}, {"text": "x" * 99}])
    with pytest.raises(Rejected) as e:
        data.load_splits([path], tok, spec(min_chars=5, max_chars=50))
    assert e.value.field == "dataset"
    assert e.value.problem.startswith("has 1 usable row(s) after refinement; at least 2 are needed"), e.value.problem
    assert ("of 5 rows read, 1 empty, 1 duplicates, 1 shorter than training.min_chars=5, "
            "1 longer than training.max_chars=50") in e.value.problem


def test_no_response_on_either_side_is_refused_with_counts(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": LONG + str(i), "completion": "ok"} for i in range(3)])
    with pytest.raises(Rejected, match=r"max_length=40 tokens, 0 training and 0 evaluation .*3 with no response"):
        data.load_splits([path], tok, spec(max_length=40))


def test_an_eval_side_emptied_by_the_cut_is_drawn_again_from_the_rows_left(tmp_path: Path, tok: Any) -> None:
    """The seeded split lands on the one row whose prompt fills max_length: the job still has 5 rows with
    responses to split, so it trains, and says why its eval rows are not the first split's."""
    rows: list[dict[str, Any]] = [{"prompt": f"Question {i}: ", "completion": f"Answer number {i}."} for i in range(6)]
    t = spec(max_length=40, eval_fraction=0.1)
    _, first_eval = data.split_rows(list(range(6)), t.eval_fraction, t.seed)
    rows[first_eval[0]] = {"prompt": LONG, "completion": "ok"}
    splits = data.load_splits([write_jsonl(tmp_path / "one-long.jsonl", rows)], tok, t)
    assert (len(splits.train), len(splits.eval), splits.report.no_response) == (4, 1, 1)
    assert (splits.report.train_rows, splits.report.eval_rows) == (4, 1)
    assert splits.notes[-1] == ("every evaluation row of the seeded split lost its response at "
                                "training.max_length=40; the 5 rows left were split again")
    again = data.load_splits([tmp_path / "one-long.jsonl"], tok, t)  # verify and resume see the same split
    assert [e.input_ids for e in again.eval] == [e.input_ids for e in splits.eval]


# ── several files ────────────────────────────────────────────────────────────────────────────────────────
def test_two_files_are_combined_and_hashed_in_order(tmp_path: Path, tok: Any) -> None:
    a = write_dataset(tmp_path / "a.jsonl", "alpaca", rows=8)
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"Q{i}: ", "completion": f"The frog says ribbit {i}."}
                                           for i in range(4)])
    t = spec()
    splits = data.load_splits([a, b], tok, t)
    report = splits.report
    unique_a = len({json.dumps(json.loads(line), sort_keys=True) for line in a.read_text().splitlines()})
    assert report.rows_read == 12 and report.train_rows + report.eval_rows == unique_a + 4
    assert "### Instruction:" in texts_of(tok, splits) and texts_of(tok, splits).count("ribbit") == 4
    assert report.sha256 == hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()

    def sha() -> str | None:
        return data.load_splits([a, b], tok, t).report.sha256

    before = sha()
    for path in (a, b):
        original = path.read_bytes()
        path.write_bytes(original + b'{"text": "One more row about the sky."}\n')
        assert sha() != before, path.name
        path.write_bytes(original)
        assert sha() == before


def test_same_name_in_two_folders_is_told_apart(tmp_path: Path) -> None:
    paths = [tmp_path / "x" / "data.jsonl", tmp_path / "y" / "data.jsonl", tmp_path / "z.jsonl"]
    assert data.file_labels(paths) == ["data.jsonl (file 1)", "data.jsonl (file 2)", "z.jsonl (file 3)"]
    assert data.file_labels(paths[2:]) == [""]


# ── malformed lines ──────────────────────────────────────────────────────────────────────────────────────
BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('{"prompt": "a"}', "a prompt/completion row needs a non-empty string \"completion\""),
    ('{"prompt": 5, "completion": "b"}', "a prompt/completion row needs a string \"prompt\""),
    ('{"prompt": "a", "completion": ""}', "a prompt/completion row needs a non-empty string \"completion\""),
    ('{"instruction": "Hi", "output": ""}', "an instruction row needs a non-empty string \"output\""),
    ('{"text": 5}', "\"text\" must be a non-empty string"),
    ('{"question": "a"}', "a row needs \"instruction\" and \"output\", or \"messages\", or \"prompt\""),
    (b"{\"text\": \"caf\xe9\"}", "not UTF-8 text"),
    ('{"text": "a", "n": ' + "1" * 5000 + "}", "not a usable JSON value (ValueError"),
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "not a usable JSON value (RecursionError"),
    ('{"text": "half \\ud800 a pair"}', "\\ud800 is half of a UTF-16 pair"),
]


def write_with_bad_line(path: Path, bad: str | bytes, good: list[dict[str, Any]]) -> Path:
    """Two good rows, a blank line, the bad line as line 4, then the rest."""
    lines = [json.dumps(g).encode() for g in good]
    path.write_bytes(b"\n".join([*lines[:2], b"", bad if isinstance(bad, bytes) else bad.encode(), *lines[2:]]))
    return path


@pytest.mark.parametrize(("bad", "expected"), BAD_LINES)
def test_malformed_line_is_refused_by_line_number(tmp_path: Path, tok: Any, bad: str | bytes, expected: str) -> None:
    path = write_with_bad_line(tmp_path / "one.jsonl", bad, GOOD)
    with pytest.raises(Rejected) as e:
        data.load_splits([path], tok, spec())
    assert e.value.field == "dataset" and e.value.problem.startswith(f"line 4: {expected}"), e.value.problem


def test_malformed_line_names_its_file_when_there_are_several(tmp_path: Path, tok: Any) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", GOOD[:4])
    b = write_with_bad_line(tmp_path / "b.jsonl", "{not json", GOOD[4:])
    with pytest.raises(Rejected) as e:
        data.load_splits([a, b], tok, spec())
    assert e.value.problem.startswith("b.jsonl line 4: not valid JSON"), e.value.problem


def test_skip_bad_rows_counts_them_and_goes_on(tmp_path: Path, tok: Any) -> None:
    a = write_with_bad_line(tmp_path / "a.jsonl", b"\xff\xfe not text", GOOD[:4])
    b = write_jsonl(tmp_path / "b.jsonl", [GOOD[4], "{not json", '{"question": "a"}', "[1, 2]", *GOOD[5:]])
    splits = data.load_splits([a, b], tok, spec(skip_bad_rows=True))
    r = splits.report
    assert (r.rows_read, r.bad_rows, r.train_rows + r.eval_rows) == (12, 4, 8)
    assert splits.notes == ["4 malformed dataset line(s) skipped (training.skip_bad_rows); "
                            "the first: a.jsonl line 4: not UTF-8 text (invalid start byte at byte 0)"]


def test_a_line_over_the_limit_is_a_bad_row_read_past_not_kept(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A file with no line end (a 30 GB sparse file, a binary) was read as one line into memory until the OOM
    killer came (adversarial review). A line over MAX_LINE_BYTES is a bad row, named by its number; the rest
    of it is read past in chunks, and the file's sha256 is still that of all its bytes."""
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 200)
    good = [json.dumps({"text": f"row {i}"}) for i in range(3)]
    path = tmp_path / "d.jsonl"
    path.write_bytes(f"{good[0]}\n".encode() + b"\0" * 5000 + f"\n{good[1]}\n".encode() + b"x" * 3000)
    reading = data.read_dataset([path], skip_bad_rows=True)
    assert [r.data["text"] for r in reading.rows] == ["row 0", "row 1"]
    assert reading.bad == ["line 2: longer than 200 bytes; one row per line, each a JSON object (is this a JSONL "
                           "file?)", "line 4: longer than 200 bytes; one row per line, each a JSON object (is this "
                           "a JSONL file?)"]
    assert reading.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and reading.lines == 4
    with pytest.raises(Rejected, match="line 2: longer than 200 bytes"):
        data.read_dataset([path])


def test_skip_bad_rows_with_no_good_row_left_is_refused(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "junk.jsonl", ["{not json", '{"question": "a"}', "", "3"])
    with pytest.raises(Rejected) as e:
        data.load_splits([path], tok, spec(skip_bad_rows=True))
    assert e.value.problem == ("none of its 3 rows is well-formed, so training.skip_bad_rows left nothing to train "
                               "on; the first: line 1: not valid JSON (Expecting property name enclosed in double "
                               "quotes at column 2); each line must be one JSON object")


def test_a_line_cut_short_is_named_at_its_own_end(tmp_path: Path, tok: Any) -> None:
    """The column is the line's own, not column 1 of the next line (json.loads once saw the line end first)."""
    path = write_jsonl(tmp_path / "cut.jsonl", [GOOD[0], '{"instruction": "broken", "output": ', GOOD[0]])
    with pytest.raises(Rejected) as e:
        data.load_splits([path], tok, spec())
    assert "line 2: not valid JSON (Expecting value at column 37 (the line ends there: cut short?))" in e.value.problem


def test_skipped_rows_are_named_when_too_few_remain(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "thin.jsonl", ["{not json", GOOD[0], GOOD[0]])
    with pytest.raises(Rejected, match=r"of 3 rows read, 1 malformed \(skipped by training.skip_bad_rows; the "
                                       r"first: line 1: not valid JSON .*\), 1 duplicates"):
        data.load_splits([path], tok, spec(skip_bad_rows=True))


def test_blank_rows_are_refined_not_refused(tmp_path: Path, tok: Any) -> None:
    """A row whose every field is blank is counted as empty; one with text but a blank answer is a mistake."""
    path = write_jsonl(tmp_path / "blank.jsonl", [*GOOD[:3], {"instruction": " ", "input": "", "output": ""},
                                                  {"prompt": "", "completion": "\t"}, {"text": ""}])
    assert data.load_splits([path], tok, spec()).report.empty == 3


# ── the split ────────────────────────────────────────────────────────────────────────────────────────────
def test_split_is_stable_and_keeps_a_row_on_each_side(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "facts.jsonl", GOOD)

    def eval_ids(**fields: Any) -> list[list[int]]:
        return [e.input_ids for e in data.load_splits([path], tok, spec(**fields)).eval]

    assert eval_ids(seed=5, eval_fraction=0.25) == eval_ids(seed=5, eval_fraction=0.25)
    assert len(eval_ids(seed=5, eval_fraction=0.25)) == 2
    assert len({json.dumps(eval_ids(seed=s, eval_fraction=0.25)) for s in range(6)}) > 1  # the seed matters
    two = write_jsonl(tmp_path / "two.jsonl", GOOD[:2])
    for fraction in (0.01, 0.99):
        splits = data.load_splits([two], tok, spec(eval_fraction=fraction))
        assert (len(splits.train), len(splits.eval)) == (1, 1)
        assert (splits.report.train_rows, splits.report.eval_rows) == (1, 1)



# ── the token cache ─────────────────────────────────────────────────────────────────────────────────────────
def _cached_splits(root: Path, tok: Any, tiny_model_dir: Path, paths: list[Path], **fields: Any) -> data.Splits:
    from worker import tokencache

    opener = tokencache.for_dataset(root, data.file_labels(paths), tok, 0o664)
    return data.load_splits(paths, tok, spec(**fields), cache=opener)


def _same(a: data.Splits, b: data.Splits) -> bool:
    return [(e.input_ids, e.labels, e.truncated) for e in a.train + a.eval] == \
        [(e.input_ids, e.labels, e.truncated) for e in b.train + b.eval]


def test_a_second_job_takes_its_tokens_from_the_share_and_gets_the_same_examples(
        tmp_path: Path, tok: Any, tiny_model_dir: Path) -> None:
    paths = [write_dataset(tmp_path / "datasets" / "a.jsonl", "chat", rows=30),
             write_dataset(tmp_path / "datasets" / "b.jsonl", "alpaca", rows=30, seed=1)]
    plain = data.load_splits(paths, tok, spec(max_length=48))
    first = _cached_splits(tmp_path, tok, tiny_model_dir, paths, max_length=48)
    files = list((tmp_path / "datasets" / ".tokens").glob("*.safetensors"))
    assert len(files) == 1 and oct(files[0].stat().st_mode & 0o777) == "0o664"
    assert first.report.tokens_cached == 0 and _same(first, plain)
    again = _cached_splits(tmp_path, tok, tiny_model_dir, paths, max_length=48)
    assert again.report.tokens_cached == again.report.train_rows + again.report.eval_rows + again.report.no_response
    assert _same(again, plain) and again.report.truncated == plain.report.truncated > 0
    longer = _cached_splits(tmp_path, tok, tiny_model_dir, paths, max_length=512)  # rows are kept whole
    assert longer.report.tokens_cached and _same(longer, data.load_splits(paths, tok, spec(max_length=512)))


def _rewrite(path: Path, change: Any) -> None:
    """Change the cache's arrays as someone with write access to the share could, keeping its key."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("breakage", [
    lambda p: p.write_bytes(p.read_bytes()[:-50]),
    lambda p: _rewrite(p, lambda t: t["ids"].__setitem__(3, 10**6)),
    lambda p: _rewrite(p, lambda t: t["offsets"].__setitem__(2, 0)),
    lambda p: _rewrite(p, lambda t: t.pop("trained")),
    lambda p: _rewrite(p, lambda t: t["rows"].__setitem__((0, 0), 7)),
], ids=["cut-short", "id-outside-vocab", "offsets-out-of-order", "array-missing", "unknown-file"])
def test_a_broken_token_cache_is_ignored_and_written_again(tmp_path: Path, tok: Any, tiny_model_dir: Path,
                                                           breakage: Any, caplog: pytest.LogCaptureFixture) -> None:
    paths = [write_dataset(tmp_path / "datasets" / "a.jsonl", "chat", rows=30)]
    plain = data.load_splits(paths, tok, spec(max_length=48))
    _cached_splits(tmp_path, tok, tiny_model_dir, paths, max_length=48)
    [cache] = (tmp_path / "datasets" / ".tokens").glob("*.safetensors")
    breakage(cache)
    again = _cached_splits(tmp_path, tok, tiny_model_dir, paths, max_length=48)
    assert again.report.tokens_cached == 0 and _same(again, plain)
    assert "ignoring the token cache" in caplog.text
    assert _cached_splits(tmp_path, tok, tiny_model_dir, paths, max_length=48).report.tokens_cached > 0


def test_another_tokenizer_or_dataset_gets_its_own_cache(tmp_path: Path, tok: Any, tiny_model_dir: Path) -> None:
    import shutil

    from transformers import AutoTokenizer

    from worker import tokencache

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other)
    (other / "additional_chat_templates").mkdir()  # read by transformers, named in no list of tokenizer files
    (other / "additional_chat_templates" / "default.jinja").write_text("{{ messages }}")
    (other / "chat_template.jinja").unlink()
    assert tokencache.tokenizer_fingerprint(AutoTokenizer.from_pretrained(other)) != \
        tokencache.tokenizer_fingerprint(tok)
    paths = [write_dataset(tmp_path / "datasets" / "a.jsonl", "chat", rows=30)]
    _cached_splits(tmp_path, tok, tiny_model_dir, paths, max_length=48)
    with open(paths[0], "a") as f:  # the dataset changed: its sha256 with it
        f.write(json.dumps({"instruction": "one more", "output": "row"}) + "\n")
    assert _cached_splits(tmp_path, tok, tiny_model_dir, paths, max_length=48).report.tokens_cached == 0
    assert len(list((tmp_path / "datasets" / ".tokens").glob("*.safetensors"))) == 2


def test_a_line_moved_to_the_next_file_does_not_get_another_rows_tokens(tmp_path: Path, tok: Any,
                                                                         tiny_model_dir: Path) -> None:
    """The dataset sha256 runs over all files' bytes in order: moving a line across the boundary keeps it, so the
    key holds each file's size too (a reviewer's case: the moved row trained as its neighbour)."""
    a, b = tmp_path / "datasets" / "a.jsonl", tmp_path / "datasets" / "b.jsonl"
    rows = [json.dumps({"instruction": f"question {w}", "output": f"answer {w}"}) + "\n" for w in "VWXYZ"]
    a.parent.mkdir(parents=True)
    a.write_text("".join(rows[:3]))
    b.write_text("".join(rows[3:]))
    _cached_splits(tmp_path, tok, tiny_model_dir, [a, b], max_length=64)
    a.write_text("".join(rows[:2]))
    b.write_text("".join(rows[2:]))
    moved = _cached_splits(tmp_path, tok, tiny_model_dir, [a, b], max_length=64)
    assert moved.report.tokens_cached == 0 and _same(moved, data.load_splits([a, b], tok, spec(max_length=64)))


def test_a_cache_that_claims_more_than_the_dataset_holds_is_not_read(tmp_path: Path, tok: Any,
                                                                      tiny_model_dir: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Anyone can compute the key: a small file claiming millions of rows is refused from its header."""
    paths = [write_dataset(tmp_path / "datasets" / "a.jsonl", "chat", rows=30)]
    _cached_splits(tmp_path, tok, tiny_model_dir, paths, max_length=48)
    [cache] = (tmp_path / "datasets" / ".tokens").glob("*.safetensors")
    _rewrite(cache, lambda t: t.update(rows=torch.zeros((10**6, 2), dtype=torch.int64),
                                       offsets=torch.zeros(10**6 + 1, dtype=torch.int64)))
    again = _cached_splits(tmp_path, tok, tiny_model_dir, paths, max_length=48)
    assert again.report.tokens_cached == 0 and "exceed what the dataset can hold" in caplog.text
