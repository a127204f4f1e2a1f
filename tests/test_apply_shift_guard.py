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


@needs_host
@pytest.mark.parametrize("linear", [True, False], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("check", [True, False], ids=["check", "no_check"])
def test_the_native_entry_is_the_reference_bit_for_bit(linear, dtype, check):
    """The extension's ``add_shift`` takes float32/float64 calls of one dtype and gives the
    reference's very ``addmm_`` bits, for odd shapes and a single row."""
    add_shift = _extension.extension().add_shift
    g = torch.Generator().manual_seed(17)
    for n, d_in, d_out in ((1, 37, 29), (13, 37, 29), (50, 153, 57)):
        keys = torch.randn(n, d_in, generator=g, dtype=dtype)
        factors = torch.randn(n, d_out, generator=g, dtype=dtype) * 1e-3
        weight = torch.randn(*((d_out, d_in) if linear else (d_in, d_out)), generator=g,
                             dtype=dtype)
        want, public = weight.clone(), weight.clone()
        apply_module.apply_shift_reference(want, keys, factors, linear)
        assert add_shift(weight, keys, factors, linear, check) is True
        assert torch.equal(weight, want)
        uk.apply_shift_(public, keys, factors, "linear" if linear else "conv1d", check=check)
        assert torch.equal(public, want)


@needs_host
def test_the_native_entry_declines_what_the_python_path_must_handle():
    """Returns False with the weight untouched for every call it does not take as is; the
    public op then converts, guards out of place, or raises the error that names the problem."""
    add_shift = _extension.extension().add_shift
    g = torch.Generator().manual_seed(4)
    keys, factors = torch.randn(6, 30, generator=g), torch.randn(6, 20, generator=g) * 1e-3
    weight = torch.randn(20, 30, generator=g)
    nan_keys = keys.clone()
    nan_keys[2, 3] = float("nan")
    declined = {
        "bfloat16 weight": (weight.bfloat16(), keys.bfloat16(), factors.bfloat16(), True, True),
        "mixed dtypes": (weight.double(), keys, factors, True, True),
        "wrong shape": (weight.T.contiguous(), keys, factors, True, True),
        "rows differ": (weight, keys, factors[:5], True, True),
        "no rows": (weight, keys[:0], factors[:0], True, True),
        "1-D keys": (weight, keys[0], factors, True, True),
        "guard, strided keys": (torch.randn(20, 15), keys[:, ::2], factors, True, True),
        "guard, NaN": (weight, nan_keys, factors, True, True),
        "guard, overflow bound": (weight, keys * 1e20, factors * 1e20, True, True),
    }
    for name, (w, k, a, linear, guard) in declined.items():
        before = w.clone()
        assert add_shift(w, k, a, linear, guard) is False, name
        assert torch.equal(w, before), name
    # without the guard a strided or non-finite input is the caller's to vouch for
    strided = torch.randn(20, 15, generator=g)
    assert add_shift(strided, keys[:, ::2], factors, True, False) is True
    # what the public op then does with declined calls
    with pytest.raises(ValueError, match="NaN/Inf"):
        uk.apply_shift_(weight, nan_keys, factors, "linear")
    with pytest.raises(ValueError, match="no rows"):
        uk.apply_shift_(weight, keys[:0], factors[:0], "linear")
    w64 = weight.double()
    uk.apply_shift_(w64, keys, factors, "linear")   # converted, as the reference does
    assert torch.allclose(w64, weight.double() + factors.double().T @ keys.double())


def test_the_native_entry_is_skipped_where_the_reference_is_asked_for(monkeypatch):
    """A plain call (a ``Parameter``: its data) enters natively; under ``ULTRAEDIT_BACKEND=torch``
    the op runs the Python reference."""
    calls = []
    monkeypatch.setattr(apply_module, "_host_add_shift", lambda *a: calls.append(a) or False)
    keys, factors = torch.randn(3, 8), torch.randn(3, 5) * 1e-3
    weight = torch.nn.Parameter(torch.randn(5, 8))
    uk.apply_shift_(weight, keys, factors, "linear")
    assert len(calls) == 1 and type(calls[0][0]) is torch.Tensor   # the Parameter's data
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "torch")
    uk.apply_shift_(weight, keys, factors, "linear")
    assert len(calls) == 1
