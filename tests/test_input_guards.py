"""Bad input is a clear error and changes nothing; float64 works end to end on every backend.

* float64 and mixed float64/float32 keys, gradients and systems (``param_shift``,
  ``shift_factors``, ``spd_solve``) on every backend available here, against the float64
  oracle;
* ``lr`` that is NaN, Inf or not positive is a ``ValueError`` in every op that takes it;
* ``apply_shift_`` never writes NaN/Inf: non-finite keys/factors or an update that overflows
  the weight's dtype raise, and the weight is bit-identical afterwards;
* ``RunningStats.load_state_dict`` refuses statistics that cannot have come from any data,
  leaving the statistics bit-identical.
"""
import pytest
import torch

import ultraedit_kernels as uk
from ultraedit_kernels import _backends
from fp64_reference import realistic_features
from tolerances import TOLERANCES, rel_err

BACKENDS = [b for b, impl in sorted(_backends.implementations("spd_solve").items())
            if impl.available(torch.device("cpu")) is None]
ALL_CPU_BACKENDS = sorted({b for op in _backends.registered_ops()
                           for b, impl in _backends.implementations(op).items()
                           if impl.available(torch.device("cpu")) is None})


def _oracle(keys, grads, stats, lr, ridge):
    """float64 primal solve of the same pseudo-values (computed in float64)."""
    k, g = keys.double(), grads.double()
    v = uk.pseudo_values(k, g, stats, lr)
    assert v.dtype == torch.float64
    eye = torch.eye(k.shape[1], dtype=torch.float64)
    return torch.linalg.solve(k.T @ k + ridge * eye, k.T @ v)


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
@pytest.mark.parametrize("kd,gd", [(torch.float64, torch.float64), (torch.float64, torch.float32),
                                   (torch.float32, torch.float64)],
                         ids=["f64", "f64-keys", "f64-grads"])
def test_float64_end_to_end(monkeypatch, backend, kd, gd):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", backend)
    keys, grads = realistic_features(23, 41, 17, seed=5)
    keys, grads = keys.to(kd), grads.to(gd)
    stats = uk.RunningStats(58).update_pair(keys, grads)
    ref = _oracle(keys, grads, stats, 1e-3, 1.0)
    factors = uk.shift_factors(keys, grads, stats, lr=1e-3)
    assert factors.dtype == torch.float64
    assert rel_err(keys.double().T @ factors, ref) <= TOLERANCES["dual"][torch.float64]
    for method in ("dual", "primal"):
        dw = uk.param_shift(keys, grads, stats, lr=1e-3, method=method)
        assert dw.dtype == torch.float64 and dw.shape == (41, 17)
        assert rel_err(dw, ref) <= TOLERANCES["dual"][torch.float64], method
    weight = torch.zeros(17, 41, dtype=torch.float64)
    uk.apply_shift_(weight, keys, factors, "linear")
    assert rel_err(weight.T, ref) <= TOLERANCES["dual"][torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
def test_spd_solve_mixed_dtypes_solve_in_float64(monkeypatch, backend):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", backend)
    x = torch.randn(9, 14, dtype=torch.float64)
    a = x @ x.T + torch.eye(9, dtype=torch.float64)
    b = torch.randn(9, 4, dtype=torch.float64)
    ref = torch.linalg.solve(a, b)
    for aa, bb in ((a, b.float()), (a.float(), b), (a, b)):
        got, info = uk.spd_solve(aa, bb)
        assert got.dtype == torch.float64 and int(info) == 0
        assert rel_err(got, ref) <= (TOLERANCES["dual"][torch.float64] if aa.dtype == bb.dtype else TOLERANCES["dual"][torch.float32])


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -float("inf"), 0.0, -1e-6])
def test_bad_lr_is_a_clear_error(lr):
    keys, grads = realistic_features(6, 10, 5, seed=1)
    stats = uk.RunningStats(15).update_pair(keys, grads)
    before = stats.state_dict()
    for call in (lambda: uk.pseudo_values(keys, grads, stats, lr=lr),
                 lambda: uk.shift_factors(keys, grads, stats, lr=lr),
                 lambda: uk.param_shift(keys, grads, stats, lr=lr)):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            call()
    after = stats.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _apply_case(dtype=torch.float32, layout="linear"):
    features_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    keys, _ = realistic_features(7, 12, 5, seed=3, dtype=features_dtype)
    factors = torch.randn(7, 5, dtype=features_dtype) * 1e-3
    shape = (5, 12) if layout == "linear" else (12, 5)
    return torch.randn(*shape).to(dtype), keys, factors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("poison,match", [
    ("keys-nan", "keys contains 1 NaN/Inf"), ("keys-inf", "keys contains 1 NaN/Inf"),
    ("factors-nan", "factors contains 1 NaN/Inf"), ("overflow", "overflows"),
])
def test_apply_shift_never_writes_nan_or_inf(dtype, layout, poison, match):
    weight, keys, factors = _apply_case(dtype, layout)
    if poison == "keys-nan":
        keys[3, 4] = float("nan")
    elif poison == "keys-inf":
        keys[0, 0] = float("inf")
    elif poison == "factors-nan":
        factors[2, 1] = float("nan")
    else:   # finite, but the product exceeds the dtype's range
        big = torch.finfo(dtype).max
        keys = keys * (big ** 0.5) * 4
        factors = factors * 1e3 * (big ** 0.5)
        assert bool(torch.isfinite(keys).all() and torch.isfinite(factors).all())
    before = weight.clone()
    with pytest.raises(ValueError, match=match):
        uk.apply_shift_(weight, keys, factors, layout)
    assert torch.equal(weight, before)


