"""Real GPU launches of every Triton kernel configuration (skipped without CUDA).

Run on a GPU machine without the interpreter: ``python -m pytest -m gpu tests/test_triton_gpu.py``.
No ``triton.autotune`` is used: the launchers pick among fixed configurations by shape, and
each is launched here at a shape that selects it.
"""
import pytest
import torch

import ultraedit_kernels as uk
from ultraedit_kernels import _backends
from fp64_reference import pseudo_values_fp64, stats_two_pass
from tolerances import FACTOR, TOLERANCES, rel_err
from triton_testing import DTYPES, HAS_CUDA, HAS_TRITON, INTERPRET, odd_features

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON) or INTERPRET,
                       reason="needs a CUDA device, triton, and TRITON_INTERPRET unset"),
]
CUDA = torch.device("cuda")
GPU_TOL = TOLERANCES["gpu"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [37, 1500])      # both pseudo_values configurations
def test_pseudo_values(dtype, n):
    from ultraedit_kernels._triton.pseudo_values import pseudo_values_triton
    keys, grads = odd_features(n, 1031, 2053, seed=n, dtype=dtype, device=CUDA)
    mean = torch.randn(3084, dtype=torch.float64, device=CUDA) * 0.1
    std = torch.rand(3084, dtype=torch.float64, device=CUDA) + 0.5
    v = pseudo_values_triton(keys, grads, mean, std, 1e-3, uk.EPS)
    ref = pseudo_values_fp64(keys.cpu(), grads.cpu(), mean.cpu(), std.cpu(), 1e-3)
    assert rel_err(v.cpu(), ref) < GPU_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("official", [False, True])
def test_stats_update(dtype, official):
    from ultraedit_kernels._triton.stats_update import stats_update2_triton, stats_update_triton
    keys, grads = odd_features(2001, 517, 1029, seed=1, dtype=dtype, device=CUDA)
    zero = torch.zeros((), dtype=torch.float64, device=CUDA)
    z = torch.zeros(1546, dtype=torch.float64, device=CUDA)
    x = torch.cat([keys, grads], 1)
    n, mean, m2 = stats_two_pass([x.cpu()])
    if official:
        m2 = m2 * n / (n - 1)
    for got in (stats_update_triton(x, zero, z, z.clone(), official),
                stats_update2_triton(keys, grads, zero, z, z.clone(), official)):
        assert float(got[0]) == n
        assert rel_err(got[1].cpu(), mean) < GPU_TOL[dtype]
        assert rel_err(got[2].cpu(), m2) < GPU_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(300, 1000), (1100, 257)])   # both gram configurations
@pytest.mark.parametrize("rows", [True, False], ids=["rows", "cols"])
def test_gram(dtype, n, d, rows):
    from ultraedit_kernels._triton.gram import gram_triton
    keys, _ = odd_features(n, d, 1, seed=3, dtype=dtype, device=CUDA)
    got = gram_triton(keys, 1.0, rows)
    xd = keys.double()
    ref = xd @ xd.T if rows else xd.T @ xd
    ref.diagonal().add_(1.0)
    xf = keys.float()
    torch32 = xf @ xf.T if rows else xf.T @ xf     # torch's default: TF32 off for matmul
    torch32.diagonal().add_(1.0)
    assert rel_err(got, ref) <= FACTOR * rel_err(torch32, ref) + GPU_TOL[dtype]


def test_auto_picks_triton_on_cuda(monkeypatch, tmp_path):
    """With a calibration in which the kernels measured faster, ``auto`` takes them for CUDA
    float tensors (and the reference for float64, which they do not take)."""
    import json
    from ultraedit_kernels import calibration
    grid = {}
    for op, (axes, values) in ((op, calibration.GRIDS[op]["all" if op != "gram" else "rows"])
                               for op in ("pseudo_values", "gram")):
        cls = "all" if op != "gram" else "rows"
        grid[op] = {"backends": ["triton"], "grid": {cls: [
            {"point": [a, b], "seconds": {"torch": 1.0, "triton": 0.5}}
            for a in values[0] for b in values[1]]}}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"format": calibration.FORMAT, "device": "cuda", "ops": grid}))
    monkeypatch.setenv(calibration.ENV_VAR, str(path))
    calibration.reset()
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "auto")
    keys, grads = odd_features(8, 16, 8, seed=4, device=CUDA)
    assert _backends.select("pseudo_values", CUDA, keys, grads)[0] == "triton"
    assert _backends.select("gram", CUDA, keys)[0] == "triton"
    assert _backends.select("gram", CUDA, keys.double())[0] == "torch"
    calibration.reset()
