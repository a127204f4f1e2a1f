"""The compiled Cholesky solve (csrc/) against torch.linalg and a float64 oracle.

Host build: ``torch.ops.ultraedit_C.spd_solve`` on CPU tensors (both GEMMs the host blocked
algorithm can hand its trailing updates to), the ``cpp`` backend through ``spd_solve`` /
``param_shift``, the info codes of not-positive-definite and NaN systems, and the torch-free
C++ driver.  Device build: GPU-marked, skipped without CUDA.  Everything that needs the
extension skips with the reason it is not loaded.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess

import pytest
import torch

from ultraedit_kernels import RunningStats, _backends, _extension, param_shift, spd_solve
from ultraedit_kernels.param_shift import SolveError, _solve_checked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_REASON = _extension.unavailable_reason("cpu")
needs_host = pytest.mark.skipif(HOST_REASON is not None,
                                reason=f"host build of ultraedit_kernels._C not available: {HOST_REASON}")

from tolerances import TOLERANCES, assert_within


def _spd(n, k, batch_shape=(), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * n + k)
    x = torch.randn(*batch_shape, n, n + 5, generator=gen, dtype=torch.float64)
    a = x @ x.transpose(-1, -2) / (n + 5) + 0.5 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(*batch_shape, n, k, generator=gen, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def _rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


def _check_against_torch(a, b, x, info):
    assert x.shape == b.shape and x.dtype == b.dtype
    assert info.shape == a.shape[:-2] and info.dtype == torch.int32
    assert int(info.abs().max()) == 0
    ref64 = torch.cholesky_solve(b.double(), torch.linalg.cholesky(a.double()))
    ref_same = torch.cholesky_solve(b, torch.linalg.cholesky(a))
    assert_within(x, ref64, "spd_solve", a.dtype, plain=ref_same)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k", [1, 7, 4096])
def test_reference_one_by_one_system(dtype, k):
    """A 1 x 1 system is one division in the reference; its info is cholesky_ex's."""
    from ultraedit_kernels.spd_solve import spd_solve_reference

    a, b = _spd(1, k, (), dtype)
    x, info = spd_solve_reference(a, b)
    assert x.is_contiguous()
    _check_against_torch(a, b, x, info)
    for bad in (-1.0, 0.0, float("nan")):
        got = spd_solve_reference(torch.tensor([[bad]], dtype=dtype), b)[1]
        assert got.dtype == torch.int32 and got.shape == ()
        assert int(got) == int(torch.linalg.cholesky_ex(torch.tensor([[bad]], dtype=dtype))[1])


@pytest.fixture(params=["native", "aten"])
def host_gemm(request):
    if HOST_REASON is not None:
        pytest.skip(f"host build of ultraedit_kernels._C not available: {HOST_REASON}")
    mod = _extension.extension()
    before = mod.host_gemm()
    mod.host_gemm(request.param)
    yield request.param
    mod.host_gemm(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 2)], ids=["single", "b3", "b2x2"])
@pytest.mark.parametrize("n,k", [(1, 1), (1, 7), (17, 1), (17, 300), (255, 129), (255, 513)])
def test_host_matches_torch(host_gemm, n, k, batch_shape, dtype):
    a, b = _spd(n, k, batch_shape, dtype)
    x, info = torch.ops.ultraedit_C.spd_solve(a, b)
    _check_against_torch(a, b, x, info)


@pytest.mark.parametrize("dtype,k", [(torch.float32, 4096), (torch.float64, 65)], ids=["f32", "f64"])
def test_host_n1000(host_gemm, dtype, k):
    if host_gemm == "aten" and dtype == torch.float32:
        k = 257  # the n = 1000 x 4096 case runs once (with the default GEMM)
    a, b = _spd(1000, k, (), dtype)
    _check_against_torch(a, b, *torch.ops.ultraedit_C.spd_solve(a, b))


