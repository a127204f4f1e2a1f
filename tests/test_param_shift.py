import sys

import pytest
import torch

import ultraedit_kernels as uk
from ultraedit_kernels import RunningStats, param_shift, shift_factors
from fp64_reference import param_shift_fp64, realistic_features
from tolerances import TOLERANCES, rel_err

SHAPES = [(37, 129, 61), (101, 257, 95), (1, 33, 9)]  # (N, d_in, d_out), N < d_in: dual wins


def _setup(n, d_in, d_out, seed=0, compat="fixed", dtype=torch.float32):
    keys, grads = realistic_features(n, d_in, d_out, seed=seed, dtype=dtype)
    stats = RunningStats(d_in + d_out, compat=compat)
    stats.update(torch.randn(13, d_in + d_out, generator=torch.Generator().manual_seed(99)))
    stats.update(torch.cat([keys, grads], 1))
    return keys, grads, stats


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("compat", ["fixed", "official"])
def test_dual_matches_fp64(shape, compat):
    if compat == "official" and shape[0] == 1:
        pytest.skip("the official M2 update is NaN for one-row blocks (tested in test_running_stats)")
    keys, grads, stats = _setup(*shape, compat=compat)
    ref = param_shift_fp64(keys, grads, stats.mean, stats.std, 1e-3, 1.0)
    got = param_shift(keys, grads, stats, lr=1e-3, ridge=1.0, method="dual")
    assert got.shape == (shape[1], shape[2]) and got.dtype == torch.float32
    assert rel_err(got, ref) < TOLERANCES["dual"][torch.float32]


@pytest.mark.parametrize("shape", [(37, 29, 13), (300, 64, 31)])
def test_primal_and_auto_match_fp64(shape):
    keys, grads, stats = _setup(*shape)
    ref = param_shift_fp64(keys, grads, stats.mean, stats.std, 1e-3, 0.7)
    assert rel_err(param_shift(keys, grads, stats, lr=1e-3, ridge=0.7, method="primal"), ref) < TOLERANCES["primal"][torch.float32]
    assert rel_err(param_shift(keys, grads, stats, lr=1e-3, ridge=0.7, method="auto"), ref) < TOLERANCES["primal"][torch.float32]


def test_auto_picks_dual_when_fewer_rows_than_inputs():
    assert uk.choose_method(400, 4096) == "dual"
    assert uk.choose_method(5000, 4096) == "primal"


