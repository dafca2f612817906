"""What the share's token cache saves a job: preparing a dataset without it, the first job (which writes it),
and a later job (which reads it). CPU only; the tiny model's BPE tokenizer and its chat template.

usage: python benchmarks/token_cache.py [--rows 20000] [--shape chat|alpaca]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from schemas.job import TrainingSpec
from worker import data, tokencache
from worker.engine import load_tokenizer
from worker.tinymodel import build_tiny_model

WORDS = ("the", "cow", "says", "moo", "and", "the", "cat", "sits", "on", "a", "mat", "while", "dogs", "run",
         "fast", "over", "green", "hills")


def write_rows(path: Path, shape: str, rows: int) -> None:
    """Distinct rows (refinement drops duplicates), ~160 words each: two user and two assistant turns for chat."""
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            if shape == "alpaca":
                row = {"instruction": f"{i} {words(40)}", "output": words(120)}
            else:
                row = {"messages": [{"role": "user", "content": f"{i} {words(40)}"},
                                    {"role": "assistant", "content": words(60)},
                                    {"role": "user", "content": words(20)},
                                    {"role": "assistant", "content": words(60)}]}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--shape", choices=["chat", "alpaca"], default="chat")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "models" / "tiny")
        dataset = root / "datasets" / f"{a.shape}.jsonl"
        dataset.parent.mkdir(parents=True)
        write_rows(dataset, a.shape, a.rows)
        tokenizer = load_tokenizer(model)
        t = TrainingSpec(max_steps=10, max_length=512)
        table = []
        for label, cached in (("no cache", False), ("first job (writes it)", True), ("later job (reads it)", True)):
            opener = tokencache.for_dataset(root, data.file_labels([dataset]), tokenizer, 0o664)
            started = time.perf_counter()
            splits = data.load_splits([dataset], tokenizer, t, cache=opener if cached else None)
            table.append((label, time.perf_counter() - started, splits.report.tokens_cached))
        size = sum(p.stat().st_size for p in (root / "datasets" / ".tokens").iterdir())
        print(f"{a.rows} {a.shape} rows, {dataset.stat().st_size / 1e6:.1f} MB; cache file {size / 1e6:.1f} MB")
        print("| preparing the dataset | seconds | rows from the cache |\n|---|---|---|")
        for label, seconds, hits in table:
            print(f"| {label} | {seconds:.2f} | {hits} |")


if __name__ == "__main__":
    main()
