#!/usr/bin/env bash
# The whole GPU benchmark plus the correctness check, in under 8 minutes on one H100/H200:
#   1. curve_check  IC-KD loss curve, classic (fp32, eager) vs fast (bf16, CUDA graph) path
#   2. throughput   CE / KD / DKD / IC-KD x batch 64, 512 x classic, fast path; issue targets
#   3. retrieval    memory-bank retrieval per backend on the GPU (bench/retrieval.py)
#   4. packing      aggregate images/s of 1, 2, 4 concurrent trials on the GPU
# Run from the repository root:  bash bench/gpu_check.sh
# Every part has its own time budget (and all of them one total budget); a part that fails or runs
# out of time is reported and the others still run. Output folder: $OUT if set, else
# bench/results/<timestamp>: per part <name>.log (stdout: JSON lines and tables), <name>.jsonl (the
# JSON lines), <name>.json (the summary), <name>.stderr. Exit status 1 if any part failed (a missed
# throughput target counts: throughput runs with --strict).
# GPU_CHECK_SMOKE=1 runs the same script with every part in smoke mode on the CPU (checks the
# script itself on a machine without a GPU; numbers meaningless, targets not checked).
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
DIR="${OUT:-bench/results/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$DIR"
TOTAL_BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
START=$SECONDS
declare -a RESULTS=()
FAILED=0

# run_part NAME BUDGET_S ARGS...: run "$PY ARGS..." with at most BUDGET_S seconds (less if the total
# budget is nearly spent), keeping its output in $DIR.
run_part() {
  local name=$1 budget=$2
  shift 2
  local left=$((TOTAL_BUDGET_S - (SECONDS - START)))
  ((budget > left)) && budget=$left
  if ((budget < 20)); then
    RESULTS+=("$name: skipped (total budget of ${TOTAL_BUDGET_S}s spent)")
    FAILED=1
    return 0
  fi
  echo
  echo "=== $name (budget ${budget}s): $PY $*"
  local t0=$SECONDS status=0
  timeout --signal=TERM --kill-after=15 "$budget" "$PY" "$@" 2>"$DIR/$name.stderr" | tee "$DIR/$name.log" || status=$?
  grep '^{' "$DIR/$name.log" >"$DIR/$name.jsonl" || true
  local took=$((SECONDS - t0))
  case $status in
    0) RESULTS+=("$name: ok (${took}s)") ;;
    124 | 137) RESULTS+=("$name: TIMED OUT after ${budget}s (see $DIR/$name.stderr)"); FAILED=1 ;;
    *) RESULTS+=("$name: FAILED with status $status (${took}s; see $DIR/$name.stderr)"); FAILED=1 ;;
  esac
  if ((status != 0)); then tail -n 20 "$DIR/$name.stderr" || true; fi
}

echo "=== gpu_check: output in $DIR, python $PY"
if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then
  echo "GPU_CHECK_SMOKE=1: smoke mode on the CPU (no GPU numbers)"
  CURVE=(--device cpu) THROUGHPUT=(--device cpu --smoke) RETRIEVAL=(--smoke --devices cpu) PACKING=(--device cpu --smoke)
else
  nvidia-smi | tee "$DIR/nvidia-smi.txt" || { echo "nvidia-smi failed: this check needs an NVIDIA GPU"; exit 1; }
  "$PY" -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())'
  CURVE=(--device cuda) THROUGHPUT=(--device cuda --strict) RETRIEVAL=(--devices cuda) PACKING=(--device cuda)
fi

run_part curve_check 90 bench/curve_check.py "${CURVE[@]}" --out "$DIR/curve_check.json"
run_part throughput 200 bench/throughput.py "${THROUGHPUT[@]}" --out "$DIR/throughput.json"
run_part retrieval 90 bench/retrieval.py "${RETRIEVAL[@]}"
run_part packing 120 bench/packing.py "${PACKING[@]}" --out "$DIR/packing.json"

echo
echo "=== gpu_check summary ($((SECONDS - START))s, output in $DIR)"
printf '  %s\n' "${RESULTS[@]}"
exit "$FAILED"
