"""The optimizer loop: steps, guards, progress, metrics, checkpoints and resume.

Plain PyTorch rather than the HF Trainer: the spool needs a hook at every step (progress, stop, checkpoint) and
exact control of what reaches the share. What makes it fast is in the data and the loss, not the loop:

* batches come from ``worker.batching`` (packed or length-grouped), so little compute goes to padding;
* the loss never materialises the logits of the whole batch: the hidden states of the labelled positions only go
  through the LM head in chunks (``worker.headloss``), so a 150k vocabulary costs one chunk of logits at a time
  instead of batch × length × vocab;
* AdamW runs fused on CUDA, over the LoRA parameters only;
* on CPU a step's rows go through forward and backward in pieces (``LoopSettings.micro_tokens``), their
  gradients adding up: the same step in a fraction of the memory, and faster (``engine.CPU_MICRO_TOKENS``).

The loss that a step trains on is its sum over every labelled token of the (global) batch divided by the epoch's mean
count per step (``Batcher.targets_per_step``), so every token weighs the same over an epoch however the batches
group rows; the loss it reports is the step's own mean. Each rank divides its sum by that global count, and DDP's
gradient averaging is undone by the world size, so two processes with batch B follow the trajectory of one
process with batch 2B.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from schemas.checkpoint import CheckpointState
from schemas.heartbeat import Progress
from spooler.errors import Cancelled, Rejected
from spooler.paths import refuse_links
from worker import checkpoint, headloss, packedattn
from worker.batching import Batch, Batcher, collate_eval
from worker.data import IGNORE, Example
from worker.outputs import MetricsLog

log = logging.getLogger(__name__)

LAST_STEPS = 10  # train_loss is the mean of this many final steps: one step's loss is too noisy to report
MAX_WARMUP = 100
GRAD_CLIP = 1.0
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")
MAX_SKIPPED = 25  # fp16 steps in a row whose gradients overflowed before the job is failed


def uncompiled() -> Any:
    """Run a compiled body eagerly, for everything but the training step. Evaluation (its last batch shorter),
    probe generation (a KV cache that grows per token) and the load test each give it new shapes; every one is
    a recompile, and past dynamo's recompile_limit (8) the training step itself runs eager for the rest of the
    job. Without compile this does nothing."""
    return torch.compiler.set_stance("force_eager")


@dataclass
class Dist:
    """This process's place in a DDP job; world 1 is a plain single-process run."""

    world: int = 1
    rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def totals(self, values: list[float], device: str) -> list[float]:
        """Each of ``values`` summed over every rank, in one all-reduce."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def total(self, value: float, device: str) -> float:
        return self.totals([value], device)[0]

    def agree(self, flag: bool, device: str) -> bool:
        """True on every rank when it is true on any: a stop seen by rank 0 stops them all at the same step."""
        return self.total(1.0 if flag else 0.0, device) > 0


class CausalLMLoss(torch.nn.Module):
    """(sum of token losses, labelled tokens) of a batch. A module, so that DDP sees the whole forward."""

    def __init__(self, model: torch.nn.Module, chunked: bool) -> None:
        super().__init__()
        self.model = model  # the peft model
        lm = model.get_base_model()
        self.chunked = chunked and _chunkable(lm)
        self._body = getattr(lm, lm.base_model_prefix) if self.chunked else None
        self._head = lm.get_output_embeddings() if self.chunked else None
        self.fused: headloss.Fused | None = None  # set by choose_fused, once it has checked the kernel
        self.varlen: packedattn.Varlen | None = None  # set by choose_attention, likewise

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None,
                positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        targets = labels[:, 1:]
        keep = targets != IGNORE
        documents = ({} if self.varlen is None or positions is None else
                     packedattn.kwargs_for(self.varlen, positions))
        if not self.chunked:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                **documents).logits
            loss = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
            return loss, keep.sum()
        assert self._body is not None
        hidden = self._body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                            **documents).last_hidden_state
        return headloss.chunked_ce(self._head, hidden[:, :-1][keep], targets[keep], self.fused), keep.sum()

    def check_chunking(self, ids: torch.Tensor) -> str | None:
        """None when the chunked loss is the model's own on ``ids``; otherwise why the full path is taken from now
        on. The chunked path computes ``lm_head(hidden)`` itself, so a model that transforms its logits in a way
        ``_chunkable`` does not know of would train on another objective, silently. Asked once, before training."""
        if not self.chunked:
            return None
        with evaluating(self.model):
            chunked, _ = self(ids, ids, None, None)
            self.chunked = False
            full, _ = self(ids, ids, None, None)
        gap = abs(float(chunked) - float(full)) / max(abs(float(full)), 1e-12)
        assert self._head is not None
        # fp32: the same arithmetic, to rounding. bf16/fp16: a head run on fewer rows may round differently.
        exact = self._head.weight.dtype == torch.float32 and not torch.is_autocast_enabled(ids.device.type)
        if gap <= (1e-5 if exact else 1e-2):
            self.chunked = True
            return None
        return (f"the loss from lm_head(hidden) differs from {type(self.model.get_base_model()).__name__}'s own by "
                f"{gap:.2g}: it transforms its logits, so the loss takes the full logits (more memory)")

    def choose_fused(self, ids: torch.Tensor, device: str) -> tuple[str, str | None]:
        """Take a fused head-loss kernel where one is installed and gives the torch chunks' loss and gradient on
        this model's hidden states of ``ids``. Returns which loss runs, in words, and a note when an installed
        kernel was refused. Asked once, before training, after ``check_chunking``."""
        if not self.chunked or not headloss.frozen_linear(self._head):
            return "the model's logits" if not self.chunked else "torch chunks, checkpointed (the head trains)", None
        kernel, which = headloss.fused_kernel(device)
        if kernel is None:
            return which, None
        assert self._body is not None and self._head is not None
        with evaluating(self.model):
            hidden = self._body(input_ids=ids, use_cache=False).last_hidden_state
        if problem := headloss.check_fused(kernel, self._head, hidden[0, :-1], ids[0, 1:]):
            return "torch chunks", f"{which} not used: {problem}"
        self.fused = kernel
        return which, None

    def choose_attention(self, ids: torch.Tensor, device: str, length: int | None = None) -> tuple[str, str | None]:
        """Take the document-wise attention kernel for ``device`` (``worker.packedattn``) for packed batches of
        ``length``-token rows, once it gives the masked path's results on this model. Returns which attention
        runs, in words, and a note when a kernel was refused. Asked once, before training."""
        with evaluating(self.model):
            self.varlen, which, refused = packedattn.choose(self.model.get_base_model(), device, ids, length)
        return which, refused


class MixedPrecision:
    """The context every training and evaluation forward runs in: autocast to ``dtype`` on cuda, with peft's LoRA
    layers fed their input as it comes.

    peft casts a LoRA layer's input to its weights' dtype (fp32, kept so for the optimizer); under autocast the
    matmul casts it straight back to bf16 or fp16. The round trip is exact, so it changes no value (loss and
    gradients measured bit-identical), but it costs two casts per layer, and each LoRA layer then saves its own
    copy of its input for backward instead of the one tensor q, k and v share: a qwen3-0.6b layer keeps 60.6
    instead of 70.6 KiB per token (benchmarks/saved_activations.py, saved-tensor hooks under CPU autocast).
    Outside this context (the chunked-loss check before training runs under plain autocast) peft casts as usual.
    DoRA layers are left alone: their extra arithmetic is not all under autocast."""

    def __init__(self, model: torch.nn.Module, device: str, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.enabled = dtype in (torch.bfloat16, torch.float16)
        self.layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")
                       and not getattr(m, "lora_variant", None)] if self.enabled else []

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        for layer in self.layers:
            layer.cast_input_dtype_enabled = False
        try:
            with torch.autocast(self.device, dtype=self.dtype):
                yield
        finally:
            for layer in self.layers:
                layer.cast_input_dtype_enabled = True


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off and no gradients for a look at the model before or between training, then its mode as it was:
    the probes and checks that run ahead of training must not leave it in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _chunkable(lm: torch.nn.Module) -> bool:
    """Models whose logits are plainly ``lm_head(hidden)``: the config keys of soft-capped or scaled logits
    (gemma, cohere, granite, falcon-h1) take the full path; ``check_chunking`` catches the ones not listed."""
    cfg = lm.config
    plain = all(getattr(cfg, k, None) in (None, 1.0) for k in LOGIT_TRANSFORMS)
    return plain and hasattr(lm, lm.base_model_prefix) and lm.get_output_embeddings() is not None


@dataclass
class Position:
    """Where training is: restored from a checkpoint, advanced by every step."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    losses: list[float] = field(default_factory=list)


