"""How full the worker's packed sequences are on instruction-like lengths (no model, no GPU, a second).

Padding inside a packed sequence is compute spent on nothing, so the fill fraction bounds real tokens/s:
real = padded x fill. Lengths are the throughput benchmark's (lognormal, median ~180, clipped to 24..512).

usage: python benchmarks/packing_fill.py [--rows 20000] [--max-length 512]
"""

from __future__ import annotations

import argparse
import math
import random
import time

from worker.batching import Batcher
from worker.data import Example


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--max-length", type=int, default=512)
    a = ap.parse_args()
    rnd = random.Random(0)
    lengths = [max(24, min(a.max_length, int(rnd.lognormvariate(math.log(180), 0.6)))) for _ in range(a.rows)]
    examples = [Example(list(range(n)), list(range(n))) for n in lengths]
    started = time.perf_counter()
    plan = Batcher(examples, 16, a.max_length, 0, 0, packed=True).epoch_plan(0)
    seconds = time.perf_counter() - started
    sequences = sum(len(step) for step in plan)
    fill = sum(lengths) / (sequences * a.max_length)
    print(f"{a.rows} rows -> {sequences} sequences of {a.max_length}: {fill:.1%} real tokens, "
          f"{1 - fill:.1%} padding; planned in {seconds:.2f}s")


if __name__ == "__main__":
    main()
