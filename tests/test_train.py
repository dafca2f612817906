"""The training slice on a tiny real model, on CPU: it learns, saves a loadable share-readable adapter, and
refuses bad models, bad datasets and bad module names by field before loading any weights."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from schemas.heartbeat import Progress
from schemas.job import JobSpec
from spooler.atomic import dir_mode_for
from spooler.errors import Cancelled, Rejected
from spooler.paths import PlantedLink
from worker import data
from worker.modelguard import check_dataset_file, check_model_dir
from worker.outputs import read_metrics
from worker.tinymodel import write_dataset
from worker.train import TrainOutcome, TrainRequest, run_training
from worker.verify import hash_folder

MODE = 0o664


@pytest.fixture(scope="module")
def share_root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A share holding the tiny model, copied in as a person would, and one dataset of each shape."""
    root = tmp_path_factory.mktemp("train-share")
    shutil.copytree(tiny_model_dir, root / "models" / "tiny")
    for shape in ("alpaca", "chat", "text"):
        write_dataset(root / "datasets" / f"{shape}.jsonl", shape, rows=64)
    return root


def make_job(job_id: str = "t1", *, dataset: str = "datasets/alpaca.jsonl", model: str = "models/tiny",
             targets: Any = ("q_proj", "v_proj"), quantization: str = "none", **training: Any) -> JobSpec:
    settings = {"max_steps": 40, "batch_size": 8, "learning_rate": 3e-3, "max_length": 64, **training}
    return JobSpec(id=job_id, kind="train", base_model=model, dataset=dataset, quantization=quantization,
                   lora={"r": 8, "alpha": 16, "dropout": 0.0,
                         "target_modules": targets if isinstance(targets, str) else list(targets)},
                   training=settings)


def request(root: Path, job: JobSpec) -> TrainRequest:
    assert job.base_model and job.dataset and job.id
    return TrainRequest(job=job, model_dir=root / job.base_model, datasets=[root / d for d in job.dataset_files()],
                        share_root=root, out_dir=root / "results" / job.id / "attempts" / "a1-w", device="cpu",
                        file_mode=MODE)


def train(root: Path, job: JobSpec, reports: list[Progress] | None = None,
          should_stop: Any = lambda: False) -> TrainOutcome:
    return run_training(request(root, job), (reports if reports is not None else []).append, should_stop)


