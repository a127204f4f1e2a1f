import pytest
import torch

from ultraedit_kernels import RunningStats
from fp64_reference import stats_official, stats_two_pass
from tolerances import TOLERANCES, rel_err

BLOCK_SIZES = [1, 7, 13, 1, 50, 3]


def _blocks(dim, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dim, generator=g) * 3 + 5 for s in sizes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fixed_matches_two_pass_after_uneven_blocks(dtype):
    blocks = [b.to(dtype) for b in _blocks(37, BLOCK_SIZES)]
    stats = RunningStats(37)
    for b in blocks:
        stats.update(b)
    n, mean, m2 = stats_two_pass(blocks)
    assert stats.count == n
    assert rel_err(stats.mean, mean) < TOLERANCES["stats_mean"][torch.float64]
    assert rel_err(stats.m2, m2) < TOLERANCES["stats_m2"][torch.float64]
    assert rel_err(stats.var, m2 / (n - 1)) < TOLERANCES["stats_m2"][torch.float64]
    assert stats.mean.dtype == torch.float64


def test_official_reproduces_reference_update():
    sizes = [10, 10, 7, 10]  # the reference's one-row block is NaN, so none here
    blocks = _blocks(29, sizes, seed=1)
    stats = RunningStats(29, compat="official")
    for b in blocks:
        stats.update(b)
    n, mean, m2, std = stats_official(blocks)
    assert stats.count == n
    assert rel_err(stats.mean, mean) < TOLERANCES["stats_mean"][torch.float64]
    assert rel_err(stats.m2, m2) < TOLERANCES["stats_m2"][torch.float64]
    assert rel_err(stats.std, std) < TOLERANCES["stats_m2"][torch.float64]
    # The quirk inflates M2 by about B/(B-1) relative to the fixed mode.
    fixed = RunningStats(29)
    for b in blocks:
        fixed.update(b)
    assert float((stats.m2 / fixed.m2).mean()) > 1.05


def test_official_one_row_block_is_nan_fixed_is_not():
    x = torch.randn(1, 5) + 1
    assert torch.isnan(RunningStats(5, compat="official").update(x).m2).all()
    fixed = RunningStats(5).update(x)
    assert torch.isfinite(fixed.m2).all() and fixed.count == 1
    assert torch.equal(fixed.std, torch.zeros(5, dtype=torch.float64))


def test_state_dict_round_trip_and_clone_independent():
    stats = RunningStats(11)
    for b in _blocks(11, [4, 9]):
        stats.update(b)
    copy = RunningStats(11)
    copy.load_state_dict(stats.state_dict())
    assert copy.count == stats.count and torch.equal(copy.mean, stats.mean) and torch.equal(copy.m2, stats.m2)
    clone = stats.clone()
    clone.update(torch.randn(3, 11))
    assert copy.count == stats.count != clone.count


@pytest.mark.parametrize("bad, exc, match", [
    (torch.randn(4, 6), ValueError, "dim=7"),
    (torch.randn(0, 7), ValueError, "no rows"),
    (torch.randint(0, 3, (4, 7)), TypeError, "floating-point"),
    (torch.randn(7), ValueError, "2-D"),
    (torch.tensor([[float("nan")] * 7]), ValueError, "NaN"),
    (torch.tensor([[float("inf")] * 7]), ValueError, "NaN/Inf"),
])
def test_rejected_update_leaves_state_unchanged(bad, exc, match):
    stats = RunningStats(7).update(torch.randn(5, 7))
    before = stats.state_dict()
    with pytest.raises(exc, match=match):
        stats.update(bad)
    after = stats.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_constructor_and_load_errors():
    with pytest.raises(ValueError, match="compat"):
        RunningStats(3, compat="paper")
    with pytest.raises(ValueError, match="positive integer"):
        RunningStats(0)
    with pytest.raises(ValueError, match="expected"):
        RunningStats(3).load_state_dict({"count": torch.tensor(1.0), "mean": torch.zeros(4),
                                          "m2": torch.zeros(4)})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    blocks = _blocks(33, BLOCK_SIZES)
    cpu, gpu = RunningStats(33), RunningStats(33)
    for b in blocks:
        cpu.update(b)
        gpu.update(b.cuda())
    assert gpu.device.type == "cuda"
    assert rel_err(gpu.mean.cpu(), cpu.mean) < TOLERANCES["gpu"][torch.float64] and rel_err(gpu.m2.cpu(), cpu.m2) < TOLERANCES["gpu"][torch.float64]


def test_update_pair_equals_update_of_concatenation():
    g = torch.Generator().manual_seed(7)
    keys, grads = torch.randn(9, 13, generator=g) + 2, torch.randn(9, 6, generator=g) * 1e-3
    a = RunningStats(19).update(torch.cat([keys, grads], 1))
    b = RunningStats(19).update_pair(keys, grads)
    assert a.count == b.count
    assert rel_err(b.mean, a.mean) < TOLERANCES["stats_mean"][torch.float64] and rel_err(b.m2, a.m2) < TOLERANCES["stats_m2"][torch.float64]
    with pytest.raises(ValueError, match="dim=19"):
        b.update_pair(keys, grads[:, :5])
