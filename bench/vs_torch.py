"""Every public op against the plain-torch composition of its math, in one run, with a roofline.

For each public op and shape the op (``auto`` dispatch, validation included: what a caller
gets) and the few lines of PyTorch a user would write for the same math alternate round by
round in this process; the table gives medians and ``speed = plain / op`` (>= 1.0: the op is
at least as fast).  A third arm, the control, times the same plain code again in the same
rounds: where an op is the very call the plain code makes (``apply_shift_`` is one ``addmm_``),
its ratio can only be read against the spread of plain against itself.  Beside each time: the
op's FLOPs and algorithmic bytes (``_common.op_cost``)
and the GFLOP/s and GB/s they imply, next to the machine's copy bandwidth and float32 GEMM
rate measured at the start of the same run.

Timing: a call shorter than 5 ms is timed as a loop of calls per round (the same count for
the op and the plain code, enough for the faster one to last >= 20 ms; the time reported is
the loop's mean per call); a case shorter than 100 ms runs 3x the rounds asked for; a case the
rounds leave unresolved (an op whose verdict is not ``faster``, a backend choice outside the
calibration's margin) gets a second pass of as many rounds, and all of them decide; the order
within a round alternates (op, plain / plain, op) and the rounds are rounded up to an even
number, so that each side runs first and second equally often (some calls here alternate
slow / fast by their position in the sequence of calls, whatever the function).

JSON fields per ``ops`` row: ``op_s`` / ``plain_s`` (medians over rounds of the per-call
seconds), ``speed`` (``plain_s / op_s``, the ratio of the medians), ``speed_paired`` (the median
over pairs of rounds (op, plain / plain, op) of plain / op within the pair: a load spike that
hits a pair hits both of its sides), ``loops`` (calls per timed round), ``rounds`` (of both
passes) and ``passes`` (2 where the first pass's verdict, ``first_pass_verdict`` /
``first_pass_speed_paired``, was not ``faster``), ``op_times_s`` / ``plain_times_s`` /
``control_times_s`` (per-call seconds of every round), ``pair_ratios`` (plain
/ op per pair) and ``control_pair_ratios`` (plain / control per pair), ``control_paired`` (their
median), ``verdict`` (``faster``: ``speed_paired`` >= 1; ``within noise``: below 1 but not below
every control ratio, or within 1% of 1; ``slower``: otherwise), cost and roofline fields.
``overhead``:
each op at one row, 64 -> 64, where the arithmetic is negligible: ``op_us``, ``plain_us``,
``overhead_us`` (their difference) and ``overhead_paired_us``.  ``summary``:
``ops_slower_than_plain`` / ``min_speed`` (by ``speed``), ``ops_slower_than_plain_paired`` /
``min_speed_paired`` (by ``speed_paired``), ``calibration_disagrees`` (``auto``'s backend more
than the calibration's margin slower than the fastest by both statistics) and
``calibration_disagrees_medians`` (by the ratio of medians alone), ``ops_slower_beyond_noise``
and ``ops_within_noise`` (by ``verdict``), ``calibration_misses_beyond_noise`` (rows whose
``misses_beyond_noise``), ``second_looks`` (the cases given a second pass: first and final
ratio and verdict), ``loadavg_1m_end``.  Per ``backends`` row: ``chosen_vs_fastest``
(ratio of medians), ``chosen_vs_fastest_paired``, ``agrees_medians``, ``agrees_paired``,
``agrees`` (either within the margin; a row that does not after its rounds gets a second pass,
``passes`` 2), ``pair_ratios`` (chosen / fastest per pair) and
``misses_beyond_noise`` (the chosen backend more than the margin slower in every pair).

Also in the same run:

* the dispatch calibration (``ultraedit_kernels.calibration``), measured again at the start so
  that it saw the same machine load as the rounds that follow, then every backend of every op
  with more than one available backend, forced one at a time, and whether ``auto`` picks the
  faster one (or one within the calibration's margin of it);
* ``param_shift(method="auto")`` against the paper's primal float32 solve
  (``torch.linalg.solve(KᵀK + I, KᵀV)``) at N = 400, 4096 -> 4096, with the relative error of
  both against float64.

Usage (results as JSON; ``--quick`` keeps the embedded model's shapes and N <= 400)::

    PYTHONPATH=. python bench/vs_torch.py --rounds 5 --json bench/results/vs_torch.json
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import ultraedit_kernels as uk  # noqa: E402
from ultraedit_kernels import _backends, calibration  # noqa: E402
from ultraedit_kernels.calibration import pair_ratios  # noqa: E402
from ultraedit_kernels.running_stats import EPS  # noqa: E402

from _common import F32, machine_description, op_cost, write_results  # noqa: E402

# (label, n, d_in, d_out): the embedded model's MLP (SmolLM2-135M: 576 <-> 1536) at the row
# counts of a 100-edit turn, and 7B MLP shapes (4096 <-> 14336) from one row to 2,000.
EMBEDDED = [(f"embedded-{a}x{b}-N{n}", n, a, b)
            for a, b in ((1536, 576), (576, 1536)) for n in (50, 300, 400)]
SEVEN_B = [(f"7b-{a}x{b}-N{n}", n, a, b)
           for a, b in ((4096, 14336), (14336, 4096)) for n in (1, 100, 400, 2000)]


# ---------------------------------------------------------------------------- timing
SHORT_S = 5e-3      # a call shorter than this is timed as a loop of calls per round ...
ROUND_S = 20e-3     # ... of at least this long (the per-call time is the loop's mean)
SHORT_ROUNDS = 3    # and cases shorter than MID_S run this many times the rounds asked for
MID_S = 0.1
MAX_LOOPS = 20000


def _estimate(fn: Callable[[], object]) -> float:
    """Seconds per call: the warm-up call's time when it is long, else the faster of two timed
    calls after it (then, when short, of a loop long enough for the clock)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first >= 4 * SHORT_S:   # long: the warm-up's time is estimate enough
        return first
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    if best < SHORT_S:
        loops = max(1, min(MAX_LOOPS, int(2e-3 / max(best, 1e-7))))
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - start) / loops)
    return best


