"""Benchmark: blocked Cholesky solve (csrc/) vs torch.linalg.cholesky_ex + cholesky_solve.

    PYTHONPATH=.:python pytest bench/bench_spd_solve.py --benchmark-columns=median,iqr,rounds

Cases: n in {100, 400, 1000, 4000} with k = 1024 right-hand sides, single systems and a batch
of 12 (the modules of a turn), plus the headline n = 1000, k = 4096; on the CPU (host build,
with ATen's GEMM and with the built-in GEMM) and on a GPU when one is present (device build vs
cuSOLVER).  The 12 x n = 4000 CPU case (~650 GFLOP per call) runs only with
UE_BENCH_LARGE=1.  Each native row's ``extra_info`` has its median, the ratio to the torch
median measured just before it in the same run, the FLOP rate (n³/3 + 2n²k per system), the
CPU time per call and the peak memory (CUDA: max_memory_allocated; CPU: growth of the peak
RSS, reset through /proc/self/clear_refs).
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import pytest
import torch

from ultraedit_kernels import _extension

CASES = [(n, 1024, batch) for n in (100, 400, 1000, 4000) for batch in (1, 12)] + [(1000, 4096, 1)]
_TORCH_MEDIANS = {}


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model} ({torch.get_num_threads()} threads)"


def _spd(n, k, batch, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(n * 31 + batch)
    shape = (batch,) if batch > 1 else ()
    x = torch.randn(*shape, n, n + 8, generator=gen, dtype=torch.float64)
    a = x @ x.transpose(-1, -2) / n + torch.eye(n, dtype=torch.float64)
    b = torch.randn(*shape, n, k, generator=gen, dtype=torch.float64)
    return a.to(device, dtype), b.to(device, dtype)


def _torch_solve(a, b):
    factor, info = torch.linalg.cholesky_ex(a)
    return torch.cholesky_solve(b, factor), info


def _native(gemm=None):
    mod = _extension.extension()

    def run(a, b):
        if gemm is not None:
            mod.host_gemm(gemm)
        return torch.ops.ultraedit_C.spd_solve(a, b)
    return run


def _rss_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _impls(device):
    out = [("torch", _torch_solve, None)]
    if device == "cpu":
        why = _extension.unavailable_reason("cpu")
        out += [("cpp-aten-gemm", _native("aten"), why), ("cpp-native-gemm", _native("native"), why)]
    else:
        out += [("cuda", _native(), _extension.unavailable_reason("cuda"))]
    return out


def _params():
    params = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for n, k, batch in CASES:
            names = ("torch", "cpp-aten-gemm", "cpp-native-gemm") if device == "cpu" else ("torch", "cuda")
            for name in names:
                marks = []
                if device == "cpu" and n == 4000 and batch > 1 and os.environ.get("UE_BENCH_LARGE") != "1":
                    marks.append(pytest.mark.skip(reason="12 x n=4000 on CPU needs UE_BENCH_LARGE=1"))
                params.append(pytest.param(device, n, k, batch, name, marks=marks,
                                           id=f"{device}-n{n}-k{k}-b{batch}-{name}"))
    return params


@pytest.mark.parametrize("device,n,k,batch,impl", _params())
def test_spd_solve(benchmark, device, n, k, batch, impl):
    fn, why = {name: (f, w) for name, f, w in _impls(device)}[impl]
    if why is not None:
        pytest.skip(why)
    a, b = _spd(n, k, batch, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x, info = fn(a, b)  # warm-up (and correctness guard)
    sync()
    assert int(info.max()) == 0
    x64 = torch.cholesky_solve(b.double(), torch.linalg.cholesky(a.double()))
    rel_err = float((x.double() - x64).norm() / x64.norm())
    cpu_times = []

    def run():
        c0 = time.process_time()
        fn(a, b)
        sync()
        cpu_times.append(time.process_time() - c0)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak RSS
        except OSError:
            pass
        base = _rss_kib("VmRSS") * 1024
    work = n * n * n / 3 + 2 * n * n * k
    rounds = max(3, min(10, int(2e10 / (work * batch))))
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    peak = (torch.cuda.max_memory_allocated() - base if device == "cuda"
            else _rss_kib("VmHWM") * 1024 - base)
    median = benchmark.stats.stats.median
    key = (device, n, k, batch)
    if impl == "torch":
        _TORCH_MEDIANS[key] = median
    info_extra = {
        "device": _device_name(device), "torch": torch.__version__, "impl": impl, "n": n, "k": k,
        "batch": batch, "median_s": median, "cpu_s_median": statistics.median(cpu_times),
        "gflops": batch * work / median / 1e9, "peak_bytes": max(int(peak), 0),
        "rel_err_vs_fp64": rel_err,
        "ratio_vs_torch": (median / _TORCH_MEDIANS[key]) if key in _TORCH_MEDIANS else None,
        "load_avg": open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else None,
    }
    benchmark.extra_info.update(info_extra)
    print(f"\n{device} n={n} k={k} batch={batch} {impl}: median {median * 1e3:.2f} ms, "
          f"{info_extra['gflops']:.1f} GFLOP/s, ratio {info_extra['ratio_vs_torch']}, "
          f"err {rel_err:.1e}, load {info_extra['load_avg']}")