def test_apply_shift_near_the_bound_still_applies():
    """Large but representable updates take the checked path and are applied exactly once."""
    weight, keys, factors = _apply_case(torch.float16)
    factors = factors * 3e3            # bound above the fp16 fast-path limit, result finite
    expected = (weight.float() + factors.T @ keys).to(torch.float16)
    assert bool(torch.isfinite(expected).all())
    uk.apply_shift_(weight, keys, factors, "linear")
    assert torch.equal(weight, expected)


def _valid_state(compat="fixed"):
    x = torch.randn(9, 4, dtype=torch.float64)
    return uk.RunningStats(4, compat).update(x).state_dict()


@pytest.mark.parametrize("field,value,match", [
    ("count", torch.tensor(float("nan"), dtype=torch.float64), "non-negative integer"),
    ("count", torch.tensor(2.5, dtype=torch.float64), "non-negative integer"),
    ("count", torch.tensor(-3.0, dtype=torch.float64), "non-negative integer"),
    ("count", torch.tensor([1.0, 2.0], dtype=torch.float64), "one number"),
    ("mean", torch.tensor([0.0, float("nan"), 0.0, 0.0], dtype=torch.float64), "mean holds NaN"),
    ("m2", torch.tensor([1.0, -0.5, 1.0, 1.0], dtype=torch.float64), "must be >= 0"),
    ("m2", torch.tensor([1.0, float("inf"), 1.0, 1.0], dtype=torch.float64), "m2 holds NaN/Inf"),
    ("mean", torch.tensor([1, 2, 3, 4]), "floating-point"),
])
def test_load_state_dict_refuses_impossible_statistics(field, value, match):
    stats = uk.RunningStats(4).update(torch.randn(5, 4))
    before = stats.state_dict()
    bad = {**_valid_state(), field: value}
    with pytest.raises((ValueError, TypeError), match=match):
        stats.load_state_dict(bad)
    after = stats.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_state_dict_count_zero_must_be_empty():
    stats = uk.RunningStats(4)
    state = {"count": torch.tensor(0.0, dtype=torch.float64),
             "mean": torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64),
             "m2": torch.zeros(4, dtype=torch.float64)}
    with pytest.raises(ValueError, match="count is 0 but mean/m2 are not zero"):
        stats.load_state_dict(state)
    assert stats.count == 0 and torch.equal(stats.mean, torch.zeros(4, dtype=torch.float64))
    state["mean"] = torch.zeros(4, dtype=torch.float64)
    stats.load_state_dict(state)                       # the empty state loads


def test_load_state_dict_round_trips_both_compat_modes():
    for compat in ("fixed", "official"):
        stats = uk.RunningStats(4, compat)
        stats.load_state_dict(_valid_state(compat))
        assert stats.count == 9


def test_update_with_nan_or_overflow_leaves_the_statistics_unchanged():
    stats = uk.RunningStats(3).update(torch.randn(4, 3))
    before = stats.state_dict()
    for bad, match in ((torch.tensor([[1.0, float("nan"), 2.0]]), "NaN/Inf"),
                       (torch.full((2, 3), 1e300, dtype=torch.float64) * torch.tensor([1.0, -1.0])
                        .repeat_interleave(1).reshape(2, 1), "overflow")):
        with pytest.raises(ValueError, match=match):
            stats.update(bad)
        after = stats.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_std_cache_follows_the_state():
    stats = uk.RunningStats(3).update(torch.randn(6, 3))
    std = stats.std
    assert stats.std is std                      # computed once per state
    stats.update(torch.randn(4, 3) + 5)
    assert not torch.equal(stats.std, std)
    stats.m2.mul_(4.0)                           # an in-place change is seen too
    assert torch.allclose(stats.std, stats.var.sqrt()) and torch.equal(stats.var, stats.m2 / 9)
