"""The torch side of one training attempt: load, wrap with LoRA, train, evaluate, save, verify.

The loop is plain PyTorch rather than the HF Trainer: the spool needs a step-by-step hook for progress and
cancellation, exact control over what is written to the share, and nothing that reaches for the network.
Imported by ``worker.train.run_training`` in the training child only; ``train_adapter`` is its entry point.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from schemas.heartbeat import Progress
from schemas.job import JobSpec, Quantization
from schemas.result import Metrics
from spooler.atomic import fsync_tree
from spooler.errors import Cancelled, Rejected
from worker import data
from worker.train import TrainRequest

log = logging.getLogger(__name__)

# Everything this process reads is on the share: never let a library reach for the hub (set before the
# lazy transformers/peft imports below read it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAST_STEPS = 10  # train_loss is the mean of this many final steps: one step's loss is too noisy to report
MAX_WARMUP = 100
GRAD_CLIP = 1.0


@dataclass
class Plan:
    """How the model is loaded on this worker, after what the job asked for meets what the device can do."""

    device: str
    dtype: torch.dtype
    quantization: Quantization
    notes: list[str]


def train_adapter(req: TrainRequest, report: Callable[[Progress], None],
                  should_stop: Callable[[], bool]) -> tuple[Metrics, Path, list[str]]:
    """Everything after the folder checks: (metrics without ``seconds``, the adapter folder, notes)."""
    job_id = req.job.id or "job"
    plan, tokenizer, splits = prepare(req)
    _makedirs(req.out_dir, dir_mode_for(req.file_mode))  # the attempt's folder, kept even if it dies
    _stop_if(should_stop)
    model = load_model(req.model_dir, plan)
    _check_vocab(model, splits)
    model = add_lora(model, req.job, plan)
    loop = Loop(model, req, plan, data.pad_id_of(tokenizer), report, should_stop)
    metrics = loop.run(splits)
    adapter_dir = save_adapter(model, req, job_id, report)
    sample = loop.sample_input(splits)
    expected = _logits(model, sample, plan) if _exact(plan) else None
    del model, loop  # the only references: the fresh base for the load test may not fit beside it
    _free(plan)
    report(Progress(job=job_id, phase="verifying"))
    verify_adapter(req.model_dir, adapter_dir, plan, sample, expected)
    return metrics, adapter_dir, plan.notes + splits.notes


def prepare(req: TrainRequest) -> tuple[Plan, Any, data.Splits]:
    """Everything that can refuse the job short of reading weights: the tokenizer, every dataset row, the
    target module names (against the model's structure, built without weights)."""
    _quiet_libraries()
    t = req.job.training
    _seed_everything(t.seed)
    plan = plan_for(req.job.quantization, req.device)
    tokenizer = load_tokenizer(req.model_dir)
    splits = data.load_splits(req.datasets, tokenizer, t)
    check_targets(req.model_dir, req.job.lora.target_modules)
    return plan, tokenizer, splits


def _stop_if(should_stop: Callable[[], bool]) -> None:
    if should_stop():
        raise Cancelled()


def _quiet_libraries() -> None:
    """Keep the worker log for things a person must act on: progress goes to the heartbeat, not tqdm bars;
    bitsandbytes' CPU-kernel notice and peft's use of a deprecated transformers name are not actionable."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ── what to load, and how ────────────────────────────────────────────────────────────────────────────────
def plan_for(quantization: Quantization, device: str) -> Plan:
    """fp32 on CPU; bf16 on a GPU that has it, else fp16 (LoRA weights stay fp32 either way).
    bitsandbytes quantization needs CUDA: on CPU the job still trains, as plain LoRA, and says so."""
    if device != "cuda":
        notes = []
        if quantization is not Quantization.none:
            notes.append(f"quantization {quantization.value} asked for, but this worker runs on CPU: "
                         "trained as plain LoRA in fp32")
        return Plan("cpu", torch.float32, Quantization.none, notes)
    if not torch.cuda.is_available():
        raise RuntimeError("this worker was told to use cuda, but torch sees no CUDA GPU (driver, or a CPU-only "
                           "torch build); start the worker with --device cpu or fix the GPU setup")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return Plan("cuda", dtype, quantization, [])


def load_tokenizer(model_dir: Path) -> Any:
    """The model folder's own tokenizer; never code shipped with it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise Rejected("base_model", f"its tokenizer does not load ({type(e).__name__}: {e}); save the tokenizer "
                                     "into the model folder with tokenizer.save_pretrained") from e