def alternate(fns: Dict[str, Callable[[], object]], rounds: int,
              info: Optional[Dict[str, int]] = None) -> Dict[str, List[float]]:
    """Per-call seconds of each callable over alternating rounds (after warm-ups).

    Where the fastest callable takes under ``SHORT_S`` per call, every round times a loop of
    ``loops`` calls of each (the same count for all, enough for the fastest to take
    ``ROUND_S``) and records the mean per call, and ``SHORT_ROUNDS`` times as many rounds run.
    The order within a round alternates (A B, B A, ...) so that a drift in the machine's load
    favours neither.  ``info``, when given, receives ``loops`` and ``rounds``.
    """
    estimate = {name: _estimate(fn) for name, fn in fns.items()}
    fastest = min(estimate.values())
    loops = 1
    if fastest < SHORT_S:
        loops = max(1, min(MAX_LOOPS, math.ceil(ROUND_S / max(fastest, 1e-7))))
    if fastest < MID_S:
        rounds *= SHORT_ROUNDS
    rounds += rounds % 2   # whole (A B, B A) pairs: see paired_speed
    if info is not None:
        info.update(loops=loops, rounds=rounds)
    names = list(fns)
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(loops):
                fn()
            times[name].append((time.perf_counter() - start) / loops)
    return times


def alternate_settled(fns: Dict[str, Callable[[], object]], rounds: int,
                      settled: Callable[[Dict[str, List[float]]], bool],
                      info: Optional[Dict[str, int]] = None) -> Dict[str, List[float]]:
    """:func:`alternate`, and where ``settled(times)`` is false a second pass of as many rounds
    whose times are appended to the first's (``info["passes"]`` 2).  A case whose first
    rounds leave it unresolved (an op below its plain code, a backend choice outside the
    margin) is decided by twice the rounds, all of them; the first pass's verdict is kept in
    the results beside the final one."""
    first: Dict[str, int] = {}
    times = alternate(fns, rounds, first)
    passes = 1
    if not settled(times):
        more = alternate(fns, rounds)
        times = {name: times[name] + more[name] for name in fns}
        passes = 2
    if info is not None:
        info.update(loops=first["loops"], rounds=len(next(iter(times.values()))), passes=passes,
                    first_rounds=first["rounds"])
    return times


def median(values: List[float]) -> float:
    return statistics.median(values)


