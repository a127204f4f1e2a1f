"""End to end with ``ULTRAEDIT_BACKEND=triton``: statistics, pseudo-values and Gram all run the
Triton kernels, and the parameter shift matches the float64 oracle (the dual tolerance)."""
import dataclasses

import pytest
import torch

import ultraedit_kernels as uk
from ultraedit_kernels import _backends
from fp64_reference import param_shift_fp64, realistic_features
from tolerances import FACTOR, TOLERANCES, rel_err
from triton_testing import DEVICE, requires_kernels, use_backend

pytestmark = requires_kernels


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls of every op's triton implementation (proves the kernels ran)."""
    calls = {}
    for op in ("stats_update", "pseudo_values", "gram"):
        impl = _backends.implementations(op)["triton"]

        def counted(*args, _fn=impl.fn, _op=op):
            calls[_op] = calls.get(_op, 0) + 1
            return _fn(*args)

        # a new dict for the op (not an item set in the old one): the backend selection is
        # memoized per registry dict, so the counted implementation is what gets selected
        impls = dict(_backends._REGISTRY[op], triton=dataclasses.replace(impl, fn=counted))
        monkeypatch.setitem(_backends._REGISTRY, op, impls)
    use_backend(monkeypatch, "triton")
    return calls


@pytest.mark.parametrize("compat", ["fixed", "official"])
def test_param_shift_matches_fp64(triton_calls, compat):
    keys, grads = realistic_features(29, 67, 23, seed=11)
    keys, grads = keys.to(DEVICE), grads.to(DEVICE)
    stats = uk.RunningStats(90, compat=compat)
    for k, g in zip(keys.split(10), grads.split(10)):
        stats.update(torch.cat([k, g], 1))
    dw = uk.param_shift(keys, grads, stats, lr=1e-3, ridge=1.0)          # auto: dual (29 < 67)
    ref = param_shift_fp64(keys.cpu(), grads.cpu(), stats.mean.cpu(), stats.std.cpu(), 1e-3, 1.0)
    assert rel_err(dw.cpu(), ref) < TOLERANCES["dual"][torch.float32]
    assert triton_calls == {"stats_update": 3, "pseudo_values": 1, "gram": 1}


def test_primal_and_forced_dual(triton_calls, monkeypatch):
    """N > d_in: auto picks the primal system; the dual one (forced) is worse conditioned in
    float32 for every backend, so the kernels must only be as good as the reference there."""
    keys, grads = realistic_features(45, 31, 13, seed=12)
    keys, grads = keys.to(DEVICE), grads.to(DEVICE)
    stats = uk.RunningStats(44).update(torch.cat([keys, grads], 1))
    ref = param_shift_fp64(keys.cpu(), grads.cpu(), stats.mean.cpu(), stats.std.cpu(), 1e-3, 1.0)
    primal = uk.param_shift(keys, grads, stats, lr=1e-3)                    # 31 x 31 system
    dual = uk.param_shift(keys, grads, stats, lr=1e-3, method="dual")       # 45 x 45 system
    assert triton_calls["gram"] == 2
    use_backend(monkeypatch, "torch")
    dual_torch = uk.param_shift(keys, grads, stats, lr=1e-3, method="dual")
    assert rel_err(primal.cpu(), ref) < TOLERANCES["primal"][torch.float32]
    assert rel_err(dual.cpu(), ref) <= FACTOR * rel_err(dual_torch.cpu(), ref) + TOLERANCES["dual"][torch.float32]


def test_bf16_features(triton_calls):
    keys, grads = realistic_features(21, 40, 9, seed=13, dtype=torch.bfloat16)
    keys, grads = keys.to(DEVICE), grads.to(DEVICE)
    stats = uk.RunningStats(49).update(torch.cat([keys, grads], 1))
    dw = uk.param_shift(keys, grads, stats, lr=1e-3)
    ref = param_shift_fp64(keys.cpu(), grads.cpu(), stats.mean.cpu(), stats.std.cpu(), 1e-3, 1.0)
    assert rel_err(dw.cpu(), ref) < TOLERANCES["dual"][torch.float32]
