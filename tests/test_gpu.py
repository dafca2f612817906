"""The CUDA paths: bf16 LoRA, bitsandbytes 8-bit and 4-bit QLoRA, NVML in the heartbeat, a worker on cuda.

CI has no GPU: every test here skips, saying so. They run on a lent GPU machine (see the closing notes for
which ran where); the tiny model keeps each under a minute.
"""

from __future__ import annotations

import copy
import functools
import shutil
from pathlib import Path

import pytest

from schemas.job import JobSpec
from worker.tinymodel import write_dataset
from worker.train import TrainRequest, run_training

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


@pytest.fixture(scope="module")
def gpu_share(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("gpu-share")
    shutil.copytree(tiny_model_dir, root / "models" / "tiny")
    write_dataset(root / "datasets" / "alpaca.jsonl", "alpaca", rows=64)
    return root


def _train(root: Path, job_id: str, quantization: str, gpu_memory_gib: float | None = None, **training: object):
    job = JobSpec(id=job_id, kind="train", base_model="models/tiny", dataset="datasets/alpaca.jsonl",
                  quantization=quantization, lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
                  training={"max_steps": 40, "batch_size": 8, "learning_rate": 3e-3, "max_length": 64, **training})
    req = TrainRequest(job=job, model_dir=root / "models" / "tiny", datasets=[root / "datasets" / "alpaca.jsonl"],
                       share_root=root, out_dir=root / "results" / job_id / "attempts" / "a1-w", device="cuda",
                       file_mode=0o664, gpu_memory_gib=gpu_memory_gib)
    return run_training(req, lambda p: None, lambda: False)


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_cuda_learns(gpu_share: Path, quantization: str) -> None:
    if quantization != "none":
        pytest.importorskip("bitsandbytes")
    outcome = _train(gpu_share, f"cuda-{quantization}", quantization)
    m = outcome.metrics
    assert m.eval_loss_after < m.eval_loss_before, m
    assert (outcome.adapter_dir / "adapter_model.safetensors").is_file()
    assert not [n for n in outcome.notes if "plain LoRA" in n], outcome.notes


def test_the_workers_gpu_memory_cap_is_enforced_and_planned_for(gpu_share: Path) -> None:
    """gpu_memory_gib: the allocator refuses past it, the checkpointing estimate plans for it as for a card that
    size, and the result says so."""
    from types import SimpleNamespace

    from schemas.job import Quantization
    from worker import engine

    model = SimpleNamespace(config=SimpleNamespace(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28))
    tokens = 1024  # about 1.8 GB of activations by the estimate: under the whole GPU, over a quarter GiB
    try:
        plan = engine.plan_for(Quantization.none, "cuda")
        assert not engine.wants_checkpointing("auto", plan, model, tokens)
        plan.memory_cap = engine.cap_gpu_memory(plan, 0.25)
        assert plan.notes[-1].startswith("GPU memory held to 0.25 of ")
        assert engine.wants_checkpointing("auto", plan, model, tokens)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2**29, dtype=torch.uint8, device="cuda")
        outcome = _train(gpu_share, "cuda-capped", "none", gpu_memory_gib=1.0, max_steps=5)
        assert any(n.startswith("GPU memory held to 1 of ") for n in outcome.notes), outcome.notes
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_cuda_packed_compiled_checkpointed(gpu_share: Path) -> None:
    """The fast path (packed rows, compiled body) and the low-memory one (gradient checkpointing) both learn."""
    outcome = _train(gpu_share, "cuda-fast", "none", packing=True, compile=True, gradient_checkpointing=True,
                     checkpoint_every_steps=15)
    m = outcome.metrics
    assert m.eval_loss_after < m.eval_loss_before, m
    assert m.compile_seconds is not None and m.compile_seconds > 0
    assert m.padded_tokens and m.tokens and m.tokens <= m.padded_tokens
    assert any("gradient checkpointing on" in n and "packed" in n for n in outcome.notes), outcome.notes


def test_batches_reach_the_gpu_whole_from_pinned_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.batching import Batcher
    from worker.data import Example

    examples = [Example(input_ids=list(range(3, 3 + n)), labels=list(range(3, 3 + n))) for n in (5, 9, 30, 17)]
    batch = Batcher(examples, 2, 32, 0, 0, True).batch(0, 0)
    pin, pinned = torch.Tensor.pin_memory, []

    def counted(t: torch.Tensor, *args: object) -> torch.Tensor:
        pinned.append(t.shape)
        return pin(t, *args)

    monkeypatch.setattr(torch.Tensor, "pin_memory", counted)
    moved = batch.to("cuda")
    torch.cuda.synchronize()
    assert len(pinned) == 3  # ids, labels, positions (a packed batch has no mask)
    for here, there in ((batch.input_ids, moved.input_ids), (batch.labels, moved.labels),
                        (batch.position_ids, moved.position_ids)):
        assert there.is_cuda and torch.equal(here, there.cpu())


