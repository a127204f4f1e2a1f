"""The check ``apply_shift_`` makes before it writes a weight: ``N · max|K| · max|A|`` below the
dtype's overflow, every input finite. On the CPU the two maxima come from the host build's
one-pass ``abs_max`` (``csrc/checks/abs_max.cpp``); without it, from ``torch.aminmax``."""
import pytest
import torch

import ultraedit_kernels as uk
from ultraedit_kernels import _extension
from ultraedit_kernels import apply_shift as apply_module

HOST_REASON = _extension.unavailable_reason("cpu")
needs_host = pytest.mark.skipif(HOST_REASON is not None,
                                reason=f"host build of ultraedit_kernels._C not available: {HOST_REASON}")


@needs_host
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_abs_max_is_exact_and_sees_every_non_finite_value(dtype):
    """Exact on lengths around its two-vector stride; NaN as soon as one value is NaN or ±Inf."""
    abs_max = _extension.extension().abs_max
    g = torch.Generator().manual_seed(9)
    for n in (0, 1, 15, 16, 31, 32, 33, 1000, 4099):
        x = (torch.randn(n, generator=g) * 7).to(dtype)
        want = float(x.double().abs().max()) if n else 0.0
        assert abs_max([x]) == [want]
        for bad in (float("nan"), float("inf"), float("-inf")):
            if n:
                y = x.clone()
                y[n // 2] = bad
                got = abs_max([x, y])
                assert got[0] == want and got[1] != got[1]     # NaN
    strided = torch.randn(40, 30, generator=g)[:, ::3]
    assert abs_max([strided]) == [float(strided.abs().max())]


@pytest.mark.parametrize("host", [True, False], ids=["abs_max", "aminmax"])
def test_both_paths_give_the_same_maxima_and_refuse_non_finite_input(host, monkeypatch):
    if host and HOST_REASON is not None:
        pytest.skip(f"host build not available: {HOST_REASON}")
    if not host:
        monkeypatch.setattr(apply_module, "_host_abs_max", None)
    g = torch.Generator().manual_seed(3)
    keys, factors = torch.randn(7, 30, generator=g), torch.randn(7, 20, generator=g) * 1e-3
    got = apply_module._abs_maxima(keys, factors)
    assert list(got) == [float(keys.abs().max()), float(factors.abs().max())]
    for bad in (float("nan"), float("inf")):
        k = keys.clone()
        k[4, 11] = bad
        weight = torch.randn(20, 30)
        before = weight.clone()
        with pytest.raises(ValueError, match="NaN/Inf"):
            uk.apply_shift_(weight, k, factors, layout="linear")
        assert torch.equal(weight, before)


def test_check_false_is_the_plain_update():
    """``check=False``: no guard, the same ``addmm_`` as plain PyTorch, bit for bit; argument
    errors are still raised."""
    g = torch.Generator().manual_seed(5)
    keys, factors = torch.randn(9, 30, generator=g), torch.randn(9, 20, generator=g) * 1e-3
    weight = torch.randn(20, 30, generator=g)
    plain = weight.clone().addmm_(factors.T, keys)
    uk.apply_shift_(weight, keys, factors, layout="linear", check=False)
    assert torch.equal(weight, plain)
    with pytest.raises(ValueError, match="shape"):
        uk.apply_shift_(torch.zeros(30, 20), keys, factors, layout="linear", check=False)