def paired_speed(times: Dict[str, List[float]], fast: str, slow: str) -> float:
    """Median over pairs of rounds of ``slow / fast`` within the pair (``A B, B A``: a load
    spike that hits a pair hits both sides, and each side runs once first and once second).

    Pairs, not single rounds: on this machine some calls alternate slow / fast by their
    position in the sequence of calls (measured: a 100 x 14336 Gram matrix 12 ms, 8 ms, 12 ms,
    ... whichever function ran), which per single round favours the side that runs second;
    the rounds are therefore always an even number and the medians over rounds balanced too.
    """
    ratios = pair_ratios(times, fast, slow)
    return statistics.median(ratios or [times[slow][0] / times[fast][0]])


RESOLUTION = 0.01   # differences under 1% are a tie: the few µs of argument checks a public op
                    # adds to the same BLAS call (measured 0.998x on a quiet machine whose
                    # control spread was 1.00-1.00x)


def verdict(op_ratios: List[float], control_ratios: List[float]) -> str:
    """``"faster"`` (the op's median pair ratio >= 1), ``"within noise"`` (below 1 but inside the
    range the control, the plain code timed against itself as a third arm of the same rounds,
    spans, or within ``RESOLUTION`` of 1), or ``"slower"``."""
    speed = statistics.median(op_ratios)
    if speed >= 1.0:
        return "faster"
    if speed >= 1.0 - RESOLUTION or (control_ratios and speed >= min(control_ratios)):
        return "within noise"
    return "slower"


def machine_rates(rounds: int) -> Dict[str, float]:
    """Copy bandwidth (GB/s, read + write of 256 MiB float32) and float32 GEMM rate (GFLOP/s,
    2048 x 2048 x 2048) of this machine: the best of ``rounds`` (a roofline is what the machine
    can attain; on a shared machine the median would be the load's)."""
    src = torch.randn(64 << 20)
    dst = torch.empty_like(src)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = alternate({"copy": lambda: dst.copy_(src), "gemm": lambda: a @ b}, max(rounds, 5))
    return {"copy_gbps": 2 * F32 * src.numel() / min(t["copy"]) / 1e9,
            "gemm_gflops": 2 * 2048 ** 3 / min(t["gemm"]) / 1e9}


# ---------------------------------------------------------------------------- the cases
def features(n, d_in, d_out, seed=0):
    gen = torch.Generator().manual_seed(seed + n + d_in)
    keys = torch.randn(n, d_in, generator=gen) * 0.7 + 0.05
    grads = (torch.randn(n, d_out, generator=gen) + 0.1) * 1e-3
    return keys, grads


def plain_stats(x, count, mean, m2):
    """float64 mean and variance of the block, Chan-merged into (count, mean, M2)."""
    var_b, mean_b = torch.var_mean(x.double(), 0, correction=0)
    b = x.shape[0]
    total = count + b
    delta = mean_b - mean
    return total, mean + delta * (b / total), m2 + var_b * b + delta * delta * (count * b / total)


def plain_pseudo_values(keys, grads, mean, std, lr):
    """float32 normalize, row norm of the keys, scale the normalized gradients."""
    d_in = keys.shape[1]
    shift, scale = mean.float(), (1.0 / (std + EPS)).float()
    k_hat = (keys - shift[:d_in]) * scale[:d_in]
    return -lr * k_hat.square().sum(1, keepdim=True) * ((grads - shift[d_in:]) * scale[d_in:])


def plain_solve(a, b):
    return torch.cholesky_solve(b, torch.linalg.cholesky(a))


def plain_gram(keys, ridge):
    g = keys @ keys.T
    g.diagonal().add_(ridge)
    return g


def plain_guarded_update(weight, keys, factors):
    """``W += Aᵀ K`` only if ``N · max|K| · max|A|`` is finite and far from the dtype's largest
    value (the bound ``apply_shift_`` checks; one ``aminmax`` pass over each input)."""
    (k_lo, k_hi), (a_lo, a_hi) = torch.aminmax(keys), torch.aminmax(factors)
    bound = keys.shape[0] * max(-float(k_lo), float(k_hi)) * max(-float(a_lo), float(a_hi))
    if not (math.isfinite(bound) and bound <= torch.finfo(weight.dtype).max * 2.0 ** -8):
        raise ValueError("the update could overflow the weight")
    weight.addmm_(factors.T, keys)


def plain_factors(keys, grads, mean, std, lr, ridge):
    return plain_solve(plain_gram(keys, ridge), plain_pseudo_values(keys, grads, mean, std, lr))


def op_cases(n, d_in, d_out):
    """``{op: (ours, plain, cost_key)}`` for one shape; inputs built once."""
    keys, grads = features(n, d_in, d_out)
    x = torch.cat([keys, grads], 1)
    stats = uk.RunningStats(d_in + d_out).update(x)
    mean, std = stats.mean, stats.std
    count, m2 = stats.count_tensor, stats.m2
    lr, ridge = 1e-6, 1.0
    a = plain_gram(keys, ridge)
    v = plain_pseudo_values(keys, grads, mean, std, lr)
    weight = torch.randn(d_out, d_in) * 0.02
    factors = torch.randn(n, d_out) * 1e-9
    return {
        "RunningStats.update": (lambda: stats.clone().update(x),
                                lambda: plain_stats(x, count, mean, m2), "stats_update"),
        "RunningStats.update_pair": (lambda: stats.clone().update_pair(keys, grads),
                                     lambda: plain_stats(torch.cat([keys, grads], 1), count, mean, m2),
                                     "stats_update"),
        "pseudo_values": (lambda: uk.pseudo_values(keys, grads, stats, lr),
                          lambda: plain_pseudo_values(keys, grads, mean, std, lr), "pseudo_values"),
        "gram": (lambda: uk.gram(keys, ridge), lambda: plain_gram(keys, ridge), "gram"),
        "spd_solve": (lambda: uk.spd_solve(a, v), lambda: plain_solve(a, v), "spd_solve"),
        "shift_factors": (lambda: uk.shift_factors(keys, grads, stats, lr, ridge),
                          lambda: plain_factors(keys, grads, mean, std, lr, ridge), "shift_factors"),
        "param_shift": (lambda: uk.param_shift(keys, grads, stats, lr, ridge),
                        lambda: keys.T @ plain_factors(keys, grads, mean, std, lr, ridge),
                        "param_shift"),
        # with its guarantee (no NaN/Inf ever reaches the weight): the plain code that checks
        # the same bound before the product
        "apply_shift_": (lambda: uk.apply_shift_(weight, keys, factors, "linear"),
                         lambda: plain_guarded_update(weight, keys, factors), "apply_shift"),
        # without it: the bare addmm_
        "apply_shift_(check=False)": (
            lambda: uk.apply_shift_(weight, keys, factors, "linear", check=False),
            lambda: weight.addmm_(factors.T, keys), "apply_shift"),
    }


def cost(key, n, d_in, d_out):
    if key in ("shift_factors", "param_shift"):
        parts = ["pseudo_values", "gram", "spd_solve"] + (["apply_shift"] if key == "param_shift" else [])
        out = {"flops": 0.0, "bytes_moved": 0.0}
        for p in parts:
            c = op_cost(p, n, d_in, d_out)
            out["flops"] += c["flops"]
            out["bytes_moved"] += c["bytes_moved"]
        return out
    return op_cost(key, n, d_in, d_out)


def _verdict(times: Dict[str, List[float]]) -> str:
    """:func:`verdict` of the op's pairs of rounds against the control's."""
    return verdict(pair_ratios(times, "op", "plain"), pair_ratios(times, "control", "plain"))


