"""Per-op benchmarks of the backend, for every available backend.

Ops: ``stats_update`` (from ``cat[K, G]``), ``stats_update2`` (from K and G, no concatenation),
``pseudo_values``, ``gram`` (dual, ``K Kᵀ + λI``), ``spd_solve`` (N x N
system, d_out right-hand sides), ``apply_shift`` (in place ``W += Aᵀ K`` on an fp32 Linear
weight). Each case calls the registered ``torch.library`` op (what the editor calls) with
``ULTRAEDIT_BACKEND`` set to the backend under test, so the dispatch cost is included; backends
that are not available on the device (``_backends.implementations(op)[b].available``) are skipped.

Shapes: the 7B MLP modules 4096 -> 14336 (LLaMA-3 gate/up) and 14336 -> 4096 (Mistral down) at
N in {100, 400, 2000} answer tokens, and the embedded SmolLM2-135M's 576 -> 1536 and 1536 -> 576
at N = 280 (100 edits). N = 2000 at 7B shapes is marked ``heavy`` (``--quick`` skips it).

Select with ``-k``: e.g. ``-k "gram and 4096x14336"`` or ``-k embedded``.
"""
from __future__ import annotations

import pytest
import torch

import ultraedit_kernels  # noqa: F401  (registers every op and optional backend)
from ultraedit_kernels import _backends
from ultraedit_kernels.apply_shift import apply_shift_op
from ultraedit_kernels.gram import gram_op
from ultraedit_kernels.pseudo_values import pseudo_values_op
from ultraedit_kernels.running_stats import EPS
from ultraedit_kernels.spd_solve import spd_solve_op
from ultraedit_kernels.stats_update import stats_update_op

from _common import add_rates, device_label, op_cost, pick_rounds, random_features, summarize, time_call
from memory import measure_peak

KNOWN_OPS = ("stats_update", "stats_update2", "pseudo_values", "gram", "spd_solve", "apply_shift")
# every registered op this suite knows how to feed (a new op without a builder is reported below)
OPS = tuple(op for op in KNOWN_OPS if op in _backends.registered_ops())
# ops with a suite of their own (factor once, solve many: against the plain torch composition)
BENCHED_ELSEWHERE = {"spd_factor": "bench_spd_factor.py",
                     "spd_solve_factored": "bench_spd_factor.py"}
UNBENCHED_OPS = tuple(op for op in _backends.registered_ops()
                      if op not in KNOWN_OPS and op not in BENCHED_ELSEWHERE)

SHAPES = []
for _d_in, _d_out in ((4096, 14336), (14336, 4096)):
    for _n in (100, 400, 2000):
        marks = [pytest.mark.heavy] if _n >= 2000 else []
        SHAPES.append(pytest.param(_d_in, _d_out, _n, id=f"7b-{_d_in}x{_d_out}-N{_n}", marks=marks))
for _d_in, _d_out in ((576, 1536), (1536, 576)):
    SHAPES.append(pytest.param(_d_in, _d_out, 280, id=f"embedded-{_d_in}x{_d_out}-N280"))


def _cases():
    for op in OPS:
        for backend in sorted(_backends.implementations(op)):
            yield pytest.param(op, backend, id=f"{op}-{backend}")


def _make_call(op, n, d_in, d_out, device):
    """Inputs for one op and a zero-argument callable running it once."""
    keys, grads, _ = random_features(n, d_in, d_out, device, seed=n + d_in)
    x = torch.cat([keys, grads], 1)
    mean = x.double().mean(0)
    std = x.double().std(0)
    if op == "stats_update":
        count = torch.tensor(1000.0, dtype=torch.float64, device=device)
        m2 = std.square() * 999
        return lambda: stats_update_op(x, count, mean, m2, False)
    if op == "stats_update2":      # the same merge from K and G without the concatenation
        from ultraedit_kernels.stats_update2 import stats_update2_op
        count = torch.tensor(1000.0, dtype=torch.float64, device=device)
        m2 = std.square() * 999
        return lambda: stats_update2_op(keys, grads, count, mean, m2, False)
    if op == "pseudo_values":
        return lambda: pseudo_values_op(keys, grads, mean, std, 1e-6, EPS)
    if op == "gram":
        return lambda: gram_op(keys, 1.0, True)
    if op == "spd_solve":
        a = gram_op(keys, 1.0, True)
        b = pseudo_values_op(keys, grads, mean, std, 1e-6, EPS)
        return lambda: spd_solve_op(a, b)
    if op == "apply_shift":
        weight = torch.randn(d_out, d_in, device=device) * 0.02
        factors = torch.randn(n, d_out, device=device) * 1e-6
        return lambda: apply_shift_op(weight, keys, factors, True)
    raise KeyError(op)


def test_every_op_is_benchmarked():
    """Fails (visibly, in the report) when the backend grows an op this suite does not cover."""
    assert not UNBENCHED_OPS, f"ops without a benchmark builder: {UNBENCHED_OPS}"


@pytest.mark.parametrize("d_in,d_out,n", SHAPES)
@pytest.mark.parametrize("op,backend", list(_cases()))
def test_op(benchmark, monkeypatch, device, op, backend, d_in, d_out, n):
    impl = _backends.implementations(op)[backend]
    why = impl.available(device)
    if why is not None:
        pytest.skip(f"{backend} not available for {op} on {device.type}: {why}")
    monkeypatch.setenv(_backends.ENV_VAR, backend)
    call = _make_call(op, n, d_in, d_out, device)
    chosen, _ = _backends.select(op, device)
    assert chosen == backend, f"requested {backend} but {op} dispatches to {chosen}"

    one = time_call(call, device)          # warm-up (first call: allocations, kernel compiles)
    one = min(one, time_call(call, device))
    rounds = pick_rounds(one)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None

    def timed():
        out = call()
        if sync is not None:
            sync()
        return out

    benchmark.group = f"op:{op}"
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    times = list(benchmark.stats.stats.data)
    peak, method = measure_peak(call, device)
    extra = {"suite": "ops", "op": op, "backend": backend, "device": device_label(device),
             "d_in": d_in, "d_out": d_out, "n": n, "peak_bytes": peak, "peak_method": method}
    extra.update(summarize(times))
    cost = op_cost(op, n, d_in, d_out)
    add_rates(extra, extra["median_s"], cost["flops"], cost["bytes_moved"])
    benchmark.extra_info.update(extra)
