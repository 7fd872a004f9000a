#!/usr/bin/env bash
# The GPU check: correctness of the CUDA-graph fast path and the whole GPU benchmark, in under 8
# minutes on one H100/H200, on the machine's own Python (torch + torchvision there; nothing fetched):
#   0. nvidia-smi, torch's view of the card
#   1. correctness  bench/gpu_check.py: sync detection (set_sync_debug_mode("error")) through replays
#                   and the eager short batch; gradient pointers stable across the short batch and the
#                   next epoch; memory growth over 5 forced recaptures (< 64 MB); graph-vs-eager
#                   gradients at fp32, TF32 off (rel < 1e-3)
#   2. curve_check  IC-KD loss curve, classic (fp32, eager) vs fast (bf16, CUDA graph) path
#   3. throughput   CE / KD / DKD / IC-KD x batch 64, 512 x classic, fast path; issue targets (--strict),
#                   then every fast cell's replay count asserted (a silent eager fallback FAILS)
#   4. interleave   IC-KD/KD step time, KD and IC-KD cells interleaved 3x per batch size
#   5. fit          fit() end-to-end images/s next to step-only images/s
#   6. retrieval    memory-bank retrieval at 50,000 x 256 and 1,281,167 x 512 (bench/retrieval.py)
#   (packing: 1, 2, 4 concurrent trials, only with GPU_CHECK_PACKING=1: it does not fit the 8 minutes)
# Then one table (markdown, headed by the card's name) to paste into README "GPU check results".
# Run from the repository root:  bash bench/gpu_check.sh
# Air-gapped machine: GPU_CHECK_BUNDLE=wheel-bundle bash bench/gpu_check.sh installs the wheel bundle
# made by bench/build_wheel_bundle.sh (on a connected machine) into a folder on PYTHONPATH of the
# machine's Python (its torch), offline (pip --no-index --no-deps --target), and runs there.
# Python: $GPU_CHECK_PYTHON, else .venv/bin/python, else python3. GPU_CHECK_PARTS="correctness fit" runs
# only the parts named (correctness curve_check throughput throughput_replays interleave fit retrieval packing).
# Every part has its own time budget (and all of them one total budget); a part that fails or runs
# out of time is reported and the others still run. Output folder: $OUT if set, else
# bench/results/<timestamp>: per part <name>.log (stdout: JSON lines and tables), <name>.jsonl (the
# JSON lines), <name>.json (the summary), <name>.stderr; table.md. Exit status 1 if any part failed
# (a missed throughput target counts: throughput runs with --strict).
# GPU_CHECK_SMOKE=1 runs the same script with every part in smoke mode on the CPU (checks the
# script itself on a machine without a GPU; numbers meaningless, targets not checked; the CUDA-only
# checks use CPU stand-ins, each row of the correctness table says which).
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then PY=$GPU_CHECK_PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
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
  if [[ -n "${GPU_CHECK_PARTS:-}" && " $GPU_CHECK_PARTS " != *" $name "* ]]; then return 0; fi
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

