#!/usr/bin/env bash
# GPU checks of issue 18, one script, about 5 minutes on one H100 / H200 (each step has a time limit):
#
#   1. benchmarks/bench_scale.py --device cuda: the TinyLlama-1.1B-shaped QLoRA study (bf16 base ->
#      4-bit on the GPU, resident across trials), isolation process and none, against transformers
#      4-bit + PEFT in a fresh process per trial; 4 trials x 2 steps each;
#   2. benchmarks/bench_scale.py --oom-check --device cuda: trials of batch 1, a batch that cannot
#      fit, batch 1 in isolation: process; the second must FAIL with an out-of-memory reason and the
#      third must run in a fresh trial process;
#   3. benchmarks/bench_sft.py --device cuda: lora-tune's sft step against TRL's SFTTrainer, tokens/s.
#
#   bash benchmarks/gpu_check.sh            # from the repository root (or anywhere: it cd's there)
#   OUT=somewhere bash benchmarks/gpu_check.sh
#
# Everything goes under ${OUT:-gpu_out}: steps.log (what ran, how long, exit codes), env.txt,
# nvidia-smi.txt, gpu_memory.csv (nvidia-smi every 0.5 s), each step's markdown (.md), stderr
# (.err) and JSON, and bench_scale's run folder (study files, lora-tune run logs). The model
# (2.05 GiB) is built once under ${WORK:-${TMPDIR:-/tmp}/lora-tune-bench}, not in OUT.
# If `python -c "import lora_tune"` fails, a .venv is made first (python -m venv .venv; pip
# install torch; pip install -e '.[dev]'), which needs a pip index and is not in the 5 minutes.
# Exit status: 0 when every step passed, 1 otherwise (the later steps still run).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-${TMPDIR:-/tmp}/lora-tune-bench}
mkdir -p "$WORK"
: > "$OUT/steps.log"

say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/steps.log" >&2; }

PY=$(command -v python || command -v python3 || true)
if [ -z "$PY" ]; then
  say "no python on PATH"
  exit 1
fi
if ! "$PY" -c "import lora_tune" 2>/dev/null; then
  say "lora_tune is not importable with $PY: creating .venv (python -m venv .venv; pip install torch; pip install -e '.[dev]')"
  "$PY" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
  PY=python
  say "pip install torch"
  pip install torch 2>&1 | tail -n 3
  say "pip install -e '.[dev]'"
  if ! pip install -e '.[dev]' 2>&1 | tail -n 3; then
    say "'.[dev]' failed; pip install -e '.[quant,hf]' trl instead"
    pip install -e '.[quant,hf]' trl 2>&1 | tail -n 3
  fi
fi

say "python: $PY"
"$PY" - > "$OUT/env.txt" 2>&1 <<'EOF' || true
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "optuna", "lora_tune"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING:", exc)
import torch
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported(),
          "memory GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
EOF
cat "$OUT/env.txt" >&2
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "CUDA is not available to torch: nothing to check"
  exit 1
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
lscpu > "$OUT/lscpu.txt" 2>&1 || true

SMI_PID=""
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used,memory.total,utilization.gpu --format=csv -lms 500 \
    > "$OUT/gpu_memory.csv" 2>/dev/null &
  SMI_PID=$!
fi
stop_smi() { if [ -n "$SMI_PID" ]; then kill "$SMI_PID" 2>/dev/null || true; fi; }
trap stop_smi EXIT

status=0
# run_step NAME SECONDS COMMAND...: stdout to NAME.md, stderr to NAME.err; a failure is recorded, not fatal
run_step() {
  local name=$1 limit=$2 rc=0 start
  shift 2
  say "$name (limit ${limit} s): $*"
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.md" 2> "$OUT/$name.err" || rc=$?
  if [ "$rc" -eq 0 ]; then
    say "$name: ok in $(( $(date +%s) - start )) s"
  else
    say "$name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit')) after $(( $(date +%s) - start )) s; end of $name.err:"
    tail -n 20 "$OUT/$name.err" | tee -a "$OUT/steps.log" >&2
    status=1
  fi
}

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

run_step bench_scale 200 "$PY" benchmarks/bench_scale.py --device cuda --trials 4 --work "$WORK" \
  --json "$OUT/bench_scale.json"
latest=$(ls -td "$WORK"/runs/*/ 2>/dev/null | head -n 1 || true)
if [ -n "$latest" ]; then
  cp -r "$latest" "$OUT/bench_scale_run"
fi

run_step oom_check 75 "$PY" benchmarks/bench_scale.py --oom-check --device cuda --work "$WORK" \
  --json "$OUT/oom_check.json"

run_step bench_sft 60 "$PY" benchmarks/bench_sft.py --device cuda --reps 2 --steps 20 --warmup 3 \
  --json "$OUT/bench_sft.json"

for name in bench_scale oom_check bench_sft; do
  echo
  echo "## $name"
  cat "$OUT/$name.md" 2>/dev/null || true
done
say "done: status $status; everything is in $OUT"
exit "$status"
