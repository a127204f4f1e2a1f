import pytest
import torch

from ultraedit_kernels import RunningStats, pseudo_values
from fp64_reference import pseudo_values_fp64, realistic_features
from tolerances import TOLERANCES, rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compat", ["fixed", "official"])
def test_matches_fp64(dtype, compat):
    keys, grads = realistic_features(23, 41, 17, seed=3, dtype=dtype)
    stats = RunningStats(58, compat=compat).update(torch.cat([keys, grads], 1))
    v = pseudo_values(keys, grads, stats, lr=1e-3)
    ref = pseudo_values_fp64(keys, grads, stats.mean, stats.std, 1e-3)
    assert v.dtype == torch.float32 and v.shape == (23, 17)
    assert rel_err(v, ref) < TOLERANCES["pseudo_values"][dtype]


def test_errors_name_the_problem():
    keys, grads = realistic_features(5, 4, 3)
    stats = RunningStats(7).update(torch.cat([keys, grads], 1))
    with pytest.raises(ValueError, match="same number of rows"):
        pseudo_values(keys, grads[:4], stats)
    with pytest.raises(ValueError, match="dim=7"):
        pseudo_values(keys[:, :3], grads, stats)
    with pytest.raises(ValueError, match="empty"):
        pseudo_values(keys, grads, RunningStats(7))
    with pytest.raises(TypeError, match="RunningStats"):
        pseudo_values(keys, grads, object())