if [[ -n "${GPU_CHECK_BUNDLE:-}" ]]; then
  # Offline install of the wheel bundle into a folder put first on PYTHONPATH of the machine's own
  # Python (not a venv: `venv --system-site-packages` made from a Python that is itself a venv, as
  # on images with torch in /opt/.../.venv, would not see that venv's torch). Wheels of packages that
  # Python already has (numpy, pillow, pyyaml, tqdm, ...) are skipped, so its torch keeps its own
  # numpy; the rest go in without resolving dependencies (ickd's scipy/matplotlib are not needed).
  SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/ickd-gpu-check-site}
  echo "=== installing the wheel bundle $GPU_CHECK_BUNDLE into $SITE (offline, for $PY)"
  mapfile -t WHEELS < <("$PY" - "$GPU_CHECK_BUNDLE" <<'PYEOF'
import importlib.metadata as md, pathlib, re, sys
wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
if not wheels:
    sys.exit(f"no wheels in {sys.argv[1]}: build them with bench/build_wheel_bundle.sh")
for whl in wheels:
    name = whl.name.split("-")[0]
    try:
        have = name != "ickd" and md.version(re.sub(r"[-_.]+", "-", name))
    except md.PackageNotFoundError:
        have = False
    print(f"  skip {whl.name}: {name} {have} is there" if have else whl, file=sys.stderr if have else sys.stdout)
PYEOF
  )
  ((${#WHEELS[@]})) || { echo "FAILED: no wheel of $GPU_CHECK_BUNDLE to install"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --disable-pip-version-check --upgrade --target "$SITE" "${WHEELS[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  (cd / && "$PY" -c 'import ickd, hydra, omegaconf, yaml, tqdm, numpy, PIL, torch, torchvision; print("bundle ok: ickd from", ickd.__file__, "| torch", torch.__version__, "| hydra", hydra.__version__)')
fi

echo "=== gpu_check: output in $DIR, python $PY"
SMOKE=()
if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then
  echo "GPU_CHECK_SMOKE=1: smoke mode on the CPU (no GPU numbers; CUDA-only checks use CPU stand-ins)"
  DEV=cpu SMOKE=(--smoke) REPLAYS=() CURVE=(--device cpu) THROUGHPUT=(--device cpu --smoke) RETRIEVAL=(--smoke --devices cpu) PACKING=(--device cpu --smoke)
  "$PY" -c 'import torch; print("torch", torch.__version__, "on the CPU")' | tee "$DIR/nvidia-smi.txt"
else
  nvidia-smi | tee "$DIR/nvidia-smi.txt" || { echo "nvidia-smi failed: this check needs an NVIDIA GPU"; exit 1; }
  "$PY" -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())' | tee -a "$DIR/nvidia-smi.txt"
  DEV=cuda REPLAYS=(--require-graph) CURVE=(--device cuda) THROUGHPUT=(--device cuda --strict) RETRIEVAL=(--devices cuda --sizes 50000x256:64 50000x256:512 1281167x512:256) PACKING=(--device cuda)
fi

run_part correctness 90 bench/gpu_check.py correctness --device "$DEV" "${SMOKE[@]}" --out "$DIR/correctness.json"
run_part curve_check 60 bench/curve_check.py "${CURVE[@]}" --out "$DIR/curve_check.json"
run_part throughput 150 bench/throughput.py "${THROUGHPUT[@]}" --out "$DIR/throughput.json"
if [[ -f "$DIR/throughput.json" ]]; then
  run_part throughput_replays 20 bench/gpu_check.py replays "$DIR/throughput.json" "${REPLAYS[@]}"
elif [[ -z "${GPU_CHECK_PARTS:-}" || " $GPU_CHECK_PARTS " == *" throughput_replays "* ]]; then
  RESULTS+=("throughput_replays: FAILED (no $DIR/throughput.json)"); FAILED=1
fi
run_part interleave 100 bench/gpu_check.py interleave --device "$DEV" "${SMOKE[@]}" --out "$DIR/interleave.json"
run_part fit 45 bench/gpu_check.py fit --device "$DEV" "${SMOKE[@]}" --out "$DIR/fit.json"
run_part retrieval 90 bench/retrieval.py "${RETRIEVAL[@]}"
if [[ "${GPU_CHECK_PACKING:-0}" == 1 ]]; then
  run_part packing 120 bench/packing.py "${PACKING[@]}" --out "$DIR/packing.json"
fi

printf '%s\n' "${RESULTS[@]}" >"$DIR/parts.txt"
"$PY" bench/gpu_check.py table "$DIR" | tee "$DIR/table.md" || { RESULTS+=("table: FAILED"); FAILED=1; }
echo
echo "=== gpu_check summary ($((SECONDS - START))s, output in $DIR)"
printf '  %s\n' "${RESULTS[@]}"
exit "$FAILED"
