"""The torch side of one training attempt, in torchtune's recipe order: check (``prepare``), ``setup``, train
(``run_loop``, the loop itself is ``worker.loop``), save, verify.

Everything that can refuse a job runs before weights are read. Probes and the "before" evaluation run on the
untouched base, before a checkpoint is loaded, so they mean the same on a resumed attempt. Imported by
``worker.train`` in the training child (or a DDP rank) only; ``train_adapter`` is its entry point.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import os
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from schemas.heartbeat import Progress
from schemas.job import JobSpec, Quantization, TrainingSpec
from schemas.result import DataReport, Metrics, ProbeOutput
from spooler.atomic import chmod_tree, dir_mode_for, fsync_tree, makedirs
from spooler.errors import Cancelled, DeviceUnavailable, Rejected, brief
from spooler.paths import refuse_links
from worker import checkpoint, data, packedattn, tokencache
from worker.batching import Batcher, rows_per_piece
from worker.fused import lean_activations
from worker.loop import LAST_STEPS, CausalLMLoss, Dist, Loop, LoopSettings, uncompiled
from worker.modelguard import stored_weights
from worker.outputs import MetricsLog, TrainLog, plot_loss, read_metrics
from worker.packprobe import packing_problem
from worker.probes import check_prompts, generate_answers, pair, prompt_ids
from worker.train import TrainRequest, every_second

log = logging.getLogger(__name__)

# Everything this process reads is on the share: never let a library reach for the hub (set before the
# lazy transformers/peft imports below read it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# On CPU a step's rows go through forward and backward in pieces of about this many tokens, their gradients added
# up: the same step in a third of the memory. Measured on gpt2-small, 2 cores, glibc's default malloc (forward and
# backward of packed 512-token rows, masked SDPA): 1 row 157-181 tokens/s, 4 rows 174-187, 16 rows 127 at 21.8 GB
# peak RSS, against 6.7 GB at 4. Past a few thousand tokens the activations outgrow the caches.
CPU_MICRO_TOKENS = 2048


@dataclass
class Plan:
    """How the model is loaded on this worker, after what the job asked for meets what the device can do."""

    device: str
    dtype: torch.dtype
    quantization: Quantization
    notes: list[str]
    memory_cap: int | None = None  # bytes of the GPU this process may use (the worker's gpu_memory_gib)


@dataclass
class Trained:
    """What one attempt produced, for ``worker.train`` to hash and report."""

    metrics: Metrics
    adapter_dir: Path
    notes: list[str]
    data: DataReport
    resumed_from_step: int | None
    probes: list[ProbeOutput] = field(default_factory=list)
    quantization: str = "none"


def train_adapter(req: TrainRequest, report: Callable[[Progress], None], should_stop: Callable[[], bool],
                  dist: Dist | None = None) -> Trained | None:
    """Everything after the folder checks. Returns None on DDP ranks other than 0, which write nothing."""
    dist = dist or Dist()
    plan, tokenizer, splits = prepare(req, report, dist.main)
    refuse_links(req.share_root, req.out_dir)  # before makedirs, which would follow one
    makedirs(req.out_dir, dir_mode_for(req.file_mode))  # the attempt's folder, kept even if it dies
    refuse_links(req.share_root, req.out_dir)
    fp = _with_parent(checkpoint.fingerprint(req.job, splits.report.sha256, dist.world), req.job.parent)
    found = checkpoint.latest(req.out_dir.parent.parent, fp)
    _stop_if(should_stop)
    with TrainLog(req.out_dir, file_mode=req.file_mode) if dist.main else contextlib.nullcontext():
        model, loop = setup(req, plan, tokenizer, splits, report, should_stop, dist, fp)
        base_answers = _answers(model, tokenizer, req.job.probes, plan, dist)
        metrics = run_loop(loop, splits, req.job.training, found)
        adapted_answers = _answers(model, tokenizer, req.job.probes, plan, dist)
        if not dist.main:
            return None
        plot_loss(read_metrics(loop.metrics.path), req.out_dir / "loss.png", f"{req.job.id}: loss",
                  req.file_mode)
        adapter_dir = save_adapter(model, req, loop.s.job_id, report)
        sample = torch.tensor([splits.eval[0].input_ids[:32]], dtype=torch.long)
        expected = _logits(model, sample, plan) if _exact(plan) else None
        del model, loop  # the only references: the fresh base for the load test may not fit beside it
        _free(plan)
        report(Progress(job=req.job.id or "job", phase="verifying"))
        verify_adapter(req.model_dir, adapter_dir, plan, sample, expected)
    return Trained(metrics, adapter_dir, plan.notes + splits.notes, splits.report,
                   found.state.step if found else None, pair(req.job.probes, base_answers, adapted_answers),
                   plan.quantization.value)


def _with_parent(fp: str, parent: str | None) -> str:
    """A run continued from a parent adapter starts from other weights: its checkpoints are its own."""
    if parent is None:
        return fp
    import hashlib

    return hashlib.sha256(f"{fp}\0parent={parent}".encode()).hexdigest()


def setup(req: TrainRequest, plan: Plan, tokenizer: Any, splits: data.Splits, report: Callable[[Progress], None],
          should_stop: Callable[[], bool], dist: Dist, fp: str) -> tuple[torch.nn.Module, Loop]:
    """Load the base, wrap it with LoRA, and build the loop around it (batches, loss, optimizer, metrics)."""
    t = req.job.training
    report(Progress(job=req.job.id or "job", phase="loading"))  # silent for minutes on a big base: no stall timer
    model = load_model(req.model_dir, plan)
    packed = _packs(t, plan, model)
    if packed:
        packedattn.use_for_packed_rows(model)
    pad = data.pad_id_of(tokenizer, data.embedding_rows(model))
    batcher = Batcher(splits.train, t.batch_size, t.max_length, pad, t.seed, packed, dist.world, dist.rank)
    row = t.max_length if packed else max(len(e.input_ids) for e in splits.train)
    micro = CPU_MICRO_TOKENS if plan.device == "cpu" else None
    tokens_per_forward = rows_per_piece(micro, row, t.batch_size) * row
    recompute = wants_checkpointing(t.gradient_checkpointing, plan, model, tokens_per_forward)
    model = add_lora(model, req.job, plan, recompute, req.parent_dir)
    if not (t.compile and plan.device == "cuda"):  # compile chooses what to keep for backward itself
        log.info("lean activations: %s", lean_activations(model, plan.device, plan.dtype))
    step_module = CausalLMLoss(model, chunked=True)
    tokens = [tok for e in splits.train[:8] for tok in e.input_ids][:32]  # a real text, long enough to compare
    sample = torch.tensor([tokens], dtype=torch.long, device=plan.device)
    with _autocast(plan):  # the fp32 copies of modules_to_save meet bf16 activations only under autocast
        if problem := step_module.check_chunking(sample):
            plan.notes.append(problem)
        loss_kernel, refused = step_module.choose_fused(sample, plan.device)
        attention, refused_attention = step_module.choose_attention(sample, plan.device, row)
    plan.notes.extend(n for n in (refused, refused_attention) if n)
    log.info("LM head loss: %s; packed attention: %s", loss_kernel, attention)
    compiled = _compile(step_module, model, plan) if t.compile else False
    if dist.world > 1:
        step_module = _ddp(step_module, plan)
    total = t.max_steps or max(1, math.ceil(t.epochs * batcher.steps_per_epoch()))
    settings = LoopSettings(plan.device, plan.dtype, t.learning_rate, total, t.checkpoint_every_steps,
                            t.checkpoint_every_minutes, req.file_mode, req.job.id or "job", fp, compiled,
                            req.share_root, micro)
    metrics_log = MetricsLog(req.out_dir / "metrics.jsonl", req.file_mode) if dist.main else _NoMetrics()
    loop = Loop(model, step_module, batcher, settings, req.out_dir, metrics_log, report, should_stop, dist)
    if plan.device == "cuda":
        plan.notes.append(f"gradient checkpointing {'on' if recompute else 'off'}, "
                          f"{f'packed batches with {attention}' if packed else 'padded batches'}, "
                          f"LM head loss: {loss_kernel}")
        log.info("plan: %s", plan.notes[-1])
    return model, loop


def _packs(t: TrainingSpec, plan: Plan, model: torch.nn.Module) -> bool:
    """Packing unless the job says false or the model lets packed rows see each other (then a note: it would
    train each row on text that is not its own). On CPU too, measured against length-grouped padded batches of
    about as many tokens a step: on gpt2-small 132 real tokens/s at 4.3 GiB against 98 at 12.9 GiB (on tiny the
    two are level, within run-to-run noise), and in the quality benchmark 101% of the tuned Trainer's gain
    against 91%. And a job then takes the same steps on the GPU worker and on its CPU fallback."""
    if t.packing is False:
        return False
    if problem := packing_problem(model):
        plan.notes.append(f"padded batches instead of packed: {problem}")
        log.warning("packing off: %s", problem)
        return False
    return True


def run_loop(loop: Loop, splits: data.Splits, t: TrainingSpec, found: checkpoint.Found | None) -> Metrics:
    """Eval before (on the untouched base), resume if a checkpoint exists, train, eval after."""
    eval_batch = max(1, t.batch_size)
    # The history up to the checkpoint, with its own "before", comes first. Without a checkpoint the file starts
    # empty: a run of this attempt killed before its first checkpoint left steps that are about to be trained again.
    previous = found.folder.parent.parent / "metrics.jsonl" if found is not None else None
    loop.metrics.start_from(previous, found.state.step if found is not None else 0)
    before = loop.evaluate(splits.eval, "eval-before", eval_batch, record=found is None)
    if found is not None:
        loop.resume(found)
    loop.train()
    after = loop.evaluate(splits.eval, "eval-after", eval_batch)
    loop.metrics.close()
    tail = loop.pos.losses[-LAST_STEPS:] or [float("nan")]
    return Metrics(train_loss=sum(tail) / len(tail), eval_loss_before=before, eval_loss_after=after,
                   eval_perplexity_before=_perplexity(before), eval_perplexity_after=_perplexity(after),
                   tokens=loop.pos.tokens, padded_tokens=loop.pos.padded_tokens, steps=loop.pos.step,
                   compile_seconds=loop.compile_seconds)


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709; a loss that high means "no better than noise"


def _answers(model: torch.nn.Module, tokenizer: Any, prompts: list[str], plan: Plan, dist: Dist) -> list[str]:
    if not prompts or not dist.main:
        return []
    with _autocast(plan), uncompiled():
        return generate_answers(model, tokenizer, prompts, plan.device)


class _NoMetrics(MetricsLog):
    """DDP ranks other than 0 keep no metrics file: rank 0's holds the global numbers."""

    def __init__(self) -> None:
        self.path = Path("/nonexistent")

    def train(self, *args: Any, **kwargs: Any) -> None: ...
    def eval(self, *args: Any, **kwargs: Any) -> None: ...
    def start_from(self, previous: Path | None, upto_step: int) -> int: return 0
    def sync(self) -> None: ...
    def close(self) -> None: ...


