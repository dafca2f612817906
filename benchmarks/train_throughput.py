"""Training throughput of the worker's own trainer, side by side with the reference HF Trainer recipes, in one
run, on the same model shape and the same synthetic tokens (benchmarks/_shapes.py).

    .venv/bin/python benchmarks/train_throughput.py [--shape tiny|gpt2-small|qwen3-0.6b|llama-8b]
        [--device auto|cpu|cuda] [--recipes worker,seed,tuned,qlora] [--steps 20] [--warmup 3] [--batch 16]
        [--worker-batch N] [--compile] [--quantization none|4bit|8bit] [--sampler random|grouped]
        [--no-cudnn-sdp] [--same-malloc] [--no-liger] [--no-varlen] [--profile FILE] [--ddp N] [--cache DIR]
        [--json FILE]

Recipes (the HF ones as in /work/shared/anchors/gpu_lora_baseline.py):

* worker: ``run_training`` on a temp share, exactly as the worker calls it (LoRA r=16 all-linear, dropout 0).
  Timed from its Progress reports, between the report of step ``warmup`` and the last training step. Its LM
  head loss is liger-kernel's fused one where installed (cuda; the row's note says which ran), the torch chunks
  with ``--no-liger`` or elsewhere. Packed rows attend by document through torch's flash varlen kernel on cuda
  (the note says so), transformers' masked SDPA with ``--no-varlen``.
* seed: 8-bit base + prepare_model_for_kbit_training (gradient checkpointing), fp16, batch 4, pad to 512,
  r=8 on q/v, dropout 0.05. On CPU: fp32, no 8-bit, gradient checkpointing kept.
* tuned: bf16 (fp32 on CPU), SDPA, r=16 all-linear, dynamic padding, batch ``--batch``, rows in length-sorted
  chunks (but see the sampler note below).
* qlora: nf4 double-quant, bf16 compute, r=16 all-linear, batch 8 x 4 (cuda only).

Each recipe runs in its own subprocess (``--one RECIPE`` prints one JSON line) so that peak memory (CUDA
max_memory_allocated, or on CPU the process's peak RSS) is that recipe's alone; peaks are read at the last
timed step, so the worker's post-training adapter check is not counted. The worker's process starts with the
environment the worker gives its training process (on CPU, glibc's malloc keeps freed memory: worker.childenv);
the HF recipes with the default, unless ``--same-malloc``.

Apart from the steady rate, each row gives its first step's latency (``1st step s``: from the start of the
recipe's process, imports and loading the model and the rows included, to the end of optimizer step 1) and, for
the worker with ``--compile``, the compiling first step's own time (``compile s``), which a job pays once, and the
time to the end of the warm-up steps (``warm-up s``), which also holds any recompile the first batches caused.

Length grouping: the anchor sorts rows and shuffles chunks of 64, but the Trainer's default random sampler then
reshuffles them, so its tuned/qlora batches are really random (pad fraction ~0.55). ``--sampler random`` (default)
is what the anchor measured and reproduces its numbers. ``--sampler grouped`` keeps the chunk order (a sequential
sampler), which is not faster on an H100: nearly every batch then has a new length, and PyTorch's cuDNN attention
builds a plan per new length (~0.2 s each; ``--no-cudnn-sdp`` turns that backend off), and its rate swings with
which chunks land in a short timed window.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _shapes

from spooler.errors import brief

STARTED = time.perf_counter()  # this recipe's process began (torch's imports follow): its first step counts from here

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random models from configs: nothing may reach for the hub

RECIPES = ("worker", "seed", "tuned", "qlora")
CUDA_ONLY = {"qlora": "skipped: needs cuda (bitsandbytes nf4)"}
GIB = 2**30


@dataclass
class Row:
    recipe: str
    label: str
    model: str
    device: str
    real_tok_s: float | None = None
    padded_tok_s: float | None = None
    pad_fraction: float | None = None
    peak_gib: float | None = None
    steps_timed: int | None = None
    seconds: float | None = None
    first_step_s: float | None = None  # from the recipe's process start (imports, loading) to the end of step 1
    compile_s: float | None = None  # the worker's compiling first step (training.compile), part of first_step_s
    warmup_s: float | None = None  # from the process start to the end of the warm-up steps (recompiles too)
    ranks: int | None = None  # the worker as one job of this many DDP ranks (the scaling run)
    note: str = ""
    error: str | None = None


@dataclass
class Sample:
    """One finished optimizer step: when, and the real / padded tokens trained on up to and including it."""

    t: float
    real: int
    padded: int | None
    step: int


@dataclass
class Window:
    """Samples of the steady state: everything after ``warmup`` steps, with the peak read at the last step."""

    warmup: int
    last: int
    device: str
    samples: list[Sample] = field(default_factory=list)
    peak: int | None = None
    started: float = STARTED  # the process's start: imports, loading and checks count, as a job waits for them

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        if sample.step >= self.last:
            self.peak = peak_bytes(self.device)

    def fill(self, row: Row) -> Row:
        """Rates over [first sample at or after warmup, last sample]; an error in the row if there are too few."""
        timed = [s for s in self.samples if s.step >= self.warmup]
        if len(timed) < 2:
            row.error = row.error or f"only {len(timed)} training report(s) after warm-up: nothing to time"
            return row
        a, b = timed[0], timed[-1]
        dt = b.t - a.t
        real = b.real - a.real
        known = a.padded is not None and b.padded is not None
        padded = b.padded - a.padded if known else real  # not reported: shown as real, no pad fraction
        row.real_tok_s, row.padded_tok_s = round(real / dt), round(padded / dt)
        row.pad_fraction = round(1 - real / max(1, padded), 3) if known else None
        row.steps_timed, row.seconds = b.step - a.step, round(dt, 2)
        first = next((s for s in self.samples if s.step == 1), None)
        if first is not None:
            row.first_step_s = round(first.t - self.started, 2)
        row.warmup_s = round(a.t - self.started, 2)
        row.peak_gib = round((self.peak or peak_bytes(self.device)) / GIB, 2)
        return row


def peak_bytes(device: str) -> int:
    """Peak memory so far: CUDA allocations on a GPU, else this process's peak RSS (ru_maxrss is KiB on Linux)."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timestamp means the step is really done."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ── the worker's trainer ─────────────────────────────────────────────────────────────────────────────────