@needs_host
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k", [1, 7, 4096])
def test_host_one_by_one_system_is_the_reference_division(dtype, k):
    """A single 1 x 1 system: the host build's division gives the reference's bits and info."""
    from ultraedit_kernels.spd_solve import spd_solve_reference

    a, b = _spd(1, k, (), dtype)
    for pivot in (a, torch.tensor([[-1.0]], dtype=dtype), torch.tensor([[0.0]], dtype=dtype),
                  torch.tensor([[float("nan")]], dtype=dtype)):
        x, info = torch.ops.ultraedit_C.spd_solve(pivot, b)
        x_ref, info_ref = spd_solve_reference(pivot, b)
        assert x.is_contiguous() and torch.equal(x.nan_to_num(), x_ref.nan_to_num())
        assert info.dtype == torch.int32 and info.shape == () and int(info) == int(info_ref)
    strided = torch.randn(k, 1, dtype=dtype).T   # one row of a column-major matrix
    x, _ = torch.ops.ultraedit_C.spd_solve(a, strided)
    assert x.is_contiguous() and torch.equal(x, spd_solve_reference(a, strided)[0])


@needs_host
def test_batch_of_twelve_small_systems_runs_per_system():
    a, b = _spd(100, 64, (12,), torch.float32)
    _check_against_torch(a, b, *torch.ops.ultraedit_C.spd_solve(a, b))


@needs_host
def test_inputs_unchanged_and_only_lower_triangle_read():
    a, b = _spd(40, 9, (), torch.float64)
    a_in, b_in = a.clone(), b.clone()
    poisoned = a.tril() + torch.triu(torch.full_like(a, float("nan")), 1)
    x, info = torch.ops.ultraedit_C.spd_solve(poisoned, b)
    assert torch.equal(b, b_in) and int(info) == 0
    _check_against_torch(a, b, x, info)
    torch.ops.ultraedit_C.spd_solve(a, b)
    assert torch.equal(a, a_in)


@needs_host
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_not_positive_definite_info_like_cholesky_ex(dtype):
    a, b = _spd(37, 5, (3,), dtype)
    a[1, 20, 20] = -50.0  # leading minor of order 21 is not positive definite
    x, info = torch.ops.ultraedit_C.spd_solve(a, b)
    _, info_ref = torch.linalg.cholesky_ex(a)
    assert info.tolist() == info_ref.tolist() == [0, 21, 0]
    assert bool(torch.isnan(x[1]).all())
    for s in (0, 2):
        _check_against_torch(a[s], b[s], x[s], info[s])


@needs_host
def test_nan_reports_the_row_it_reaches():
    a, b = _spd(30, 4, (), torch.float32)
    a[12, 3] = float("nan")  # lower triangle: row 12 is the first to use it
    x, info = torch.ops.ultraedit_C.spd_solve(a, b)
    assert int(info) == 13 and bool(torch.isnan(x).all())
    a2, _ = _spd(30, 4, (), torch.float32)
    a2[0, 0] = float("nan")
    assert int(torch.ops.ultraedit_C.spd_solve(a2, b)[1]) == 1


@needs_host
def test_empty_and_bad_arguments():
    a, b = _spd(5, 3, (0,), torch.float32)
    x, info = torch.ops.ultraedit_C.spd_solve(a, b)
    assert x.shape == (0, 5, 3) and info.shape == (0,)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.ultraedit_C.spd_solve(a.double(), b)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.ultraedit_C.spd_solve(torch.eye(4), torch.ones(5, 2))


@needs_host
def test_opcheck_and_fake():
    a, b = _spd(6, 3, (2,), torch.float64)
    from ultraedit_kernels.spd_solve import _cpp_available
    assert _cpp_available(torch.device("cpu")) is None  # registers the fake implementation
    torch.library.opcheck(torch.ops.ultraedit_C.spd_solve.default, (a, b))


@needs_host
def test_cpp_backend_through_spd_solve(monkeypatch):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "cpp")
    a, b = _spd(33, 8, (), torch.float32)
    assert _backends.select("spd_solve", a.device, a, b)[0] == "cpp"
    _check_against_torch(a, b, *spd_solve(a, b))


def _edit_batch(n_rows, d_in, d_out, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n_rows, d_in, generator=gen) * 3 + 0.5
    grads = torch.randn(n_rows, d_out, generator=gen) * 1e-2
    stats = RunningStats(d_in + d_out)
    stats.update(torch.cat([keys, grads], 1))
    return keys, grads, stats


def _param_shift_fp64(keys, grads, stats, lr, ridge):
    from ultraedit_kernels import pseudo_values
    k64 = keys.double()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ULTRAEDIT_BACKEND", "torch")
        v64 = pseudo_values(keys.double(), grads.double(), stats, lr=lr).double()
    eye = torch.eye(k64.shape[1], dtype=torch.float64)
    return torch.linalg.solve(k64.T @ k64 + ridge * eye, k64.T @ v64)