def test_nvml_reports_the_gpu() -> None:
    from worker.sysinfo import SystemSampler

    sample = SystemSampler()()
    assert sample["gpus"], "NVML found no GPU although torch sees one"
    gpu = sample["gpus"][0]
    assert gpu["memory_total_bytes"] > 0 and gpu["name"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_liger_fused_loss_is_chosen_and_agrees_with_the_torch_chunks(dtype: str) -> None:
    """With liger-kernel installed, a frozen head's loss runs through its fused kernel, checked first against
    the torch chunks on the model's hidden states; over a 150k vocabulary and several of its chunks, the loss
    and gradients match the model's own logits to bf16 rounding."""
    pytest.importorskip("liger_kernel")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker import loop

    config = AutoConfig.for_model("qwen3", vocab_size=151_936, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    ids = torch.randint(0, 151_936, (4, 256), generator=torch.Generator().manual_seed(1)).cuda()
    runs = []
    for chunked in (True, False):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).cuda()
        model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
        step_module = loop.CausalLMLoss(model, chunked=chunked)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            if chunked:
                which, refused = step_module.choose_fused(ids[:1, :32], "cuda")
                assert (which, refused) == ("liger-kernel's fused linear cross-entropy", None)
            loss, _ = step_module(ids, ids, None, None)
        loss.backward()
        runs.append((float(loss.detach()), [p.grad.float() for p in model.parameters() if p.requires_grad]))
    (loss, grads), (own_loss, own_grads) = runs
    tolerance = 1e-2 if dtype == "bfloat16" else 1e-4
    assert abs(loss - own_loss) <= tolerance * abs(own_loss)
    for a, b in zip(grads, own_grads, strict=True):
        assert float((a - b).norm() / b.norm()) < 3 * tolerance


@pytest.mark.parametrize("compiled", [False, True])
def test_flash_varlen_attention_is_chosen_for_packed_rows_and_trains_as_the_mask_does(
        compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA (bf16, grouped-query heads as qwen3 has them) packed rows attend by document through torch's flash
    varlen kernel, chosen after its check, eager and with the body compiled; the loss and LoRA gradients of a
    packed batch are those of transformers' masked SDPA, to bf16 rounding. (Compiled, a call is counted when
    dynamo traces it: once a layer at least.)"""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    real, calls = varlen.varlen_attn, [0]

    @functools.wraps(real)  # the worker reads its signature
    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", counted)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker import loop, packedattn

    config = AutoConfig.for_model("qwen3", vocab_size=1024, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    ids = torch.randint(3, 1024, (4, 512), generator=torch.Generator().manual_seed(1)).cuda()
    cuts = [0, 100, 101, 350, 512]  # a one-token document, and one that spans several flash blocks
    positions = torch.cat([torch.arange(b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]).expand(4, -1).cuda()
    runs = []
    for ours in (True, False):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.bfloat16).cuda()  # switched
        if ours:
            assert packedattn.use_for_packed_rows(base)
        model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
        step_module = loop.CausalLMLoss(model, chunked=True)
        if ours:
            which, refused = step_module.choose_attention(ids[:1, :32], "cuda")
            assert (which, refused) == ("flash varlen attention (torch.nn.attention.varlen)", None)
            calls[0] = 0
            if compiled:
                step_module._body.compile()
        for _ in range(2 if compiled and ours else 1):  # a compiled body: the second call runs the compiled code
            model.zero_grad(set_to_none=True)
            loss, _ = step_module(ids, ids, None, positions)
            loss.backward()
        if ours:
            assert calls[0] >= config.num_hidden_layers, calls  # the training steps took the kernel
        runs.append((float(loss.detach()), [p.grad.float() for p in model.parameters() if p.requires_grad]))
    (loss, grads), (own_loss, own_grads) = runs
    assert abs(loss - own_loss) <= 1e-2 * abs(own_loss)
    for a, b in zip(grads, own_grads, strict=True):
        assert float((a - b).norm() / b.norm()) < 5e-2