def _meta_model(model_dir: Path) -> torch.nn.Module:
    """The model's structure with no weights (on the meta device): module names in a second, not a load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise Rejected("base_model", f"is not a causal language model this transformers version can build "
                                     f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e


def _adaptable(module: torch.nn.Module) -> bool:
    """Layer types peft's LoRA can wrap."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    return isinstance(module, kinds)


def target_problem(model: torch.nn.Module, targets: list[str]) -> str | None:
    """Why ``targets`` cannot be LoRA-adapted in ``model`` (peft matches a name or a dotted suffix), or None."""
    modules = dict(model.named_modules())
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if n and isinstance(m, torch.nn.Linear)})
    for target in targets:
        hits = [m for n, m in modules.items() if n == target or n.endswith("." + target)]
        if not hits:
            return f"unknown module {target!r}; this model has: {', '.join(linear)}"
        if not all(_adaptable(m) for m in hits):
            kind = next(type(m).__name__ for m in hits if not _adaptable(m))
            return f"{target!r} is a {kind}, not a layer LoRA can adapt; name linear layers: {', '.join(linear)}"
    return None


def check_targets(model_dir: Path, targets: list[str] | str) -> None:
    """Refuse unknown ``lora.target_modules`` before any weights are read."""
    if targets == "all-linear":
        return
    if problem := target_problem(_meta_model(model_dir), list(targets)):
        raise Rejected("lora.target_modules", problem)


def _quantization_config(plan: Plan) -> Any:
    from transformers import BitsAndBytesConfig

    if plan.quantization is Quantization.bit4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=plan.dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(model_dir: Path, plan: Plan) -> torch.nn.Module:
    """Load the base weights: safetensors only, no remote code, on the plan's device and dtype."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": plan.dtype, "use_safetensors": True, "trust_remote_code": False}
    if plan.device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if plan.quantization is not Quantization.none:
        kwargs["quantization_config"] = _quantization_config(plan)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False  # the KV cache only costs memory in training
    return model


def _check_vocab(model: torch.nn.Module, splits: data.Splits) -> None:
    rows = model.get_input_embeddings().num_embeddings
    top = max(max(e.input_ids) for e in splits.train + splits.eval)
    if top >= rows:
        raise Rejected("base_model", f"its tokenizer gives token id {top} but the model's embedding has {rows} "
                                     "rows: the tokenizer does not belong to this model")


def add_lora(model: torch.nn.Module, job: JobSpec, plan: Plan) -> torch.nn.Module:
    """Wrap ``model`` with trainable LoRA layers (kept in fp32 by peft's autocast_adapter_dtype)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if plan.quantization is not Quantization.none:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = job.lora
    config = LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, bias="none")
    model = get_peft_model(model, config)
    # An absolute path on this worker's mount means nothing elsewhere: record the share-relative one.
    model.peft_config["default"].base_model_name_or_path = job.base_model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %s: %d trainable parameters", lora.r, lora.target_modules, trainable)
    return model