def run_ops(shapes, rounds, ops=None, rates=None):
    rows = []
    for label, n, d_in, d_out in shapes:
        for op, (ours, plain, key) in op_cases(n, d_in, d_out).items():
            if ops and op not in ops:
                continue
            info = {}
            # the control: the same plain code as a third arm (its own callable), timed in the
            # same rounds at the op's positions (first / last), so its spread against `plain`
            # is what this run can resolve between two identical functions
            t = alternate_settled({"op": ours, "plain": plain, "control": lambda p=plain: p()},
                                  rounds, lambda times: _verdict(times) == "faster", info)
            first = {name: v[:info["first_rounds"]] for name, v in t.items()}
            c = cost(key, n, d_in, d_out)
            op_pairs = pair_ratios(t, "op", "plain")
            control_pairs = pair_ratios(t, "control", "plain")
            row = {"op": op, "shape": label, "n": n, "d_in": d_in, "d_out": d_out,
                   "op_s": median(t["op"]), "plain_s": median(t["plain"]),
                   "speed": median(t["plain"]) / median(t["op"]),
                   "speed_paired": paired_speed(t, "op", "plain"),
                   "pair_ratios": op_pairs, "control_pair_ratios": control_pairs,
                   "control_paired": statistics.median(control_pairs),
                   "verdict": verdict(op_pairs, control_pairs),
                   "loops": info["loops"], "rounds": info["rounds"], "passes": info["passes"],
                   "first_pass_verdict": _verdict(first),
                   "first_pass_speed_paired": paired_speed(first, "op", "plain"),
                   "flops": c["flops"], "bytes": c["bytes_moved"],
                   "op_times_s": t["op"], "plain_times_s": t["plain"],
                   "control_times_s": t["control"]}
            row["gflops"] = c["flops"] / row["op_s"] / 1e9
            row["gbps"] = c["bytes_moved"] / row["op_s"] / 1e9
            if rates:   # the roofline: the time the op needs at the machine's GEMM rate or DRAM
                # copy bandwidth; data that stays in the caches moves faster, so it can pass 100%
                bound = max(c["flops"] / (rates["gemm_gflops"] * 1e9),   # bandwidth, whichever
                            c["bytes_moved"] / (rates["copy_gbps"] * 1e9))  # is the larger
                row["roofline_s"] = bound
                row["of_roofline"] = bound / row["op_s"]
                row["bound_by"] = ("flops" if c["flops"] / rates["gemm_gflops"]
                                   > c["bytes_moved"] / rates["copy_gbps"] else "bytes")
            rows.append(row)
            print(f"{op:26s} {label:26s} op {row['op_s'] * 1e3:9.2f} ms  plain "
                  f"{row['plain_s'] * 1e3:9.2f} ms  speed {row['speed']:5.2f}x "
                  f"(paired {row['speed_paired']:5.2f}x, control {min(control_pairs):4.2f}-"
                  f"{max(control_pairs):4.2f}x: {row['verdict']}; "
                  f"{row['rounds']} x {row['loops']})  "
                  f"{row['gflops']:7.1f} GFLOP/s {row['gbps']:6.1f} GB/s"
                  + (f"  {100 * row['of_roofline']:5.1f}% of roofline ({row['bound_by']})"
                     if rates else ""), flush=True)
    return rows


# ---------------------------------------------------------------------------- overhead
OVERHEAD_SHAPE = (1, 64, 64)   # N, d_in, d_out: the arithmetic is negligible, the call is not


def run_overhead(rounds):
    """Per-call cost of each public op beyond its plain composition, where the arithmetic is
    negligible (one row, 64 -> 64): ``overhead_us = op_us - plain_us`` (validation, dispatch,
    the checks on the result)."""
    n, d_in, d_out = OVERHEAD_SHAPE
    out = {}
    for op, (ours, plain, _key) in op_cases(n, d_in, d_out).items():
        t = alternate({"op": ours, "plain": plain}, rounds)
        op_us, plain_us = median(t["op"]) * 1e6, median(t["plain"]) * 1e6
        out[op] = {"op_us": op_us, "plain_us": plain_us, "overhead_us": op_us - plain_us,
                   "overhead_paired_us": statistics.median(
                       (a - b) * 1e6 for a, b in zip(t["op"], t["plain"]))}
        print(f"overhead {op:26s} op {op_us:8.2f} us  plain {plain_us:8.2f} us  "
              f"overhead {op_us - plain_us:7.2f} us", flush=True)
    return {"n": n, "d_in": d_in, "d_out": d_out, "ops": out}


# ---------------------------------------------------------------------------- backends
def _agrees(times: Dict[str, List[float]], chosen: str) -> bool:
    """``auto``'s backend within the calibration's margin of the fastest, by the ratio of the
    medians or by the median pair ratio (the row's ``agrees``)."""
    med = {b: median(v) for b, v in times.items()}
    fastest = min(med, key=med.get)
    if chosen == fastest:
        return True
    limit = 1 + calibration.MARGIN
    return med[chosen] / med[fastest] <= limit or paired_speed(times, fastest, chosen) <= limit


