"""``devices: "all"``: one job in several torchrun ranks (DDP). On CPU: two gloo processes via LORASPOOL_DDP_PROCS.

Two ranks with batch B must train exactly as one process with batch 2B (the loop normalises the loss over the
global batch), and the daemon must get the same result kinds as from one process: done, rejected, cancelled (with a
checkpoint), failed, died.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from schemas.heartbeat import Progress
from schemas.job import JobSpec
from spooler.errors import Rejected
from worker import ddp, horse
from worker.ddp import ENV_PROCS, processes
from worker.outputs import read_metrics
from worker.tinymodel import write_dataset
from worker.train import TrainOutcome, TrainRequest, run_training
from worker.verify import hash_folder

MODE = 0o664
TRAIN_ROWS = 40  # a multiple of the global batch (2 x 2): no partial last batch that one process and two split apart


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A share with the tiny model and 44 distinct alpaca rows: 40 to train on, 4 to evaluate."""
    root = tmp_path_factory.mktemp("ddp-share")
    shutil.copytree(tiny_model_dir, root / "models" / "tiny")
    many = write_dataset(root / "datasets" / "many.jsonl", "alpaca", rows=400)
    distinct = list(dict.fromkeys(many.read_text().splitlines()))
    (root / "datasets" / "alpaca.jsonl").write_text("\n".join(distinct[:44]) + "\n")
    (root / "datasets" / "one.jsonl").write_text("\n".join(distinct[:2]) + "\n")  # 1 row to train, 1 to evaluate
    return root


@pytest.fixture(scope="module")
def two_ranks() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_PROCS, "2")
        yield


def make_job(job_id: str, devices: str = "all", *, dataset: str = "datasets/alpaca.jsonl",
             targets: tuple[str, ...] = ("q_proj", "v_proj"), **training: Any) -> JobSpec:
    settings = {"max_steps": 10, "batch_size": 2, "learning_rate": 3e-3, "max_length": 64, "packing": False,
                **training}
    return JobSpec(id=job_id, kind="train", base_model="models/tiny", dataset=dataset, devices=devices,
                   lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": list(targets)}, training=settings)


def request(root: Path, job: JobSpec) -> TrainRequest:
    assert job.base_model and job.id
    return TrainRequest(job=job, model_dir=root / job.base_model, datasets=[root / d for d in job.dataset_files()],
                        share_root=root, out_dir=root / "results" / job.id / "attempts" / "a1-w", device="cpu",
                        file_mode=MODE)


def train(root: Path, job: JobSpec, reports: list[Progress] | None = None) -> TrainOutcome:
    return run_training(request(root, job), (reports if reports is not None else []).append, lambda: False)


def train_losses(outcome: TrainOutcome) -> list[tuple[int, float, int]]:
    lines = read_metrics(outcome.adapter_dir.parent / "metrics.jsonl")
    return [(m.step, m.loss, m.tokens) for m in lines if m.kind == "train"]  # type: ignore[misc]


@pytest.fixture(scope="module")
def ddp_run(root: Path, two_ranks: None) -> tuple[TrainOutcome, list[Progress]]:
    reports: list[Progress] = []
    return train(root, make_job("ddp", batch_size=2), reports), reports


# ── the world size ───────────────────────────────────────────────────────────────────────────────────────
def test_processes_one_per_gpu_only_for_devices_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_PROCS, raising=False)
    assert processes("auto", "cpu") == processes("all", "cpu") == processes("auto", "cuda") == 1
    monkeypatch.setenv(ENV_PROCS, "2")
    assert processes("all", "cpu") == 2
    assert processes("auto", "cpu") == 1  # the override is for "all" jobs only
    assert processes("all", "cpu", platform="win32") == 1  # no NCCL in torch on Windows: one process
    monkeypatch.setattr(ddp, "_gpu_count", lambda: 2)
    assert ddp.one_gpu_note("all", "cuda", platform="win32") == ddp.NO_NCCL  # and the job's notes say so
    assert ddp.one_gpu_note("all", "cuda", platform="linux") is None
    monkeypatch.setenv(ENV_PROCS, "two")
    with pytest.raises(RuntimeError, match=f"{ENV_PROCS}='two'"):
        processes("all", "cpu")


# ── two ranks train as one process with the whole batch ──────────────────────────────────────────────────
def test_two_ranks_follow_one_process_with_the_global_batch(root: Path, ddp_run: Any) -> None:
    ddp: TrainOutcome = ddp_run[0]
    single = train(root, make_job("single", "auto", batch_size=4))
    assert ddp.data and single.data and ddp.data.train_rows == single.data.train_rows == TRAIN_ROWS
    two, one = train_losses(ddp), train_losses(single)
    assert [s for s, _, _ in two] == [s for s, _, _ in one] == list(range(1, 11))
    assert [t for _, _, t in two] == [t for _, _, t in one]  # the same rows in every step
    for (step, a, _), (_, b, _) in zip(two, one, strict=True):
        assert math.isclose(a, b, rel_tol=1e-5), (step, two, one)  # fp32: ~1e-7 seen
    assert math.isclose(ddp.metrics.eval_loss_after, single.metrics.eval_loss_after, rel_tol=1e-3)
    assert ddp.metrics.eval_loss_after < ddp.metrics.eval_loss_before


