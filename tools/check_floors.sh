#!/usr/bin/env bash
# Dependency-floor check: install the lowest versions pyproject.toml allows for the pure-Python
# dependencies into a fresh venv and run a chosen set of tests against them.
#
#   tools/check_floors.sh                 # floors venv in a temp folder, removed afterwards
#   FLOORS_VENV=/tmp/f tools/check_floors.sh -k spec   # keep/reuse the venv; extra pytest args
#
# torch, torchvision, matplotlib, pillow (and pytest's helpers) are borrowed from .venv (a .pth
# file that appends .venv's site-packages AFTER the floors venv's own, so the floors win): on the
# machines this project runs on only torch==2.14.1 (with torchvision 0.29.1) imports, so the torch
# floor (>=2.3) cannot be checked here. Update FLOORS together with pyproject.toml. SLURM tests are
# left out (-m "not slurm"); the rest takes about 30 min on 2 shared cores.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BASE_VENV=${BASE_VENV:-$REPO/.venv}
FLOORS=(
  "optuna==4.9.0" "optuna-dashboard==0.17.0" "plotly==5.0.0" "psycopg2-binary==2.9.5"
  "hydra-core==1.3.2" "omegaconf==2.3.0"
  "submitit==1.5.4" "hydra-submitit-launcher==1.2.0"
  "wandb==0.19.10" "wandb-workspaces==0.4.0"
  "numpy==1.25.0" "scipy==1.10.0" "pyyaml==6.0" "tqdm==4.66.0" "faiss-cpu==1.8.0"
)
TESTS=(
  tests/test_sweep_spec.py tests/test_sweep.py tests/test_launch.py tests/test_track.py
  tests/test_train.py tests/test_backend_auto.py tests/test_packaging.py
)
keep=1
if [ -z "${FLOORS_VENV:-}" ]; then FLOORS_VENV=$(mktemp -d /tmp/ickd-floors.XXXXXX); keep=0; fi
cleanup() { if [ "$keep" = 0 ]; then rm -rf "$FLOORS_VENV"; fi; }
trap cleanup EXIT

py=$("$BASE_VENV/bin/python" -c 'import sys; print(sys._base_executable)')
if [ ! -x "$FLOORS_VENV/bin/python" ]; then
  "$py" -m venv "$FLOORS_VENV"
  # setuptools: the build-system requirement (the venv's bundled one is older) for test_packaging's build.
  "$FLOORS_VENV/bin/python" -m pip install -q "pytest>=8" "setuptools>=77" "${FLOORS[@]}"
  base_site=$("$BASE_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  floor_site=$("$FLOORS_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$base_site" > "$floor_site/zz_borrow_ickd_venv.pth"   # appended after the floors' own
fi
# ickd itself from this checkout (tests start `python -m ickd.cli` from other folders), like the
# editable install of .venv, whose own .pth the borrowed folder does not bring.
floor_site=$("$FLOORS_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$REPO" > "$floor_site/ickd_checkout.pth"
"$FLOORS_VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("optuna", "optuna-dashboard", "hydra-core", "omegaconf", "submitit", "wandb", "numpy", "scipy", "torch"):
    print(f"  {name}=={md.version(name)}")
PY
cd "$REPO"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$FLOORS_VENV/bin/python" -m pytest -q -x -p no:cacheprovider -m "not slurm" "${TESTS[@]}" "$@"