def _compile(step_module: CausalLMLoss, model: torch.nn.Module, plan: Plan) -> bool:
    """torch.compile the transformer body in place (state-dict names unchanged); the compile itself happens in
    the first step, which the loop times as ``compile_seconds``. CUDA only: on CPU it costs minutes of compile
    for little gain, so the setting is ignored there, with a note. Whether it compiled: a job that did not
    reports no compile time."""
    if plan.device != "cuda":
        plan.notes.append("training.compile is for cuda; ignored on CPU")
        return False
    body = step_module._body if step_module.chunked else model.get_base_model()
    body.compile()
    return True


def _ddp(module: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.cuda.current_device()] if plan.device == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False)


def wants_checkpointing(setting: bool | str, plan: Plan, model: torch.nn.Module, tokens_per_step: int) -> bool:
    """Recompute activations only when the memory estimate says they would not fit: it costs ~30% of the
    speed, so it is chosen by arithmetic, not habit. Per token and layer a decoder keeps about 8 hidden-sized
    and 4 MLP-sized activations (bf16), counted with a 1.5x margin against 80% of the memory left free."""
    if isinstance(setting, bool):
        return setting
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", 0) or 0
    inner = getattr(cfg, "intermediate_size", None) or 4 * hidden
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    per_token = (8 * hidden + 4 * inner) * layers * (4 if plan.dtype == torch.float32 else 2)
    need = 1.5 * per_token * tokens_per_step
    free = _free_bytes(plan)
    if need > 0.8 * free:
        log.info("gradient checkpointing on: activations need ~%.1f GiB, %.1f GiB free", need / 2**30, free / 2**30)
        return True
    return False


