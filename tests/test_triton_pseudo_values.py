"""The fused pseudo-values kernel vs the float64 oracle (interpreter on CPU, or a GPU)."""
import pytest
import torch

import ultraedit_kernels as uk
from ultraedit_kernels import _backends
from fp64_reference import pseudo_values_fp64
from tolerances import TOLERANCES, rel_err
from triton_testing import DEVICE, DTYPES, odd_features, requires_kernels, use_backend

pytestmark = requires_kernels


def _launcher():
    from ultraedit_kernels._triton import pseudo_values as mod
    return mod


def _stats(n, d_in, d_out, seed, dtype):
    keys, grads = odd_features(n, d_in, d_out, seed, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    mean = (torch.randn(d_in + d_out, generator=gen, dtype=torch.float64) * 0.3).to(DEVICE)
    std = (torch.rand(d_in + d_out, generator=gen, dtype=torch.float64) + 0.2).to(DEVICE)
    return keys, grads, mean, std


# (n, d_in, d_out): masks on rows and columns, d_out > BLOCK_D (two column tiles), one row,
# and N >= LARGE_ROWS (the other launch configuration)
SHAPES = [(13, 37, 29), (1, 5, 700), (6, 600, 3), (1030, 9, 11)]
CASES = [pytest.param(shape, dtype, id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}")
         for shape in SHAPES for dtype in DTYPES
         if shape[0] < 1000 or dtype == torch.bfloat16]   # the large config once (slow to interpret)


@pytest.mark.parametrize("shape,dtype", CASES)
def test_matches_fp64(shape, dtype):
    n, d_in, d_out = shape
    keys, grads, mean, std = _stats(n, d_in, d_out, seed=n + d_in, dtype=dtype)
    v = _launcher().pseudo_values_triton(keys, grads, mean, std, 1e-3, uk.EPS)
    ref = pseudo_values_fp64(keys.cpu(), grads.cpu(), mean.cpu(), std.cpu(), 1e-3)
    assert v.dtype == torch.float32 and v.shape == (n, d_out)
    assert rel_err(v.cpu(), ref) < TOLERANCES["pseudo_values"][dtype]


def test_config_choice_covers_both_configs():
    mod = _launcher()
    assert {mod.choose_config(n) for n, _, _ in SHAPES} == set(mod.CONFIGS)


def test_op_dispatches_to_triton(monkeypatch):
    use_backend(monkeypatch, "triton")
    keys, grads = odd_features(23, 41, 17, seed=3)
    stats = uk.RunningStats(58).update(torch.cat([keys, grads], 1))
    assert _backends.select("pseudo_values", keys.device, keys, grads)[0] == "triton"
    v = uk.pseudo_values(keys, grads, stats, lr=1e-3)
    ref = pseudo_values_fp64(keys.cpu(), grads.cpu(), stats.mean.cpu(), stats.std.cpu(), 1e-3)
    assert rel_err(v.cpu(), ref) < TOLERANCES["pseudo_values"][torch.float32]


def test_mixed_and_strided_inputs():
    keys, grads, mean, std = _stats(9, 21, 15, seed=5, dtype=torch.float32)
    keys_t = keys.T.contiguous().T            # column-major view: unit row stride
    v = _launcher().pseudo_values_triton(keys_t, grads.bfloat16(), mean, std, 1e-2, uk.EPS)
    ref = pseudo_values_fp64(keys.cpu(), grads.bfloat16().cpu(), mean.cpu(), std.cpu(), 1e-2)
    assert rel_err(v.cpu(), ref) < TOLERANCES["pseudo_values"][torch.float32]


def test_float64_input_uses_the_exact_reference():
    keys, grads, mean, std = _stats(7, 5, 4, seed=6, dtype=torch.float64)
    v = _launcher().pseudo_values_triton(keys, grads, mean, std, 1e-3, uk.EPS)
    ref = uk.pseudo_values_op  # noqa: F841  (same op, torch backend)
    expected = _backends.implementations("pseudo_values")["torch"].fn(keys, grads, mean, std,
                                                                       1e-3, uk.EPS)
    assert torch.equal(v, expected)


def test_auto_never_picks_the_interpreter(monkeypatch):
    use_backend(monkeypatch, "auto")
    keys, grads = odd_features(4, 3, 2, seed=7, device=torch.device("cpu"))
    assert _backends.select("pseudo_values", torch.device("cpu"), keys, grads)[0] == "torch"


def test_opcheck_with_triton_selected(monkeypatch):
    use_backend(monkeypatch, "triton")
    keys, grads, mean, std = _stats(11, 19, 7, seed=2, dtype=torch.float32)
    torch.library.opcheck(uk.pseudo_values_op, (keys, grads, mean, std, 1e-3, uk.EPS))