# ── the loop ─────────────────────────────────────────────────────────────────────────────────────────────
def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], plan: Plan) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of labelled tokens): sums, so eval can weight every token equally."""
    batch = {k: v.to(plan.device) for k, v in batch.items()}
    with _autocast(plan):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=data.IGNORE, reduction="sum")
    return loss, int((targets != data.IGNORE).sum())


def _autocast(plan: Plan) -> Any:
    return torch.autocast("cuda", dtype=plan.dtype, enabled=plan.device == "cuda")


class Loop:
    """The optimizer loop, with its progress reports and stop checks."""

    def __init__(self, model: torch.nn.Module, req: TrainRequest, plan: Plan, pad_id: int,
                 report: Callable[[Progress], None], should_stop: Callable[[], bool]) -> None:
        self.model, self.req, self.plan, self.pad_id = model, req, plan, pad_id
        self.report, self.should_stop = report, should_stop
        self.job_id = req.job.id or "job"
        self.t = req.job.training

    def run(self, splits: data.Splits) -> Metrics:
        """Eval, train, eval: the metrics of one attempt (``seconds`` is filled in by the caller)."""
        before = self.evaluate(splits.eval, "eval-before")
        per_epoch = math.ceil(len(splits.train) / self.t.batch_size)
        total = self.t.max_steps or max(1, math.ceil(self.t.epochs * per_epoch))
        losses, tokens = self.train(splits.train, total, per_epoch)
        after = self.evaluate(splits.eval, "eval-after")
        tail = losses[-LAST_STEPS:]
        return Metrics(train_loss=sum(tail) / len(tail), eval_loss_before=before, eval_loss_after=after,
                       tokens=tokens, steps=len(losses))

    def evaluate(self, examples: list[data.Example], phase: str) -> float:
        """Mean loss per labelled token over ``examples``, with dropout off and no gradients."""
        self.report(Progress(job=self.job_id, phase=phase))
        self.model.eval()
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(examples), self.t.batch_size):
                _stop_if(self.should_stop)
                loss, n = batch_loss(self.model, data.collate(examples[start:start + self.t.batch_size],
                                                              self.pad_id), self.plan)
                loss_sum, count = loss_sum + float(loss), count + n
        mean = loss_sum / max(count, 1)
        if not math.isfinite(mean):
            raise RuntimeError(f"the {phase} loss is {mean}: the model gives non-finite outputs"
                               f"{self._fp16_hint()}; check the model files")
        return mean

    def batches(self, examples: list[data.Example]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(epoch, batch) forever, reshuffled each epoch by a generator seeded from the job's seed."""
        epoch = 0
        while True:
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.t.seed + epoch))
            for start in range(0, len(order), self.t.batch_size):
                chunk = [examples[int(i)] for i in order[start:start + self.t.batch_size]]
                yield epoch, data.collate(chunk, self.pad_id)
            epoch += 1

    def train(self, examples: list[data.Example], total: int, per_epoch: int) -> tuple[list[float], int]:
        """``total`` optimizer steps; returns every step's loss and the non-pad tokens trained on."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.t.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_decay(total))
        scaler = torch.amp.GradScaler("cuda", enabled=self.plan.device == "cuda" and self.plan.dtype == torch.float16)
        self.model.train()
        losses: list[float] = []
        tokens, started = 0, time.monotonic()
        for step, (_, batch) in enumerate(self.batches(examples), start=1):
            _stop_if(self.should_stop)
            lr = schedule.get_last_lr()[0]
            loss_sum, n = batch_loss(self.model, batch, self.plan)
            loss = loss_sum / max(n, 1)
            self._check_finite(loss.item(), step, lr)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
            self._progress(step, total, step / per_epoch, losses[-1], lr, tokens, time.monotonic() - started)
            if step >= total:
                return losses, tokens
        raise AssertionError("unreachable: batches() never ends")

    def _check_finite(self, loss: float, step: int, lr: float) -> None:
        if not math.isfinite(loss):
            raise RuntimeError(f"the training loss became {loss} at step {step} (learning rate {lr:.3g}): "
                               f"training diverged; lower training.learning_rate{self._fp16_hint()}")

    def _fp16_hint(self) -> str:
        if self.plan.dtype == torch.float16:
            return " (this GPU has no bf16, so the model runs in fp16, which overflows easily)"
        return ""

    def _progress(self, step: int, total: int, epoch: float, loss: float, lr: float, tokens: int,
                  elapsed: float) -> None:
        self.report(Progress(job=self.job_id, step=step, total_steps=total, epoch=round(epoch, 4), loss=loss,
                             learning_rate=lr, tokens_per_second=tokens / elapsed if elapsed > 0 else None,
                             eta_seconds=elapsed / step * (total - step), phase="training"))

    def sample_input(self, splits: data.Splits) -> torch.Tensor:
        """A short real input for the load test: the first eval row, at most 32 tokens."""
        return torch.tensor([splits.eval[0].input_ids[:32]], dtype=torch.long)


def _warmup_decay(total: int) -> Callable[[int], float]:
    """Linear warmup over ~10% of the steps (at most MAX_WARMUP), then linear decay towards zero."""
    warmup = min(MAX_WARMUP, max(1, total // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


# ── saving and checking the adapter ──────────────────────────────────────────────────────────────────────
def dir_mode_for(file_mode: int) -> int:
    """The folder mode that matches a file mode: whoever may read a file may list its folder (0664 -> 0775)."""
    return file_mode | ((file_mode & 0o444) >> 2)


def _makedirs(path: Path, mode: int) -> None:
    """mkdir -p, chmod-ing each folder this call creates (mkdir's own mode is cut by the umask)."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        os.chmod(folder, mode)


def chmod_tree(folder: Path, file_mode: int) -> None:
    """Give every file ``file_mode`` and every folder the matching mode: safetensors writes 0600."""
    os.chmod(folder, dir_mode_for(file_mode))
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode_for(file_mode))
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


