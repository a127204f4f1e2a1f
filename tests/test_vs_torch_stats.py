"""The statistics of ``bench/vs_torch.py``: pairs of rounds, the control arm's verdict, and the
plain composition ``apply_shift_`` is measured against (no timing here)."""
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vs_torch():
    path = os.path.join(ROOT, "bench", "vs_torch.py")
    spec = importlib.util.spec_from_file_location("vs_torch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pair_ratios_sum_each_pair_of_rounds(vs_torch):
    times = {"op": [1.0, 3.0, 2.0, 2.0], "plain": [2.0, 2.0, 2.0, 3.0]}
    assert vs_torch.pair_ratios(times, "op", "plain") == [1.0, 1.25]
    assert vs_torch.paired_speed(times, "op", "plain") == pytest.approx(1.125)


def test_verdict_reads_the_op_against_the_control(vs_torch):
    assert vs_torch.verdict([1.02, 0.99, 1.01], [0.97, 1.03]) == "faster"
    assert vs_torch.verdict([0.96, 0.97, 0.98], [0.95, 1.04]) == "within noise"
    assert vs_torch.verdict([0.995, 0.99, 0.997], [1.0, 1.0]) == "within noise"   # < 1%
    assert vs_torch.verdict([0.96, 0.97, 0.98], [0.99, 1.01]) == "slower"


def test_the_guarded_plain_update_checks_the_bound(vs_torch):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=gen)
    k, a = torch.randn(3, 7, generator=gen), torch.randn(3, 5, generator=gen)
    expected = w + a.T @ k
    vs_torch.plain_guarded_update(w, k, a)
    torch.testing.assert_close(w, expected)
    with pytest.raises(ValueError, match="overflow"):
        vs_torch.plain_guarded_update(w, k, a * 1e37)
    with pytest.raises(ValueError, match="overflow"):
        vs_torch.plain_guarded_update(w, k.clone().fill_(float("nan")), a)


def test_an_unresolved_case_gets_a_second_pass_of_as_many_rounds(vs_torch, monkeypatch):
    passes = iter([{"op": [2.0, 2.0], "plain": [1.0, 1.0]}, {"op": [1.0, 1.0], "plain": [3.0, 3.0]}])

    def fake_alternate(fns, rounds, info=None):
        if info is not None:
            info.update(loops=7, rounds=2)
        return next(passes)

    monkeypatch.setattr(vs_torch, "alternate", fake_alternate)
    fns = {"op": None, "plain": None}
    seen = []
    info = {}
    times = vs_torch.alternate_settled(fns, 1, lambda t: seen.append(t) or False, info)
    assert times == {"op": [2.0, 2.0, 1.0, 1.0], "plain": [1.0, 1.0, 3.0, 3.0]}
    assert info == {"loops": 7, "rounds": 4, "passes": 2, "first_rounds": 2}
    assert seen == [{"op": [2.0, 2.0], "plain": [1.0, 1.0]}]   # judged on the first pass only

    passes = iter([{"op": [1.0, 1.0], "plain": [2.0, 2.0]}])
    info = {}
    assert vs_torch.alternate_settled(fns, 1, lambda t: True, info) == \
        {"op": [1.0, 1.0], "plain": [2.0, 2.0]}
    assert info["passes"] == 1 and info["rounds"] == 2