def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a cached file into the temp share (an 8B model is 16 GB); copy across filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_share(root: Path, model_dir: Path, rows: Path, shape: str) -> tuple[Path, Path]:
    """A share holding the model folder and the dataset, as a person would copy them in (no symlinks: the
    worker refuses links that leave the share)."""
    for src in model_dir.iterdir():
        _link_or_copy(src, root / "models" / shape / src.name)
    _link_or_copy(rows, root / "datasets" / "rows.jsonl")
    return root / "models" / shape, root / "datasets" / "rows.jsonl"


def worker_job(args: argparse.Namespace) -> Any:
    """The job a person would submit; eval is kept to a few rows and checkpoints out of the timed window."""
    from schemas.job import JobSpec

    return JobSpec(id="bench", kind="train", base_model=f"models/{args.shape}", dataset="datasets/rows.jsonl",
                   quantization=args.quantization, devices="all" if args.ranks else "auto",
                   lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                   training={"max_steps": args.warmup + args.steps + (PROFILE_STEPS if args.profile else 0)
                             + (1 if args.stop_after_timed else 0),  # a step to stop at, before evaluating
                             "batch_size": (args.worker_batch or args.batch) * (args.ranks or 1),
                             "max_length": _shapes.MAX_LENGTH, "eval_fraction": 0.002,
                             "checkpoint_every_steps": 10**9, "checkpoint_every_minutes": 1e9,
                             "compile": args.compile, "packing": args.packing,
                             "gradient_checkpointing": args.gradient_checkpointing})


PROFILE_STEPS = 3


class StepProfile:
    """torch's profiler over ``PROFILE_STEPS`` optimizer steps after the timed ones (the job trains that many
    more), so that the rate is never measured under it. Writes the ops by their own time, device time first on a
    GPU: where a step's time goes, which #6 asks to know before speeding anything up."""

    def __init__(self, path: Path, device: str, after: int) -> None:
        self.path, self.device, self.after = path, device, after
        self.prof: Any = None

    def at(self, step: int) -> None:
        import torch

        if step == self.after:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.start()
        elif step == self.after + PROFILE_STEPS and self.prof is not None:
            sync(self.device)
            self.prof.stop()
            key = "self_device_time_total" if self.device == "cuda" else "self_cpu_time_total"
            table = self.prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90)
            self.path.write_text(f"{PROFILE_STEPS} optimizer steps after the timed ones, by {key}\n{table}\n")


