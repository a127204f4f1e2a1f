"""The statistics kernels (``stats_update`` and the pair op ``stats_update2``) vs float64."""
import pytest
import torch

import ultraedit_kernels as uk
from ultraedit_kernels import _backends
from ultraedit_kernels.stats_update2 import stats_update2_op, stats_update2_reference, update_stats_pair
from fp64_reference import stats_official, stats_two_pass
from tolerances import TOLERANCES, rel_err
from triton_testing import DEVICE, DTYPES, odd_features, requires_kernels, use_backend

pytestmark = requires_kernels


def _mod():
    from ultraedit_kernels._triton import stats_update as mod
    return mod


def _state(dim, seed):
    gen = torch.Generator().manual_seed(seed)
    count = torch.tensor(17.0, dtype=torch.float64)
    mean = torch.randn(dim, generator=gen, dtype=torch.float64)
    m2 = torch.rand(dim, generator=gen, dtype=torch.float64) * 20 + 1
    return count.to(DEVICE), mean.to(DEVICE), m2.to(DEVICE)


def _check(got, expected, dtype):
    assert float(got[0]) == float(expected[0])
    assert rel_err(got[1].cpu(), expected[1].cpu()) < TOLERANCES["stats_mean"][dtype]
    assert rel_err(got[2].cpu(), expected[2].cpu()) < TOLERANCES["stats_m2"][dtype]


# (rows, cols): masked row tiles (BLOCK_R = 32) and column tiles (BLOCK_D = 128), one row
SHAPES = [(77, 41), (33, 130), (1, 9)]


@pytest.mark.parametrize("official", [False, True], ids=["fixed", "official"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_block_merge_matches_fp64(shape, dtype, official):
    rows, cols = shape
    keys, grads = odd_features(rows, cols - cols // 3, cols // 3, seed=rows, dtype=dtype)
    x = torch.cat([keys, grads], 1)
    count, mean, m2 = _state(cols, seed=cols)
    got = _mod().stats_update_triton(x, count, mean, m2, official)
    expected = uk.stats_update.stats_update_reference(x.double(), count, mean, m2, official)
    if official and rows == 1:   # the reference code's B * var_unbiased is NaN for one row
        assert torch.isnan(got[2]).all() and torch.isnan(expected[2]).all()
        assert rel_err(got[1].cpu(), expected[1].cpu()) < TOLERANCES["stats_mean"][dtype]
        return
    _check(got, expected, dtype)
    pair = _mod().stats_update2_triton(keys, grads, count, mean, m2, official)
    _check(pair, expected, dtype)


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_row_splits_agree(splits):
    x = torch.cat(odd_features(95, 20, 9, seed=4), 1)
    count, mean, m2 = _state(29, seed=5)
    got = _mod().stats_update_triton(x, count, mean, m2, False, splits=splits)
    expected = uk.stats_update.stats_update_reference(x.double(), count, mean, m2, False)
    _check(got, expected, torch.float32)
    assert _mod().choose_splits(95, 29, DEVICE, splits)[0] == splits


def test_large_offset_keeps_float32_accuracy():
    """Features far from zero (mean 300, std 0.01): the shifted, per-tile float32 sums stay
    float32-accurate (8e-8 measured) where float32 sums of squares lose every digit of the
    variance and a whole-column float32 two-pass gives 5e-6."""
    gen = torch.Generator().manual_seed(9)
    x = (300.0 + 0.01 * torch.randn(70, 13, generator=gen)).to(DEVICE)
    zero = torch.zeros((), dtype=torch.float64, device=DEVICE)
    z = torch.zeros(13, dtype=torch.float64, device=DEVICE)
    got = _mod().stats_update_triton(x, zero, z, z.clone(), False, splits=2)
    _, mean64, m2_64 = stats_two_pass([x.cpu()])
    assert rel_err(got[1].cpu(), mean64) < TOLERANCES["stats_offset_mean"][torch.float32]
    assert rel_err(got[2].cpu(), m2_64) < TOLERANCES["stats_offset_m2"][torch.float32]


@pytest.mark.parametrize("compat", ["fixed", "official"])
def test_running_stats_stream(monkeypatch, compat):
    """Several micro-batches through RunningStats with the triton backend vs a float64 oracle."""
    use_backend(monkeypatch, "triton")
    keys, grads = odd_features(47, 23, 11, seed=8)
    blocks = [torch.cat([k, g], 1) for k, g in zip(keys.split(10), grads.split(10))]
    stats = uk.RunningStats(34, compat=compat)
    pair_stats = uk.RunningStats(34, compat=compat)
    for block, k, g in zip(blocks, keys.split(10), grads.split(10)):
        stats.update(block)
        update_stats_pair(pair_stats, k, g)
    if compat == "fixed":
        n, mean, m2 = stats_two_pass([b.cpu() for b in blocks])
    else:
        n, mean, m2, _ = stats_official([b.cpu() for b in blocks])
    for s in (stats, pair_stats):
        assert s.count == n
        assert rel_err(s.mean.cpu(), mean) < TOLERANCES["stats_mean"][torch.float32]
        assert rel_err(s.m2.cpu(), m2) < TOLERANCES["stats_m2"][torch.float32]


def test_pair_reference_equals_concatenated_reference():
    keys, grads = odd_features(12, 7, 5, seed=10, device=torch.device("cpu"))
    count, mean, m2 = (t.cpu() for t in _state(12, seed=11))
    for official in (False, True):
        a = stats_update2_reference(keys, grads, count, mean, m2, official)
        b = uk.stats_update.stats_update_reference(torch.cat([keys, grads], 1), count, mean, m2,
                                                   official)
        for x, y in zip(a, b):
            assert rel_err(x, y) <= TOLERANCES["reorder"][torch.float64]


def test_pair_update_rejects_bad_input_and_keeps_state():
    stats = uk.RunningStats(12)
    keys, grads = odd_features(4, 7, 5, seed=12, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="dim=12"):
        update_stats_pair(stats, keys[:, :6], grads)
    bad = grads.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        update_stats_pair(stats, keys, bad)
    assert stats.count == 0


@pytest.mark.parametrize("pair", [False, True], ids=["stats_update", "stats_update2"])
def test_opcheck_with_triton_selected(monkeypatch, pair):
    use_backend(monkeypatch, "triton")
    keys, grads = odd_features(11, 19, 7, seed=2)
    count, mean, m2 = _state(26, seed=3)
    assert _backends.select("stats_update", DEVICE, keys)[0] == "triton"
    if pair:
        torch.library.opcheck(stats_update2_op, (keys, grads, count, mean, m2, False))
    else:
        torch.library.opcheck(uk.stats_update_op,
                              (torch.cat([keys, grads], 1), count, mean, m2, True))