def _free_bytes(plan: Plan) -> float:
    if plan.device == "cuda":  # the driver's free memory, plus what torch's allocator holds but does not use
        allocated = torch.cuda.memory_allocated()
        free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - allocated
        return float(free if plan.memory_cap is None else min(free, plan.memory_cap - allocated))
    import psutil

    return float(psutil.virtual_memory().available)


def prepare(req: TrainRequest, report: Callable[[Progress], None] = lambda p: None, main: bool = True
            ) -> tuple[Plan, Any, data.Splits]:
    """Everything that can refuse the job short of reading weights: the tokenizer, every dataset row, the
    target module names (against the model's structure, built without weights). ``main``: the process that
    writes (the only one, or DDP's rank 0)."""
    quiet_libraries()
    t = req.job.training
    _seed_everything(t.seed)
    plan = plan_for(req.job.quantization, req.device, req.cpu_quantization)
    plan.memory_cap = cap_gpu_memory(plan, req.gpu_memory_gib)
    check_targets(req.model_dir, req.job.lora.target_modules, req.job.lora.modules_to_save)  # first: reads config
    tokenizer = load_tokenizer(req.model_dir)
    cache = tokencache.for_dataset(req.share_root, data.file_labels(req.datasets), tokenizer, req.file_mode,
                                   write=main)
    splits = data.load_splits(req.datasets, tokenizer, t, every_second(report, req.job.id or "job", "preparing"),
                              cache)
    splits.report.files = [str(p.relative_to(req.share_root)) if p.is_relative_to(req.share_root) else p.name
                           for p in req.datasets]
    check_vocab(req.model_dir, tokenizer, req.job, splits)
    if note := check_lengths(req.model_dir, tokenizer, req.job, splits):
        splits.notes.append(note)
    return plan, tokenizer, splits


