#!/usr/bin/env bash
# Build the full native extension (host + CUDA kernels, ops.cpp's CUDA registration) against the
# CUDA build of torch 2.13 from PyPI, on a machine with nvcc and no GPU, and check what it
# registered. Not part of CI: it downloads several GB (torch cu130 and its nvidia-* wheels).
#
#   bash scripts/check_cuda_build.sh            # venv in /tmp/ue-cuda-venv, clone in /tmp/ue-cuda-build
#
# Needs: nvcc (CUDA_HOME, default /usr/local/cuda), a C++ compiler, network access to PyPI.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-/tmp/ue-cuda-venv}
BUILD=${BUILD:-/tmp/ue-cuda-build}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
python -m venv "$VENV"
# --isolated: ignore local pip configuration that pins the CPU wheel
"$VENV/bin/pip" --isolated install -q "torch==2.13.0" "setuptools>=77" wheel ninja pybind11 numpy \
    --index-url https://pypi.org/simple
rm -rf "$BUILD" && git clone -q "$ROOT" "$BUILD"
cd "$BUILD"
MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"} \
    ULTRAEDIT_REQUIRE_NATIVE=1 "$VENV/bin/python" setup.py build_ext --inplace
NV=$("$VENV/bin/python" -c "import nvidia, os; print(list(nvidia.__path__)[0])")
LD_LIBRARY_PATH="$NV/cu13/lib:${LD_LIBRARY_PATH:-}" PYTHONPATH="$BUILD" "$VENV/bin/python" - <<'EOF'
import torch
import ultraedit_kernels._C as C

info = C.build_info()
print("build:", info)
assert C.has_cpu() and C.has_cuda() and info["cuda"], "the CUDA kernels were not compiled in"
op = "ultraedit_C::spd_solve"
for key in ("CPU", "CUDA"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel"
a = torch.randn(17, 17, dtype=torch.float64)
a = a @ a.T + 17 * torch.eye(17, dtype=torch.float64)
b = torch.randn(17, 5, dtype=torch.float64)
x, info_code = torch.ops.ultraedit_C.spd_solve(a, b)
err = float((x - torch.linalg.solve(a, b)).abs().max())
assert int(info_code.max()) == 0 and err < 1e-10, err
print(f"OK: {op} registered for CPU and CUDA; host solve error {err:.1e}; "
      f"cuda available here: {torch.cuda.is_available()}")
EOF
