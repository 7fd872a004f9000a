#!/usr/bin/env bash
# Build the wheel bundle that bench/gpu_check.sh installs on an air-gapped GPU machine whose Python
# already has torch + torchvision (e.g. torch 2.11 + torchvision 0.26, Python 3.12, no network).
# Run on a connected machine from the repository root:
#   bash bench/build_wheel_bundle.sh [OUT_DIR]          # default OUT_DIR: wheel-bundle/
#   BUNDLE_PYTHON_VERSION=3.11 bash bench/build_wheel_bundle.sh /tmp/b   # for another target Python
# Contents: the ickd wheel and what the GPU check imports besides torch/torchvision: hydra-core,
# omegaconf, antlr4-python3-runtime 4.9.3 (sdist only on PyPI: built here as a pure-Python wheel),
# packaging, pyyaml, tqdm, and numpy + pillow (torchvision's own needs; installed only where missing).
# Not bundled: torch, torchvision (the machine's), scipy and matplotlib (ickd compare / plots only,
# not the check; scipy alone is 35 MB), faiss (optional; retrieval rows without it say so), optuna,
# submitit, wandb (never imported by the check). gpu_check.sh installs the bundle with
# `pip install --no-index --no-deps`, so ickd's declared scipy/matplotlib need not be there.
# Prints the bundle's size; exit 1 when it exceeds 64 MiB (the limit of what travels with a checkout).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-wheel-bundle}
PYV=${BUNDLE_PYTHON_VERSION:-3.12}
PLATFORMS=${BUNDLE_PLATFORMS:-"manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64"}
LIMIT_MIB=${BUNDLE_LIMIT_MIB:-64}
if [[ -n "${BUNDLE_BUILD_PYTHON:-}" ]]; then PY=$BUNDLE_BUILD_PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi

# Version ranges: pyproject.toml's.
PURE=("antlr4-python3-runtime==4.9.3")
BINARY=("hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" "packaging" "pyyaml>=6" "tqdm>=4.66" "numpy>=1.25" "pillow>=9")

rm -rf "$OUT"
mkdir -p "$OUT"
echo "=== ickd wheel ($PY)"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" .
echo "=== pure-Python wheels built from sdists: ${PURE[*]}"
"$PY" -m pip wheel -q --no-deps -w "$OUT" "${PURE[@]}"
echo "=== binary wheels for CPython $PYV (${PLATFORMS// /, }): ${BINARY[*]}"
plat_args=()
for p in $PLATFORMS; do plat_args+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$PYV" \
  "${plat_args[@]}" -d "$OUT" "${BINARY[@]}"

ls -l "$OUT"
bytes=$(du -sb "$OUT" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "bundle: $OUT, $(ls "$OUT"/*.whl | wc -l) wheels, $mib MiB (limit $LIMIT_MIB MiB), target CPython $PYV"
if ((bytes > LIMIT_MIB * 1048576)); then
  echo "FAILED: the bundle exceeds $LIMIT_MIB MiB" >&2
  exit 1
fi
echo "carry it with the checkout and run:  GPU_CHECK_BUNDLE=$OUT bash bench/gpu_check.sh"