class WorkerClock:
    """The ``report`` callback: one Sample per training-phase Progress. Tokens come from ``progress.tokens``;
    an engine that does not fill it in still reports tokens_per_second (tokens / elapsed) and eta_seconds
    (elapsed / step * (total - step)), from which the tokens can be recovered for every step but the last."""

    def __init__(self, window: Window, total: int, profile: StepProfile | None = None) -> None:
        self.window, self.total, self.profile = window, total, profile
        self.job_total = total + (PROFILE_STEPS if profile else 0)
        self.estimated = False
        self.done = False  # every step the job was given for timing (and profiling) has been reported

    def report(self, progress: Any) -> None:
        if progress.phase != "training" or progress.step <= 0:
            return
        self.done = self.done or progress.step >= self.job_total
        if progress.step > self.total:
            if self.profile is not None:
                self.profile.at(progress.step)
            return
        if progress.step in (1, self.window.warmup, self.total - 1, self.total):
            sync(self.window.device)  # only at the window's ends: a sync every step would slow an async loop
        t = time.perf_counter()
        real = progress.tokens if progress.tokens is not None else self._estimate(progress)
        if real is not None:
            self.window.add(Sample(t, real, getattr(progress, "padded_tokens", None), progress.step))
        elif progress.step >= self.total:
            self.window.peak = peak_bytes(self.window.device)
        if progress.step == self.total and self.profile is not None:
            self.profile.at(progress.step)

    def _estimate(self, p: Any) -> int | None:
        if p.tokens_per_second is None or p.eta_seconds is None or p.step >= self.job_total:
            return None
        self.estimated = True
        return round(p.tokens_per_second * p.eta_seconds * p.step / (self.job_total - p.step))


def run_worker(args: argparse.Namespace) -> Row:
    from worker import headloss, packedattn
    from worker.train import TrainRequest

    headloss.USE_LIGER = not args.no_liger
    packedattn.USE_FLASH = not args.no_varlen
    batch = args.worker_batch or args.batch
    ranks = f"{args.ranks} DDP ranks x " if args.ranks else ""
    cap = f", {args.gpu_memory_gib:g} GiB cap" if args.gpu_memory_gib else ""
    label = (f"worker ({ranks}batch {batch}, quantization {args.quantization}{', compile' if args.compile else ''}"
             f"{cap})")
    row = Row("worker", label, args.shape, args.device, ranks=args.ranks)
    model_dir, rows = _shapes.paths(args.cache, args.shape)
    total = args.warmup + args.steps
    window = Window(args.warmup, total, args.device)
    profile = StepProfile(args.profile, args.device, total) if args.profile else None
    clock = WorkerClock(window, total, profile)
    with tempfile.TemporaryDirectory(dir=args.cache, prefix="share-") as tmp:
        root = Path(tmp)
        model, dataset = make_share(root, model_dir, rows, args.shape)
        req = TrainRequest(job=worker_job(args), model_dir=model, datasets=[dataset], share_root=root,
                           out_dir=root / "results" / "bench" / "attempts" / "a1", device=args.device,
                           file_mode=0o664, cpu_quantization="bitsandbytes",  # on CPU, as --quantization says
                           gpu_memory_gib=args.gpu_memory_gib)
        outcome = _train(req, clock, args.stop_after_timed)
        notes = list(outcome.notes) if outcome else [
            "ended after the timed steps (--stop-after-timed): not evaluated, saved or verified",
            *_plan_lines(req.out_dir / "train.log")]
    row.compile_s = outcome.metrics.compile_seconds if outcome else None
    if clock.estimated:
        notes.append("tokens estimated from tokens_per_second (progress.tokens not set)")
    if not any(s.padded is not None for s in window.samples):
        notes.append("padded tokens not reported: shown = real")
    if args.ranks:
        notes.append("peak not shown: the ranks are processes of their own")
    row.note = "; ".join(notes)
    row = window.fill(row)
    if args.ranks:
        row.peak_gib = None
    return row


