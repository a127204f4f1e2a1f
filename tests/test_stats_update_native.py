"""The host build of the running statistics (``cpp`` backend of ``stats_update`` and
``stats_update2``, ``torch.ops.ultraedit_C.stats_update``): one pass over the block, float64
sums per column tile; against a float64 two-pass oracle on odd shapes that cross the kernel's
column tile (1,024), its four-row sweep and the threaded path, and through ``RunningStats``."""
import pytest
import torch

import ultraedit_kernels as uk
from fp64_reference import realistic_features, stats_official, stats_two_pass
from tolerances import TOLERANCES, rel_err
from ultraedit_kernels import _backends, _extension
from ultraedit_kernels.stats_update import cpp_available, stats_update_native, stats_update_reference
from ultraedit_kernels.stats_update2 import stats_update2_native

HOST_REASON = _extension.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(HOST_REASON is not None,
                                reason=f"host build of ultraedit_kernels._C not available: {HOST_REASON}")

# (rows, d_in, d_out): one row, rows that are not a multiple of four, a key block wider than
# one column tile and a gradient block narrower than one, both wider than one tile
SHAPES = [(1, 9, 4), (2, 5, 3), (7, 31, 17), (77, 1031, 41), (130, 1100, 2070)]


def _blocks(rows, d_in, d_out, dtype, seed):
    keys, grads = realistic_features(rows, d_in, d_out, seed=seed)
    return keys.to(dtype), grads.to(dtype)


def _oracle(prior, blocks, official):
    """(count, mean, m2) of ``prior`` rows followed by ``blocks`` (float64, two-pass)."""
    if official:
        count, mean, m2, _ = stats_official([prior, blocks])
        return count, mean, m2
    return stats_two_pass([prior, blocks])


def _check(got, expected, dtype):
    count, mean, m2 = expected
    assert float(got[0]) == float(count)
    assert rel_err(got[1], mean) < TOLERANCES["stats_mean"][dtype]
    assert rel_err(got[2], m2) < TOLERANCES["stats_m2"][dtype]


@pytest.mark.parametrize("official", [False, True], ids=["fixed", "official"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_merge_matches_fp64(shape, dtype, official):
    rows, d_in, d_out = shape
    keys, grads = _blocks(rows, d_in, d_out, dtype, seed=rows + d_in)
    prior = torch.cat(realistic_features(5, d_in, d_out, seed=3), 1).to(dtype)
    state = stats_update_reference(prior.double(), torch.zeros((), dtype=torch.float64),
                                   torch.zeros(d_in + d_out, dtype=torch.float64),
                                   torch.zeros(d_in + d_out, dtype=torch.float64), official)
    x = torch.cat([keys, grads], 1)
    # one row: the official M2 is NaN; the mean is every variant's
    expected = _oracle(prior, x, official and rows > 1)
    for got in (stats_update_native(x, *state, official),
                stats_update2_native(keys, grads, *state, official)):
        if official and rows == 1:   # the reference code's B * var_unbiased is NaN for one row
            assert torch.isnan(got[2]).all()
            assert rel_err(got[1], expected[1]) < TOLERANCES["stats_mean"][dtype]
            continue
        _check(got, expected, dtype)


def test_strided_inputs_and_large_offsets():
    """Column-strided, row-strided and transposed-storage blocks of features far from zero
    (mean 300, std 0.01), where unshifted float64 sums of squares would cancel."""
    gen = torch.Generator().manual_seed(9)
    x = 300.0 + 0.01 * torch.randn(70, 2 * 1037, generator=gen)
    zero, z = torch.zeros((), dtype=torch.float64), torch.zeros(1037, dtype=torch.float64)
    for block in (x[:, ::2], x[:, :1037], x[:, :1037].T.contiguous().T):
        _, mean64, m2_64 = stats_two_pass([block])
        got = stats_update_native(block, zero, z, z.clone(), False)
        assert rel_err(got[1], mean64) < TOLERANCES["stats_offset_mean"][torch.float32]
        assert rel_err(got[2], m2_64) < TOLERANCES["stats_offset_m2"][torch.float32]


def test_threaded_path_matches_one_thread():
    """Past 2**24 elements the column tiles are split over torch's threads: the same bits."""
    keys, grads = realistic_features(4099, 4100, 3, seed=11)
    zero, z = torch.zeros((), dtype=torch.float64), torch.zeros(4103, dtype=torch.float64)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = stats_update2_native(keys, grads, zero, z, z, False)
        torch.set_num_threads(2)
        two = stats_update2_native(keys, grads, zero, z, z, False)
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    _check(one, stats_two_pass([torch.cat([keys, grads], 1)]), torch.float32)


def test_running_stats_through_the_cpp_backend(monkeypatch):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "cpp")
    keys, grads = _blocks(41, 1030, 23, torch.float32, seed=2)
    assert _backends.select("stats_update", keys.device, keys)[0] == "cpp"
    assert _backends.select("stats_update2", keys.device, keys, grads)[0] == "cpp"
    x = torch.cat([keys, grads], 1)
    whole = uk.RunningStats(x.shape[1]).update(x[:17]).update(x[17:])
    pair = uk.RunningStats(x.shape[1]).update_pair(keys[:17], grads[:17])
    pair.update_pair(keys[17:], grads[17:])
    expected = stats_two_pass([x])
    for stats in (whole, pair):
        _check((stats.count_tensor, stats.mean, stats.m2), expected, torch.float32)


def test_bad_arguments_raise():
    zero, z = torch.zeros((), dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    op = torch.ops.ultraedit_C.stats_update
    with pytest.raises(RuntimeError, match="columns"):
        op([torch.ones(3, 4)], zero, z, z, False)
    with pytest.raises(RuntimeError, match="one row count"):
        op([torch.ones(3, 4), torch.ones(2, 1)], zero, z, z, False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op([torch.ones(3, 5, dtype=torch.bfloat16)], zero, z, z, False)


def test_the_native_op_and_its_fake_agree():
    assert cpp_available(torch.device("cpu")) is None
    keys, grads = realistic_features(6, 7, 3, seed=5)
    state = (torch.tensor(4.0, dtype=torch.float64), torch.zeros(10, dtype=torch.float64),
             torch.ones(10, dtype=torch.float64))
    torch.library.opcheck(torch.ops.ultraedit_C.stats_update.default,
                          ([keys, grads], *state, False))
