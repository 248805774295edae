#!/usr/bin/env bash
# CUDA checks for a GPU machine: log-prob kernels, bf16 quickstart, scale-out strategies, and the
# log-prob memory benchmark.
#
#   bash scripts/gpu_check.sh [WHEEL_DIR]
#
# Uses the machine's python3 with its own torch. WHEEL_DIR, if given, holds wheels of the other
# dependencies for a machine without a package index (installed with --no-deps, so its torch stays).
# Results go to $OUT (default ./gpu_check_out).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ $# -ge 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps "$1"/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from source: no build step needed
# Caches and the run folder stay outside $OUT, which keeps only the summaries.
WORK="$(mktemp -d)"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 IPO_LIGHTNING_CACHE="$WORK/cache" HF_DATASETS_CACHE="$WORK/hf_datasets"
export GPU_CHECK_RUNS="$WORK/runs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
status=0
"$PY" scripts/gpu_check.py || status=$?
# DDP / FSDP / DeepSpeed ZeRO-2/3 on min(2, GPUs) devices: frozen reference, export, loss vs DDP.
"$PY" scripts/gpu_check_scale.py || status=$?
# Qwen2.5's vocabulary, 8 sequences of 2048 scored tokens, bf16 logits (4.6 GiB).
"$PY" benchmarks/logprobs.py --device cuda --dtype bfloat16 --rows 8 --length 2048 --vocab 151936 \
  | tee "$OUT/logprobs_benchmark.jsonl"
exit "$status"
