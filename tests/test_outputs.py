"""The files an attempt leaves for a person (metrics, loss plot, train log) and the before/after probes."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from schemas.checkpoint import MetricsLine
from worker.outputs import MetricsLog, TrainLog, plot_loss, read_metrics
from worker.probes import generate_answers, pair

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(path: Path, steps: range, eval_every: int = 0) -> None:
    with MetricsLog(path, 0o640) as m:
        for step in steps:
            m.train(step, 2.0 / step, lr=1e-3, epoch=step / 10, tokens=100 * step, tokens_per_second=50.0,
                    grad_norm=0.5)
            if eval_every and step % eval_every == 0:
                m.eval(step, 1.5 / step, phase="during")


def test_metrics_round_trip_skips_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, 0o640) as m:
        m.eval(0, 3.0, phase="before")
        m.train(1, 2.5, 1e-3, 0.0, 128, 64.0, 0.9)
        m.train(2, 2.25, 1e-3, 0.0, 256, 64.0, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    with open(path, "ab") as f:
        f.write(b'{"step": 3, "kind": "tra')  # a crash mid-write
    lines = read_metrics(path)
    assert [(x.kind, x.step) for x in lines] == [("eval", 0), ("train", 1), ("train", 2)]
    assert lines[0].phase == "before" and lines[0].eval_loss == 3.0
    assert lines[1] == MetricsLine(step=1, kind="train", loss=2.5, lr=1e-3, epoch=0.0, tokens=128,
                                   tokens_per_second=64.0, grad_norm=0.9)


def test_read_metrics_tolerates_missing_and_garbage(tmp_path: Path) -> None:
    assert read_metrics(tmp_path / "nope.jsonl") == []
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "kind": "train", "loss": 1.0}\nnot json\n[1, 2]\n\xff\xfe\n'
                     b'{"kind": "train"}\n{"step": 2, "kind": "train", "loss": 0.5}\n')
    assert [x.step for x in read_metrics(path)] == [1, 2]


def test_start_from_keeps_history_up_to_the_checkpoint(tmp_path: Path) -> None:
    first = tmp_path / "a1" / "metrics.jsonl"
    first.parent.mkdir()
    _write_run(first, range(1, 13), eval_every=5)  # died after step 12; last checkpoint at step 8
    second = tmp_path / "a2" / "metrics.jsonl"
    second.parent.mkdir()
    with MetricsLog(second, 0o640) as m:
        assert m.start_from(first, 8) == 9  # train 1..8, eval at 5
        for step in range(9, 16):
            m.train(step, 1.0 / step)
        m.eval(15, 0.1, phase="after")
    lines = read_metrics(second)
    train_steps = [x.step for x in lines if x.kind == "train"]
    assert train_steps == list(range(1, 16))
    assert [(x.step, x.phase) for x in lines if x.kind == "eval"] == [(5, "during"), (15, "after")]
    assert stat.S_IMODE(second.stat().st_mode) == 0o640


def test_start_from_nothing_and_before_appends(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    m = MetricsLog(path, 0o664)
    assert m.start_from(None, 5) == 0
    assert m.start_from(tmp_path / "missing.jsonl", 5) == 0
    m.train(1, 1.0)
    with pytest.raises(RuntimeError):
        m.start_from(None, 0)
    m.close()
    assert [x.step for x in read_metrics(path)] == [1]


@pytest.mark.parametrize("steps", [5, 80])  # 80: enough points for the smoothed curve
def test_plot_loss_writes_a_png(tmp_path: Path, steps: int) -> None:
    path = tmp_path / "metrics.jsonl"
    _write_run(path, range(1, steps + 1), eval_every=4)
    png = tmp_path / "loss.png"
    assert plot_loss(read_metrics(path), png, "job-1") == png
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_plot_loss_without_train_points_draws_nothing(tmp_path: Path) -> None:
    png = tmp_path / "loss.png"
    assert plot_loss([], png, "empty") is None
    assert plot_loss([MetricsLine(step=0, kind="eval", eval_loss=2.0, phase="before")], png, "evals") is None
    assert not png.exists()


def test_train_log_captures_records_while_open(tmp_path: Path) -> None:
    logger = logging.getLogger("loraspool.test.trainlog")
    with TrainLog(tmp_path, file_mode=0o640) as t:
        logger.info("step 3 of 10")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("it failed")
    logger.warning("after the attempt")
    lines = t.path.read_text().splitlines()
    assert len(lines) == 2
    assert "INFO loraspool.test.trainlog: step 3 of 10" in lines[0]
    assert "ERROR" in lines[1] and "ValueError: boom" in lines[1]
    assert stat.S_IMODE(t.path.stat().st_mode) == 0o640


def test_generate_answers_on_the_tiny_model(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.use_cache = False  # as training leaves it
    model.train()
    prompts = ["What color is the sky?", "What does the cat say?"]
    first = generate_answers(model, tokenizer, prompts, "cpu", max_new_tokens=12)
    assert model.training  # the mode it came in with
    second = generate_answers(model, tokenizer, prompts, "cpu", max_new_tokens=12)
    assert len(first) == len(prompts) and all(isinstance(a, str) for a in first)
    assert first == second
    assert not any(a.startswith("### Instruction") for a in first)  # the prompt itself is not echoed back
    probes = pair(prompts, first, second)
    assert [(p.prompt, p.base, p.adapted) for p in probes] == list(zip(prompts, first, second, strict=True))
    with pytest.raises(ValueError):
        pair(prompts, first, [])