def run_backends(shapes, rounds):
    """Every op with two or more backends available on the CPU: each forced, vs calibration."""
    rows = []
    device = torch.device("cpu")
    for op in _backends.registered_ops():
        names = [b for b, impl in _backends.implementations(op).items()
                 if impl.available(device) is None]
        if len(names) < 2:
            continue
        for label, n, d_in, d_out in shapes:
            args = calibration.example_args(op, n, d_in, d_out, device)
            if args is None:
                continue
            fns = {b: (lambda b=b: _backends.implementations(op)[b].fn(*args)) for b in names}
            info = {}
            chosen = _backends.select(op, device, *args)[0]
            t = alternate_settled(fns, rounds, lambda times: _agrees(times, chosen), info)
            med = {b: median(v) for b, v in t.items()}
            fastest = min(med, key=med.get)
            # the chosen backend's time over the fastest's: ratio of medians, and the median of
            # the per-round ratios (a load spike hits both sides of a round)
            ratio = med[chosen] / med[fastest]
            paired = (paired_speed(t, fastest, chosen) if chosen != fastest else 1.0)
            limit = 1 + calibration.MARGIN
            pairs = pair_ratios(t, fastest, chosen) if chosen != fastest else []
            rows.append({"op": op, "shape": label, "median_s": med, "fastest": fastest,
                         # a miss beyond the noise: the chosen backend more than the margin
                         # slower in every pair of rounds, not just in the medians
                         "pair_ratios": pairs,
                         "misses_beyond_noise": bool(pairs) and min(pairs) > limit,
                         "loops": info["loops"], "rounds": info["rounds"],
                         "passes": info["passes"], "auto": chosen, "chosen_vs_fastest": ratio,
                         "chosen_vs_fastest_paired": paired,
                         "agrees_medians": ratio <= limit, "agrees_paired": paired <= limit,
                         "agrees": _agrees(t, chosen)})
            print(f"{op:12s} {label:26s} " + "  ".join(f"{b} {s * 1e3:8.2f} ms" for b, s in med.items())
                  + f"  fastest {fastest}, auto -> {chosen}", flush=True)
    return rows