def check_vocab(model_dir: Path, tokenizer: Any, job: JobSpec, splits: data.Splits) -> None:
    """Every token id the job feeds the model must be a row of its embedding, checked before the load: a
    tokenizer with added tokens the model was never resized for ends in an IndexError (a device-side assert on
    CUDA). A probe is the job's own text, so it is named; the rows come from the dataset and the tokenizer."""
    rows = data.embedding_rows(meta_model(model_dir))
    top = max(max(e.input_ids) for e in splits.train + splits.eval)
    if top >= rows:
        raise Rejected("base_model", f"its tokenizer gives token id {top} but the model's embedding has {rows} "
                                     "rows: the tokenizer does not belong to this model")
    for i, prompt in enumerate(job.probes):
        if (top := max(prompt_ids(tokenizer, prompt), default=0)) >= rows:
            raise Rejected(f"probes.{i}", f"gives token id {top} (a token added to the tokenizer?) but the model's "
                                          f"embedding has {rows} rows: take that token out of the probe")


def cap_gpu_memory(plan: Plan, gib: float | None) -> int | None:
    """Hold this process to the worker's ``gpu_memory_gib`` before anything is loaded: past it PyTorch's
    allocator raises the OOM a result names, and ``wants_checkpointing`` plans for the cap as it would for a card
    of that size. The desktop's owner keeps the rest; a benchmark on a big GPU measures a small card's choices."""
    if gib is None or plan.device != "cuda":
        return None
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    cap = min(int(gib * 2**30), total)
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    plan.notes.append(f"GPU memory held to {cap / 2**30:.3g} of {total / 2**30:.3g} GiB (the worker's gpu_memory_gib)")
    log.info("plan: %s", plan.notes[-1])
    return cap


