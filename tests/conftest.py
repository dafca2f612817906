"""Shared fixtures: real temp shares, real worker processes, a tiny real model.

Workers run as subprocesses of the installed ``loraspool`` entry point, the way a person runs them, so kill -9
and SIGTERM mean what they mean in production.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.result import Result
from spooler.share import Share, init_share, read_model

# Fast timings for tests; the defaults are for real shares.
FAST = {"confirm_seconds": 0.0, "heartbeat_interval": 0.25, "stale_after": 2.0, "settle_seconds": 0.6,
        "rescan_interval": 0.5, "poll_interval": 0.2}


def make_share(root: Path, **overrides: float | int | str) -> Share:
    return init_share(root, **{**FAST, **overrides})


@pytest.fixture
def share(tmp_path: Path) -> Share:
    return make_share(tmp_path / "share")


class Procs:
    """Worker and submitter subprocesses, each logging to its own file; all killed at teardown."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "spooler.cli", *args], stdout=subprocess.PIPE,
                                stderr=log, start_new_session=True,
                                env={**os.environ, "XDG_CACHE_HOME": str(self.logdir / "cache"), **(env or {})})
        proc.log_path = self.logdir / f"{name}.log"  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def worker(self, share: Share | Path, wid: str, *extra: str, env: dict[str, str] | None = None
               ) -> subprocess.Popen:
        root = share.root if isinstance(share, Share) else share
        return self.start("worker", "--share", str(root), "--id", wid, "--device", "cpu", *extra, name=wid, env=env)

    def kill9(self, proc: subprocess.Popen) -> None:
        """kill -9 the worker and every process of its session (its training child too), as a power cut would."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def tails(self, lines: int = 25) -> str:
        """The end of every process's log, for a timeout's message: what each was doing when time ran out."""
        out = []
        for p in self.procs:
            text, name = log_of(p).splitlines()[-lines:], Path(p.log_path).name  # type: ignore[attr-defined]
            out.append(f"--- {name} (exit code {p.poll()}), its last {len(text)} lines")
            out.extend(text)
        return "\n".join(out)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.stop_all()


def log_of(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def wait_for(pred: Callable[[], object], timeout: float, what: str, every: float = 0.05,
             explain: Callable[[], str] | None = None) -> object:
    """``explain`` adds what the message of a timeout should show (where the jobs are, the logs' ends)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"\n{explain()}" if explain else ""))


def spool_listing(share: Share) -> str:
    """Every job file's place in the spool (inbox, intake, queue, running), and how many results exist."""
    lines = []
    for folder in ("inbox", "intake", "queue", "running"):
        base = share.root / folder
        names = sorted(str(p.relative_to(share.root)) for p in base.rglob("*") if p.is_file()) if base.exists() else []
        lines.append(f"{folder}: {len(names)} file(s) {names[:40]}")
    lines.append(f"results: {len(list(share.results.glob('*/result.json')))} result.json")
    return "\n".join(lines)


def result_of(share: Share, job_id: str) -> Result | None:
    return read_model(share.result_dir(job_id) / "result.json", Result)


def wait_result(share: Share, job_id: str, timeout: float = 60,
                explain: Callable[[], str] | None = None) -> Result:
    return wait_for(lambda: result_of(share, job_id), timeout, f"result of {job_id}",  # type: ignore[return-value]
                    explain=explain)


def drop(share: Share, name: str, job: dict | bytes) -> Path:
    """Drop a job the way a person's file copy does: written in place under its final name."""
    data = job if isinstance(job, bytes) else json.dumps(job).encode()
    path = share.inbox / name
    path.write_bytes(data)
    return path


def rejected_for(share: Share, source: str) -> Result | None:
    for path in share.results.glob("*/result.json"):
        r = read_model(path, Result)
        if r is not None and r.source_file == source and r.status.value == "rejected":
            return r
    return None


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny causal LM and BPE tokenizer, built once per session and saved the real way."""
    from worker.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def train_share(share: Share, tiny_model_dir: Path) -> Share:
    """A share holding the tiny model (copied, as a person would) and a small alpaca dataset."""
    import shutil

    from worker.tinymodel import write_dataset

    shutil.copytree(tiny_model_dir, share.root / "models" / "tiny")
    write_dataset(share.root / "datasets" / "alpaca.jsonl", "alpaca", rows=64)
    return share


def train_job(job_id: str, steps: int = 20, **training: object) -> dict:
    return {"id": job_id, "kind": "train", "base_model": "models/tiny", "dataset": "datasets/alpaca.jsonl",
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "training": {"max_steps": steps, "batch_size": 4, "learning_rate": 3e-3, "max_length": 64, **training}}