def test_dual_is_far_more_accurate_than_primal_fp32():
    keys, grads, stats = _setup(200, 1024, 64, seed=5)
    ref = param_shift_fp64(keys, grads, stats.mean, stats.std, 1e-6, 1.0)
    dual = rel_err(param_shift(keys, grads, stats, method="dual"), ref)
    K = keys.float()
    v = uk.pseudo_values(keys, grads, stats)
    paper = torch.linalg.solve(K.T @ K + torch.eye(K.shape[1]), K.T @ v)
    assert dual * 100 < rel_err(paper, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    keys, grads, stats = _setup(31, 97, 45, dtype=dtype)
    ref = param_shift_fp64(keys, grads, stats.mean, stats.std, 1e-3, 1.0)
    assert rel_err(param_shift(keys, grads, stats, lr=1e-3), ref) < TOLERANCES["dual"][torch.float32]


def test_factors_give_the_dense_shift():
    keys, grads, stats = _setup(37, 129, 61)
    factors = shift_factors(keys, grads, stats, lr=1e-3)
    assert factors.shape == (37, 61)
    dense = param_shift(keys, grads, stats, lr=1e-3, method="dual")
    assert rel_err(keys.float().T @ factors, dense) < TOLERANCES["reorder"][torch.float32]


def test_failed_factorization_retries_in_float64(monkeypatch, caplog):
    keys, grads, stats = _setup(20, 50, 10)
    ref = param_shift(keys, grads, stats, lr=1e-3)
    ps = sys.modules["ultraedit_kernels.param_shift"]

    def failing(a, b):
        return torch.full_like(b, float("nan")), torch.ones(a.shape[:-2], dtype=torch.int32)

    monkeypatch.setattr(ps, "spd_solve_call", failing)
    with caplog.at_level("WARNING", logger="ultraedit_kernels"):
        got = param_shift(keys, grads, stats, lr=1e-3)
    assert "retrying in float64" in caplog.text
    assert rel_err(got, ref) < TOLERANCES["dual"][torch.float32]


def test_degenerate_system_raises_solve_error(monkeypatch):
    keys, grads, stats = _setup(20, 50, 10)
    ps = sys.modules["ultraedit_kernels.param_shift"]

    def failing(a, b):
        return b, torch.ones(a.shape[:-2], dtype=torch.int32)

    monkeypatch.setattr(ps, "spd_solve_call", failing)
    monkeypatch.setattr(ps, "spd_solve_reference", failing)
    with pytest.raises(uk.SolveError, match="not positive definite"):
        param_shift(keys, grads, stats)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda k, g: (k[:-1], g), ValueError, "same number of rows"),
    (lambda k, g: (k.long(), g), TypeError, "floating-point"),
    (lambda k, g: (k[:0], g[:0]), ValueError, "N = 0"),
    (lambda k, g: (k, g.clone().index_fill_(0, torch.tensor([2]), float("nan"))), ValueError, "NaN"),
    (lambda k, g: (k.clone().index_fill_(1, torch.tensor([0]), float("inf")), g), ValueError, "NaN/Inf"),
])
def test_bad_input(mutate, exc, match):
    keys, grads, stats = _setup(9, 17, 5)
    before = stats.state_dict()
    k, g = mutate(keys, grads)
    with pytest.raises(exc, match=match):
        param_shift(k, g, stats)
    assert all(torch.equal(before[x], stats.state_dict()[x]) for x in before)


def test_official_nan_stats_are_refused():
    keys, grads, _ = _setup(1, 17, 5)
    stats = RunningStats(22, compat="official").update(torch.cat([keys, grads], 1))
    with pytest.raises(ValueError, match="one-row block"):
        param_shift(keys, grads, stats)


def test_bad_arguments():
    keys, grads, stats = _setup(9, 17, 5)
    with pytest.raises(ValueError, match="method"):
        param_shift(keys, grads, stats, method="lu")
    with pytest.raises(ValueError, match="ridge"):
        param_shift(keys, grads, stats, ridge=0.0)
    with pytest.raises(ValueError, match="dim="):
        param_shift(keys, grads, RunningStats(21).update(torch.randn(3, 21)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["dual", "primal"])
def test_cuda_matches_fp64(method):
    keys, grads, stats = _setup(37, 129, 61)
    ref = param_shift_fp64(keys, grads, stats.mean, stats.std, 1e-3, 1.0)
    gstats = RunningStats(stats.dim, device="cuda")
    gstats.load_state_dict(stats.state_dict())
    torch.backends.cuda.matmul.allow_tf32 = False
    got = param_shift(keys.cuda(), grads.cuda(), gstats, lr=1e-3, method=method)
    assert rel_err(got.cpu(), ref) < (TOLERANCES["dual"][torch.float32] if method == "dual" else TOLERANCES["primal"][torch.float32])


def test_frozen_stats_equal_running_stats():
    keys, grads, stats = _setup(37, 129, 61)
    frozen = uk.FrozenStats(stats.mean.float(), stats.std.float())
    ours = param_shift(keys, grads, stats, lr=1e-3)
    theirs = param_shift(keys, grads, frozen, lr=1e-3)
    assert rel_err(theirs, ours) < TOLERANCES["reorder"][torch.float32]
    with pytest.raises(ValueError, match="dim=190"):
        param_shift(keys[:, :100], grads, frozen)
    with pytest.raises(ValueError, match="same, non-zero length"):
        uk.FrozenStats(torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        uk.FrozenStats(torch.zeros(3), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="finite"):
        uk.FrozenStats(torch.tensor([0.0, float("nan"), 0.0]), torch.ones(3))