def _stop_if(should_stop: Callable[[], bool]) -> None:
    if should_stop():
        raise Cancelled()


def quiet_libraries() -> None:
    """Keep the worker log for things a person must act on: progress goes to the heartbeat, not tqdm bars;
    bitsandbytes' CPU-kernel notice, its 8-bit matmul's "inputs will be cast to float16" (one line per layer per
    step, the design of LLM.int8()) and peft's use of a deprecated transformers name are not actionable."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for chatty in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ── what to load, and how ────────────────────────────────────────────────────────────────────────────────
def plan_for(quantization: Quantization, device: str, cpu_quantization: str = "plain") -> Plan:
    """fp32 on CPU; bf16 on a GPU that has it, else fp16 (LoRA weights stay fp32 either way).
    On CPU a 4bit/8bit job trains as plain LoRA, and says so, unless the worker was set to keep the quantization
    (``cpu_quantization = "bitsandbytes"``) and this bitsandbytes has CPU kernels."""
    if device != "cuda":
        notes = []
        if quantization is not Quantization.none:
            problem = _cpu_bitsandbytes_problem(quantization) if cpu_quantization == "bitsandbytes" else None
            if cpu_quantization == "bitsandbytes" and problem is None:
                return Plan("cpu", torch.float32, quantization,
                            [f"quantization {quantization.value} on CPU, with bitsandbytes' CPU kernels"])
            notes.append(f"quantization {quantization.value} asked for, but this worker runs on CPU: "
                         "trained as plain LoRA in fp32" + (f" ({problem})" if problem else ""))
        return Plan("cpu", torch.float32, Quantization.none, notes)
    if not torch.cuda.is_available():
        raise DeviceUnavailable("this worker was told to use cuda, but torch sees no CUDA GPU (driver, or a CPU-only "
                                "torch build); start the worker with --device cpu or fix the GPU setup")
    # Not the emulated kind: torch "supports" bf16 on any GPU that can hold the dtype, and on a Turing or Volta
    # card (an RTX 2080 Ti, a T4) it has no tensor cores and no fused attention; fp16 with a GradScaler has both.
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return Plan("cuda", dtype, quantization, [])


def _cpu_bitsandbytes_problem(quantization: Quantization) -> str | None:
    """Why bitsandbytes cannot quantize on this CPU, or None. Older releases had CUDA kernels only: try the very
    operation a load would do, on a few numbers, rather than trust a version number."""
    try:
        import bitsandbytes.functional as bnb_f

        sample = torch.randn(64, 64)
        if quantization is Quantization.bit4:
            bnb_f.quantize_4bit(sample, quant_type="nf4")
        else:
            bnb_f.int8_vectorwise_quant(sample.half())
    except Exception as e:  # noqa: BLE001 - any failure means: no CPU kernels here; the job still trains
        return f"bitsandbytes cannot quantize on this CPU: {type(e).__name__}: {str(e)[:200]}"
    return None


def load_tokenizer(model_dir: Path) -> Any:
    """The model folder's own tokenizer; never code shipped with it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever the folder's files make the libraries raise is theirs
        raise Rejected("base_model", f"its tokenizer does not load ({brief(e)}); save the tokenizer "
                                     "into the model folder with tokenizer.save_pretrained") from e


