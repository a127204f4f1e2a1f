#!/usr/bin/env bash
# The GPU acceptance run, from the source tree (nothing pip-installed, no network):
#   bash scripts/gpu_acceptance.sh --out DIR               # on a CUDA machine, within 8 minutes
#   bash scripts/gpu_acceptance.sh --cpu-smoke --out DIR   # every code path, tiny, on a CPU
# Options: --budget-s S (whole run), --steps a,b (a subset). Steps, budgets and outputs:
# bench/gpu_acceptance.py and docs/gpu.md. Exit status 1 when a step failed (all others ran).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT:$ROOT/python:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# PYTHON picks the interpreter; else python3 (on CUDA images the one that holds torch), else python
PY=${PYTHON:-$(command -v python3 || command -v python)}
exec "$PY" bench/gpu_acceptance.py "$@"