@pytest.fixture(scope="module")
def alpaca_outcome(share_root: Path) -> tuple[TrainOutcome, list[Progress]]:
    reports: list[Progress] = []
    return train(share_root, make_job("alpaca"), reports), reports


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to read config, tokenizer or weights fails the test: refusals must come first."""
    import transformers

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model file was loaded before the input was checked")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", boom)


# ── it learns ────────────────────────────────────────────────────────────────────────────────────────────
def test_alpaca_learns_and_reports(alpaca_outcome: tuple[TrainOutcome, list[Progress]]) -> None:
    outcome, reports = alpaca_outcome
    m = outcome.metrics
    assert m.eval_loss_after < m.eval_loss_before, m
    assert m.steps == 40 and m.tokens and m.tokens > 0 and m.seconds and m.seconds > 0
    assert m.train_loss is not None and math.isfinite(m.train_loss)
    phases = list(dict.fromkeys(p.phase for p in reports))
    assert phases == ["loading", "preparing", "eval-before", "training", "eval-after", "saving", "verifying"]
    steps = [p for p in reports if p.phase == "training"]
    assert [p.step for p in steps] == list(range(1, 41)) and steps[-1].total_steps == 40
    assert all(p.job == "alpaca" and p.loss is not None and p.learning_rate is not None for p in steps)
    assert steps[-1].eta_seconds == 0 and steps[-1].tokens_per_second and steps[-1].tokens_per_second > 0
    assert outcome.notes == []


def test_copying_the_base_to_the_cache_reports_progress(share_root: Path, tmp_path: Path) -> None:
    """A large base copies for minutes before "loading": the worker must hear from it (stall_minutes)."""
    reports: list[Progress] = []
    req = request(share_root, make_job("copied", max_steps=2))
    req.cache_dir = tmp_path / "cache"
    run_training(req, reports.append, lambda: False)
    assert [p.phase for p in reports][:2] == ["copying", "loading"]
    assert any((tmp_path / "cache").rglob("model.safetensors")), "the job trained from the local copy"


@pytest.mark.parametrize("shape", ["chat", "text"])
def test_other_shapes_learn(share_root: Path, shape: str) -> None:
    outcome = train(share_root, make_job(f"learn-{shape}", dataset=f"datasets/{shape}.jsonl"))
    assert outcome.metrics.eval_loss_after < outcome.metrics.eval_loss_before, outcome.metrics


def test_prompt_completion_rows_learn(share_root: Path) -> None:
    rows = [json.loads(line) for line in (share_root / "datasets" / "alpaca.jsonl").read_text().splitlines()]
    path = share_root / "datasets" / "completion.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["instruction"] + "\n", "completion": r["output"]}) + "\n"
                            for r in rows))
    outcome = train(share_root, make_job("learn-completion", dataset="datasets/completion.jsonl"))
    assert outcome.metrics.eval_loss_after < outcome.metrics.eval_loss_before, outcome.metrics
    assert outcome.data is not None and outcome.data.files == ["datasets/completion.jsonl"]


def test_dora_with_modules_to_save_trains_and_loads(share_root: Path) -> None:
    """use_dora and modules_to_save reach peft: DoRA magnitudes and a full lm_head copy are saved and load back."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    job = make_job("dora", max_steps=10)
    job.lora.use_dora, job.lora.modules_to_save = True, ["lm_head"]
    outcome = train(share_root, job)
    assert outcome.metrics.eval_loss_after < outcome.metrics.eval_loss_before, outcome.metrics
    with safe_open(str(outcome.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("lora_magnitude_vector" in k for k in keys), keys
    assert any("lm_head" in k for k in keys), keys
    config = json.loads((outcome.adapter_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["modules_to_save"] == ["lm_head"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(share_root / "models" / "tiny"),
                              outcome.adapter_dir)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_packed_rows_learn_unless_the_model_would_mix_them(share_root: Path, arch: str) -> None:
    """packing: true on a model that keeps packed rows apart: full max_length sequences, and it learns. OPT lets
    packed rows attend to each other, so the same job trains length-grouped padded batches and says why."""
    from worker.tinymodel import build_tiny_model

    model = "models/tiny" if arch == "llama" else f"models/tiny-{arch}"
    if arch != "llama":
        build_tiny_model(share_root / model, arch=arch)
    outcome = train(share_root, make_job(f"packed-{arch}", model=model, packing=True, max_steps=20))
    m = outcome.metrics
    assert m.eval_loss_after < m.eval_loss_before, m
    assert m.padded_tokens is not None and m.tokens is not None
    fallback = [n for n in outcome.notes if n.startswith("padded batches instead of packed")]
    if arch == "llama":
        assert fallback == [] and m.padded_tokens % 64 == 0 and m.tokens / m.padded_tokens > 0.9, m
    else:
        assert len(fallback) == 1 and "OPTForCausalLM lets a packed row attend" in fallback[0], outcome.notes


@pytest.mark.parametrize("arch", ["llama", "granite"])
def test_the_chunked_loss_is_the_models_own_or_is_not_used(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Granite divides its logits by logits_scaling, so lm_head(hidden) is not its logits. Known by config, it
    never chunks; with that key forgotten (as for a model whose transform no one has listed yet), the check
    before training catches the difference and takes the full path. Llama's chunked loss is its own."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker import loop

    config = AutoConfig.for_model(arch, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  **({"logits_scaling": 8.0} if arch == "granite" else {}))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(0, 256, (1, 32))
    assert loop.CausalLMLoss(model, chunked=True).chunked == (arch == "llama")
    monkeypatch.setattr(loop, "LOGIT_TRANSFORMS", ("final_logit_softcapping",))
    step_module = loop.CausalLMLoss(model, chunked=True)
    problem = step_module.check_chunking(ids)
    assert step_module.chunked == (arch == "llama") and (problem is None) == (arch == "llama"), problem
    assert problem is None or "GraniteForCausalLM's own" in problem
    assert model.training, "the check left the model in eval mode"


def test_lora_layers_under_autocast_take_their_input_as_it_comes() -> None:
    """A bf16 base with fp32 LoRA weights under autocast (CPU autocast here, the same casts as cuda's): without
    peft's round trip through fp32 the loss and every gradient are the same bits, fewer bytes are kept for
    backward, and peft's casting is back on outside the context (the checks before training need it)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker import loop

    config = AutoConfig.for_model("qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))

    def step(as_it_comes: bool) -> tuple[float, list[torch.Tensor], int, loop.MixedPrecision]:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        precision = loop.MixedPrecision(model, "cpu", torch.bfloat16)
        context = precision() if as_it_comes else torch.autocast("cpu", dtype=torch.bfloat16)
        loss, grads, kept = _loss_grads_saved(model, ids, context)
        assert grads and all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        return loss, grads, kept, precision

    loss, grads, kept, precision = step(as_it_comes=True)
    peft_loss, peft_grads, peft_kept, _ = step(as_it_comes=False)
    assert loss == peft_loss and all(torch.equal(a, b) for a, b in zip(grads, peft_grads, strict=True))
    assert kept < 0.95 * peft_kept, (kept, peft_kept)
    assert len(precision.layers) == 14 and all(layer.cast_input_dtype_enabled for layer in precision.layers)
    assert not loop.MixedPrecision(precision.layers[0], "cpu", torch.float32).enabled


def _qwen3_lora(dtype: Any, lean: bool) -> tuple[Any, dict[str, int]]:
    """A 2-layer qwen3 in ``dtype`` (norms with q/k norms, SwiGLU MLP) with LoRA, its norm weights randomised so
    that they count, and the worker's eager-mode swaps made when ``lean``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker.fused import lean_activations

    config = AutoConfig.for_model("qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model, lean_activations(model, "cpu", dtype) if lean else {}


def _loss_grads_saved(model: Any, ids: Any, context: Any) -> tuple[float, list[Any], int]:
    """One forward (in ``context``) and backward: the loss, the trainable gradients, and the bytes autograd kept
    for backward (parameters not counted)."""
    import torch

    from worker import loop

    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with context, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss, _ = loop.CausalLMLoss(model, chunked=True)(ids, ids, None, None)
    loss.backward()
    return float(loss.detach()), [p.grad for p in model.parameters() if p.requires_grad], sum(saved.values())


def _precision(model: Any, bf16: bool) -> Any:
    import torch

    from worker import loop

    return loop.MixedPrecision(model, "cpu", torch.bfloat16)() if bf16 else contextlib.nullcontext()


def test_lean_norms_and_swiglu_train_as_the_models_own_and_keep_less() -> None:
    """The eager-mode swaps give the model's own loss, its gradients to rounding (the norm's backward is one
    formula in fp32 rather than autograd's chain, so a bf16 gradient may round the other way) and keep fewer bytes
    for backward."""
    import torch

    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    for dtype in (torch.bfloat16, torch.float32):
        bf16 = dtype == torch.bfloat16
        lean, swapped = _qwen3_lora(dtype, lean=True)
        assert swapped == {"RMSNorm": 9, "SwiGLU": 2, "GELU(tanh)": 0}  # 4 norms a layer, the final one
        own = _qwen3_lora(dtype, lean=False)[0]
        loss, grads, kept = _loss_grads_saved(lean, ids, _precision(lean, bf16))
        own_loss, own_grads, own_kept = _loss_grads_saved(own, ids, _precision(own, bf16))
        assert loss == own_loss
        for a, b in zip(grads, own_grads, strict=True):
            assert float((a - b).norm() / b.norm()) < (1e-2 if bf16 else 1e-5)
        if bf16:
            assert kept < 0.8 * own_kept, (kept, own_kept)


def test_a_norm_the_lean_one_does_not_reproduce_is_left_as_it_is() -> None:
    """The swap is decided by the numbers: a norm that scales by ``1 + weight`` (gemma's way) under a llama-like
    name keeps its own forward, and so does a norm whose weight trains."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from worker.fused import lean_activations

    class OffsetRMSNorm(LlamaRMSNorm):
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # gemma's arithmetic
            x = hidden_states.float()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (x * (1.0 + self.weight.float())).type_as(hidden_states)

    plain, offset, trained = LlamaRMSNorm(16), OffsetRMSNorm(16), LlamaRMSNorm(16)
    for m in (plain, offset):
        m.weight.requires_grad_(False)
    model = torch.nn.ModuleList([plain, offset, trained])
    assert lean_activations(model, "cpu", torch.float32) == {"RMSNorm": 1, "SwiGLU": 0, "GELU(tanh)": 0}
    assert "forward" in vars(plain) and "forward" not in vars(offset) and "forward" not in vars(trained)


def _seeded_lora(config: Any, dtype: Any, **lora: Any) -> Any:
    """A model from ``config`` with random LoRA weights (so that they count), the same for the same seed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, **lora))


def test_gpt2s_python_gelu_becomes_the_one_kernel_and_trains_the_same() -> None:
    """GPT-2's ``gelu_new`` is the tanh GELU written out in Python; the swap to torch's kernel gives the loss and
    gradients to rounding, in fp32 and bf16, and keeps fewer bytes for backward."""
    import torch
    from transformers import AutoConfig

    from worker.fused import lean_activations

    config = AutoConfig.for_model("gpt2", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16):
        bf16 = dtype == torch.bfloat16
        runs = []
        for lean in (True, False):
            model = _seeded_lora(config, dtype)
            if lean:
                assert lean_activations(model, "cpu", dtype) == {"RMSNorm": 0, "SwiGLU": 0, "GELU(tanh)": 2}
            runs.append(_loss_grads_saved(model, ids, _precision(model, bf16)))
        (loss, grads, kept), (own_loss, own_grads, own_kept) = runs
        assert abs(loss - own_loss) <= (1e-2 if bf16 else 1e-5) * abs(own_loss)
        for a, b in zip(grads, own_grads, strict=True):
            assert float((a - b).norm() / b.norm()) < (3e-2 if bf16 else 1e-5)
        assert kept < 0.9 * own_kept, (kept, own_kept)


@pytest.mark.parametrize("head", ["frozen", "trained"])
def test_the_chunked_loss_has_the_full_logits_gradients(head: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen head's chunks form their gradient in forward (``_FrozenHeadCE``); a head that trains (here a
    modules_to_save copy) is checkpointed instead. Either way, over several chunks, the loss and every trainable
    gradient are those of the model's own logits, in fp32 and under bf16 autocast."""
    import torch
    from transformers import AutoConfig

    from worker import headloss, loop

    monkeypatch.setattr(headloss, "LOSS_CHUNK", 16)  # 94 labelled positions: six chunks, the last one short
    fused = 0
    apply = headloss._FrozenHeadCE.apply

    def counted(*args: Any) -> Any:
        nonlocal fused
        fused += 1
        return apply(*args)

    monkeypatch.setattr(headloss._FrozenHeadCE, "apply", counted)
    config = AutoConfig.for_model("qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    extra = {"modules_to_save": ["lm_head"]} if head == "trained" else {}
    for dtype in (torch.float32, torch.bfloat16):
        bf16 = dtype == torch.bfloat16
        runs = []
        for chunked in (True, False):
            model = _seeded_lora(config, dtype, **extra)
            with _precision(model, bf16):
                loss, _ = loop.CausalLMLoss(model, chunked=chunked)(ids, ids, None, None)
            loss.backward()
            runs.append((float(loss.detach()), [p.grad for p in model.parameters() if p.requires_grad]))
        (loss, grads), (own_loss, own_grads) = runs
        assert abs(loss - own_loss) <= (1e-2 if bf16 else 1e-5) * abs(own_loss)
        for a, b in zip(grads, own_grads, strict=True):
            assert float((a - b).norm() / b.norm()) < (1e-2 if bf16 else 1e-5)
    assert fused == (2 if head == "frozen" else 0)


def _plain_fused(h: Any, weight: Any, bias: Any, y: Any) -> Any:
    """What a fused kernel must give: the summed cross-entropy of the head's logits, by plain autograd."""
    import torch.nn.functional as F  # noqa: N812

    return F.cross_entropy(F.linear(h, weight, bias).float(), y, reduction="sum")


def _off_fused(h: Any, weight: Any, bias: Any, y: Any) -> Any:
    return _plain_fused(h, weight, bias, y) * 1.05  # a kernel built for another version, say


def _broken_fused(h: Any, weight: Any, bias: Any, y: Any) -> Any:
    raise RuntimeError("no kernel image is available for execution on the device")


def _unscaled_fused(h: Any, weight: Any, bias: Any, y: Any) -> Any:
    """Right loss, and right gradient when the gradient coming in is 1; wrong for the scaled loss training has."""
    import torch

    class Unscaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            with torch.enable_grad():
                xd = x.detach().requires_grad_()
                loss = _plain_fused(xd, weight, bias, y)
                (ctx.grad,) = torch.autograd.grad(loss, xd)
            return loss.detach()

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            return ctx.grad  # forgets to multiply by g

    return Unscaled.apply(h)


@pytest.mark.parametrize("kernel", ["agrees", "off", "broken", "unscaled"])
def test_a_fused_head_loss_kernel_trains_only_when_it_agrees_with_the_torch_chunks(
        kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """liger-kernel's fused linear cross-entropy runs on CUDA only, so a stand-in takes its place here: it is
    used for training when its loss and gradient on the model's hidden states are those of the torch chunks;
    otherwise (5% off, failing, or right only when the gradient coming in is 1) the torch chunks train, and the
    refusal says why. Off CUDA none is looked for."""
    import torch
    from transformers import AutoConfig

    from worker import headloss, loop

    assert headloss.fused_kernel("cpu") == (None, "torch chunks")
    calls = 0
    fake = {"agrees": _plain_fused, "off": _off_fused, "broken": _broken_fused, "unscaled": _unscaled_fused}[kernel]

    def counted(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return fake(*args)

    monkeypatch.setattr(headloss, "fused_kernel", lambda device: (counted, "the stand-in kernel"))
    config = AutoConfig.for_model("qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    runs = []
    for choose in (True, False):
        step_module = loop.CausalLMLoss(_seeded_lora(config, torch.float32), chunked=True)
        if choose:
            which, refused = step_module.choose_fused(ids[:1, :32], "cuda")
            checked, calls = calls, 0
        loss, _ = step_module(ids, ids, None, None)
        loss.backward()
        runs.append((float(loss.detach()), [p.grad for p in step_module.parameters() if p.requires_grad]))
    (loss, grads), (own_loss, own_grads) = runs
    assert abs(loss - own_loss) <= 1e-5 * abs(own_loss)
    for a, b in zip(grads, own_grads, strict=True):
        assert float((a - b).norm() / b.norm()) < 1e-5
    assert checked == 1
    if kernel == "agrees":
        assert (which, refused, calls) == ("the stand-in kernel", None, 1)
        return
    assert which == "torch chunks" and calls == 0
    assert refused is not None and refused.startswith("the stand-in kernel not used: ")
    expected = {"off": "its loss differs by 0.05", "broken": "it failed on this model (RuntimeError: no kernel image",
                "unscaled": "and its gradient by 3 from"}[kernel]
    assert expected in refused, refused


def test_a_refused_fused_kernel_is_named_in_the_jobs_notes(share_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice is made in the training process, before the first step, and a refusal reaches result.json."""
    from worker import headloss

    monkeypatch.setattr(headloss, "fused_kernel", lambda device: (_off_fused, "the stand-in kernel"))
    outcome = train(share_root, make_job("fused-refused", max_steps=3))
    assert [n for n in outcome.notes if n.startswith("the stand-in kernel not used: its loss differs by 0.05")]


def _packed_config(arch: str, **extra: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, vocab_size=256, hidden_size=64, n_embd=64, intermediate_size=128,
                                num_hidden_layers=2, n_layer=2, num_attention_heads=4, n_head=4,
                                num_key_value_heads=2, head_dim=16, n_positions=64, resid_pdrop=0.0,
                                embd_pdrop=0.0, bos_token_id=1, eos_token_id=2, **{"attn_pdrop": 0.0, **extra})


def _packed_lora(config: Any, ours: bool, targets: Any = "all-linear") -> Any:
    """``_seeded_lora``, switched to worker.packedattn's attention before LoRA when ``ours``, as the engine does."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from worker import packedattn

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(copy.deepcopy(config))  # the switch is made on the config
    if ours:
        assert packedattn.use_for_packed_rows(base)
    return get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))


def _assert_same_step(ours: tuple[Any, list[Any]], reference: tuple[Any, list[Any]], rel: float = 1e-6) -> None:
    """(loss or losses, LoRA gradients) of two runs: the same, to rounding."""
    (loss, grads), (own_loss, own_grads) = ours, reference
    assert loss == pytest.approx(own_loss, rel=rel)
    for a, b in zip(grads, own_grads, strict=True):
        assert float((a - b).norm() / b.norm()) < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_packed_documents_attend_one_by_one_as_the_mask_has_them(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU each packed document gets an SDPA call of its own (worker.packedattn): the loss and gradients of a
    packed batch are those of transformers' block-diagonal mask, grouped-query heads (qwen3) included. A padded
    batch (no position ids) and generation with a cache take transformers' SDPA as it is."""
    import torch

    from worker import loop, packedattn

    documents: list[list[int]] = []
    cpu = packedattn.per_document_sdpa()

    def seen(q: Any, k: Any, v: Any, cu: Any, *rest: Any) -> Any:
        documents.append(cu.tolist())
        return cpu.run(q, k, v, cu, *rest)

    monkeypatch.setattr(packedattn, "per_document_sdpa", lambda: packedattn.Varlen(cpu.name, seen, dropout=True))
    ids = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    positions = torch.stack([torch.cat([torch.arange(20), torch.arange(28)]),
                             torch.cat([torch.arange(5), torch.arange(30), torch.arange(13)])])
    runs = []
    for ours in (False, True):
        model = _packed_lora(_packed_config(arch), ours)
        step_module = loop.CausalLMLoss(model, chunked=True)
        if ours:
            assert step_module.choose_attention(ids[:1, :32], "cpu") == (cpu.name, None)
            assert documents == [[0, 13, 32]] * 2  # the check: both layers, forward once
            documents.clear()
        loss, _ = step_module(ids, ids, None, positions)
        loss.backward()
        runs.append((float(loss.detach()), [p.grad for p in model.parameters() if p.requires_grad]))
    assert documents == [[0, 20, 48, 53, 83, 96]] * 2  # both layers of the second model
    _assert_same_step(runs[1], runs[0])
    documents.clear()
    with loop.evaluating(model):
        padded = step_module(ids, ids, torch.ones_like(ids), None)[0]
        model.generate(input_ids=ids[:1, :8], max_new_tokens=3, do_sample=False)
    assert not documents and torch.isfinite(padded)


def _crossing_attention(q: Any, k: Any, v: Any, cu: Any, longest: int, scale: float, dropout: float) -> Any:
    """One causal call over everything, as if nothing were packed: every document sees the ones before it."""
    import torch.nn.functional as F  # noqa: N812

    def heads_first(t: Any) -> Any:
        return t.transpose(0, 1).unsqueeze(0)

    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True,
                                         scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def _gradless_attention(*args: Any) -> Any:
    """The right output, with no gradient for the queries, keys and values (a backward that is not wired up)."""
    from worker import packedattn

    return packedattn.per_document_sdpa().run(*args).detach() + 0 * args[0].sum()


def _broken_attention(*args: Any) -> Any:
    raise RuntimeError("FlashAttention only supports Ampere GPUs or newer")


@pytest.mark.parametrize("kernel", ["agrees", "long window", "moe", "crosses", "gradless", "broken", "no dropout",
                                    "windowed", "chunked"])
def test_a_packed_attention_kernel_trains_only_when_it_agrees_with_the_masked_path(
        kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's flash varlen kernel runs on CUDA only, so stand-ins take its place: one is used for packed batches
    when the model's logits and input gradient with it are those of one SDPA call per document (the reference on
    CUDA, itself held to the mask by the test above); otherwise (documents that see each other, no gradient, an
    error, or attention dropout it cannot apply) the masked SDPA trains, and the refusal says why. A sliding
    window as long as the rows, and a MoE model's unset router-logits flag, do not keep it from being used. A
    right kernel is refused where the model's layers never take it (a window shorter than the rows), and where a
    layer's mask is narrower than one causal block per document with nothing telling the attention call so
    (llama4's chunks, here of 40 tokens: longer than the check's 32-token sample, so only the look at the masks
    on rows of the training length, 48, finds them; the reference takes the same path as the kernel). Either way
    the training loss and gradients are the masked path's."""
    import torch

    from worker import loop, packedattn

    calls = 0
    right = packedattn.per_document_sdpa().run
    run = {"crosses": _crossing_attention, "gradless": _gradless_attention, "broken": _broken_attention,
           "no dropout": _crossing_attention}.get(kernel, right)

    def counted(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return run(*args)

    stand_in = packedattn.Varlen("the stand-in kernel", counted, dropout=False)
    monkeypatch.setattr(packedattn, "kernel_for", lambda device: (stand_in, stand_in.name))
    config = {"no dropout": lambda: _packed_config("gpt2", attn_pdrop=0.1),  # gpt2's own default
              "windowed": lambda: _packed_config("mistral", sliding_window=4),
              "long window": lambda: _packed_config("mistral", sliding_window=48),
              "moe": lambda: _packed_config("qwen3_moe", num_experts=2, num_experts_per_tok=1,
                                            moe_intermediate_size=32),
              "chunked": lambda: _packed_config("llama4_text", attention_chunk_size=40, no_rope_layers=[1, 1],
                                                intermediate_size_mlp=128, num_local_experts=1,
                                                interleave_moe_layer_step=1),
              }.get(kernel, lambda: _packed_config("qwen3"))()
    ids = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    positions = torch.stack([torch.cat([torch.arange(20), torch.arange(28)])] * 2)
    runs = []
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if kernel in ("chunked", "moe") else "all-linear"  # no experts
    for ours in (True, False):
        model = _packed_lora(config, ours, targets)
        step_module = loop.CausalLMLoss(model, chunked=True)
        if ours:
            which, refused = step_module.choose_attention(ids[:1, :32], "cuda", 48)
            checked, calls = calls, 0
        with loop.evaluating(model), torch.enable_grad():  # dropout off, so that both runs compute the same
            loss, _ = step_module(ids, ids, None, positions)
            loss.backward()
        runs.append((float(loss.detach()), [p.grad for p in model.parameters() if p.requires_grad]))
    _assert_same_step(*runs)
    if kernel in ("agrees", "long window", "moe"):
        assert (which, refused, checked, calls) == ("the stand-in kernel", None, 4, 2)  # 2 layers: check, audit
        return
    assert (which, calls) == ("masked SDPA", 0) and refused is not None
    assert refused.startswith("the stand-in kernel not used: "), refused
    expected = {"crosses": "its logits differ by", "gradless": "and its input gradient by",
                "broken": "it failed on this model (RuntimeError: FlashAttention only supports",
                "no dropout": "the model trains with attention dropout 0.1, which it does not apply",
                "windowed": "no layer of this model takes it on 32-token rows",
                "chunked": "2 of its 2 attention calls on 48-token rows have a mask other than one causal block "
                           "per document"}[kernel]
    assert expected in refused, refused


def _varlen_semantics(q: Any, k: Any, v: Any, cu: Any, longest: int, causal: bool, scale: float | None,
                      gqa: bool) -> Any:
    """What torch's varlen_attn computes, by its documentation, in plain SDPA calls: each document on its own.
    It also holds the caller to what the flash kernel needs."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    if k.shape[1] != q.shape[1] and not gqa:
        raise ValueError("Expect query and key/value to have the same number of heads")
    assert cu.dtype == torch.int32 and cu.is_contiguous() and all(t.stride(-1) == 1 for t in (q, k, v))
    edges = cu.tolist()
    assert longest == max(e - s for s, e in zip(edges[:-1], edges[1:], strict=True))
    parts = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                            is_causal=causal, scale=scale, enable_gqa=gqa).transpose(0, 1)
             for s, e in zip(edges[:-1], edges[1:], strict=True)]
    return torch.cat(parts)


def _varlen_2_9(query: Any, key: Any, value: Any, cu_seq_q: Any, cu_seq_k: Any, max_q: int, max_k: int,
                is_causal: bool = False, return_aux: Any = None) -> Any:
    """torch 2.9's: no scale, no enable_gqa (its flash kernel shares grouped-query heads by itself)."""
    return _varlen_semantics(query, key, value, cu_seq_q, max_q, is_causal, None, key.shape[1] != query.shape[1])


def _varlen_2_13(query: Any, key: Any, value: Any, cu_seq_q: Any, cu_seq_k: Any, max_q: int, max_k: int, *,
                 return_aux: Any = None, scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                 enable_gqa: bool = False, seqused_k: Any = None, block_table: Any = None,
                 num_splits: int | None = None) -> Any:
    return _varlen_semantics(query, key, value, cu_seq_q, max_q, window_size == (-1, 0), scale, enable_gqa)


@pytest.mark.parametrize("api", ["2.9", "2.13"])
def test_the_flash_varlen_call_fits_the_installed_torchs_signature(api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's varlen_attn took ``is_causal`` in 2.9 and ``window_size``, ``scale`` and ``enable_gqa`` later.
    Its flash kernel needs CUDA, so a stand-in with each signature and the documented semantics takes its place:
    called the way the worker calls it, on grouped-query heads, it passes the check and trains as the mask does."""
    import torch
    import torch.nn.attention.varlen

    from worker import loop

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", {"2.9": _varlen_2_9, "2.13": _varlen_2_13}[api])
    ids = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    positions = torch.stack([torch.cat([torch.arange(20), torch.arange(28)]),
                             torch.cat([torch.arange(5), torch.arange(30), torch.arange(13)])])
    runs = []
    for ours in (True, False):
        model = _packed_lora(_packed_config("qwen3"), ours)
        step_module = loop.CausalLMLoss(model, chunked=True)
        if ours:
            assert step_module.choose_attention(ids[:1, :32], "cuda") == (
                "flash varlen attention (torch.nn.attention.varlen)", None)
        loss, _ = step_module(ids, ids, None, positions)
        loss.backward()
        runs.append((float(loss.detach()), [p.grad for p in model.parameters() if p.requires_grad]))
    _assert_same_step(*runs)


@pytest.fixture
def varlen_on_cpu() -> Any:
    """torch's own varlen_attn (its Python wrapper, custom op, autograd and fake tensors), with a CPU kernel in
    place of the flash one, which needs CUDA: what a compiled model traces is then the real thing. Skips where
    this torch's ops have another schema than the one the kernel below is written for. Yields the number of
    forward calls so far; the kernels are off again afterwards."""
    import torch

    varlen = pytest.importorskip("torch.nn.attention.varlen")
    forward = getattr(varlen, "_varlen_attn", None)
    backward = getattr(varlen, "_varlen_attn_backward", None)
    if forward is None or backward is None or "window_size" not in str(forward._opoverload._schema):
        pytest.skip("this torch's varlen ops differ from torch 2.13's")
    calls = [0]

    def run(query: Any, key: Any, value: Any, cu_seq_q: Any, cu_seq_k: Any, max_q: int, max_k: int,
            is_causal: bool = False, scale: float | None = None, window_size: Any = None, enable_gqa: bool = False,
            seqused_k: Any = None, block_table: Any = None, num_splits: Any = None) -> Any:
        if calls[0] < 0:
            raise NotImplementedError("torch_attn::_varlen_attn has no CPU kernel")
        calls[0] += 1
        out = _varlen_semantics(query, key, value, cu_seq_q, max_q, is_causal, scale, enable_gqa)
        return (out, torch.zeros(query.shape[1], query.shape[0], dtype=torch.float32),
                torch.zeros(2, dtype=torch.uint64))

    def grads(grad_out: Any, query: Any, key: Any, value: Any, out: Any, lse: Any, cu_seq_q: Any, cu_seq_k: Any,
              max_q: int, max_k: int, is_causal: bool, rng_state: Any, scale: float | None = None,
              window_size: Any = None) -> Any:
        if calls[0] < 0:
            raise NotImplementedError("torch_attn::_varlen_attn_backward has no CPU kernel")

        def attend(q: Any, k: Any, v: Any) -> Any:
            return _varlen_semantics(q, k, v, cu_seq_q, max_q, is_causal, scale, k.shape[1] != q.shape[1])

        # A kernel runs below autograd; torch.func differentiates there.
        return torch.func.vjp(attend, query, key, value)[1](grad_out)

    forward.register_kernel("cpu")(run)
    backward.register_kernel("cpu")(grads)
    yield calls
    calls[0] = -1  # a registration cannot be taken back: from now on the kernels refuse, as CPU has none


def test_flash_varlen_attention_compiles_into_one_graph_for_every_packing(
        varlen_on_cpu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With training.compile the body is compiled with the varlen call inside: batches whose documents fall
    differently (another count of them each time) must not each compile a graph of their own, nor break the
    graph; and the compiled step trains as transformers' masked SDPA does. dynamo's cheapest backend traces on
    CPU what the GPU would compile; the kernel is a CPU stand-in (``varlen_on_cpu``)."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from worker import loop

    ids = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    layouts = [[20, 28], [5, 30, 13], [48], [10, 10, 10, 18], [1, 47]]
    batches = [torch.cat([torch.arange(n) for n in layout]).expand(2, -1) for layout in layouts]
    runs = []
    for ours in (True, False):
        model = _packed_lora(_packed_config("qwen3"), ours)
        step_module = loop.CausalLMLoss(model, chunked=True)
        losses = []
        if ours:
            which, refused = step_module.choose_attention(ids[:1, :32], "cuda")
            assert (which, refused) == ("flash varlen attention (torch.nn.attention.varlen)", None), refused
            torch._dynamo.reset()
            counters.clear()
            step_module._body.compile(backend="eager")
            checked = varlen_on_cpu[0]
        try:
            for positions in batches:
                loss, _ = step_module(ids, ids, None, positions)
                loss.backward()
                losses.append(float(loss.detach()))
            if ours:
                assert varlen_on_cpu[0] - checked == 2 * len(batches)  # both layers, every batch: compiled in
                stats = dict(counters["stats"])
                assert not counters["graph_break"], dict(counters["graph_break"])
                assert not counters["unimplemented"], dict(counters["unimplemented"])
        finally:
            torch._dynamo.reset()
        runs.append((losses, [p.grad for p in model.parameters() if p.requires_grad]))
    assert stats["unique_graphs"] <= 2, stats  # the first batch's shapes, then one with the counts symbolic
    _assert_same_step(*runs, rel=1e-5)


def test_a_refused_attention_kernel_is_named_in_the_jobs_notes(share_root: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice is made in the training process, before the first step, and a refusal reaches result.json."""
    from worker import packedattn

    stand_in = packedattn.Varlen("the stand-in kernel", _crossing_attention, dropout=True)
    monkeypatch.setattr(packedattn, "kernel_for", lambda device: (stand_in, stand_in.name))
    outcome = train(share_root, make_job("attention-refused", max_steps=3))
    assert [n for n in outcome.notes if n.startswith("the stand-in kernel not used: its logits differ by")]


# ── the adapter on the share ─────────────────────────────────────────────────────────────────────────────
def test_adapter_loads_the_plain_way_and_is_share_readable(share_root: Path, alpaca_outcome: Any) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    outcome: TrainOutcome = alpaca_outcome[0]
    adapter = outcome.adapter_dir
    assert adapter == share_root / "results" / "alpaca" / "attempts" / "a1-w" / "adapter"
    names = sorted(p.name for p in adapter.iterdir())
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert {n: stat.S_IMODE(os.stat(adapter / n).st_mode) for n in names} == dict.fromkeys(names, MODE)
    assert stat.S_IMODE(os.stat(adapter).st_mode) == dir_mode_for(MODE) == 0o775
    assert (outcome.files, outcome.size_bytes) == hash_folder(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "models/tiny"

    base = AutoModelForCausalLM.from_pretrained(share_root / "models" / "tiny")
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, adapter)(input_ids=ids).logits
    assert torch.isfinite(tuned).all()
    assert not torch.allclose(plain, tuned), "the adapter changes nothing"


def test_4bit_on_cpu_trains_as_plain_lora_and_says_so(share_root: Path) -> None:
    outcome = train(share_root, make_job("q4", quantization="4bit", max_steps=3))
    assert outcome.metrics.steps == 3
    assert len(outcome.notes) == 1
    assert "4bit" in outcome.notes[0] and "CPU" in outcome.notes[0] and "plain LoRA" in outcome.notes[0]
    assert (outcome.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_a_quantized_job_on_cpu_keeps_its_quantization_when_the_worker_is_set_to(
        share_root: Path, quantization: str, caplog: pytest.LogCaptureFixture) -> None:
    """bitsandbytes' CPU kernels run the QLoRA path the GPU runs (quantized load, k-bit preparation, training,
    saving and the load test) on this machine, so it is tested without a GPU."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    job = make_job(f"cpu-{quantization}", quantization=quantization, max_steps=4)
    req = dataclasses.replace(request(share_root, job), cpu_quantization="bitsandbytes")
    outcome = run_training(req, [].append, lambda: False)
    assert outcome.quantization == quantization
    assert outcome.notes == [f"quantization {quantization} on CPU, with bitsandbytes' CPU kernels"]
    assert outcome.metrics.steps == 4 and math.isfinite(outcome.metrics.train_loss)
    chatter = [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")]
    assert not chatter, f"bitsandbytes logs per matmul, flooding the worker log: {chatter[:2]}"
    config = json.loads((outcome.adapter_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    from worker.engine import load_model, plan_for

    plan = plan_for(job.quantization, "cpu", "bitsandbytes")
    layer = load_model(share_root / "models" / "tiny", plan).model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear4bit if quantization == "4bit" else Linear8bitLt)


def test_gradient_checkpointing_changes_memory_not_the_losses(share_root: Path) -> None:
    """Recomputing activations (non-reentrant, with the input-embedding grad hooks removed) gives the very
    gradients of a plain run: the loss at every step is the same."""
    losses = {}
    for recompute in (False, True):
        job = make_job(f"recompute-{recompute}", max_steps=6, gradient_checkpointing=recompute)
        outcome = train(share_root, job)
        lines = read_metrics(outcome.adapter_dir.parent / "metrics.jsonl")
        losses[recompute] = [m.loss for m in lines if m.kind == "train"]
    assert len(losses[True]) == 6
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("packing", [True, False])
def test_a_step_in_pieces_trains_as_the_whole_batch(share_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                    packing: bool) -> None:
    """On CPU a step's rows go through in pieces (engine.CPU_MICRO_TOKENS), their gradients added up: the loss
    at every step is that of the whole batch at once, packed or padded."""
    from worker import batching, engine

    sizes: list[list[int]] = []  # per step, the tokens of each piece
    pieces = batching.Batch.pieces

    def counted(self: batching.Batch, max_tokens: int | None) -> list[batching.Batch]:
        out = pieces(self, max_tokens)
        assert sum(p.input_ids.shape[0] for p in out) == self.input_ids.shape[0]
        sizes.append([p.input_ids.numel() for p in out])
        return out

    monkeypatch.setattr(batching.Batch, "pieces", counted)
    losses = {}
    for micro in (None, 64):
        monkeypatch.setattr(engine, "CPU_MICRO_TOKENS", micro)
        sizes.clear()
        outcome = train(share_root, make_job(f"pieces-{packing}-{micro}", max_steps=6, packing=packing))
        lines = read_metrics(outcome.adapter_dir.parent / "metrics.jsonl")
        losses[micro] = [m.loss for m in lines if m.kind == "train"]
        assert len(sizes) == 6
        if micro is None:
            assert all(len(step) == 1 for step in sizes)
        else:  # rows of up to 64 tokens: one row a piece, or two of at most 32
            assert all(len(step) > 1 and max(step) <= 64 for step in sizes), sizes
    assert len(losses[64]) == 6
    assert losses[64] == pytest.approx(losses[None], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("recompute", [False, True])
def test_evaluation_and_probes_leave_the_compiled_body_to_training(share_root: Path, recompute: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Eval batches (a 1-row last one) and probe generation (a KV cache growing per token) each gave the compiled
    body another shape to compile for; past dynamo's recompile limit (8) the training step itself then ran eager
    for the whole job, with compile_seconds still reported. The cuda-only setting is compiled here with dynamo's
    cheapest backend, so what gets traced can be counted on CPU. Packed rows attend as on a GPU without the
    flash varlen kernel: the CPU's per-document one is never compiled (compile is for cuda)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from worker import engine, packedattn

    def compile_on_cpu(step_module: Any, model: Any, plan: Any) -> bool:
        (step_module._body if step_module.chunked else model.get_base_model()).compile(backend="eager")
        return True

    monkeypatch.setattr(engine, "_compile", compile_on_cpu)
    monkeypatch.setattr(packedattn, "kernel_for", lambda device: (None, "masked SDPA"))
    torch._dynamo.reset()
    counters.clear()
    job = make_job(f"compiled-{recompute}", compile=True, max_steps=3, batch_size=4, eval_fraction=0.15,
                   gradient_checkpointing=recompute)
    job.probes = ["What color is the sky?", "What does the cow say?", "Name a fruit."]
    try:
        outcome = train(share_root, job)
    finally:
        torch._dynamo.reset()
    assert outcome.metrics.steps == 3 and outcome.metrics.compile_seconds is not None
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # the training step's, at most twice
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["unimplemented"], dict(counters["unimplemented"])


def test_a_compile_the_cpu_ignores_reports_no_compile_time(share_root: Path) -> None:
    """training.compile is for cuda: on a CPU worker the job trains eager, says so, and its result gives no
    compile time (it gave the first step's time as one)."""
    outcome = train(share_root, make_job("cpu-compile", compile=True, max_steps=2, batch_size=4))
    assert outcome.metrics.compile_seconds is None
    assert "training.compile is for cuda; ignored on CPU" in outcome.notes


@pytest.mark.parametrize(("major", "dtype"), [(7, "float16"), (8, "bfloat16")])
def test_a_gpu_without_bf16_tensor_cores_trains_fp16(monkeypatch: pytest.MonkeyPatch, major: int, dtype: str) -> None:
    """torch calls bf16 supported on any GPU that can hold a bf16 tensor (emulation); on a Turing card (an
    11 GB RTX 2080 Ti, the team's kind of card) that is slow. The device's compute capability is simulated."""
    from types import SimpleNamespace

    import torch

    from schemas.job import Quantization
    from worker.engine import plan_for

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda _d: True)  # emulation would work
    assert plan_for(Quantization.none, "cuda").dtype == getattr(torch, dtype)


def test_every_trainable_weight_is_fp32_on_an_fp16_base(share_root: Path) -> None:
    """An fp16 base (a Turing GPU): the LoRA weights and the full copies of modules_to_save train in fp32, where
    fp16's GradScaler can unscale their gradients."""
    import torch

    from schemas.job import Quantization
    from worker.engine import Plan, add_lora, load_model

    plan = Plan("cpu", torch.float16, Quantization.none, [])
    job = make_job("half")
    job.lora.modules_to_save = ["lm_head", "embed_tokens"]
    model = add_lora(load_model(share_root / "models" / "tiny", plan), job, plan, recompute=False)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}, trainable
    assert next(p for n, p in model.named_parameters() if "q_proj.base_layer" in n).dtype == torch.float16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_job_with_modules_to_save_trains(share_root: Path, dtype: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole job on a bf16 or fp16 plan, as on a GPU (CPU autocast and CPU GradScaler stand in for CUDA's):
    the chunked-loss check, training (fp16: scaled, unscaled, stepped, with fp32 copies of lm_head and
    embed_tokens beside fp16 activations) and saving."""
    import torch

    from schemas.job import Quantization
    from worker import engine

    half = getattr(torch, dtype)
    monkeypatch.setattr(engine, "plan_for", lambda *_a: engine.Plan("cpu", half, Quantization.none, []))
    job = make_job(f"{dtype}-mts", max_steps=4)
    job.lora.modules_to_save = ["lm_head", "embed_tokens"]
    outcome = train(share_root, job)
    assert outcome.metrics.steps == 4 and math.isfinite(outcome.metrics.train_loss)
    assert not any("transforms its logits" in n for n in outcome.notes), outcome.notes


def test_a_4bit_base_keeps_its_unquantized_weights_in_the_compute_dtype(share_root: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """peft's prepare_model_for_kbit_training casts every weight bitsandbytes left unquantized (embeddings,
    lm_head, norms) to fp32: about 2 GB more for an 8B model's embedding and head, and a residual stream in fp32
    (twice the activation memory), against a 12 GiB budget. They stay in the compute dtype (bf16 here, as on a
    GPU), frozen; only the LoRA weights are fp32, and the whole job trains."""
    pytest.importorskip("bitsandbytes")
    import torch

    from schemas.job import Quantization
    from worker import engine

    plan = engine.Plan("cpu", torch.bfloat16, Quantization.bit4, [])
    model = engine.add_lora(engine.load_model(share_root / "models" / "tiny", plan), make_job("kbit"), plan, False)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert dtypes and set(dtypes.values()) == {torch.float32} and all("lora_" in n for n in dtypes), dtypes
    kept = {n: p.dtype for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n or "norm" in n}
    assert kept and set(kept.values()) == {torch.bfloat16}, kept

    monkeypatch.setattr(engine, "plan_for", lambda *_a: engine.Plan("cpu", torch.bfloat16, Quantization.bit4, []))
    outcome = train(share_root, make_job("kbit-job", quantization="4bit", max_steps=4))
    assert outcome.quantization == "4bit" and math.isfinite(outcome.metrics.train_loss)


def test_a_checkpoint_saved_with_two_gpus_visible_resumes_on_a_worker_with_one(monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    """Earlier checkpoints hold one CUDA RNG state per visible GPU; setting a second one on a 1-GPU machine
    raises IndexError in torch (its default_generators tuple), which failed the resume. The GPU is simulated the
    way torch fails."""
    import torch
    import torch.cuda.random

    from worker import checkpoint

    seen: list[Any] = []

    def set_rng_state(new_state: Any, device: Any = "cuda") -> None:
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= 1:
            raise IndexError("tuple index out of range")
        seen.append(new_state)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    saved = {"python": checkpoint._python_rng(), "torch": torch.get_rng_state(),
             "cuda": [torch.ones(3), torch.zeros(3)]}
    checkpoint.restore_rng(saved)
    assert len(seen) == 1 and torch.equal(seen[0], torch.ones(3))


def test_a_cuda_fault_counts_as_a_crash_that_resumes_not_as_the_jobs_failure(caplog: pytest.LogCaptureFixture
                                                                             ) -> None:
    """An illegal address or a GPU off the bus failed the job for good; now, like a killed training process, it
    costs an attempt and the next resumes from its checkpoint. Out of memory stays the job's own failure."""
    import torch

    from worker import horse

    def outcome(e: BaseException) -> horse.HorseResult:
        return horse._final(horse._report_of(e, "traceback"), None)

    fault = outcome(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert (fault.kind, fault.killed) == ("died", True)
    assert "GPU failed" in caplog.text and "traceback" in caplog.text  # the whole of it goes to the worker log
    assert fault.error == "the GPU failed: AcceleratorError: CUDA error: an illegal memory access was encountered"
    oom = outcome(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert oom.kind == "failed" and "lower training.batch_size" in (oom.error or "")
    bare = outcome(torch.OutOfMemoryError())  # no text at all: still the job's own failure, still said what to do
    assert bare.error == ("out of GPU memory (OutOfMemoryError): lower training.batch_size or training.max_length, "
                          "or set quantization to \"4bit\"") and bare.kind == "failed"
    bug = outcome(ValueError("a bug\n" + "tried: CPU, CUDA, Meta, ...\n" * 500))  # torch's dispatcher runs to pages
    assert bug.kind == "failed" and bug.error == ("ValueError: a bug (the whole error and its traceback: the "
                                                  "attempt's train.log, or the worker log)"), bug.error
    assert outcome(torch.AcceleratorError("CUDA error: device-side assert triggered")).kind == "failed"  # the job's


def test_should_stop_cancels_mid_training(share_root: Path) -> None:
    reports: list[Progress] = []
    job = make_job("cancel-me")
    with pytest.raises(Cancelled):
        train(share_root, job, reports, lambda: any(p.step >= 3 for p in reports))
    assert max(p.step for p in reports) == 3
    out_dir = request(share_root, job).out_dir
    assert out_dir.is_dir() and not (out_dir / "adapter").exists()


class _Killed(Exception):
    """Stands for kill -9: leaves the loop without the checkpoint a cancel would write."""


def _killed_at(step: int, reports: list[Progress]) -> Any:
    """A ``should_stop`` that "kills" the training once it has reported ``step``."""
    def killed() -> bool:
        if any(p.step >= step for p in reports):
            raise _Killed
        return False
    return killed


def test_a_rerun_before_any_checkpoint_starts_its_history_afresh(share_root: Path) -> None:
    job = make_job("rerun", max_steps=12, checkpoint_every_steps=100)
    reports: list[Progress] = []
    with pytest.raises(_Killed):
        train(share_root, job, reports, _killed_at(5, reports))
    out_dir = request(share_root, job).out_dir
    assert [m.step for m in read_metrics(out_dir / "metrics.jsonl") if m.kind == "train"] == [1, 2, 3, 4, 5]
    assert not (out_dir / "checkpoints").exists() or not any((out_dir / "checkpoints").iterdir())

    train(share_root, job)  # the same attempt again, as after a crash of the worker before its first checkpoint
    lines = read_metrics(out_dir / "metrics.jsonl")
    assert [m.step for m in lines if m.kind == "train"] == list(range(1, 13))
    assert [m.phase for m in lines if m.kind == "eval"] == ["before", "after"]


def test_a_run_with_changed_data_in_the_same_attempt_folder_keeps_its_own_checkpoints(share_root: Path) -> None:
    """Stopped at step 6, then the dataset changed, then the same worker took the job again (the same attempt
    folder): the new run starts at 0, and its checkpoints were ranked by step with the old run's. Step 2 was
    removed as soon as it was written, the old steps 4 and 6 kept, so a kill left nothing to resume (audit,
    proven). Now each run keeps its own; the old step 4, in the new one's way, is renamed, still resumable."""
    from worker import checkpoint

    shutil.copy(share_root / "datasets" / "alpaca.jsonl", share_root / "datasets" / "changing.jsonl")
    job = make_job("changed-data", dataset="datasets/changing.jsonl", max_steps=12, checkpoint_every_steps=2)
    reports: list[Progress] = []
    with pytest.raises(Cancelled):
        train(share_root, job, reports, lambda: any(p.step >= 6 for p in reports))
    checkpoints = request(share_root, job).out_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-4", "step-6"]
    old = checkpoint._read_state(checkpoints / "step-6")
    with open(share_root / "datasets" / "changing.jsonl", "a") as f:
        f.write(json.dumps({"instruction": "Name a new colour.", "input": "", "output": "Teal."}) + "\n")
    reports.clear()
    with pytest.raises(_Killed):
        train(share_root, job, reports, _killed_at(5, reports))
    runs = {p.name: checkpoint._read_state(p) for p in checkpoints.glob("step-*")}
    assert old is not None and all(st is not None for st in runs.values()), runs
    new = sorted(n for n, st in runs.items() if st and st.fingerprint != old.fingerprint)
    kept = sorted(n for n, st in runs.items() if st and st.fingerprint == old.fingerprint)
    assert new == ["step-2", "step-4"] and kept[-1] == "step-6" and kept[0].startswith("step-4."), runs
    result_dir = checkpoints.parent.parent.parent
    assert checkpoint.latest(result_dir, runs["step-4"].fingerprint).folder.name == "step-4"  # type: ignore[union-attr]
    assert checkpoint.latest(result_dir, old.fingerprint).folder.name == "step-6"  # type: ignore[union-attr]


def test_non_finite_loss_is_a_clear_error(share_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.loop import CausalLMLoss

    real = CausalLMLoss.forward

    def poisoned(self: Any, *args: Any) -> tuple[Any, Any]:
        loss, n = real(self, *args)
        return (loss * float("nan"), n) if self.training else (loss, n)

    monkeypatch.setattr(CausalLMLoss, "forward", poisoned)
    with pytest.raises(RuntimeError, match=r"nan at step 1 .*lower training.learning_rate"):
        train(share_root, make_job("diverge"))
    said = (share_root / "results" / "diverge" / "attempts" / "a1-w" / "train.log").read_text()
    assert "ERROR worker.outputs: training stopped by RuntimeError | Traceback" in said, said[-2000:]


def test_non_finite_gradient_is_a_clear_error(share_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finite loss whose backward overflows (fp32 here, so no scaler to absorb it) stops the job too."""
    from worker.loop import CausalLMLoss

    real = CausalLMLoss.forward

    def exploding(self: Any, *args: Any) -> tuple[Any, Any]:
        loss, n = real(self, *args)
        if not self.training:
            return loss, n
        lora = next(p for name, p in self.named_parameters() if "lora_B" in name)
        return loss + _inf_grad(lora), n

    monkeypatch.setattr(CausalLMLoss, "forward", exploding)
    with pytest.raises(RuntimeError, match=r"gradient norm became (inf|nan) at step 1"):
        train(share_root, make_job("diverge-grad"))


def _inf_grad(param: Any) -> Any:
    """A zero-valued term whose gradient is infinite."""
    import torch

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            return x.sum() * 0

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            return torch.full(param.shape, float("inf"), dtype=param.dtype, device=param.device)

    return InfGrad.apply(param)


# ── data ─────────────────────────────────────────────────────────────────────────────────────────────────
def _tokenizer(share_root: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(share_root / "models" / "tiny")


def test_alpaca_labels_cover_the_response_and_eos_only(share_root: Path) -> None:
    tok = _tokenizer(share_root)
    row = data.Row(1, "alpaca", {"instruction": "What color is the sky?", "input": "sky", "output": "The sky is blue."})
    ex = data.tokenize(row, tok, 512)
    prompt = data.ALPACA_PROMPT_WITH_INPUT.format(instruction="What color is the sky?", input="sky")
    n_prompt = 1 + len(tok.encode(prompt, add_special_tokens=False))  # + BOS
    response = tok.encode("The sky is blue.", add_special_tokens=False)
    assert ex.input_ids[0] == tok.bos_token_id
    assert ex.labels[:n_prompt] == [data.IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:] == [*response, tok.eos_token_id]
    assert tok.decode(ex.input_ids[n_prompt:], skip_special_tokens=True) == "The sky is blue."


def test_chat_labels_cover_assistant_turns_only(share_root: Path) -> None:
    tok = _tokenizer(share_root)
    messages = [{"role": "user", "content": "What does the cow say?"}, {"role": "assistant", "content": "Moo."},
                {"role": "user", "content": "And the duck?"}, {"role": "assistant", "content": "Quack."}]
    for template in (tok.chat_template, None):  # the model's own template, then the documented plain one
        tok.chat_template = template
        ex = data.tokenize(data.Row(1, "chat", {"messages": messages}), tok, 512)
        learned = tok.decode([i for i, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != data.IGNORE])
        assert learned.replace("\n", "") == "Moo.<|eos|>Quack.<|eos|>", (template, learned)


def test_text_rows_learn_every_token_and_truncate(share_root: Path) -> None:
    tok = _tokenizer(share_root)
    ex = data.tokenize(data.Row(1, "text", {"text": "The cat says meow. " * 20}), tok, 16)
    assert len(ex.input_ids) == len(ex.labels) == 16
    assert ex.labels[1:] == ex.input_ids[1:]


def test_collate_pads_with_masked_labels() -> None:
    batch = data.collate([data.Example([1, 5, 6], [-100, 5, 6]), data.Example([1, 7], [-100, 7])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_split_is_seeded_and_keeps_both_sides(tmp_path: Path) -> None:
    rows = [data.Row(i, "text", {"text": str(i)}) for i in range(1, 21)]
    train_rows, eval_rows = data.split_rows(rows, 0.1, seed=3)
    assert (len(train_rows), len(eval_rows)) == (18, 2)
    assert data.split_rows(rows, 0.1, seed=3) == (train_rows, eval_rows)
    assert [len(s) for s in data.split_rows(rows[:2], 0.9, seed=0)] == [1, 1]
    with pytest.raises(Rejected, match="at least 2") as e:
        data.split_rows(rows[:1], 0.1, seed=0)
    assert e.value.field == "dataset"


@pytest.mark.parametrize(("line", "expected"), [
    ("{not json", "line 7: not valid JSON"),
    ('{"instruction": "Hi"}', "line 7: an instruction row needs a non-empty string \"output\""),
    ('{"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]}',
     "line 7: the last message must have role \"assistant\""),
    ('{"question": "a", "answer": "b"}', "line 7: a row needs"),
    ("[1, 2]", "line 7: a row must be a JSON object"),
])
def test_malformed_dataset_line_is_refused_by_number(share_root: Path, line: str, expected: str) -> None:
    path = share_root / "datasets" / "broken.jsonl"
    good = (share_root / "datasets" / "alpaca.jsonl").read_text().splitlines()
    path.write_text("\n".join([*good[:5], "", line, *good[5:10]]) + "\n")  # a blank line 6 still counts
    with pytest.raises(Rejected) as e:
        train(share_root, make_job("broken", dataset="datasets/broken.jsonl"))
    assert e.value.field == "dataset" and e.value.problem.startswith(expected), e.value.problem


def test_dataset_file_checks(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    for name, expected in [("missing.jsonl", "does not exist"), ("empty.jsonl", "is empty"), (".", "not a file")]:
        with pytest.raises(Rejected, match=expected) as e:
            check_dataset_file(tmp_path / name)
        assert e.value.field == "dataset"


@pytest.mark.skipif(sys.platform == "win32" or not hasattr(os, "setuid"), reason="POSIX permissions")
def test_files_the_workers_account_cannot_read_are_rejected_by_name(tiny_model_dir: Path) -> None:
    """A dataset only its owner may read (safetensors and many tools write 0600), a model subfolder of mode 0700:
    the checks passed them, and the read that followed raised PermissionError, which ended the job "failed", as
    a worker fault (audit, proven). Root reads anything: as root, a forked child checks as nobody (uid 65534)."""
    import tempfile

    as_nobody = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="loraspool-perm-"))
    try:
        os.chmod(root, 0o755)
        shutil.copytree(tiny_model_dir, root / "models" / "m")
        (root / "models" / "m" / "private").mkdir()
        write_dataset(root / "datasets" / "a.jsonl", "alpaca", rows=8)
        for folder, _, files in os.walk(root):
            os.chmod(folder, 0o755)
            for name in files:
                os.chmod(Path(folder) / name, 0o644)
        os.chmod(root / "models" / "m" / "private", 0o700 if as_nobody else 0o000)
        os.chmod(root / "datasets" / "a.jsonl", 0o600 if as_nobody else 0o000)
        lines = _checked_as(65534 if as_nobody else None, root)
        assert len(lines) == 2, lines
        assert lines[0].startswith("dataset | 'a.jsonl' cannot be read by the worker's account"), lines[0]
        assert lines[1].startswith("base_model | 'private' cannot be read by the worker's account"), lines[1]
    finally:
        for folder, _, _ in os.walk(root):
            os.chmod(folder, 0o755)
        shutil.rmtree(root, ignore_errors=True)


def _checked_as(uid: int | None, root: Path) -> list[str]:
    """The dataset and model checks' verdicts, from a forked child running as ``uid`` (this interpreter, with its
    modules loaded: it may live where that user cannot read)."""
    def verdicts() -> list[str]:
        out = []
        for check in (lambda: check_dataset_file(root / "datasets" / "a.jsonl"),
                      lambda: check_model_dir(root / "models" / "m", root)):
            try:
                check()
                out.append("passed")
            except Rejected as e:
                out.append(f"{e.field} | {e.problem}")
            except Exception as e:  # noqa: BLE001 - what the worker would have ended "failed"
                out.append(f"{type(e).__name__}: {e}")
        return out

    if uid is None:
        return verdicts()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, check, report, and leave without running pytest's exit handlers
        try:
            os.close(read)
            os.setgid(uid)
            os.setuid(uid)
            os.write(write, json.dumps(verdicts()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        said = f.read()
    os.waitpid(pid, 0)
    return json.loads(said or b"[]")


# ── refusals before anything loads ───────────────────────────────────────────────────────────────────────
def _pickle_only(folder: Path, outside: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")


def _auto_map(folder: Path, outside: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))


def _link_outside(folder: Path, outside: Path) -> None:
    target = outside / "tokenizer.json"
    shutil.move(folder / "tokenizer.json", target)
    (folder / "tokenizer.json").symlink_to(target)


def _no_config(folder: Path, outside: Path) -> None:
    (folder / "config.json").unlink()


def _no_weights(folder: Path, outside: Path) -> None:
    (folder / "model.safetensors").unlink()


def _cut_short(folder: Path, outside: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _shards_beside_a_cut_model_file(folder: Path, outside: Path) -> None:
    """A whole sharded copy, and a model.safetensors cut short: from_pretrained reads model.safetensors."""
    from worker.modelguard import read_header

    weights = folder / "model.safetensors"
    shutil.copyfile(weights, folder / "model-00001-of-00001.safetensors")
    names = read_header(weights)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}))
    _cut_short(folder, outside)


def _renamed_weights(folder: Path, outside: Path) -> None:
    (folder / "model.safetensors").rename(folder / "weights.safetensors")


def _giant_number(folder: Path, outside: Path) -> None:
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace("{", '{"odd": ' + "9" * 5000 + ", ", 1))


def _config_with(**sizes: object) -> Any:
    def breakage(folder: Path, outside: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **sizes}))
    return breakage


def _gpt2_names(folder: Path, outside: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.pop("num_hidden_layers")
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "n_layer": 2000}))


def _transposed_embedding(folder: Path, outside: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].T.contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _integer_weights(folder: Path, outside: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = (weights["lm_head.weight"] * 100).to(torch.int32)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _no_rotation(folder: Path, outside: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 0
    (folder / "config.json").write_text(json.dumps(config))


def _bad_tokenizer(folder: Path, outside: Path) -> None:
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["type"] = "Nope"
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


@pytest.mark.parametrize(("breakage", "expected"), [
    (_gpt2_names, "config.json: n_layer is 2000, more than the"),  # GPT-2's own name for num_hidden_layers
    (_config_with(vocab_size=10**15), "vocab_size is 1000000000000000, more than all the numbers the weight files"),
    (_config_with(vocab_size=10**5), "vocab_size x hidden_size (100000 x 64) is more numbers than"),
    (_config_with(vocab_size=1e15), "config.json: vocab_size is 1000000000000000.0, not a positive whole number"),
    (_config_with(text_config={"hidden_size": -4}), "config.json: text_config.hidden_size is -4, not a positive"),
    (_config_with(num_hidden_layers="2"), "num_hidden_layers is 2, not a positive whole number"),
    (_config_with(num_local_experts=10**9), "num_local_experts is 1000000000, more than all the numbers the weight"),
    (_config_with(num_hidden_layers=2000), "num_hidden_layers is 2000, more than the"),
    # Names other model types read (audit: a million num_layers built for hours): every layer-count name counts.
    (_config_with(num_layers=10**6), "config.json: num_layers is 1000000, more than the"),
    (_config_with(decoder={"num_decoder_layers": 10**6}), "config.json: decoder.num_decoder_layers is 1000000, more"),
    (_shards_beside_a_cut_model_file, "model.safetensors: model.norm.weight: shape [64] or offsets"),
    (_renamed_weights, "has weights.safetensors but neither model.safetensors nor"),
    (_pickle_only, "has only pickle weights (pytorch_model.bin)"),
    (_auto_map, "config.json has \"auto_map\""),
    (_link_outside, "'tokenizer.json' is a symlink to"),
    (_no_config, "has no config.json"),
    (_no_weights, "has no weights"),
    (_cut_short, "do not fit the file; the file is broken or was cut short"),
    (_giant_number, "config.json is not usable JSON (ValueError"),
])
def test_bad_model_folder_is_refused_before_loading(tmp_path: Path, tiny_model_dir: Path, breakage: Any,
                                                    expected: str, no_loading: None) -> None:
    refusal = _refusal(tmp_path, tiny_model_dir, breakage)
    assert refusal.field == "base_model" and expected in refusal.problem, refusal.problem
    if breakage is _link_outside:
        assert "outside the share" in refusal.problem


def _refusal(tmp_path: Path, tiny_model_dir: Path, breakage: Any) -> Rejected:
    """How a train job on a copy of the tiny model, changed by ``breakage``, is refused."""
    root, outside = tmp_path / "share", tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copytree(tiny_model_dir, root / "models" / "bad")
    write_dataset(root / "datasets" / "alpaca.jsonl", "alpaca", rows=8)
    breakage(root / "models" / "bad", outside)
    with pytest.raises(Rejected) as e:
        train(root, make_job("bad", model="models/bad"))
    return e.value


@pytest.mark.parametrize(("breakage", "expected"), [
    (_config_with(num_attention_heads=3), "(StrictDataclassClassValidationError: "),
    (_config_with(tie_word_embeddings="yes"), "(StrictDataclassFieldValidationError: "),
    (_config_with(pad_token_id=10**6), "(AssertionError: Padding_idx must be within num_embeddings"),
    (_bad_tokenizer, "its tokenizer does not load (Exception: data did not match any variant"),
    # Failed at the load (audit, proven): weights of other shapes than config.json, a scheme no library here loads.
    (_transposed_embedding, "its weights do not fit its config.json ("),
    (_config_with(quantization_config={"quant_method": "gptq", "bits": 4}),
     "config.json says it is pre-quantized (gptq), and this worker has no library to load it ("),
    # Loaded and trained on, cast to floats, with a loss in the thousands; or a NaN loss that ended "failed" (audit).
    (_integer_weights, "weight lm_head.weight (I32) is stored as integers, and config.json has no quantization_"),
    (_no_rotation, "the model's loss on the eval rows is nan before any training: its weights or config.json"),
])
def test_a_config_or_tokenizer_the_libraries_refuse_is_a_rejection(tmp_path: Path, tiny_model_dir: Path,
                                                                   breakage: Any, expected: str) -> None:
    """transformers 5 checks a config with huggingface_hub's validators, the tokenizers library raises a bare
    Exception, an embedding asserts: none of them a ValueError or an OSError, so each of these ended the job
    failed, as if the worker had a bug, instead of rejected with base_model named."""
    refusal = _refusal(tmp_path, tiny_model_dir, breakage)
    assert refusal.field == "base_model" and expected in refusal.problem, refusal.problem


def test_a_pad_token_the_model_lacks_pads_with_another_and_a_probe_with_it_is_refused(tmp_path: Path,
                                                                                      tiny_model_dir: Path) -> None:
    """A pad token added to the tokenizer without resizing the model (id 512 of a 512-row embedding): the padding
    looked it up and the job ended "failed" in an IndexError, and so did a probe holding an added token (audit,
    proven). Any id pads (pads are masked): the job trains. A probe is the job's own text: refused by name."""
    from transformers import AutoTokenizer

    root = tmp_path / "share"
    shutil.copytree(tiny_model_dir, root / "models" / "padded")
    write_dataset(root / "datasets" / "alpaca.jsonl", "alpaca", rows=24)
    tokenizer = AutoTokenizer.from_pretrained(root / "models" / "padded")
    tokenizer.add_special_tokens({"pad_token": "<added-pad>"})
    assert tokenizer.pad_token_id == 512
    tokenizer.save_pretrained(root / "models" / "padded")
    job = make_job("padded", model="models/padded", max_steps=2, batch_size=4).model_copy(
        update={"probes": ["Name a colour."]})
    assert train(root, job).metrics.steps == 2
    job = job.model_copy(update={"id": "probed", "probes": ["Name a colour.", "Say <added-pad> twice."]})
    with pytest.raises(Rejected) as e:
        train(root, job)
    assert e.value.field == "probes.1" and "gives token id 512" in e.value.problem, e.value
    # LoRA on the embedding wraps it in a layer with no num_embeddings: probes failed on it (review).
    job = make_job("embedded", model="models/padded", targets=("embed_tokens", "q_proj"), max_steps=2, batch_size=4)
    assert len(train(root, job.model_copy(update={"probes": ["Name a colour."]})).probes) == 1


def test_a_config_bigger_than_its_weights_is_refused_before_any_weight_is_read(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each size fits the weights (the config check passes), together they describe a model 30x bigger than the
    files hold: transformers would fill the rest with random numbers, or be killed allocating a real one."""
    import transformers

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were loaded before the parameter count was checked")

    root = tmp_path / "share"
    shutil.copytree(tiny_model_dir, root / "models" / "big")
    write_dataset(root / "datasets" / "alpaca.jsonl", "alpaca", rows=8)
    _config_with(intermediate_size=4096)(root / "models" / "big", tmp_path)
    check_model_dir(root / "models" / "big", root)  # no single size is out of bounds
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(Rejected) as e:
        train(root, make_job("big", model="models/big"))
    assert e.value.field == "base_model" and "config.json describes a model of" in e.value.problem, e.value.problem


@pytest.fixture(scope="module")
def gpt2_share(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A GPT-2 of 128 learned positions, with the tiny model's tokenizer: past 128 its position table ends. Short
    alpaca rows, and one text file whose row runs to 400 words."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gpt2-share")
    config = AutoConfig.for_model("gpt2", vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "models" / "g")
    for f in tiny_model_dir.iterdir():
        if "token" in f.name:
            shutil.copy(f, root / "models" / "g")
    write_dataset(root / "datasets" / "alpaca.jsonl", "alpaca", rows=16)
    (root / "datasets" / "long.jsonl").write_text("".join(json.dumps({"text": "word " * n}) + "\n"
                                                          for n in (400, 10, 12, 14, 16, 18, 20, 22)))
    return root


@pytest.mark.parametrize(("dataset", "max_length", "probe", "field", "says"), [
    ("long", 256, "Hi", "training.max_length", "rows of up to 256 tokens pass this model's 128 learned positions"),
    ("alpaca", 64, "word " * 80, "probes.0", "with its 64-token answer it passes this model's context of 128 tokens"),
])
def test_rows_or_probes_past_a_learned_position_table_are_refused_before_loading(
        gpt2_share: Path, monkeypatch: pytest.MonkeyPatch, dataset: str, max_length: int, probe: str, field: str,
        says: str) -> None:
    """Both ended in an IndexError from GPT-2's position table, the job failed as if the worker had a bug."""
    import transformers

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were loaded before the lengths were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    job = make_job("long", model="models/g", dataset=f"datasets/{dataset}.jsonl", targets=("c_attn",), max_steps=2,
                   max_length=max_length)
    with pytest.raises(Rejected) as e:
        train(gpt2_share, job.model_copy(update={"probes": [probe]}))
    assert e.value.field == field and says in e.value.problem, e.value.problem


def test_rows_and_probes_within_the_position_table_train_and_answer(gpt2_share: Path) -> None:
    """max_length past the table is no problem while every row fits it: packing starts positions again at each
    row (review: the first check refused the setting, not the rows). The longest prompt that fits is answered."""
    from worker.probes import ANSWER_TOKENS, prompt_ids

    tokenizer = _tokenizer_of(gpt2_share / "models" / "g")
    words = 1
    while len(prompt_ids(tokenizer, "word " * (words + 1))) <= 128 - ANSWER_TOKENS + 1:
        words += 1
    job = make_job("fits", model="models/g", targets=("c_attn",), max_steps=2, max_length=256)
    outcome = train(gpt2_share, job.model_copy(update={"probes": ["word " * words]}))
    assert outcome.metrics.steps == 2 and len(outcome.probes) == 1


def test_rows_past_a_rotary_models_context_train_with_a_note(share_root: Path, tmp_path: Path) -> None:
    """Rotary positions have no end: such rows are not refused, and the note says they pass what the model
    was pretrained on."""
    root = tmp_path / "share"
    shutil.copytree(share_root / "models" / "tiny", root / "models" / "short")
    config = json.loads((root / "models" / "short" / "config.json").read_text())
    (root / "models" / "short" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    write_dataset(root / "datasets" / "alpaca.jsonl", "alpaca", rows=16)
    outcome = train(root, make_job("rope", model="models/short", max_steps=2, max_length=64))
    assert any("past this model's max_position_embeddings of 32" in n for n in outcome.notes), outcome.notes


def _tokenizer_of(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_a_jobs_checks_load_and_verification_build_the_models_structure_once(
        share_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target names, the context, the parameter count and the reload each read the structure without
    weights: seconds each on an 8B model. It was built three times a job, and the context check made four."""
    import transformers

    from worker import engine

    built = []
    real = transformers.AutoModelForCausalLM.from_config
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        lambda *a, **kw: built.append(1) or real(*a, **kw))
    engine._meta_model.cache_clear()
    train(share_root, make_job("once", max_steps=1))
    assert len(built) == 1


@pytest.mark.parametrize(("entries", "data", "says"), [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, "overlapping or gapped"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 16, "end at byte 8 of the data, but the"),
    ({"a": {"dtype": "F8_E9M9", "shape": [10**12], "data_offsets": [0, 8]}}, 8, "not one safetensors defines"),
], ids=["overlap", "gap-at-end", "unknown-dtype"])
def test_weights_whose_header_does_not_tile_the_data_are_refused_by_name(tmp_path: Path, tiny_model_dir: Path,
                                                                        entries: dict, data: int, says: str) -> None:
    """Overlapping offsets and an unknown dtype ended as "failed" (SafetensorError in the loader), and an unknown
    dtype of shape 10^12 inflated the count the config check compares with (adversarial review)."""
    root = tmp_path / "share"
    folder = root / "models" / "odd"
    shutil.copytree(tiny_model_dir, folder)
    header = json.dumps(entries).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(data))
    with pytest.raises(Rejected, match=says) as e:
        check_model_dir(folder, root)
    assert e.value.field == "base_model"


def test_weights_in_every_dtype_safetensors_writes_pass_the_header_check(tmp_path: Path) -> None:
    """Files written by the library itself, in every dtype this torch has (review: FP8 FNUZ was refused)."""
    import torch
    from safetensors.torch import save_file

    from worker.modelguard import read_header

    names = ["float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
             "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "uint16",
             "uint32", "uint64"]
    dtypes = [getattr(torch, n) for n in names if hasattr(torch, n)]
    for dtype in dtypes:
        save_file({"x": torch.zeros(2, 3).to(dtype), "y": torch.zeros(5).to(dtype)}, str(tmp_path / "w.safetensors"))
        assert set(read_header(tmp_path / "w.safetensors")) == {"x", "y"}, dtype
    assert torch.float8_e4m3fnuz in dtypes


def test_pre_quantized_weights_are_not_counted_against_the_config(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A GPTQ, AQLM or bitsandbytes checkpoint packs 2 to 16 values per stored number by its own scheme: with a
    quantization_config the count is bounded by bits (one parameter per bit of the files), so a real 2-bit model
    is not refused, and one that claims a thousand times its files is (that passed unchecked, found by an
    adversarial review: a 0.6 MB folder describing a 215 GB model ended in the OOM killer)."""
    from worker.engine import check_parameters

    folder = tmp_path / "share" / "models" / "q"
    shutil.copytree(tiny_model_dir, folder)
    _config_with(intermediate_size=4096)(folder, tmp_path)
    with pytest.raises(Rejected, match="config.json describes a model of"):
        check_parameters(folder)
    _config_with(intermediate_size=4096, quantization_config={"quant_method": "gptq", "bits": 2})(folder, tmp_path)
    check_parameters(folder)
    _config_with(intermediate_size=140_000, quantization_config={"quant_method": "fp8"})(folder, tmp_path)
    with pytest.raises(Rejected, match="config.json describes a model of"):
        check_parameters(folder)


def test_a_layer_setting_that_is_not_a_layer_count_is_not_bounded_by_the_tensors(tmp_path: Path,
                                                                                 tiny_model_dir: Path) -> None:
    """Qwen2 and Qwen3 configs keep max_window_layers at 28 in a two-layer model of ~25 tensors: a pattern over
    layer names refused them (review). The layer counts are named one by one."""
    root = tmp_path / "share"
    shutil.copytree(tiny_model_dir, root / "models" / "qwenish")
    _config_with(max_window_layers=28, dense_attention_every_n_layers=64)(root / "models" / "qwenish", tmp_path)
    check_model_dir(root / "models" / "qwenish", root)


def test_links_inside_the_share_are_fine(tmp_path: Path, tiny_model_dir: Path) -> None:
    root = tmp_path / "share"
    shutil.copytree(tiny_model_dir, root / "blobs")
    (root / "models" / "linked").mkdir(parents=True)
    for f in (root / "blobs").iterdir():
        (root / "models" / "linked" / f.name).symlink_to(f)
    check_model_dir(root / "models" / "linked", root)


def test_unknown_target_module_is_refused_with_the_valid_names(share_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                               ) -> None:
    import transformers

    def no_weights(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were loaded before the module names were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(Rejected) as e:
        train(share_root, make_job("typo", targets=["q_proj", "q_prj"]))
    assert e.value.field == "lora.target_modules"
    assert e.value.problem.startswith("unknown module 'q_prj'; this model has: ")
    assert "q_proj, up_proj, v_proj" in e.value.problem
    with pytest.raises(Rejected, match="'mlp' is a LlamaMLP, not a layer LoRA can adapt"):
        train(share_root, make_job("typo2", targets=["mlp"]))
    # modules_to_save: a name nothing matched trained nothing extra without a word, and a list of layers ended the
    # job failed inside peft (audit, proven).
    for saved, says in ((["lm_head", "nope"], "unknown module 'nope'; this model's modules end in: "),
                        (["layers"], "'layers' is a ModuleList, a list of modules")):
        job = make_job("saved").model_copy(deep=True)
        job.lora.modules_to_save = saved
        with pytest.raises(Rejected) as e:
            train(share_root, job)
        assert e.value.field == "lora.modules_to_save" and e.value.problem.startswith(says), e.value


def test_guard_and_outcome_modules_never_import_torch() -> None:
    """The guard runs before any load; the daemon unpickles TrainOutcome, importing worker.train, without torch."""
    code = ("import sys, worker.modelguard, worker.train, worker.verify; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ── links planted where the worker writes ────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("planted", ["attempts", "attempts/a1-w", "attempts/a1-w/adapter"])
def test_a_link_planted_under_results_is_never_written_through(share_root: Path, tmp_path: Path,
                                                               planted: str) -> None:
    """results/<id>/ is writable by anyone with the share. A link there (to a teammate's folder, or out of the
    share) would have had the worker rmtree, overwrite, append to and then move that folder's files with its own
    rights (seen by an adversarial review: a teammate's adapter deleted, her train.log moved into the job's
    results). The job fails, naming the link, and the folder it leads to is untouched."""
    job = make_job(f"plant-{planted.count('/')}", max_steps=2)
    victim = tmp_path / "alice" / "run1"
    (victim / "adapter").mkdir(parents=True)
    (victim / "adapter" / "ALICE.txt").write_text("alice's only copy")
    (victim / "train.log").write_text("alice's notes\n")
    link = share_root / "results" / str(job.id) / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim if planted != "attempts" else victim.parent, target_is_directory=True)
    before = {str(p.relative_to(tmp_path)): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    with pytest.raises(PlantedLink, match="is a link"):
        train(share_root, job)
    after = {str(p.relative_to(tmp_path)): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before


def test_logs_are_never_appended_through_a_link(tmp_path: Path) -> None:
    from worker.outputs import MetricsLog, TrainLog

    theirs = tmp_path / "theirs.txt"
    theirs.write_text("not yours\n")
    (tmp_path / "train.log").symlink_to(theirs)
    (tmp_path / "metrics.jsonl").symlink_to(theirs)
    with pytest.raises(OSError), TrainLog(tmp_path):
        pass
    with pytest.raises(OSError), MetricsLog(tmp_path / "metrics.jsonl") as m:
        m.train(1, 0.5)
    assert theirs.read_text() == "not yours\n"


@pytest.mark.parametrize("where", ["outside", "share/adapters/x/v1"])
def test_a_token_cache_folder_that_is_a_link_is_not_used(tmp_path: Path, tiny_model_dir: Path, where: str) -> None:
    """datasets/.tokens as a link, out of the share or into a write-once adapter version: the worker would write
    there with its own rights (and read rows someone else made). It trains without the cache, writing nothing."""
    root = tmp_path / "share"
    shutil.copytree(tiny_model_dir, root / "models" / "tiny")
    write_dataset(root / "datasets" / "alpaca.jsonl", "alpaca", rows=32)
    outside = tmp_path / where
    outside.mkdir(parents=True)
    (root / "datasets" / ".tokens").symlink_to(outside, target_is_directory=True)
    outcome = train(root, make_job("no-cache", max_steps=2))
    assert outcome.data.tokens_cached == 0 and list(outside.iterdir()) == []


def test_a_stuck_training_process_does_not_outlive_its_killed_worker(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A child stuck where it never looks for its parent (here a chat template that loops 10^10 times while
    tokenizing) would outlive a kill -9 of its worker for good, holding the CPU or GPU. It is ended
    ORPHAN_GRACE after (1 s here) the worker is gone."""
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import sys

    import psutil

    root = tmp_path / "share"
    shutil.copytree(tiny_model_dir, root / "models" / "loop")
    (root / "models" / "loop" / "chat_template.jinja").write_text(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}")
    write_dataset(root / "datasets" / "chat.jsonl", "chat", rows=8)
    job = make_job("stuck", model="models/loop", dataset="datasets/chat.jsonl")
    driver = (f"import json, pathlib\nfrom schemas.job import JobSpec\nfrom worker import horse\n"
              f"root = pathlib.Path({str(root)!r})\njob = JobSpec.model_validate_json({job.model_dump_json()!r})\n"
              "req = dict(job=job, model_dir=root / 'models/loop', datasets=[root / 'datasets/chat.jsonl'], "
              "share_root=root, out_dir=root / 'results/stuck/attempts/a1-w', device='cpu', file_mode=0o664)\n"
              "horse.run(req, lambda p: print(json.dumps(p.phase), flush=True), lambda: None)\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "LORASPOOL_ORPHAN_GRACE": "1"}, cwd=Path(__file__).resolve().parents[1])
    children: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        while json.loads(proc.stdout.readline()) != "preparing":  # the last report before the loop: stuck in it
            pass
        children = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        assert len(children) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, "the stuck training process outlived its worker"
    finally:
        for p in [*children, *psutil.Process().children(recursive=True)]:  # the orphan is no child of ours
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def test_a_cpu_training_process_starts_with_malloc_keeping_what_it_frees(share_root: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU worker puts glibc's keep-what-you-free tunables in its environment once, at start-up
    (worker.childenv), and its training child is spawned with them. A GPU worker, a person's own
    GLIBC_TUNABLES, or a glibc older than the one measured gets nothing added."""
    import platform

    import psutil

    from spooler.config import WorkerSettings
    from tests.conftest import make_share
    from worker import childenv, horse
    from worker.daemon import Worker

    if not childenv._measured_glibc():
        pytest.skip("glibc 2.36's malloc tunables only")
    monkeypatch.setenv(childenv.TUNABLES, "")
    monkeypatch.delenv(childenv.TUNABLES)  # and gone again after the test
    spool = make_share(tmp_path / "spool")
    worker = Worker(spool, WorkerSettings(share=spool.root, id="w1", device="cpu", cache_dir=tmp_path / "cache"))
    assert worker.device == "cpu" and os.environ[childenv.TUNABLES] == childenv.CPU_TUNABLES
    assert not childenv.prepare("cpu")  # a second worker (slot) of the process adds nothing
    seen: list[list[bytes]] = []

    def look() -> str | None:
        children = [c for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())]
        if not children:
            return None
        # glibc cuts the variable at each ':' in place as it parses it, so the pieces show as separate entries.
        seen.append(Path(f"/proc/{children[0].pid}/environ").read_bytes().split(b"\0"))
        return "cancel"

    result = horse.run(vars(request(share_root, make_job("malloc", max_steps=50))), lambda p: None, look)
    assert result.kind == "cancelled"
    wanted = f"{childenv.TUNABLES}={childenv.CPU_TUNABLES}".encode().split(b":")
    assert seen and all(piece in seen[0] for piece in wanted), [e for e in seen[0] if b"glibc" in e.lower()]
    assert childenv.for_training("cuda", {}) == {}
    assert childenv.for_training("cpu", {childenv.TUNABLES: "glibc.malloc.arena_max=2"}) == {}
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.34"))
    assert childenv.for_training("cpu", {}) == {}