def meta_model(model_dir: Path) -> torch.nn.Module:
    """The model's structure with no weights (on the meta device): module names in a second, not a load. Built
    once per config.json for a job's checks, its load and its verification: seconds each on an 8B model."""
    try:
        config_json = (Path(model_dir) / "config.json").read_bytes()
        return _meta_model(str(model_dir), config_json)
    except Exception as e:  # noqa: BLE001 - config checks raise their own kinds (huggingface_hub's, asserts)
        raise Rejected("base_model", f"is not a causal language model this transformers version can build "
                                     f"({brief(e)})") from e


@functools.lru_cache(maxsize=2)
def _meta_model(model_dir: str, config_json: bytes) -> torch.nn.Module:
    """Keyed by the config's bytes too: a folder whose config.json was replaced is built again. Nobody changes
    the result: it is read for names, shapes and sizes only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def model_context(config: Any) -> int | None:
    """The longest sequence the model was built for, when its config says."""
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    return context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None


def _learned_positions(model: torch.nn.Module, context: int) -> bool:
    """Whether the model looks positions up in a table of ``context`` rows (GPT-2's wpe; OPT's has 2 more)."""
    words = model.get_input_embeddings()
    return any(isinstance(m, torch.nn.Embedding) and m is not words and context <= m.num_embeddings <= context + 2
               for m in model.modules())


def check_lengths(model_dir: Path, tokenizer: Any, job: JobSpec, splits: data.Splits) -> str | None:
    """Refuse rows and probes past a learned position table: there GPT-2 and its kind end in an IndexError deep
    inside a step or a generate, after the load. Rows are cut to max_length and packing starts the positions
    again at each row, so the longest row counts, not max_length. Rotary and ALiBi models have no such end; past
    max_position_embeddings they run on positions they never learned, which the returned note says."""
    structure = meta_model(model_dir)
    context = model_context(structure.config)
    if context is None:
        return None
    longest = max((len(e.input_ids) for e in (*splits.train, *splits.eval)), default=0)
    if not _learned_positions(structure, context):
        return None if longest <= context else (
            f"rows of up to {longest} tokens, past this model's max_position_embeddings of {context}: it trains on "
            "positions it was not pretrained on")
    if longest > context:
        raise Rejected("training.max_length", f"rows of up to {longest} tokens pass this model's {context} learned "
                                              "positions (max_position_embeddings in config.json); set "
                                              f"training.max_length to {context} or less")
    check_prompts(tokenizer, job.probes, context)
    return None


def check_parameters(model_dir: Path) -> None:
    """Refuse a config.json that describes a bigger model than its weights: each size may fit (the config check
    bounds them one by one) while together they do not, a thousand experts where the files hold eight, say.
    transformers would fill the missing parameters with random numbers, or be killed trying to allocate them.
    Built on the meta device, the model counts its parameters in a fraction of a second."""
    stored = stored_weights(model_dir)
    if not stored.parameters:
        return  # shards without an index: nothing is known, and the loader says what is wrong
    # Pre-quantized weights pack 2 to 16 values per stored number, by a scheme only their loader knows: they are
    # bounded by bits instead, one parameter per bit of the files at most (a 1-bit scheme), never left unbounded.
    quantized = "quantization_config" in json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    held = stored.size_bytes * 8 if quantized else stored.parameters
    wanted = sum(p.numel() for p in meta_model(model_dir).parameters())  # tied weights count once
    if wanted > held * 1.01 + 2**20:
        raise Rejected("base_model", f"config.json describes a model of {wanted:,} parameters, but the weight files "
                                     f"hold {held:,}: this config.json does not belong to these weights; copy the "
                                     "model's own config.json")


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


def check_targets(model_dir: Path, targets: list[str] | str, saved: list[str] | None = None) -> None:
    """Refuse unknown ``lora.target_modules`` and ``lora.modules_to_save`` before any weights are read."""
    if targets != "all-linear" and (problem := target_problem(meta_model(model_dir), list(targets))):
        raise Rejected("lora.target_modules", problem)
    if saved and (problem := saved_problem(meta_model(model_dir), saved)):
        raise Rejected("lora.modules_to_save", problem)


def saved_problem(model: torch.nn.Module, saved: list[str]) -> str | None:
    """Why ``saved`` cannot be trained in full beside LoRA (peft wraps every module whose name ends with one), or
    None. A name nothing matched trained nothing extra, silently; a container (a ModuleList of layers) ended the
    job failed inside peft (audit, proven)."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules if not any(m.children())})
    for name in saved:
        hits = [m for n, m in modules if n.endswith(name)]
        if not hits:
            return f"unknown module {name!r}; this model's modules end in: {', '.join(leaves)}"
        if kind := next((type(m).__name__ for m in hits if isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict))),
                        None):
            return (f"{name!r} is a {kind}, a list of modules, which peft cannot train whole; name a module "
                    f"such as lm_head or embed_tokens ({', '.join(leaves)})")
    return None