def test_ddp_through_run_training_saves_a_checked_adapter(ddp_run: tuple[TrainOutcome, list[Progress]]) -> None:
    outcome, reports = ddp_run
    assert (outcome.adapter_dir / "adapter_model.safetensors").is_file()
    assert (outcome.files, outcome.size_bytes) == hash_folder(outcome.adapter_dir)
    assert outcome.metrics.steps == 10 and outcome.metrics.seconds and outcome.metrics.seconds > 0
    assert outcome.notes == ["trained with DDP on 2 CPU processes (gloo)"]
    phases = list(dict.fromkeys(p.phase for p in reports))  # rank 0's progress, relayed
    assert phases == ["loading", "preparing", "eval-before", "training", "eval-after", "saving", "verifying"]
    assert [p.step for p in reports if p.phase == "training"] == list(range(1, 11))
    assert json.loads((outcome.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "models/tiny"


# ── the horse's result kinds ─────────────────────────────────────────────────────────────────────────────
def test_bad_module_name_in_the_ranks_is_rejected_by_field(root: Path, two_ranks: None) -> None:
    with pytest.raises(Rejected) as e:
        train(root, make_job("typo", targets=("q_proj", "q_prj")))
    assert e.value.field == "lora.target_modules" and "unknown module 'q_prj'" in e.value.problem


def horse_request(root: Path, job: JobSpec) -> dict[str, Any]:
    return vars(request(root, job))


def test_stop_reaches_every_rank_at_one_step_with_a_checkpoint_and_ddp_resumes(root: Path, two_ranks: None) -> None:
    reports: list[Progress] = []
    job = make_job("stop-me", max_steps=200)  # 40 once finished inside the half second a stop may take to be sent
    result = horse.run(horse_request(root, job), reports.append,
                       lambda: "cancel" if any(p.step >= 3 for p in reports) else None)
    assert result.kind == "cancelled" and result.error == "cancel", result
    last = max(p.step for p in reports)
    out_dir = request(root, job).out_dir
    assert [f.name for f in (out_dir / "checkpoints").iterdir()] == [f"step-{last}"]
    assert not (out_dir / "adapter").exists()

    again = request(root, job)
    again.out_dir = out_dir.parent / "a2-w"  # the next attempt, as the spool would run it
    resumed = run_training(again, lambda p: None, lambda: False)
    assert resumed.resumed_from_step == last and resumed.metrics.steps == 200
    assert [m.step for m in read_metrics(again.out_dir / "metrics.jsonl") if m.kind == "train"] == list(range(1, 201))


def test_a_rank_that_raises_fails_the_job_with_its_reason(root: Path, two_ranks: None) -> None:
    """One training row cannot feed two ranks: both raise, and the horse says "failed" with their words."""
    result = horse.run(horse_request(root, make_job("too-few", dataset="datasets/one.jsonl")), lambda p: None,
                       lambda: None)
    assert result.kind == "failed", result
    assert "an epoch has no full batch for every process" in (result.error or ""), result
    logged = (request(root, make_job("too-few")).out_dir / "train.log").read_text()
    assert "rank 1 of 2 failed: Traceback" in logged, "a rank other than 0: its traceback only in the worker log"


def test_a_killed_rank_is_a_died_result(root: Path, two_ranks: None) -> None:
    reports: list[Progress] = []
    killed: list[int] = []

    def kill_rank_1() -> None:
        if killed or not any(p.step >= 2 for p in reports):
            return None
        for proc in psutil.Process().children(recursive=True):
            if "worker.ddp" in " ".join(proc.cmdline()) and proc.environ().get("RANK") == "1":
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
        return None

    result = horse.run(horse_request(root, make_job("kill-me", max_steps=200)), reports.append, kill_rank_1)
    assert killed, "rank 1 was never found"
    assert result.kind == "died", result
    assert not [p for p in psutil.Process().children(recursive=True) if "worker.ddp" in " ".join(p.cmdline())]


def test_no_rank_outlives_a_killed_horse(root: Path, two_ranks: None) -> None:
    """kill -9 of the training child (the daemon's last resort against a stuck one) takes torchrun and its ranks
    with it: none may keep a GPU, or write to the share, for a job the daemon has given up."""
    reports: list[Progress] = []
    seen: list[psutil.Process] = []
    tickets: set[Path] = set()

    def kill_the_horse() -> None:
        if seen or not any(p.step >= 2 for p in reports):
            return None
        for child in psutil.Process().children():  # the horse child is the one with torchrun and the ranks below it
            below = [p for p in child.children(recursive=True) if _ours(p)]
            if below:
                seen.extend(below)
                # Read before the kill: once dead, a process may already be a zombie with no command line.
                tickets.update(Path(a) for p in below for a in p.cmdline() if a.endswith("ticket.pkl"))
                child.kill()
        return None

    result = horse.run(horse_request(root, make_job("kill-horse", max_steps=200)), reports.append, kill_the_horse)
    assert result.kind == "died", result
    assert len(seen) == 3, seen  # torchrun and two ranks
    gone, alive = psutil.wait_procs(seen, timeout=60)
    assert not alive, alive
    (ticket,) = tickets
    assert not ticket.exists() and not (ticket.parent / "sock").exists()  # tidied once every rank had connected
    shutil.rmtree(ticket.parent)  # torchrun's log folder: only a killed horse child leaves it


def _ours(proc: psutil.Process) -> bool:
    cmd = " ".join(proc.cmdline())
    return "torch.distributed.run" in cmd or "worker.ddp" in cmd


def test_the_launcher_side_never_imports_torch() -> None:
    """The horse child imports worker.ddp for every job, and counts GPUs only for a devices "all" job on cuda."""
    code = ("import sys, worker.ddp; assert worker.ddp.processes('all', 'cpu') == 1; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1],
                   env={k: v for k, v in os.environ.items() if k != ENV_PROCS})
