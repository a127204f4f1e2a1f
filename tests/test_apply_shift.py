"""``apply_shift_`` against float64, through both of its entries: the extension's ``add_shift``
(the common case, one native call) and the Python checks and dispatch (what runs without the
extension, and for every argument the native entry declines)."""
import pytest
import torch

from ultraedit_kernels import _extension, apply_shift_, layout_of
from ultraedit_kernels import apply_shift as apply_module
from tolerances import TOLERANCES, rel_err


@pytest.fixture(autouse=True, params=["host_entry", "python"])
def entry(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(apply_module, "_host_add_shift", None)
    elif _extension.unavailable_reason("cpu") is not None:
        pytest.skip(f"host build not available: {_extension.unavailable_reason('cpu')}")
    return request.param


def _factors(n=19, d_in=31, d_out=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g) * 4, torch.randn(n, d_out, generator=g) * 1e-3


@pytest.mark.parametrize("rows", [19, 1], ids=["rows19", "one_row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_linear_and_conv1d_layouts(dtype, rows):
    keys, factors = _factors(n=rows)
    delta = keys.double().T @ factors.double()            # d_in x d_out
    w_lin = (torch.randn(23, 31) * 0.1).to(dtype)
    w_conv = (torch.randn(31, 23) * 0.1).to(dtype)
    want_lin, want_conv = w_lin.double() + delta.T, w_conv.double() + delta
    apply_shift_(w_lin, keys, factors, layout="linear")
    apply_shift_(w_conv, keys, factors, layout="conv1d")
    assert w_lin.dtype == dtype
    assert rel_err(w_lin, want_lin) < TOLERANCES["apply"][dtype]
    assert rel_err(w_conv, want_conv) < TOLERANCES["apply"][dtype]


def test_module_layout_is_inferred_and_in_place():
    from transformers.pytorch_utils import Conv1D
    keys, factors = _factors()
    lin, conv = torch.nn.Linear(31, 23), Conv1D(23, 31)
    assert layout_of(lin) == "linear" and layout_of(conv) == "conv1d"
    ptr = lin.weight.data_ptr()
    before = lin.weight.detach().clone()
    apply_shift_(lin, keys, factors)
    assert lin.weight.data_ptr() == ptr
    assert rel_err(lin.weight.detach() - before, (keys.T @ factors).T) < TOLERANCES["dual"][torch.float32]
    apply_shift_(conv, keys, factors)
    assert lin.weight.grad is None and conv.weight.grad is None


def test_errors():
    keys, factors = _factors()
    with pytest.raises(ValueError, match="shape"):
        apply_shift_(torch.zeros(31, 23), keys, factors, layout="linear")
    with pytest.raises(ValueError, match="layout"):
        apply_shift_(torch.zeros(23, 31), keys, factors)
    with pytest.raises(TypeError, match="nn.Linear or GPT-2 Conv1D"):
        apply_shift_(torch.nn.Embedding(4, 4), keys, factors)
    w = torch.zeros(23, 31)
    with pytest.raises(ValueError, match="NaN"):
        apply_shift_(w, keys, torch.full_like(factors, float("nan")), layout="linear")
    assert torch.count_nonzero(w) == 0
