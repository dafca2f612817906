"""``loraspool demo``: the whole path on one machine, with nothing downloaded.

A temp folder plays the share; a tiny causal LM and a BPE tokenizer are built on the spot; a CPU worker runs
as its own process, exactly as on a GPU desktop; the job goes in through ``submit`` and the result is printed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spooler import submit
from spooler.clock import SystemClock
from spooler.share import Share, init_share

# At the root of every share the demo makes: ``--keep`` reuses only a folder that has it, or a new or empty one.
MARK = "made-by-loraspool-demo.txt"


def run_demo(keep: Path | None, steps: int) -> int:
    if keep is not None and (refusal := _not_a_demo_folder(keep)):
        print(refusal, file=sys.stderr)
        return 2
    root = keep or Path(tempfile.mkdtemp(prefix="loraspool-demo-"))
    share = init_share(root, heartbeat_interval=1.0, stale_after=10.0)
    (share.root / MARK).write_text("A share made by `loraspool demo`, with its tiny model and dataset: safe to "
                                   "delete.\n")
    print(f"share: {share.root}", file=sys.stderr)

    from worker.tinymodel import build_tiny_model, write_dataset

    if not (share.root / "models" / "tiny" / "config.json").exists():
        build_tiny_model(share.root / "models" / "tiny")
    write_dataset(share.root / "datasets" / "demo.jsonl", "alpaca", rows=200)
    print("built a tiny model in models/tiny and a dataset in datasets/demo.jsonl", file=sys.stderr)

    log_path = share.root / "tmp" / "demo-worker.log"
    with open(log_path, "ab") as log:
        worker = subprocess.Popen([sys.executable, "-m", "spooler.cli", "worker", "--share", str(share.root),
                                   "--id", "demo-worker", "--device", "cpu"], stderr=log)
    print(f"worker started (pid {worker.pid}); its log: {log_path}", file=sys.stderr)
    try:
        if not _first_heartbeat(share, worker, log_path):
            return 1
        job_id = f"demo-{len(list(share.results.glob('demo-*'))) + 1}"
        job = {"id": job_id, "kind": "train", "base_model": "models/tiny", "dataset": "datasets/demo.jsonl",
               "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
               "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 3e-3, "max_length": 96},
               "probes": ["What color is the sky?", "What does the cow say?"]}
        job_file = share.root / "tmp" / f"{job_id}.json"
        job_file.write_text(json.dumps(job, indent=2))
        submit.drop(share, job_file)
        result = submit.wait_for(share, job_id, SystemClock(), fallback=False)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    print(result.model_dump_json(indent=2))
    m = result.metrics
    if result.status.value == "succeeded":
        print(f"\n{job_id} succeeded on {result.device}: eval loss {m.eval_loss_before:.3f} -> {m.eval_loss_after:.3f}"
              f" in {m.seconds:.1f}s; adapter in {share.root / result.adapter.path}", file=sys.stderr)
    if keep is None:
        print(f"the demo share stays in {share.root} for you to look at; delete it when done", file=sys.stderr)
    return submit.exit_code(result)


def _not_a_demo_folder(folder: Path) -> str:
    """Why ``--keep`` must not use ``folder``: the demo sets the share's heartbeat and stale_after to seconds,
    writes its own dataset and starts a worker that claims every queued job. Pointed at a team's share, it made
    their live workers look dead and replaced datasets/demo.jsonl (audit, proven)."""
    if not folder.exists() or (folder / MARK).is_file():
        return ""
    if folder.is_dir() and not any(folder.iterdir()):
        return ""
    return (f"{folder} is not empty and was not made by loraspool demo: the demo writes its own settings, model, "
            "dataset and worker there, so it never uses a folder that holds anything else; name a new folder (a "
            f"demo share made before {MARK} existed has none: delete it, or run the demo on a new folder)")


def _first_heartbeat(share: Share, worker: subprocess.Popen, log_path: Path, timeout: float = 120.0) -> bool:
    """Submit once the worker is up, as a person would see it in ``loraspool status``: a job dropped before its
    first heartbeat makes the waiter say that no worker is live, which reads as a failure on a first run."""
    deadline = time.monotonic() + timeout
    while not share.heartbeat_file("demo-worker").exists():
        if worker.poll() is not None or time.monotonic() > deadline:
            tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-20:])
            print(f"the demo worker {'exited' if worker.poll() is not None else 'wrote no heartbeat'}; the end "
                  f"of its log ({log_path}):\n{tail}", file=sys.stderr)
            return False
        time.sleep(0.2)
    return True
