#!/usr/bin/env bash
# CUDA checks for a GPU machine, in parts (estimated wall time on one H200, machine start not included):
#   kernels  log-prob kernels, bf16 quickstart, log-prob memory benchmark     -> kernels.jsonl  (~90 s)
#   scale    DDP/FSDP/FSDP2/ZeRO-2/ZeRO-3 on a tiny Llama in float32            -> scale.jsonl    (~120 s)
#   qwen     the same on a random-init Qwen2.5-0.5B-shaped model, bf16-mixed    -> qwen.jsonl     (~180 s)
#   packing  padding_free vs padded log-probs in bf16 (sdpa; flash-attn if any) -> packing.jsonl  (~20 s)
#   rl       RLOO and online IPO steps (sampling included) in bf16 vs offline  -> rl.jsonl       (~40 s)
#   bench    benchmarks/gpu_throughput.py, when the file exists                 -> bench.jsonl    (~240 s)
#
#   bash scripts/gpu_check.sh                     # every part
#   GPU_CHECK_ONLY=scale,packing bash scripts/gpu_check.sh
#
# Results: one JSON line per check in $OUT/<part>.jsonl (default OUT=./gpu_check_out), every child's
# output tail in $OUT/gpu_check.log. Uses the machine's python3 (PYTHON) and its own torch; wheels in
# .whl/ (scripts/gpu_wheels.sh) are installed with --no-deps into /tmp/site first, for a machine
# without a package index. GPU_CHECK_ACCELERATOR=cpu dry-runs every part that can run on CPU (with
# GPU_CHECK_SMALL=1 for small models), using the current environment's packages.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
ONLY=",${GPU_CHECK_ONLY:-kernels,scale,qwen,packing,rl,bench},"
ACCELERATOR="${GPU_CHECK_ACCELERATOR:-gpu}"
say() { echo "$*" | tee -a "$LOG"; }

if [ "$ACCELERATOR" != cpu ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >>"$LOG" 2>&1 || say "wheel install failed (see $LOG)"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from source: no build step needed
# Caches and run folders stay outside $OUT, which keeps only the summaries. No network, no W&B.
WORK="$(mktemp -d)"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false IPO_LIGHTNING_CACHE="$WORK/cache" HF_DATASETS_CACHE="$WORK/hf_datasets"
export GPU_CHECK_RUNS="$WORK/runs"
[ "$ACCELERATOR" != cpu ] && export DS_ACCELERATOR=cuda
if [ "$ACCELERATOR" != cpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi
say "python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>&1)"

# The machine's own packages are not pinned (pyarrow, for one, is too big to carry): say their versions,
# and stop at once, not after every part has failed, if the CLI cannot even be imported.
say "packages: $("$PY" -c '
from importlib.metadata import PackageNotFoundError, version
def found(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"
names = "transformers lightning datasets pyarrow fsspec jsonargparse trl deepspeed liger-kernel flash-attn"
print(" ".join(f"{name} {found(name)}" for name in names.split()))' 2>&1)"
if ! "$PY" -c "import ipo_lightning.cli" >>"$LOG" 2>&1; then
  say "cannot import ipo_lightning.cli with these packages (the traceback is in $LOG)"
  exit 1
fi

status=0
TOTAL_START=$SECONDS
# part NAME TIMEOUT COMMAND...: stdout (the JSON lines) to the terminal and the log, stderr to the log.
part() {
  local name="$1" limit="$2"
  shift 2
  case "$ONLY" in *",$name,"*) ;; *) return 0 ;; esac
  local start=$SECONDS rc
  echo "===== $name: $*" >>"$LOG"
  timeout -k 10 "$limit" "$@" 2>>"$LOG" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && status=1
  say "part $name: exit $rc, $((SECONDS - start)) s"
}

kernels() {
  set -o pipefail  # bash -c starts without it
  if [ "$ACCELERATOR" = cpu ]; then
    echo '{"check": "kernels", "ok": true, "skipped": "the kernel checks need CUDA"}' | tee -a "$OUT/kernels.jsonl"
    return 0
  fi
  "$PY" scripts/gpu_check.py || return 1
  # Qwen2.5's vocabulary, 8 sequences of 2048 scored tokens, bf16 logits (4.6 GiB).
  "$PY" benchmarks/logprobs.py --device cuda --dtype bfloat16 --rows 8 --length 2048 --vocab 151936 \
    | tee -a "$OUT/kernels.jsonl"
}

# The on-policy methods on the device: benchmarks/rl_step.py on the quickstart model (built in
# seconds; builtin:gold's reference takes a minute and a half of SFT to build), one round.
rl() {
  set -o pipefail  # bash -c starts without it
  local device=cuda dtype=bfloat16
  [ "$ACCELERATOR" = cpu ] && device=cpu dtype=float32
  "$PY" benchmarks/rl_step.py --model builtin:quickstart --data builtin:quickstart/train \
    --device "$device" --dtype "$dtype" --repeats 1 | grep '^{' | tee -a "$OUT/rl.jsonl"
}

export -f kernels rl
export PY ACCELERATOR
part kernels 200 bash -c kernels
part scale 240 "$PY" scripts/gpu_check_scale.py --model tiny
part qwen 330 "$PY" scripts/gpu_check_scale.py --model qwen
part packing 120 "$PY" scripts/gpu_check_packing.py
part rl 150 bash -c rl
if [ -f benchmarks/gpu_throughput.py ]; then
  # The benchmark caps itself at --budget-s (GPU_CHECK_BENCH_BUDGET, default 210 s; --small on CPU).
  BENCH_BUDGET="${GPU_CHECK_BENCH_BUDGET:-210}"
  SMALL_FLAG=()
  [ "$ACCELERATOR" = cpu ] && SMALL_FLAG=(--small)
  part bench $((BENCH_BUDGET + 30)) "$PY" benchmarks/gpu_throughput.py --out "$OUT/bench.jsonl" \
    --budget-s "$BENCH_BUDGET" "${SMALL_FLAG[@]}"
fi
say "all parts: $((SECONDS - TOTAL_START)) s, $([ $status -eq 0 ] && echo ok || echo FAILED)"
rm -rf "$WORK"
exit "$status"
