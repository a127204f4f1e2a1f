"""The Gram kernel (``K Kᵀ + λI`` and ``Kᵀ K + λI``) vs float64 and vs torch.matmul in float32."""
import pytest
import torch

import ultraedit_kernels as uk
from ultraedit_kernels import _backends
from tolerances import bound, rel_err
from triton_testing import (DEVICE, DTYPES, odd_features,
                            requires_kernels, use_backend)

pytestmark = requires_kernels


def _mod():
    from ultraedit_kernels._triton import gram as mod
    return mod


def _references(x, ridge, rows):
    xd = x.cpu().double()
    ref = xd @ xd.T if rows else xd.T @ xd
    ref.diagonal().add_(ridge)
    xf = x.cpu().float()
    torch32 = xf @ xf.T if rows else xf.T @ xf
    torch32.diagonal().add_(ridge)
    return ref, torch32


# (n, d): one tile, two tile rows (off-diagonal tile mirrored), masked K slices (BLOCK_K = 32);
# rows=True on (1030, 5) is the "large" configuration (BLOCK_M = 128, output >= 1024)
SHAPES = [(37, 53), (70, 45), (5, 131)]


@pytest.mark.parametrize("rows", [True, False], ids=["rows", "cols"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_as_well_as_torch(shape, dtype, rows):
    keys, _ = odd_features(shape[0], shape[1], 1, seed=sum(shape), dtype=dtype)
    got = _mod().gram_triton(keys, 0.7, rows)
    ref, torch32 = _references(keys, 0.7, rows)
    m = shape[0] if rows else shape[1]
    assert got.dtype == torch.float32 and got.shape == (m, m)
    limit = bound("gram", dtype, rel_err(torch32, ref))
    assert rel_err(got.cpu(), ref) <= limit
    assert torch.equal(got, got.T)   # both triangles filled, symmetric by construction


def test_large_configuration():
    keys, _ = odd_features(1030, 5, 1, seed=1, dtype=torch.bfloat16)
    assert _mod().choose_config(1030) == "large"
    got = _mod().gram_triton(keys, 1.0, True)
    ref, torch32 = _references(keys, 1.0, True)
    limit = bound("gram", torch.bfloat16, rel_err(torch32, ref))
    assert rel_err(got.cpu(), ref) <= limit


def test_strided_input_and_float64():
    keys, _ = odd_features(40, 9, 1, seed=2)
    view = keys.T.contiguous().T     # column-major: the kernel reads it through strides
    ref, torch32 = _references(keys, 2.0, True)
    limit = bound("gram", torch.float32, rel_err(torch32, ref))
    assert rel_err(_mod().gram_triton(view, 2.0, True).cpu(), ref) <= limit
    k64 = keys.double()
    reference = _backends.implementations("gram")["torch"].fn
    torch.testing.assert_close(_mod().gram_triton(k64, 2.0, False), reference(k64, 2.0, False))


@pytest.mark.parametrize("rows", [True, False], ids=["rows", "cols"])
def test_opcheck_with_triton_selected(monkeypatch, rows):
    use_backend(monkeypatch, "triton")
    keys, _ = odd_features(11, 19, 1, seed=2)
    assert _backends.select("gram", DEVICE, keys)[0] == "triton"
    torch.library.opcheck(uk.gram_op, (keys, 1.0, rows))


@pytest.mark.parametrize("rows", [True, False], ids=["rows", "cols"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k_matches_fp64_and_stays_symmetric(monkeypatch, dtype, rows):
    """A small Gram matrix over a long reduction is split over k (as on a many-SM GPU)."""
    mod = _mod()
    monkeypatch.setattr(mod, "_multiprocessors", lambda device: 64)
    n, d = (37, 2100) if rows else (2100, 37)
    # the last split is masked: bf16/fp16 2 x 1056, float32 4 x 544
    assert mod.choose_split(37, 2100, 64, 32, 64, dtype) == ((4, 544) if dtype == torch.float32
                                                            else (2, 1056))
    keys, _ = odd_features(n, d, 1, seed=5, dtype=dtype)
    got = mod.gram_triton(keys, 0.3, rows)
    ref, torch32 = _references(keys, 0.3, rows)
    assert got.shape == (37, 37)
    assert rel_err(got.cpu(), ref) <= bound("gram", dtype, rel_err(torch32, ref))
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("m,k,block_m", [(100, 4096, 64), (100, 14336, 64), (400, 14336, 64),
                                         (2000, 14336, 128), (14336, 100, 128), (3, 0, 64),
                                         (100, 1023, 64), (1, 100000, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_choose_split_covers_k_without_empty_splits(m, k, block_m, dtype):
    mod = _mod()
    splits, per = mod.choose_split(m, k, block_m, 32, 132, dtype)
    assert splits >= 1 and per % 32 == 0 and per >= 32
    assert splits * per >= k and (splits - 1) * per < max(k, 1)   # every split has work
    tiles = -(-m // block_m)
    min_k = mod.MIN_K_PER_SPLIT.get(dtype, mod.DEFAULT_MIN_K_PER_SPLIT)
    assert splits == 1 or per >= min_k                            # long enough runs
    assert splits <= max(1, -(-mod.PROGRAMS_PER_SM * 132 // (tiles * (tiles + 1) // 2)))