@dataclass
class LoopSettings:
    device: str
    dtype: torch.dtype
    learning_rate: float
    total_steps: int
    checkpoint_every_steps: int
    checkpoint_every_minutes: float
    file_mode: int
    job_id: str
    fingerprint: str
    compile: bool = False
    share_root: Path | None = None  # checkpoints are written only where no link leads (spooler.paths.link_below)
    micro_tokens: int | None = None  # a step's rows go through in pieces of this many tokens; None: all at once


class Loop:
    """Trains ``model`` (the peft model) through ``step_module`` (the loss module, DDP-wrapped when world > 1)."""

    def __init__(self, model: torch.nn.Module, step_module: torch.nn.Module, batcher: Batcher, s: LoopSettings,
                 out_dir: Path, metrics: MetricsLog, report: Callable[[Progress], None],
                 should_stop: Callable[[], bool], dist: Dist | None = None) -> None:
        self.model, self.step_module, self.batcher, self.s = model, step_module, batcher, s
        self.out_dir, self.metrics, self.report, self.should_stop = out_dir, metrics, report, should_stop
        self.dist = dist or Dist()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=s.learning_rate, weight_decay=0.0,
                                           fused=s.device == "cuda")
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_decay(s.total_steps))
        self.precision = MixedPrecision(model, s.device, s.dtype)  # a CPU plan is fp32: no autocast there
        self.scaler = torch.amp.GradScaler(s.device, enabled=s.dtype == torch.float16)  # CPU plans are fp32
        self.pos = Position()
        self.compile_seconds: float | None = None
        self._skipped = 0

    # ── resume and checkpoint ───────────────────────────────────────────────────────────────────────────
    def resume(self, found: checkpoint.Found) -> None:
        """Continue exactly where ``found`` stopped: weights, optimizer, schedule, RNG and data position."""
        weights, optim, rng = checkpoint.load(found)
        trainable = dict(self._trainable())
        missing = set(trainable) - set(weights)
        if missing:
            raise RuntimeError(f"checkpoint {found.folder} lacks {len(missing)} trainable tensors "
                               f"(e.g. {sorted(missing)[0]}); it cannot continue this run")
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(weights[name].to(param.device, param.dtype))
        self.optimizer.load_state_dict(optim["optimizer"])
        self.schedule.load_state_dict(optim["schedule"])
        if optim.get("scaler"):
            self.scaler.load_state_dict(optim["scaler"])
        checkpoint.restore_rng(rng)
        st = found.state
        self.pos = Position(st.step, st.epoch, st.batch_in_epoch, st.tokens, st.padded_tokens,
                            list(st.recent_losses))
        log.info("job %s resumes at step %d of %d from %s", self.s.job_id, st.step, st.total_steps, found.folder)

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def save_checkpoint(self) -> Path | None:
        if not self.dist.main or self.pos.step == 0:
            return None
        state = CheckpointState(step=self.pos.step, total_steps=self.s.total_steps, epoch=self.pos.epoch,
                                batch_in_epoch=self.pos.batch_in_epoch, tokens=self.pos.tokens,
                                padded_tokens=self.pos.padded_tokens, world_size=self.dist.world,
                                fingerprint=self.s.fingerprint, recent_losses=self.pos.losses[-LAST_STEPS:],
                                written_by=self.out_dir.name)
        optim = {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
        if self.s.share_root is not None:  # a link planted mid-run would take this write, and the pruning, elsewhere
            refuse_links(self.s.share_root, self.out_dir / "checkpoints")
        folder = checkpoint.save(self.out_dir / "checkpoints", state, dict(self._trainable()), optim,
                                 self.s.file_mode)
        self.metrics.sync()
        log.info("job %s checkpoint at step %d: %s", self.s.job_id, self.pos.step, folder)
        return folder

    # ── evaluation ──────────────────────────────────────────────────────────────────────────────────────
    def evaluate(self, examples: list[Example], phase: str, batch_size: int, record: bool = True) -> float:
        """Mean loss per labelled token over ``examples``, with dropout off and no gradients."""
        self.step_module.eval()
        loss_sum, count = 0.0, 0
        with torch.no_grad(), uncompiled():
            for start in range(0, len(examples), batch_size):
                self._stop_if_asked(save=False)
                self.report(Progress(job=self.s.job_id, step=self.pos.step, phase=phase))  # alive, for horse.py
                loss, n = self._forward(collate_eval(examples[start:start + batch_size], self.batcher.pad_id))
                loss_sum, count = loss_sum + float(loss), count + int(n)
        self.step_module.train()
        mean = loss_sum / max(count, 1)
        if not math.isfinite(mean):
            if phase == "eval-before" and not self._fp16_hint():
                # The untouched base, in bf16 or fp32: its files are at fault (a rope_theta of 0, NaN weights),
                # and the person who put them there has to mend them (audit, proven: it ended "failed").
                raise Rejected("base_model", f"the model's loss on the eval rows is {mean} before any training: its "
                                             "weights or config.json give non-finite outputs (a rope_theta of 0? "
                                             "NaN weights?); copy the model again as save_pretrained wrote it")
            raise RuntimeError(f"the {phase} loss is {mean}: the model gives non-finite outputs{self._fp16_hint()}; "
                               "check the model files")
        if record:
            self.metrics.eval(self.pos.step, mean, phase.removeprefix("eval-"))
        return mean

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch.to(self.s.device)
        module = self.step_module if torch.is_grad_enabled() else _unwrapped(self.step_module)
        with self.precision():
            return module(b.input_ids, b.labels, b.attention_mask, b.position_ids)

    # ── training ────────────────────────────────────────────────────────────────────────────────────────
    def train(self) -> None:
        """Steps until ``total_steps``. Stops (Cancelled) with a checkpoint when asked."""
        self.step_module.train()
        started, start_tokens, start_step = time.monotonic(), self.pos.tokens, self.pos.step
        last_ckpt_step, last_ckpt_time = self.pos.step, time.monotonic()
        per_epoch = max(1, self.batcher.steps_per_epoch())
        while self.pos.step < self.s.total_steps:
            self._stop_if_asked(save=True)
            step_started = time.monotonic()
            loss, grad_norm, lr = self._one_step()
            if self.compile_seconds is None and self.s.compile:
                self.compile_seconds = round(time.monotonic() - step_started, 3)
                log.info("job %s first (compiling) step took %.1fs", self.s.job_id, self.compile_seconds)
            self.pos.losses = (self.pos.losses + [loss])[-LAST_STEPS:]
            elapsed = time.monotonic() - started
            rate = (self.pos.tokens - start_tokens) / elapsed if elapsed > 0 else None
            epoch = self.pos.epoch + self.pos.batch_in_epoch / per_epoch
            self.metrics.train(self.pos.step, loss, lr, round(epoch, 4), self.pos.tokens, rate, grad_norm)
            self._progress(loss, lr, epoch, rate, elapsed / (self.pos.step - start_step))
            due_steps = self.pos.step - last_ckpt_step >= self.s.checkpoint_every_steps
            due_time = time.monotonic() - last_ckpt_time >= 60 * self.s.checkpoint_every_minutes
            if (due_steps or due_time) and self.pos.step < self.s.total_steps:
                self.save_checkpoint()
                last_ckpt_step, last_ckpt_time = self.pos.step, time.monotonic()

    def _next_batch(self) -> Batch:
        plan = self.batcher.epoch_plan(self.pos.epoch)
        if self.pos.batch_in_epoch >= len(plan):
            self.pos.epoch, self.pos.batch_in_epoch = self.pos.epoch + 1, 0
            if not self.batcher.epoch_plan(self.pos.epoch):
                raise RuntimeError("an epoch has no full batch for every process; use fewer devices or a "
                                   "smaller training.batch_size")
        batch = self.batcher.batch(self.pos.epoch, self.pos.batch_in_epoch)
        self.pos.batch_in_epoch += 1
        return batch

    def _one_step(self) -> tuple[float, float, float]:
        """One optimizer step: (loss, grad norm, learning rate)."""
        batch = self._next_batch()
        lr = self.schedule.get_last_lr()[0]
        labelled = float((batch.labels[:, 1:] != IGNORE).sum())
        n_global, real, padded = self.dist.totals([labelled, batch.real_tokens, batch.padded_tokens], self.s.device)
        # Sum over this rank / the epoch's mean targets per step, times world to undo DDP's averaging.
        scale = self.dist.world / max(self.batcher.targets_per_step(self.pos.epoch), 1.0)
        loss_sum = self._forward_backward(batch.pieces(self.s.micro_tokens), scale)
        reported = self.dist.total(float(loss_sum), self.s.device) / max(n_global, 1.0)
        self._check_loss(reported, lr)  # before the optimizer step: a non-finite loss never reaches the weights
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP))
        self._check_grad_norm(grad_norm, lr)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.pos.step += 1
        self.pos.tokens += int(real)
        self.pos.padded_tokens += int(padded)
        return reported, grad_norm, lr

    def _forward_backward(self, pieces: list[Batch], scale: float) -> torch.Tensor:
        """Forward and backward over the step's pieces, gradients adding up; returns the summed token loss.
        DDP reduces the gradients once, in the last piece's backward."""
        total = torch.zeros((), device=self.s.device)
        no_sync = getattr(self.step_module, "no_sync", None)  # DDP's; a plain module has none
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                loss_sum, _ = self._forward(piece)
                self.scaler.scale(loss_sum * scale).backward()
            total += loss_sum.detach().float()
        return total

    def _check_loss(self, loss: float, lr: float) -> None:
        if not math.isfinite(loss):
            raise RuntimeError(f"the training loss became {loss} at step {self.pos.step + 1} (learning rate "
                               f"{lr:.3g}): training diverged; lower training.learning_rate{self._fp16_hint()}")

    def _check_grad_norm(self, norm: float, lr: float) -> None:
        """A non-finite gradient never trains on silently. In fp16 the scaler skips such a step and lowers its
        scale, which is normal now and then; many in a row mean the run is broken."""
        if math.isfinite(norm):
            self._skipped = 0
            return
        if self.scaler.is_enabled():
            self._skipped += 1
            if self._skipped < MAX_SKIPPED:
                return
        raise RuntimeError(f"the gradient norm became {norm} at step {self.pos.step + 1} (learning rate {lr:.3g}): "
                           f"training diverged; lower training.learning_rate{self._fp16_hint()}")

    def _fp16_hint(self) -> str:
        if self.s.dtype == torch.float16:
            return " (this GPU has no bf16, so the model runs in fp16, which overflows easily)"
        return ""

    def _stop_if_asked(self, save: bool) -> None:
        """Stop at a step boundary when asked (cancel, shutdown, lost claim), with a checkpoint first, so a
        shutdown of the worker (SIGTERM, service stop) costs no training."""
        if self.dist.agree(self.dist.main and self.should_stop(), self.s.device):
            if save:
                self.save_checkpoint()
            raise Cancelled()

    def _progress(self, loss: float, lr: float, epoch: float, rate: float | None, step_seconds: float) -> None:
        eta = step_seconds * (self.s.total_steps - self.pos.step)
        self.report(Progress(job=self.s.job_id, step=self.pos.step, total_steps=self.s.total_steps,
                             epoch=round(epoch, 4), loss=loss, learning_rate=lr, tokens_per_second=rate,
                             eta_seconds=eta, tokens=self.pos.tokens, padded_tokens=self.pos.padded_tokens,
                             phase="training"))


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The loss module without its DDP wrapper: evaluation needs no gradient sync."""
    return getattr(module, "module", module)


def warmup_decay(total: int) -> Callable[[int], float]:
    """Linear warmup over ~10% of the steps (at most MAX_WARMUP), then linear decay towards zero."""
    warmup = min(MAX_WARMUP, max(1, total // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor
