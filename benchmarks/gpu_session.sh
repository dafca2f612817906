#!/usr/bin/env bash
# The GPU checks of issue #6 and tests/test_gpu.py, in phases that each end well inside ten minutes, for a lent GPU
# machine that has torch, transformers and peft but not the rest (or any machine with a CUDA GPU and this repo).
#
#   bash benchmarks/gpu_session.sh PHASE [OUT] [FLAGS...]
#       PHASE: tests | qwen | targets | compile | profile | anchors | llama4bit | quality
#
# OUT (default $OUT, else /tmp/gpu-out) receives one log per phase and the benchmark's JSON lines. FLAGS go to the
# targets, compile, profile and llama4bit phases' runs (--no-liger, --no-varlen, --batch N, --compile), to take a rate apart.
#
# Seen on one H100 (2026-11-24, torch 2.11, transformers 5.17), warm machine: tests 139 s; qwen ~190 s; one
# compiled worker run at batch 32 ~280 s (most of it compiling; a compiled batch-16 run with liger and varlen did
# not finish in 200 s). Run targets first: it is the side-by-side run the targets of #6 name. A warm machine keeps
# /tmp (the built model, the wheels) between calls; a fresh one builds again. With 30 minutes of a lent GPU, one
# phase per call, each call made as soon as the last returns (an idle machine goes back after 30 s): targets,
# llama4bit (never run: its build writes 16 GB; a rerun after a time-out reuses a finished build), quality, tests
# (the gpu_memory_gib test has not run), profile.
# Wheels the machine lacks are installed from .whl/ when that folder exists. Fetch them on a machine with pip:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     bitsandbytes watchdog pydantic pydantic-core annotated-types typing-inspection liger-kernel time-machine
# The anchors phase needs the reference recipes copied into .anchors/ (cp ../shared/anchors/*.py .anchors/).
set -uo pipefail
cd "$(dirname "$0")/.."
phase="${1:?usage: gpu_session.sh tests|qwen|targets|compile|profile|anchors|llama4bit|quality [OUT] [FLAGS...]}"
shift
out="${OUT:-/tmp/gpu-out}"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # OUT may be left out before FLAGS
  out="$1"
  shift
fi
flags=("$@")
mkdir -p "$out"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
if [ -d .whl ] && ! (ls .whl | cmp -s - /tmp/site/.loraspool-wheels); then  # again when the wheels changed
  rm -rf /tmp/site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  ls .whl > /tmp/site/.loraspool-wheels
fi
if [ -d /tmp/site ]; then
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
tag="$phase$(printf '%s' "${flags[*]:-}" | tr -c 'a-z0-9' '-' | tr -s '-')"
tag="${tag%-}"
bench=(benchmarks/train_throughput.py --device cuda --cache /tmp/loraspool-bench --json "$out/$tag.jsonl")
log="$out/$tag.log"
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
    targets)  # the targets' run: the compiled worker at batch 32 beside the tuned Trainer at 16 x 2, one run
      "$py" "${bench[@]}" --shape qwen3-0.6b --recipes worker,tuned --steps 20 --warmup 3 --compile \
        --worker-batch 32 ${flags[@]+"${flags[@]}"} ;;
    compile)  # one compiled worker run (batch 32 unless FLAGS say), to take the rate apart with FLAGS
      "$py" "${bench[@]}" --shape qwen3-0.6b --recipes worker --steps 20 --warmup 3 --compile --batch 32 \
        ${flags[@]+"${flags[@]}"} ;;
    profile)  # where a step's time goes, as FLAGS say and then also with masked SDPA (3 steps after the timed 20)
      "$py" "${bench[@]}" --shape qwen3-0.6b --recipes worker --steps 20 --warmup 3 ${flags[@]+"${flags[@]}"} \
        --profile "$out/$tag.txt"
      "$py" "${bench[@]}" --shape qwen3-0.6b --recipes worker --steps 20 --warmup 3 ${flags[@]+"${flags[@]}"} \
        --no-varlen --profile "$out/$tag-no-varlen.txt" ;;
    anchors)  # the reference recipes on the same machine, for the side-by-side table
      "$py" .anchors/gpu_lora_baseline.py tuned --model qwen3-0.6b --steps 20
      # the plain loop loads the model the baseline builds; ours is the same shape, should the baseline fail
      [ -e /tmp/base-qwen3-0.6b ] || [ ! -d /tmp/loraspool-bench/qwen3-0.6b/model ] \
        || ln -sfn /tmp/loraspool-bench/qwen3-0.6b/model /tmp/base-qwen3-0.6b
      "$py" .anchors/gpu_lora_plain.py --rows 32 --chunked-loss --compile ;;
    llama4bit)  # the worker held to 12 GiB, as on the seed users' smaller cards, beside the QLoRA Trainer
      "$py" "${bench[@]}" --shape llama-8b --quantization 4bit --recipes worker,qlora --steps 10 --warmup 2 \
        --gpu-memory-gib 12 --stop-after-timed ${flags[@]+"${flags[@]}"} ;;
    quality)
      "$py" benchmarks/train_quality.py --device cuda --json "$out/quality.json" ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
} 2>&1 | tee "$log"