def _quantization_config(plan: Plan) -> Any:
    from transformers import BitsAndBytesConfig

    if plan.quantization is Quantization.bit4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=plan.dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(model_dir: Path, plan: Plan) -> torch.nn.Module:
    """Load the base weights: safetensors only, no remote code, on the plan's device and dtype."""
    from transformers import AutoModelForCausalLM

    check_parameters(model_dir)
    kwargs: dict[str, Any] = {"dtype": plan.dtype, "use_safetensors": True, "trust_remote_code": False}
    if plan.device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if plan.quantization is not Quantization.none:
        kwargs["quantization_config"] = _quantization_config(plan)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (ImportError, ValueError, RuntimeError, AssertionError) as e:
        if (problem := _load_refusal(model_dir, e)) is None:
            raise
        raise Rejected("base_model", problem) from None
    model.config.use_cache = False  # the KV cache only costs memory in training
    return model


def _load_refusal(model_dir: Path, e: BaseException) -> str | None:
    """A load that fails for the folder's own sake, said as input to fix; None for anything else, which stays a
    failure (a worker fault must not use up a job's id). Weights of other shapes than config.json gives, and a
    pre-quantized model whose scheme needs a library this worker lacks (GPTQ wants optimum), ended the job
    failed (audit, proven)."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    if "size mismatch" in str(e) or "ignore_mismatched_sizes" in str(e):
        return (f"its weights do not fit its config.json ({first}): copy the model's own config.json and "
                "weights again")
    quant = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    if isinstance(e, ImportError) and isinstance(quant, dict):
        method = str(quant.get("quant_method", "unknown"))[:40]
        return (f"config.json says it is pre-quantized ({method}), and this worker has no library to load it "
                f"({first}): point base_model at the model's full-precision weights, and set quantization: 4bit "
                "in the job to train QLoRA")
    return None


def add_lora(model: torch.nn.Module, job: JobSpec, plan: Plan, recompute: bool,
             parent_dir: Path | None = None) -> torch.nn.Module:
    """Wrap ``model`` with trainable LoRA (or DoRA) layers, kept in fp32 by peft's autocast_adapter_dtype; with
    ``parent_dir``, the parent adapter's own layers and weights, trainable, so training continues from it."""
    from peft import LoraConfig, PeftModel, get_peft_model

    # Not peft's prepare_model_for_kbit_training on a quantized base: it casts every weight bitsandbytes left
    # unquantized (embeddings, lm_head, norms) to fp32, ~2 GB more on an 8B model and a residual stream in fp32.
    # Frozen weights need no fp32 (the norms compute in fp32 inside), and peft freezes the base itself.
    ckpt_kwargs = {"use_reentrant": False}  # reentrant checkpointing needs inputs that require grad; LoRA has none
    if recompute:
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.x; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    lora = job.lora
    if parent_dir is not None:
        model = PeftModel.from_pretrained(model, parent_dir, is_trainable=True)
        _note_parent_shape(model.peft_config["default"], job, plan)
    else:
        config = LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, use_dora=lora.use_dora,
                            modules_to_save=lora.modules_to_save, bias="none")
        model = get_peft_model(model, config)
    if plan.dtype == torch.float16:
        _trainable_in_fp32(model)
    if recompute:
        _drop_input_grad_hooks(model)
    # An absolute path on this worker's mount means nothing elsewhere: record the share-relative one.
    model.peft_config["default"].base_model_name_or_path = job.base_model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s r=%d on %s: %d trainable parameters", "DoRA" if lora.use_dora else "LoRA", lora.r,
             lora.target_modules, trainable)
    return model


def _trainable_in_fp32(model: torch.nn.Module) -> None:
    """peft keeps LoRA weights in fp32, but the full copies of ``lora.modules_to_save`` in the base's dtype, and
    in fp16 the GradScaler refuses to unscale fp16 gradients. Autocast casts them for the forward pass. Only for
    fp16: in bf16 they train (updates below half a bf16 step are lost), and fp32 copies of an 8B model's
    lm_head and embeddings would cost 8 GB more memory and twice the adapter's size."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _drop_input_grad_hooks(model: torch.nn.Module) -> None:
    """transformers' checkpointing and peft each hook the input embeddings to make their output require grad,
    which only reentrant checkpointing needs; ours is not (the gradients are the same without). Under
    torch.compile that requires_grad_() on an intermediate makes dynamo give up the whole body: the job would
    train eager while reporting a compile. The hooks are plain forward hooks, found by their functions' names."""
    embeddings = model.get_input_embeddings()
    for key, hook in list(embeddings._forward_hooks.items()):
        if getattr(hook, "__name__", "") in ("make_inputs_require_grads", "make_inputs_require_grad"):
            del embeddings._forward_hooks[key]


def _note_parent_shape(config: Any, job: JobSpec, plan: Plan) -> None:
    """A continued adapter keeps its parent's shape; say so when the job asked for another."""
    targets = sorted(config.target_modules) if isinstance(config.target_modules, set | list) else config.target_modules
    asked = job.lora.target_modules if isinstance(job.lora.target_modules, str) else sorted(job.lora.target_modules)
    if (config.r, float(config.lora_alpha), targets) != (job.lora.r, float(job.lora.alpha), asked):
        plan.notes.append(f"continued from {job.parent}: its LoRA shape (r={config.r}, alpha={config.lora_alpha}, "
                          f"target_modules={targets}) is kept; the job's lora settings were not used")


# ── saving and checking the adapter ──────────────────────────────────────────────────────────────────────
def save_adapter(model: torch.nn.Module, req: TrainRequest, job_id: str,
                 report: Callable[[Progress], None]) -> Path:
    """Write the adapter (safetensors + adapter_config.json) to ``out_dir/adapter``, readable by the share."""
    report(Progress(job=job_id, phase="saving"))
    adapter_dir = req.out_dir / "adapter"
    refuse_links(req.share_root, adapter_dir)  # the rmtree below, and the save, go nowhere else
    if adapter_dir.exists():  # left by an earlier try of this very attempt: never mix two adapters' files
        shutil.rmtree(adapter_dir)
    # The vocabulary is never resized, so no full embedding copies: and "auto" would look the base up on the hub.
    model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=False)
    chmod_tree(adapter_dir, req.file_mode)
    fsync_tree(adapter_dir)
    return adapter_dir


def _autocast(plan: Plan) -> Any:
    return torch.autocast(plan.device, dtype=plan.dtype, enabled=plan.dtype != torch.float32)


def _exact(plan: Plan) -> bool:
    """Only fp32 without quantization reproduces logits closely enough to compare after a reload."""
    return plan.dtype == torch.float32 and plan.quantization is Quantization.none


def _logits(model: torch.nn.Module, sample: torch.Tensor, plan: Plan) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), _autocast(plan), uncompiled():
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