# ---------------------------------------------------------------------------- paper
def run_paper(rounds, n=400, d_in=4096, d_out=4096):
    gen = torch.Generator().manual_seed(0)
    offset = torch.randn(d_in, generator=gen) * 0.5
    keys = torch.randn(n, d_in, generator=gen) * (1000.0 / d_in) ** 0.5 + 0.3 * offset
    grads = torch.randn(n, d_out, generator=gen) * 1e-3
    stats = uk.RunningStats(d_in + d_out).update(torch.cat([keys, grads], 1))

    def paper():
        values = uk.pseudo_values(keys, grads, stats)
        return torch.linalg.solve(keys.T @ keys + torch.eye(d_in), keys.T @ values)

    ours = lambda: uk.param_shift(keys, grads, stats, method="auto")  # noqa: E731
    t = alternate({"ours": ours, "paper": paper}, rounds)
    values64 = uk.pseudo_values(keys, grads, stats).double()
    k64 = keys.double()
    ref = torch.linalg.solve(k64.T @ k64 + torch.eye(d_in, dtype=torch.float64), k64.T @ values64)
    err = {name: float((fn().double() - ref).norm() / ref.norm()) for name, fn in
           (("ours", ours), ("paper", paper))}
    out = {"n": n, "d_in": d_in, "d_out": d_out, "ours_s": median(t["ours"]),
           "paper_s": median(t["paper"]), "speedup": median(t["paper"]) / median(t["ours"]),
           "rel_err_ours": err["ours"], "rel_err_paper": err["paper"],
           "accuracy_gain": err["paper"] / max(err["ours"], 1e-300)}
    print(f"param_shift(auto) vs paper primal fp32, N={n}, {d_in}->{d_out}: "
          f"{out['ours_s']:.3f} s vs {out['paper_s']:.3f} s = {out['speedup']:.1f}x faster; "
          f"rel. error vs float64 {err['ours']:.1e} vs {err['paper']:.1e} "
          f"({out['accuracy_gain']:.0f}x more accurate)", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="embedded shapes and 7B N <= 400 only")
    p.add_argument("--ops", default=None, help="comma-separated public ops (default: all)")
    p.add_argument("--shapes", default=None, help="comma-separated shape labels (default: all)")
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); on a 2-core machine shared "
                        "with other jobs, 1 thread avoids OpenMP barrier stalls that dominate "
                        "2-thread timings")
    p.add_argument("--no-calibrate", action="store_true",
                   help="use the cached calibration instead of measuring it at the start")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)   # before the calibration: its cache key holds it
    shapes = EMBEDDED + [s for s in SEVEN_B if not (a.quick and s[1] > 400)]
    if a.shapes:
        shapes = [s for s in shapes if s[0] in a.shapes.split(",")]
    ops = a.ops.split(",") if a.ops else None
    result = {"machine": machine_description(), "command": " ".join(sys.argv),
              "backend": os.environ.get(_backends.ENV_VAR, "auto")}
    result["rates"] = machine_rates(a.rounds)
    print(f"machine: {result['machine']}\ncopy {result['rates']['copy_gbps']:.1f} GB/s, "
          f"float32 GEMM {result['rates']['gemm_gflops']:.1f} GFLOP/s", flush=True)
    if not a.no_calibrate and calibration.mode() != "off":
        # measured now, so that the load it saw is the load of the rounds below
        start = time.perf_counter()
        calibration.calibrate(torch.device("cpu"))
        print(f"calibrated in {time.perf_counter() - start:.1f} s", flush=True)
    result["calibration"] = calibration.describe(torch.device("cpu"))
    result["backends"] = run_backends(shapes, a.rounds) if not ops or "spd_solve" in ops else []
    result["overhead"] = run_overhead(a.rounds) if not a.shapes else None
    result["ops"] = run_ops(shapes, a.rounds, ops, result["rates"])
    result["paper"] = run_paper(a.rounds) if not ops or "param_shift" in ops else None
    # again at the end: with the points past the grid measured while the cases above ran
    result["calibration"] = calibration.describe(torch.device("cpu"))
    slow = [f"{r['op']}@{r['shape']} {r['speed']:.2f}x" for r in result["ops"] if r["speed"] < 1.0]
    slow_paired = [f"{r['op']}@{r['shape']} {r['speed_paired']:.2f}x" for r in result["ops"]
                   if r["speed_paired"] < 1.0]
    disagree = [f"{r['op']}@{r['shape']}" for r in result["backends"] if not r["agrees"]]
    disagree_medians = [f"{r['op']}@{r['shape']} {r['chosen_vs_fastest']:.2f}x"
                        for r in result["backends"] if not r["agrees_medians"]]
    result["summary"] = {"ops_slower_than_plain": slow, "calibration_disagrees": disagree,
                         "ops_slower_beyond_noise": [
                             f"{r['op']}@{r['shape']} {r['speed_paired']:.2f}x "
                             f"(control {min(r['control_pair_ratios']):.2f}x)"
                             for r in result["ops"] if r["verdict"] == "slower"],
                         "ops_within_noise": [f"{r['op']}@{r['shape']} {r['speed_paired']:.2f}x"
                                              for r in result["ops"]
                                              if r["verdict"] == "within noise"],
                         "calibration_misses_beyond_noise": [
                             f"{r['op']}@{r['shape']}" for r in result["backends"]
                             if r["misses_beyond_noise"]],
                         "min_speed": min((r["speed"] for r in result["ops"]), default=None),
                         "ops_slower_than_plain_paired": slow_paired,
                         "calibration_disagrees_medians": disagree_medians,
                         "min_speed_paired": min((r["speed_paired"] for r in result["ops"]),
                                                 default=None),
                         # the cases the first rounds left unresolved, decided by twice the
                         # rounds: their first-pass verdicts
                         "second_looks": [
                             f"{r['op']}@{r['shape']} first {r['first_pass_speed_paired']:.3f}x "
                             f"({r['first_pass_verdict']}), all {r['speed_paired']:.3f}x "
                             f"({r['verdict']})" for r in result["ops"] if r["passes"] == 2],
                         "loadavg_1m_end": os.getloadavg()[0]}
    print(f"slower than plain torch: {slow or 'none'} (paired: {slow_paired or 'none'}); "
          f"beyond the control's spread: {result['summary']['ops_slower_beyond_noise'] or 'none'}; "
          f"calibration disagrees: {disagree or 'none'} (beyond noise: "
          f"{result['summary']['calibration_misses_beyond_noise'] or 'none'})")
    write_results(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