def _train(req: Any, clock: WorkerClock, stop_after_timed: bool) -> Any:
    """The job as the worker runs it; with ``stop_after_timed`` it is cancelled once the timed steps are done,
    as a person would cancel it: the evaluation, save and verification reload that follow take minutes on an 8B
    base and time nothing. The worker's choices (checkpointing, kernels, the memory cap) are then read from its
    train.log (``_plan_lines``)."""
    from spooler.errors import Cancelled
    from worker.train import run_training

    if not stop_after_timed:
        return run_training(req, clock.report, should_stop=lambda: False)
    try:
        return run_training(req, clock.report, should_stop=lambda: clock.done)
    except Cancelled:
        return None


def _plan_lines(train_log: Path) -> list[str]:
    """What the training process logged of its plan, from the attempt's train.log."""
    try:
        lines = train_log.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [line.split(" plan: ", 1)[1] for line in lines if " plan: " in line]


# ── the Hugging Face Trainer recipes ─────────────────────────────────────────────────────────────────────
@dataclass
class Recipe:
    """How one HF recipe loads and wraps the model, and its Trainer settings."""

    label: str
    model: Any
    targs: dict[str, Any]
    pad_to: int | None
    grouped: bool
    note: str = ""


def _lora(model: Any, r: int, targets: Any, dropout: float) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=32, target_modules=targets, lora_dropout=dropout, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def seed_recipe(args: argparse.Namespace, path: Path) -> Recipe:
    """Seed 001 as written; on CPU (no bitsandbytes 8-bit, no fp16) fp32, with its gradient checkpointing."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    targets = list(_shapes.SHAPES[args.shape].qv_targets)
    note = f"r=8 on {','.join(targets)}"
    if args.device == "cuda":
        model = AutoModelForCausalLM.from_pretrained(
            path, device_map={"": 0}, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
        model = prepare_model_for_kbit_training(model)
        return Recipe("seed", _lora(model, 8, targets, 0.05),
                      dict(per_device_train_batch_size=4, gradient_accumulation_steps=8, fp16=True), 512, False, note)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = prepare_model_for_kbit_training(model)  # on an unquantized model it skips the checkpointing:
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable()  # so switch it on as the 8-bit path would
    return Recipe("seed (cpu: fp32, no 8-bit)", _lora(model, 8, targets, 0.05),
                  dict(per_device_train_batch_size=4, gradient_accumulation_steps=1), 512, False, note)


def tuned_recipe(args: argparse.Namespace, path: Path) -> Recipe:
    import torch
    from transformers import AutoModelForCausalLM

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(args.device)
    targs = dict(per_device_train_batch_size=args.batch, gradient_accumulation_steps=2 if cuda else 1, bf16=cuda)
    label = "tuned" if cuda else "tuned (cpu: fp32)"
    return Recipe(label, _lora(model, 16, "all-linear", 0.0), targs, None, True, f"sampler {args.sampler}")


def qlora_recipe(args: argparse.Namespace, path: Path) -> Recipe:
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(path, device_map={"": 0}, dtype=torch.bfloat16,
                                                 quantization_config=quant)
    model = prepare_model_for_kbit_training(model)
    targs = dict(per_device_train_batch_size=8, gradient_accumulation_steps=4, bf16=True)
    return Recipe("qlora", _lora(model, 16, "all-linear", 0.0), targs, None, True, f"sampler {args.sampler}")


HF_RECIPES: dict[str, Callable[[argparse.Namespace, Path], Recipe]] = {
    "seed": seed_recipe, "tuned": tuned_recipe, "qlora": qlora_recipe}


def load_rows(model_dir: Path, rows: Path) -> list[Any]:
    """The worker's rows as token ids: the same tokenizer, plus the BOS and EOS the worker adds."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(rows, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    return [torch.tensor([tok.bos_token_id, *ids, tok.eos_token_id]) for ids in encoded]


def group_by_length(rows: list[Any], chunk: int = 64, seed: int = 1) -> list[Any]:
    """Sort by length, then shuffle chunks of 64, as the anchor does: batches of near-equal lengths."""
    import random

    ordered = sorted(rows, key=len)
    chunks = [ordered[i:i + chunk] for i in range(0, len(ordered), chunk)]
    random.Random(seed).shuffle(chunks)
    return [r for c in chunks for r in c]


