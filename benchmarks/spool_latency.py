"""Spool timings for the closing notes: drop-to-claim latency (native and polling observers), probe throughput
with several workers, and the time from kill -9 of a worker to the submitter's fallback claiming its job.

    .venv/bin/python benchmarks/spool_latency.py [--confirm S] [--smb | --share-a DIR --share-b DIR]

With ``--share-a/--share-b`` (two mounts of one share, e.g. the rclone mounts the SMB tests make), workers run
on A and jobs are dropped through B, as on two machines. Timings use one machine's clock for both ends, so
they are comparable only because both processes run here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from schemas.result import Result
from spooler.clock import parse_iso
from spooler.share import Share, init_share, read_model

SETTINGS = {"heartbeat_interval": 1.0, "stale_after": 6.0, "rescan_interval": 5.0, "poll_interval": 0.5}


def start_worker(root: Path, wid: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "spooler.cli", "worker", "--share", str(root), "--id", wid,
                             "--device", "cpu", *extra], stderr=subprocess.DEVNULL, start_new_session=True)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=30)


def wait_result(share: Share, job_id: str, timeout: float = 120) -> Result:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = read_model(share.result_dir(job_id) / "result.json", Result)
        if r is not None:
            return r
        time.sleep(0.01)
    raise TimeoutError(job_id)


def wait_heartbeat(share: Share, wid: str) -> None:
    end = time.monotonic() + 60
    while not share.heartbeat_file(wid).exists():
        if time.monotonic() > end:
            raise TimeoutError(wid)
        time.sleep(0.05)
    time.sleep(1.0)  # let its watcher start


def drop_atomic(inbox: Path, name: str, job: dict) -> float:
    tmp = inbox / f".{name}.tmp"
    tmp.write_text(json.dumps(job))
    t = time.time()
    os.rename(tmp, inbox / name)
    return t


def drop_to_claim(a: Share, b: Share, mode: str, n: int, tag: str) -> dict:
    w = start_worker(a.root, f"lat-{mode}-{tag}", "--watch", mode)
    try:
        wait_heartbeat(a, f"lat-{mode}-{tag}")
        lat = []
        for i in range(n):
            job_id = f"lat-{mode}-{tag}-{i}"
            t0 = drop_atomic(b.inbox, f"{job_id}.json", {"kind": "probe"})
            r = wait_result(a, job_id)
            lat.append(parse_iso(r.started_at) - t0)
            # Idle between drops, at random phase to the poll period. Back-to-back drops measure something else:
            # watchdog's inotify buffer holds an unpaired IN_MOVED_FROM (our own grab out of inbox/) for 0.5 s,
            # and the events queued behind it wait too.
            time.sleep(random.uniform(0.6, 1.2))
    finally:
        stop([w])
    return {"what": "drop_to_claim", "observer": mode, "n": n, "median_s": round(statistics.median(lat), 3),
            "p90_s": round(sorted(lat)[int(0.9 * (n - 1))], 3), "max_s": round(max(lat), 3)}


def throughput(a: Share, b: Share, workers: int, jobs: int, tag: str) -> dict:
    procs = [start_worker(a.root, f"tp{i}-{tag}") for i in range(workers)]
    try:
        for i in range(workers):
            wait_heartbeat(a, f"tp{i}-{tag}")
        t0 = time.monotonic()
        for i in range(jobs):
            drop_atomic(b.inbox, f"tp-{tag}-{i}.json", {"kind": "probe"})
        for i in range(jobs):
            wait_result(a, f"tp-{tag}-{i}", timeout=600)
        took = time.monotonic() - t0
    finally:
        stop(procs)
    return {"what": "probe_throughput", "workers": workers, "jobs": jobs, "seconds": round(took, 2),
            "jobs_per_s": round(jobs / took, 1)}


def kill_to_fallback(share: Share, tag: str) -> dict:
    """A worker trains a long job; a submitter waits with --fallback auto; the worker is killed with -9."""
    from worker.tinymodel import build_tiny_model, write_dataset

    if not (share.root / "models" / "tiny").exists():
        build_tiny_model(share.root / "models" / "tiny")
        write_dataset(share.root / "datasets" / "bench.jsonl", "alpaca", rows=64)
    wid = f"victim-{tag}"
    w = start_worker(share.root, wid)
    wait_heartbeat(share, wid)
    job_id = f"kill-{tag}"
    job = {"id": job_id, "kind": "train", "base_model": "models/tiny", "dataset": "datasets/bench.jsonl",
           "training": {"max_steps": 100000, "batch_size": 2, "max_length": 32}}
    path = share.root / "tmp" / f"{job_id}.json"
    path.write_text(json.dumps(job))
    sub = subprocess.Popen([sys.executable, "-m", "spooler.cli", "submit", str(path), "--share", str(share.root),
                            "--wait"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = share.result_dir(job_id) / "progress.json"
    while not progress.exists():
        time.sleep(0.05)
    os.killpg(w.pid, signal.SIGKILL)
    killed = time.monotonic()
    w.wait()
    running = share.root / "running"
    while not any(p.name.startswith(f"{os.uname().nodename.split('.')[0][:40]}-fallback")
                  for p in running.iterdir() if any(p.iterdir())):
        time.sleep(0.02)
    took = time.monotonic() - killed
    from spooler.cancel import request_cancel
    from spooler.clock import SystemClock

    request_cancel(share, job_id, SystemClock())  # the benchmark job is endless: stop it
    sub.wait(timeout=120)
    return {"what": "kill9_to_fallback_claim", "stale_after_s": share.settings.stale_after,
            "heartbeat_interval_s": share.settings.heartbeat_interval, "seconds": round(took, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--share-a", type=Path)
    ap.add_argument("--share-b", type=Path)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--skip-kill", action="store_true")
    ap.add_argument("--confirm", type=float, default=0.3, help="the share's confirm_seconds (default 0.3)")
    ap.add_argument("--smb", action="store_true",
                    help="serve a temp folder with samba and use two rclone mounts of it (tests/smbshare.py)")
    args = ap.parse_args()
    if args.smb:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.smbshare import smb_pair

        with smb_pair(Path(tempfile.mkdtemp(prefix="lsbench-smb-"))) as pair:
            args.share_a, args.share_b = pair.a / "spool", pair.b / "spool"
            run(args)
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    tag = str(os.getpid())
    SETTINGS["confirm_seconds"] = args.confirm
    if args.share_a:
        a = init_share(args.share_a, **SETTINGS)
        b = Share.open(args.share_b or args.share_a)
        modes = ["polling", "native"]
    else:
        a = b = init_share(Path(tempfile.mkdtemp(prefix="lsbench-")), **SETTINGS)
        modes = ["native", "polling"]
    rows = [drop_to_claim(a, b, m, args.n, tag) for m in modes]
    rows.append(throughput(a, b, 3, 300, tag))
    if not args.skip_kill:
        rows.append(kill_to_fallback(a, tag))
    for row in rows:
        print(json.dumps({**row, "confirm_seconds": args.confirm}), flush=True)


if __name__ == "__main__":
    main()