@needs_host
@pytest.mark.parametrize("method,n_rows,d_in", [("dual", 57, 96), ("primal", 120, 40)])
def test_param_shift_cpp_matches_fp64(monkeypatch, method, n_rows, d_in):
    keys, grads, stats = _edit_batch(n_rows, d_in, 33)
    ref = _param_shift_fp64(keys, grads, stats, lr=1e-3, ridge=1.0)
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "cpp")
    assert _backends.select("spd_solve", keys.device, keys, keys)[0] == "cpp"
    dw = param_shift(keys, grads, stats, lr=1e-3, ridge=1.0, method=method)
    assert dw.dtype == torch.float32 and dw.shape == (d_in, 33)
    assert _rel_err(dw, ref) <= TOLERANCES["dual"][torch.float32]


@needs_host
def test_param_shift_not_positive_definite_raises(monkeypatch, caplog):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "cpp")
    system = torch.eye(6)
    system[4, 4] = -1.0
    with caplog.at_level(logging.WARNING, logger="ultraedit_kernels"):
        with pytest.raises(SolveError, match="not positive definite even in float64"):
            _solve_checked(system, torch.ones(6, 2), "test")
    assert "retrying in float64" in caplog.text
    system[4, 4] = float("nan")
    with pytest.raises(SolveError):
        _solve_checked(system, torch.ones(6, 2), "test")


@needs_host
def test_singular_after_float32_rounding(monkeypatch, caplog):
    # Positive definite in float64 (pivot 1 - c² > 0), singular once rounded to float32
    # (c rounds to 1): the host build reports info = 2 and param_shift's float64 retry of
    # the float32 matrix cannot recover it, so it raises SolveError after logging.
    c = 1.0 - 2.0 ** -30
    system64 = torch.tensor([[1.0, c], [c, 1.0]], dtype=torch.float64)
    system32 = system64.float()
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "cpp")
    _, info = spd_solve(system32, torch.ones(2, 1))
    assert int(info) == 2
    with caplog.at_level(logging.WARNING, logger="ultraedit_kernels"):
        with pytest.raises(SolveError):
            _solve_checked(system32, torch.ones(2, 1), "test")
    assert "info=2" in caplog.text
    x, info64 = spd_solve(system64, torch.ones(2, 1, dtype=torch.float64))
    assert int(info64) == 0 and bool(torch.isfinite(x).all())


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_torch_free_driver(tmp_path):
    """csrc/cholesky/host*.cpp without torch: blocked vs naive Cholesky, info codes."""
    exe = tmp_path / "cholesky_driver"
    src = [os.path.join(ROOT, p) for p in ("csrc/cholesky/host.cpp", "csrc/cholesky/host_gemm.cpp",
                                          "csrc/tests/cholesky_driver.cpp")]
    cxx = os.environ.get("CXX", "c++")
    subprocess.run([cxx, "-O2", "-std=c++17", "-ffp-contract=fast", "-Wno-psabi", "-pthread",
                    *src, "-o", str(exe)], check=True, capture_output=True, timeout=300)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ALL OK" in out.stdout, out.stdout + out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,k,batch_shape", [(1, 3, ()), (17, 300, (12,)), (255, 129, ()),
                                             (1000, 4096, (2,))])
def test_device_matches_torch(n, k, batch_shape, dtype):
    why = _extension.unavailable_reason("cuda")
    if why is not None:
        pytest.skip(why)
    a, b = _spd(n, k, batch_shape, dtype)
    x, info = torch.ops.ultraedit_C.spd_solve(a.cuda(), b.cuda())
    _check_against_torch(a, b, x.cpu(), info.cpu())
    bad = a.clone().cuda()
    bad[..., n // 2, n // 2] = -1.0
    _, info_bad = torch.ops.ultraedit_C.spd_solve(bad, b.cuda())
    # The oracle is LAPACK's first non-positive leading minor, in float64 on the CPU: cuSOLVER's
    # blocked potrf reports 129 instead of 128 for this 255 x 255 matrix on an H200.
    expected = torch.linalg.cholesky_ex(bad.cpu().double())[1]
    assert info_bad.cpu().tolist() == expected.tolist()