class Counted:
    """A collator that pads (to ``pad_to`` or the longest row) and keeps running totals of real (attention
    mask) and padded (numel) tokens per batch. Totals are per batch, not a single counter, because the
    dataloader fetches one batch ahead: the clock reads the totals of exactly the batches trained on."""

    def __init__(self, pad_to: int | None) -> None:
        self.pad_to = pad_to
        self.real: list[int] = []
        self.padded: list[int] = []

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids = [b["input_ids"] for b in batch]
        width = self.pad_to or max(len(x) for x in ids)
        x = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, t in enumerate(ids):
            x[i, :len(t)] = t
            mask[i, :len(t)] = 1
        self.real.append((self.real[-1] if self.real else 0) + int(mask.sum()))
        self.padded.append((self.padded[-1] if self.padded else 0) + x.numel())
        return {"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)}

    def totals(self, batches: int) -> tuple[int, int]:
        return self.real[batches - 1], self.padded[batches - 1]


def _clock(window: Window, counts: Counted, accum: int) -> Any:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """One Sample per optimizer step (``accum`` batches each), synchronized on cuda as the anchor does."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync(window.device)
            real, padded = counts.totals(state.global_step * accum)
            window.add(Sample(time.perf_counter(), real, padded, state.global_step))

    return Clock()


def in_order(trainer: type) -> type:
    """A Trainer that keeps the dataset's order (the length-grouped chunks) instead of reshuffling it.
    Overrides the sampler hook rather than using train_sampling_strategy, which older 5.x releases lack."""
    import torch

    class InOrder(trainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return InOrder


def run_hf(args: argparse.Namespace) -> Row:
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_dir, rows_path = _shapes.paths(args.cache, args.shape)
    total = args.warmup + args.steps
    window = Window(args.warmup, total, args.device)
    recipe = HF_RECIPES[args.one](args, model_dir)
    rows = load_rows(model_dir, rows_path)
    grouped = recipe.grouped and args.sampler == "grouped"
    data = [{"input_ids": r} for r in (group_by_length(rows) if recipe.grouped else rows)]
    counts = Counted(recipe.pad_to)
    with tempfile.TemporaryDirectory(prefix="hf-out-") as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=total, learning_rate=2e-4, logging_strategy="no", save_strategy="no",
            report_to="none", remove_unused_columns=False, dataloader_pin_memory=False, optim="adamw_torch",
            disable_tqdm=True, use_cpu=args.device == "cpu", **recipe.targs)
        trainer = (in_order(Trainer) if grouped else Trainer)(
            model=recipe.model, args=targs, train_dataset=data, data_collator=counts,
            callbacks=[_clock(window, counts, targs.gradient_accumulation_steps)])
        trainer.train()
    accum = targs.gradient_accumulation_steps
    batch = f"batch {targs.per_device_train_batch_size}" + (f" x {accum}" if accum > 1 else "")
    row = Row(args.one, recipe.label, args.shape, args.device, note=f"{batch}; {recipe.note}")
    return window.fill(row)


# ── one recipe per process ───────────────────────────────────────────────────────────────────────────────
def run_one(args: argparse.Namespace) -> Row:
    """Run ``args.one`` here and return its row; a failure becomes the row's error, not a crash."""
    if args.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        if args.no_cudnn_sdp:
            torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return run_worker(args) if args.one == "worker" else run_hf(args)
    except Exception as e:  # any failure of one recipe (a shape the worker refuses, an OOM) is that row's result
        return Row(args.one, args.one, args.shape, args.device, error=brief(e))


def child_args(args: argparse.Namespace, recipe: str) -> list[str]:
    return [sys.executable, __file__, "--one", recipe, "--shape", args.shape, "--device", args.device,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
            *(["--worker-batch", str(args.worker_batch)] if args.worker_batch else []),
            *(["--gpu-memory-gib", str(args.gpu_memory_gib)] if args.gpu_memory_gib else []),
            *(["--stop-after-timed"] if args.stop_after_timed else []),
            *(["--ranks", str(args.ranks)] if args.ranks else []),
            *(["--profile", str(args.profile)] if args.profile and recipe == "worker" else []),
            "--quantization", args.quantization, "--sampler", args.sampler, "--cache", str(args.cache),
            "--packing", str(args.packing).lower(),
            "--gradient-checkpointing", str(args.gradient_checkpointing).lower(),
            *(["--no-cudnn-sdp"] if args.no_cudnn_sdp else []), *(["--compile"] if args.compile else []),
            *(["--no-liger"] if args.no_liger else []), *(["--no-varlen"] if args.no_varlen else [])]


def child_env(args: argparse.Namespace, recipe: str) -> dict[str, str]:
    """The worker's recipe starts as the worker's training process does (worker.childenv: on CPU, glibc's malloc
    keeps what it frees); the HF recipes as a person would run them, unless ``--same-malloc``."""
    from worker import childenv, ddp

    env = childenv.for_training(args.device, os.environ) if recipe == "worker" or args.same_malloc else {}
    if recipe == "worker" and args.ranks:
        env[ddp.ENV_PROCS] = str(args.ranks)  # what a worker sets to run its "all" jobs on fewer ranks
    return env


def spawn(args: argparse.Namespace, recipe: str) -> Row:
    """Run one recipe in a fresh interpreter and read its JSON line (its stderr is shown only on failure)."""
    extra = child_env(args, recipe)
    proc = subprocess.run(child_args(args, recipe), capture_output=True, text=True, env={**os.environ, **extra})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        row = Row(**json.loads(lines[-1]))
    else:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        row = Row(recipe, recipe, args.shape, args.device, error=f"exit {proc.returncode}: {tail[0][:300]}")
    if extra:
        row.note = "; ".join(n for n in (row.note, "malloc keeps what it frees (worker.childenv)") if n)
    if row.error:
        print(proc.stderr[-4000:], file=sys.stderr)
    return row


def prepare(args: argparse.Namespace) -> None:
    """Build the cached model and rows in a child too: a CUDA context or a big build must not stay in the
    parent (it would hold GPU memory that the recipes then lack)."""
    if (args.cache / args.shape / _shapes.DONE).exists():
        return
    print(f"building {args.shape} into {args.cache} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, __file__, "--build", "--shape", args.shape, "--device", args.device,
                    "--cache", str(args.cache)], check=True)


