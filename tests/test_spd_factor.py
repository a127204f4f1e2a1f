"""Factor once, solve many: ``spd_factor`` + ``spd_solve_factored`` against a float64 oracle."""
import pytest
import torch

import ultraedit_kernels as uk
from tolerances import assert_within


def _spd(n, k, batch_shape=(), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * n + k)
    x = torch.randn(*batch_shape, n, n + 5, generator=gen, dtype=torch.float64)
    a = x @ x.transpose(-1, -2) / (n + 5) + 0.5 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(*batch_shape, n, k, generator=gen, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n,k,batch", [(37, 5, ()), (70, 129, ()), (23, 11, (3,))])
def test_factor_then_solve_matches_float64(n, k, batch, dtype):
    a, b = _spd(n, k, batch, dtype)
    factor, info = uk.spd_factor(a)
    assert factor.dtype == dtype and info.shape == a.shape[:-2] and int(info.abs().max()) == 0
    x = uk.spd_solve_factored(factor, b)
    assert x.shape == b.shape and x.dtype == dtype and x.is_contiguous()
    ref = torch.linalg.solve(a.double(), b.double())
    plain = torch.cholesky_solve(b, torch.linalg.cholesky(a))
    assert_within(x, ref, "spd_solve", dtype, plain=plain)
    # many right-hand sides against one factor equal one solve each with spd_solve
    again, _ = uk.spd_solve(a, b)
    assert_within(again, ref, "spd_solve", dtype, plain=plain)


def test_not_positive_definite_reports_info():
    a, _ = _spd(9, 1, dtype=torch.float64)
    a[4, 4] = -1.0
    _, info = uk.spd_factor(a)
    assert int(info) == 5


@pytest.mark.parametrize("call,match", [
    (lambda: uk.spd_factor(torch.zeros(3, 4)), "square"),
    (lambda: uk.spd_factor(torch.zeros(3, 3, dtype=torch.int32)), "float32 or float64"),
    (lambda: uk.spd_solve_factored(torch.eye(3), torch.zeros(4, 2)), "does not match"),
    (lambda: uk.spd_solve_factored(torch.eye(3), torch.zeros(3, 2, dtype=torch.float64)), "cast"),
    (lambda: uk.spd_solve_factored(torch.eye(3), [1.0]), "torch.Tensor"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_opcheck():
    a, b = _spd(13, 7)
    torch.library.opcheck(uk.spd_factor_op, (a,))
    factor, _ = uk.spd_factor(a)
    torch.library.opcheck(uk.spd_solve_factored_op, (factor, b))


def test_opcheck_batched():
    a, b = _spd(6, 3, (2,))
    torch.library.opcheck(uk.spd_factor_op, (a,))
    factor, _ = uk.spd_factor(a)
    torch.library.opcheck(uk.spd_solve_factored_op, (factor, b))