def save_adapter(model: torch.nn.Module, req: TrainRequest, job_id: str,
                 report: Callable[[Progress], None]) -> Path:
    """Write the adapter (safetensors + adapter_config.json) to ``out_dir/adapter``, readable by the share."""
    report(Progress(job=job_id, phase="saving"))
    adapter_dir = req.out_dir / "adapter"
    if adapter_dir.exists():  # left by an earlier try of this very attempt: never mix two adapters' files
        shutil.rmtree(adapter_dir)
    # The vocabulary is never resized, so no full embedding copies: and "auto" would look the base up on the hub.
    model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=False)
    chmod_tree(adapter_dir, req.file_mode)
    fsync_tree(adapter_dir)
    return adapter_dir


def _exact(plan: Plan) -> bool:
    """Only fp32 without quantization reproduces logits closely enough to compare after a reload."""
    return plan.dtype == torch.float32 and plan.quantization is Quantization.none


def _logits(model: torch.nn.Module, sample: torch.Tensor, plan: Plan) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), _autocast(plan):
        return model(input_ids=sample.to(plan.device)).logits.float().cpu()


def _free(plan: Plan) -> None:
    """Drop the trained model before loading a fresh base: two copies of a large model may not fit."""
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()


def verify_adapter(model_dir: Path, adapter_dir: Path, plan: Plan, sample: torch.Tensor,
                   expected: torch.Tensor | None) -> None:
    """Load the saved adapter the way its users will (fresh base + ``PeftModel.from_pretrained``) and check a
    forward pass: finite logits, and in fp32 the same logits the trained model gave."""
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(load_model(model_dir, plan), adapter_dir)
    logits = _logits(loaded, sample, plan)
    del loaded
    _free(plan)
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the saved adapter in {adapter_dir} gives non-finite logits when loaded; "
                           "it is not usable: lower training.learning_rate and run the job again")
    if expected is not None and not torch.allclose(logits, expected, atol=1e-3, rtol=1e-3):
        diff = float((logits - expected).abs().max())
        raise RuntimeError(f"the saved adapter in {adapter_dir} does not reproduce the trained model (logits "
                           f"differ by up to {diff:.3g}); the save is incomplete: run the job again")