# ── output ───────────────────────────────────────────────────────────────────────────────────────────────
COLUMNS = [("recipe", "label"), ("model", "model"), ("device", "device"), ("real tok/s", "real_tok_s"),
           ("padded tok/s", "padded_tok_s"), ("pad frac", "pad_fraction"), ("peak GiB", "peak_gib"),
           ("steps", "steps_timed"), ("seconds", "seconds"), ("1st step s", "first_step_s"),
           ("compile s", "compile_s"), ("warm-up s", "warmup_s"), ("note", "note")]


def _cell(row: Row, key: str) -> str:
    value = getattr(row, key)
    if key == "note" and row.error:
        return f"ERROR {row.error}" + (f"; {row.note}" if row.note else "")
    if value is None:
        return "-"
    return f"{value:,}" if key.endswith("tok_s") else str(value)


def table(rows: list[Row]) -> str:
    cells = [[h for h, _ in COLUMNS]] + [[_cell(r, k) for _, k in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(c[i].ljust(w) for i, w in enumerate(widths)) + "  " + c[-1] for c in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _worker_row(rows: list[Row], ddp: bool) -> Row | None:
    """The worker's row with a rate: the one-process run, or the DDP one of the scaling run."""
    return next((r for r in rows if r.recipe == "worker" and r.real_tok_s and bool(r.ranks) == ddp), None)


def speedups(rows: list[Row]) -> list[str]:
    """The worker's real tokens/s over each other recipe that produced a rate."""
    worker = _worker_row(rows, ddp=False)
    if worker is None:
        return []
    return [f"worker vs {r.label}: {worker.real_tok_s / r.real_tok_s:.2f}x real tok/s"
            for r in rows if r.recipe != "worker" and r.real_tok_s]


def scaling_ranks(args: argparse.Namespace) -> int:
    """Ranks for the scaling run: ``--ddp N``, else every GPU when there are several (none on one GPU or a CPU)."""
    if args.ddp is not None:
        return args.ddp
    if args.device != "cuda":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.device_count() > 1 else 0


def scaling(rows: list[Row]) -> list[str]:
    """The DDP worker's rate against the one-process worker's: weak scaling, each rank with the one's batch."""
    one, many = _worker_row(rows, ddp=False), _worker_row(rows, ddp=True)
    if one is None or many is None or not many.ranks:
        return []
    ratio = many.real_tok_s / one.real_tok_s
    return [f"scaling: {many.ranks} DDP ranks give {ratio:.2f}x one process's real tok/s "
            f"({ratio / many.ranks:.0%} per rank)"]


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=list(_shapes.SHAPES))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, from: " + ", ".join(RECIPES))
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (at least 1)")
    ap.add_argument("--batch", type=int, default=16, help="rows per step for the worker and tuned recipes")
    ap.add_argument("--worker-batch", type=int, default=None,
                    help="the worker's rows per step, when it should differ from the tuned recipe's --batch "
                         "(the targets compare with the tuned recipe at its own batch of 16 x 2)")
    ap.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"],
                    help="worker recipe only (on CPU too, with bitsandbytes' CPU kernels)")
    ap.add_argument("--compile", action="store_true", help="worker recipe: training.compile (cuda)")
    ap.add_argument("--packing", default="auto", type=lambda v: v if v == "auto" else v == "true",
                    help="worker recipe: training.packing (auto|true|false)")
    ap.add_argument("--gradient-checkpointing", default="auto", type=lambda v: v if v == "auto" else v == "true",
                    help="worker recipe: training.gradient_checkpointing (auto|true|false)")
    ap.add_argument("--sampler", default="random", choices=["random", "grouped"],
                    help="tuned/qlora row order: random is what the anchor measured; grouped keeps the sorted chunks")
    ap.add_argument("--no-cudnn-sdp", action="store_true",
                    help="turn off PyTorch's cuDNN attention in every recipe: it builds a plan per new sequence "
                         "length, which dynamic padding pays on almost every batch")
    ap.add_argument("--same-malloc", action="store_true",
                    help="on CPU, run the HF recipes with the glibc malloc settings the worker's training process "
                         "gets (worker.childenv) too, rather than the default a person would have")
    ap.add_argument("--no-liger", action="store_true",
                    help="worker recipe: the torch chunks for the LM head loss even where liger-kernel is installed")
    ap.add_argument("--no-varlen", action="store_true",
                    help="worker recipe on cuda: transformers' masked SDPA for packed rows even where torch has the "
                         "flash varlen kernel")
    ap.add_argument("--gpu-memory-gib", type=float, default=None,
                    help="worker recipe: the worker's gpu_memory_gib, to train as on a smaller card (a 12 GiB cap "
                         "on an 80 GiB GPU plans and allocates as a 12 GiB card would)")
    ap.add_argument("--stop-after-timed", action="store_true",
                    help="worker recipe: cancel the job after its timed (and profiled) steps instead of evaluating, "
                         "saving and verifying it, which takes minutes on an 8B base")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/loraspool-bench"))
    ap.add_argument("--json", type=Path, help="also append the JSON lines to this file")
    ap.add_argument("--profile", type=Path,
                    help=f"worker recipe: write torch's profile of {PROFILE_STEPS} more steps, after the timed ones, "
                         "to this file (ops by their own device time on a GPU, CPU time on a CPU)")
    ap.add_argument("--ddp", type=int, default=None, metavar="N",
                    help="also run the worker as one devices-\"all\" job of N DDP ranks, each with the one-process "
                         "batch, and print the scaling (default: every GPU, when there are several; 0: never). "
                         "On a CPU the ranks are gloo processes")
    ap.add_argument("--ranks", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one", choices=RECIPES, help=argparse.SUPPRESS)
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1")
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if unknown := sorted(set(args.recipes) - set(RECIPES)):
        ap.error(f"unknown recipe(s): {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    args.device = resolve_device(args.device)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.build:
        _shapes.ensure(args.cache, args.shape, args.device)
        return
    if args.one:
        print(json.dumps(asdict(run_one(args))), flush=True)
        return
    prepare(args)
    rows: list[Row] = []
    for recipe in args.recipes:
        if recipe in CUDA_ONLY and args.device != "cuda":
            row = Row(recipe, recipe, args.shape, args.device, note=CUDA_ONLY[recipe])
        else:
            row = spawn(args, recipe)
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
    if "worker" in args.recipes and (ranks := scaling_ranks(args)) > 1:
        # not profiled: the ranks train in processes of their own, and the one-process profile must stay
        rows.append(spawn(argparse.Namespace(**{**vars(args), "ranks": ranks, "profile": None}), "worker"))
        print(json.dumps(asdict(rows[-1])), flush=True)
    if args.json:  # appended: a session's several runs (gpu_session.sh) collect in one file
        with args.json.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(asdict(r)) + "\n" for r in rows))
    print()
    print(table(rows))
    for line in speedups(rows) + scaling(rows):
        print(line)


if __name__ == "__main__":
    main()
