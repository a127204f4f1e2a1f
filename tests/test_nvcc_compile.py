"""Every .cu file under csrc/ compiles with nvcc for sm_80 and sm_90 (no GPU needed).

The device code includes only the CUDA runtime headers, so plain `nvcc -c` compiles it.
Skipped only when nvcc is absent (looked up as $NVCC, on PATH, then under $CUDA_HOME).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
ARCHES = ("sm_80", "sm_90")


def _nvcc():
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


NVCC = _nvcc()


def test_there_are_cu_files():
    assert CU_FILES, "no .cu files under csrc/"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set NVCC or CUDA_HOME)")
def test_nvcc_compiles_every_cu_file(tmp_path):
    jobs = []
    for path in CU_FILES:
        for arch in ARCHES:
            out = tmp_path / f"{os.path.basename(path)}.{arch}.o"
            cmd = [NVCC, f"-arch={arch}", "-std=c++17", "-O3", "-Werror", "all-warnings",
                   "-I", os.path.join(ROOT, "csrc"), "-c", path, "-o", str(out)]
            jobs.append((path, arch, out, subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
            if len(jobs) % 2 == 0:  # at most two compilers at a time
                jobs[-2][3].wait()
    failures = []
    for path, arch, out, proc in jobs:
        log, _ = proc.communicate(timeout=300)
        if proc.returncode != 0 or not out.exists():
            failures.append(f"{os.path.relpath(path, ROOT)} [{arch}]:\n{log}")
    assert not failures, "\n".join(failures)
