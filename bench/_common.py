"""Shared helpers of the benchmark suites: timing summaries, cost models, machine description.

Conventions for every case's ``extra_info`` (pytest-benchmark JSON):

``median_s``, ``p20_s``, ``p80_s``, ``q1_s``, ``q3_s``, ``iqr_s``, ``rounds``
    the timed repeats of that case (pytest-benchmark's own ``stats`` hold the same for the timed
    function; these fields also exist for the parts we time ourselves, prefixed, e.g.
    ``paper_median_s``);
``peak_bytes``, ``peak_method``
    peak extra allocated bytes of one separate, untimed run (``bench/memory.py``);
``flops``, ``bytes_moved``, ``gflops``, ``gbps``
    an analytic cost model of the op (``bytes_moved``: every input read once and every output
    written once, the algorithmic minimum; ``gbps`` is the effective bandwidth it implies at the
    median time, as Liger/flashinfer print it);
``backend``, ``device``, shape fields (``d_in``, ``d_out``, ``n``).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

F32 = 4
F64 = 8


# ------------------------------------------------------------------------------ statistics
def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(seconds: Sequence[float], prefix: str = "") -> Dict[str, float]:
    values = sorted(float(s) for s in seconds)
    out = {
        "median_s": statistics.median(values) if values else float("nan"),
        "p20_s": _quantile(values, 0.2),
        "p80_s": _quantile(values, 0.8),
        "q1_s": _quantile(values, 0.25),
        "q3_s": _quantile(values, 0.75),
        "min_s": values[0] if values else float("nan"),
        "rounds": len(values),
    }
    out["iqr_s"] = out["q3_s"] - out["q1_s"]
    return {prefix + k: v for k, v in out.items()}


def add_rates(extra: Dict, seconds: float, flops: float, bytes_moved: float, prefix: str = "") -> None:
    extra[prefix + "flops"] = float(flops)
    extra[prefix + "bytes_moved"] = float(bytes_moved)
    extra[prefix + "gflops"] = flops / seconds / 1e9 if seconds > 0 else float("nan")
    extra[prefix + "gbps"] = bytes_moved / seconds / 1e9 if seconds > 0 else float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def pick_rounds(one_call_s: float, budget_s: Optional[float] = None, lo: int = 5, hi: int = 50) -> int:
    """How many timed rounds fit a case's time budget (``ULTRAEDIT_BENCH_BUDGET_S``, default 3 s)."""
    budget = float(os.environ.get("ULTRAEDIT_BENCH_BUDGET_S", "3")) if budget_s is None else budget_s
    if one_call_s <= 0:
        return hi
    return int(max(lo, min(hi, budget // one_call_s)))


# ------------------------------------------------------------------------------ cost models
def op_cost(op: str, n: int, d_in: int, d_out: int) -> Dict[str, float]:
    """``{"flops", "bytes_moved"}`` of one call of a backend op (float32 inputs)."""
    d = d_in + d_out
    if op in ("stats_update", "stats_update2"):   # x (n, d) or K, G -> float64 count/mean/M2 (d,)
        return {"flops": 4.0 * n * d, "bytes_moved": F32 * n * d + 2 * 2 * F64 * d}
    if op == "pseudo_values":      # K, G, mean, std -> V (n, d_out)
        return {"flops": n * (3.0 * d_in + 4.0 * d_out),
                "bytes_moved": F32 * n * d + 2 * F64 * d + F32 * n * d_out}
    if op == "gram":               # K (n, d_in) -> K Kᵀ + λI (n, n)
        return {"flops": 2.0 * n * n * d_in, "bytes_moved": F32 * (n * d_in + n * n)}
    if op == "spd_solve":          # A (n, n), B (n, d_out) -> X (n, d_out)
        return {"flops": n ** 3 / 3.0 + 2.0 * n * n * d_out,
                "bytes_moved": F32 * (n * n + 2 * n * d_out)}
    if op == "apply_shift":        # W (d_out, d_in) += Aᵀ K
        return {"flops": 2.0 * n * d_in * d_out,
                "bytes_moved": F32 * (n * d_in + n * d_out + 2 * d_in * d_out)}
    raise KeyError(op)


def project_update_cost(n: int, d_in: int, d_out: int) -> Dict[str, float]:
    """This project's per-module update: stats + pseudo-values + Gram + solve + apply."""
    total = {"flops": 0.0, "bytes_moved": 0.0}
    for op in ("stats_update", "pseudo_values", "gram", "spd_solve", "apply_shift"):
        c = op_cost(op, n, d_in, d_out)
        total["flops"] += c["flops"]
        total["bytes_moved"] += c["bytes_moved"]
    return total


def paper_update_cost(n: int, d_in: int, d_out: int) -> Dict[str, float]:
    """The paper path: KᵀK, KᵀV, LU of d_in x d_in, two triangular solves with d_out right-hand
    sides, dense ΔW written and added; disk traffic of K and G (written and read) counted in bytes."""
    d = d_in + d_out
    flops = (2.0 * n * d_in * d_in + 2.0 * n * d_in * d_out + 2.0 / 3.0 * d_in ** 3
             + 2.0 * d_in * d_in * d_out + d_in * d_out + 6.0 * n * d)
    bytes_moved = (F32 * 2 * 2 * n * d              # save + load of K and G
                   + F32 * 2 * d_in * d_in          # the system matrix written, factorized
                   + F32 * 2 * d_in * d_out         # ΔW written, read by the apply
                   + F32 * 2 * d_in * d_out)        # W read and written
    return {"flops": flops, "bytes_moved": bytes_moved}


# ------------------------------------------------------------------------------ machine
from ultraedit_kernels.calibration import cpu_model  # noqa: E402  (one definition)


def machine_description() -> Dict[str, object]:
    info: Dict[str, object] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def write_results(path: Optional[str], result: Dict[str, object], indent: int = 1) -> None:
    """A benchmark's results as JSON at ``path`` (its folder created); nothing without a path."""
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as fh:
            json.dump(result, fh, indent=indent)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {os.cpu_count()} cores)"


def bench_device() -> torch.device:
    """``ULTRAEDIT_BENCH_DEVICE`` (default: cuda when available, else cpu)."""
    name = os.environ.get("ULTRAEDIT_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_features(n: int, d_in: int, d_out: int, device, seed: int = 0, micro_batches: int = 10):
    """Keys/gradients with realistic scales (keys O(1), output gradients O(1e-3)), odd offsets,
    split into ``micro_batches`` nearly equal parts (the paper's 10 requests per micro-batch)."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_in, generator=gen) * 0.7 + 0.05
    grads = (torch.randn(n, d_out, generator=gen) + 0.1) * 1e-3
    keys, grads = keys.to(device), grads.to(device)
    sizes = [n // micro_batches + (1 if i < n % micro_batches else 0) for i in range(micro_batches)]
    parts = list(zip(keys.split(sizes), grads.split(sizes)))
    return keys, grads, [(k.clone(), g.clone()) for k, g in parts if k.shape[0]]


def list_to_str(values: List) -> str:
    return ",".join(str(v) for v in values)


def kernel_bytes_moved(op: str, n: int, d_in: int, d_out: int, elem: int) -> int:
    """Bytes a fused kernel must move for ``n`` rows of ``d_in``/``d_out`` features of ``elem``
    bytes each: its inputs once, its float32 output, and the float64 statistics it reads or
    merges (the roofline's memory side)."""
    d = d_in + d_out
    if op == "pseudo_values":
        return elem * n * d + 4 * n * d_out + 2 * 8 * d
    if op in ("stats_update", "stats_update2"):
        return elem * n * d + 4 * 8 * d
    if op == "gram":
        return elem * n * d_in + 4 * n * n
    raise KeyError(op)
