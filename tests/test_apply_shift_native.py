"""The host build of ``apply_shift_`` (``cpp`` backend, ``torch.ops.ultraedit_C.apply_shift_``):
the built-in packed GEMM adding ``Aᵀ K`` (linear) or ``Kᵀ A`` (conv1d) straight into the weight;
against float64 on odd shapes that cross the kernel's tile (6 x 16 / 6 x 8), its depth panel
(256 rows of keys), its row block (96) and column block (1,024), shallow (< 32 rows) and deep
products, and through ``uk.apply_shift_``."""
import pytest
import torch

import ultraedit_kernels as uk
from tolerances import TOLERANCES, bound, rel_err
from ultraedit_kernels import _backends, _extension

HOST_REASON = _extension.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(HOST_REASON is not None,
                                reason=f"host build of ultraedit_kernels._C not available: {HOST_REASON}")

# (N, d_in, d_out)
SHAPES = [(1, 37, 23), (5, 3, 17), (19, 97, 131), (33, 61, 50), (50, 300, 61), (257, 41, 203),
          (3, 1100, 13)]


def _inputs(n, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_in, generator=g) * 3 + 0.5
    factors = torch.randn(n, d_out, generator=g) * 1e-3
    return keys, factors


def _native():
    from ultraedit_kernels.apply_shift import _cpp_available
    assert _cpp_available(torch.device("cpu")) is None
    return torch.ops.ultraedit_C.apply_shift_


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_update_matches_fp64(shape, dtype, layout, monkeypatch):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "cpp")
    n, d_in, d_out = shape
    keys, factors = _inputs(n, d_in, d_out, seed=n + d_in + d_out)
    keys, factors = keys.to(dtype), factors.to(dtype)
    delta = keys.double().T @ factors.double()                       # d_in x d_out
    want = delta.T if layout == "linear" else delta
    weight = torch.zeros(want.shape, dtype=dtype)                     # the update alone
    assert _backends.select("apply_shift", weight.device, weight, keys, factors,
                            layout == "linear")[0] == "cpp"
    uk.apply_shift_(weight, keys, factors, layout=layout)
    plain = (factors.T @ keys) if layout == "linear" else (keys.T @ factors)
    assert rel_err(weight, want) <= bound("apply", dtype, rel_err(plain, want))
    # on a weight: one rounding of W + ΔW
    base = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(dtype) * 0.05
    weight = base.clone()
    uk.apply_shift_(weight, keys, factors, layout=layout)
    assert rel_err(weight, base.double() + want) <= TOLERANCES["apply"][dtype]


def test_other_dtypes_and_layouts_go_to_the_reference(monkeypatch):
    """A half-precision weight or one whose rows are not contiguous is computed by the
    reference (same result bit for bit); half-precision keys are converted to the weight's."""
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "cpp")
    from ultraedit_kernels.apply_shift import apply_shift_reference
    keys, factors = _inputs(7, 40, 24, seed=2)
    for weight in (torch.randn(24, 40).to(torch.bfloat16), torch.randn(40, 24).T):
        want = weight.clone()
        apply_shift_reference(want, keys, factors, True)
        uk.apply_shift_(weight, keys, factors, layout="linear")
        assert torch.equal(weight, want)
    weight = torch.zeros(24, 40)
    uk.apply_shift_(weight, keys.to(torch.bfloat16), factors, layout="linear")
    want = factors.double().T @ keys.to(torch.bfloat16).double()
    assert rel_err(weight, want) <= TOLERANCES["apply"][torch.float32]


def test_strided_rows_and_threads(monkeypatch):
    """A weight that is a column slice of a wider matrix (its rows' stride is larger than its
    width) is updated in place, the rest of the matrix untouched; above 2^30 multiply-adds the
    column strips run on the threads, bit-identical to one thread."""
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "cpp")
    keys, factors = _inputs(9, 30, 20, seed=4)
    wide = torch.randn(20, 50)
    before = wide.clone()
    uk.apply_shift_(wide[:, 10:40], keys, factors, layout="linear")
    want = before[:, 10:40].double() + factors.double().T @ keys.double()
    assert rel_err(wide[:, 10:40], want) <= TOLERANCES["apply"][torch.float32]
    assert torch.equal(wide[:, :10], before[:, :10]) and torch.equal(wide[:, 40:], before[:, 40:])

    keys, factors = _inputs(1024, 1030, 1040, seed=5)           # 1.1e9 multiply-adds
    results = []
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            weight = torch.zeros(1040, 1030)
            uk.apply_shift_(weight, keys, factors, layout="linear")
            results.append(weight)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(results[0], results[1])


def test_non_finite_input_leaves_the_weight_unchanged(monkeypatch):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "cpp")
    keys, factors = _inputs(6, 30, 20, seed=6)
    keys[2, 3] = float("nan")
    weight = torch.randn(20, 30)
    before = weight.clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        uk.apply_shift_(weight, keys, factors, layout="linear")
    assert torch.equal(weight, before)


def test_the_native_op_and_its_fake_agree():
    op = _native()
    keys, factors = _inputs(5, 12, 7, seed=7)
    torch.library.opcheck(op.default, (torch.zeros(7, 12), keys, factors, True))
    torch.library.opcheck(op.default, (torch.zeros(12, 7), keys, factors, False))


def test_bad_input_is_a_clear_error():
    op = _native()
    keys, factors = _inputs(5, 12, 7, seed=8)
    with pytest.raises(RuntimeError, match="float32 or float64 weight"):
        op(torch.zeros(7, 12, dtype=torch.bfloat16), keys, factors, True)
    with pytest.raises(RuntimeError, match="weight's dtype"):
        op(torch.zeros(7, 12), keys.double(), factors, True)
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        op(torch.zeros(12, 7).T, keys, factors, True)
    with pytest.raises(RuntimeError, match="imply"):
        op(torch.zeros(12, 7), keys, factors, True)
    with pytest.raises(RuntimeError, match="differ in rows"):
        op(torch.zeros(7, 12), keys, factors[:4], True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_the_guards_abs_max(dtype):
    """The host build's one-pass ``max |x|`` that the in-place update checks before it writes:
    exact on lengths around its two-vector stride, NaN as soon as one value is NaN or ±Inf."""
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
