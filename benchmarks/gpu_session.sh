#!/usr/bin/env bash
# The GPU checks of issue #6 and tests/test_gpu.py, in phases that each end well inside ten minutes, for a lent GPU
# machine that has torch, transformers and peft but not the rest (or any machine with a CUDA GPU and this repo).
#
#   bash benchmarks/gpu_session.sh PHASE [OUT]       PHASE: tests | qwen | compile | anchors | llama4bit | quality
#
# OUT (default $OUT, else /tmp/gpu-out) receives one log per phase and the benchmark's JSON lines.
# Wheels the machine lacks are installed from .whl/ when that folder exists. Fetch them on a machine with pip:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     bitsandbytes watchdog pydantic pydantic-core annotated-types typing-inspection liger-kernel time-machine
# The anchors phase needs the reference recipes copied into .anchors/ (cp ../shared/anchors/*.py .anchors/).
set -uo pipefail
cd "$(dirname "$0")/.."
phase="${1:?usage: gpu_session.sh tests|qwen|compile|anchors|llama4bit|quality [OUT]}"
out="${2:-${OUT:-/tmp/gpu-out}}"
mkdir -p "$out"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
bench=(benchmarks/train_throughput.py --device cuda --cache /tmp/loraspool-bench --json "$out/$phase.jsonl")
log="$out/$phase.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers",
transformers.__version__, "peft", peft.__version__)'
  case "$phase" in
    tests)  # every CUDA test, and the CPU tests of the loss and the loop, which then also run beside a GPU
      "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        "tests/test_train.py::test_the_chunked_loss_has_the_full_logits_gradients" \
        "tests/test_train.py::test_a_fused_head_loss_kernel_trains_only_when_it_agrees_with_the_torch_chunks" \
        "tests/test_train.py::test_a_packed_attention_kernel_trains_only_when_it_agrees_with_the_masked_path" ;;
    qwen)  # the targets' shape: the worker against the tuned Trainer; then without liger, and without flash varlen
      "$py" "${bench[@]}" --shape qwen3-0.6b --recipes worker,tuned --steps 20 --warmup 3
      "$py" "${bench[@]}" --shape qwen3-0.6b --recipes worker --steps 20 --warmup 3 --no-liger
      "$py" "${bench[@]}" --shape qwen3-0.6b --recipes worker --steps 20 --warmup 3 --no-varlen ;;
    compile)  # compile time and first step are reported apart from the steady rate
      "$py" "${bench[@]}" --shape qwen3-0.6b --recipes worker --steps 20 --warmup 3 --compile
      "$py" "${bench[@]}" --shape qwen3-0.6b --recipes worker --steps 20 --warmup 3 --compile --batch 32 ;;
    anchors)  # the reference recipes on the same machine, for the side-by-side table
      "$py" .anchors/gpu_lora_baseline.py tuned --model qwen3-0.6b --steps 20
      "$py" .anchors/gpu_lora_plain.py --rows 32 --chunked-loss --compile ;;
    llama4bit)
      "$py" "${bench[@]}" --shape llama-8b --quantization 4bit --recipes worker,qlora --steps 10 --warmup 2 ;;
    quality)
      "$py" benchmarks/train_quality.py --device cuda --json "$out/quality.json" ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
} 2>&1 | tee "$log"
