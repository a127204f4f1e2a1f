"""Long-run stability on a tiny model: many turns without NaN, statistics equal to a float64
recomputation from every captured row, per-turn time flat in the turn count; and fp32
accumulation keeping bf16 updates that per-turn rounding loses."""
import statistics

import pytest
import torch

import ultraedit.editor as editor_mod
from _state_common import (MODULES, one_thread,  # noqa: F401 (autouse)
                           tiny_llama, turn_requests)
from conftest import ue_make_tokenizer
from ultraedit import UltraEditor
from ultraedit.state import TurnJournal, dense_update
from ultraedit.hooks import CaptureSession

TURNS = 60


@pytest.fixture(scope="module")
def tok():
    return ue_make_tokenizer(with_bos=True)


def test_lifelong_run_stays_exact_finite_and_flat(tok, monkeypatch):
    rows = {name: [] for name in MODULES}

    class Recording(CaptureSession):
        def pop_frames(self):
            frames = super().pop_frames()
            for out in frames:
                for name, (k, g) in out.items():
                    rows[name].append(torch.cat([k, g], 1).double())
            return frames

    monkeypatch.setattr(editor_mod, "CaptureSession", Recording)
    ed = UltraEditor(tiny_llama(len(tok)), tok, modules=MODULES, lr=1e-3, micro_batch=3,
                     history=2)
    times = []
    for t in range(TURNS):
        reqs = turn_requests(t, n=3 + t % 4)          # varying batch sizes
        times.append(ed.edit(reqs).turn_s)
    assert ed.turns == TURNS
    for p in ed.model.parameters():
        assert bool(torch.isfinite(p).all())

    by_key = {}
    for name in MODULES:
        by_key.setdefault(ed.stats_key(name), []).extend(rows[name])
    assert set(by_key) == set(ed.stats)
    for key, blocks in by_key.items():
        z = torch.cat(blocks)
        st = ed.stats[key]
        assert st.count == z.shape[0]
        torch.testing.assert_close(st.mean, z.mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(st.var, z.var(0, unbiased=True), rtol=1e-9, atol=1e-12)

    third = TURNS // 3
    first, last = statistics.median(times[:third]), statistics.median(times[-third:])
    assert last <= 2 * first + 0.01, (first, last)      # loose: a shared, loaded machine


def _lost_fraction(dtype, accumulate, turns, monkeypatch, tok):
    """||(W_T - W_0) - Σ_t ΔW_t|| / ||Σ_t ΔW_t|| over the edited modules, where ΔW_t is the
    float64 value of each turn's computed update."""
    intended = {}
    real = TurnJournal._apply_module

    def record(self, name, k, method, u):
        intended[name] = intended.get(name, 0) + dense_update(self.layouts[name], k, method, u)
        return real(self, name, k, method, u)

    monkeypatch.setattr(TurnJournal, "_apply_module", record)
    ed = UltraEditor(tiny_llama(len(tok), dtype), tok, modules=MODULES, lr=1e-5, micro_batch=4,
                     accumulate=accumulate, history=0)
    for t in range(turns):
        ed.edit(turn_requests(t % 3))
    monkeypatch.undo()
    err = tot = 0.0
    for name in MODULES:
        change = ed.modules[name].weight.detach().double() - ed.journal.base[name].double()
        err += float((change - intended[name]).norm() ** 2)
        tot += float(intended[name].norm() ** 2)
    return (err / tot) ** 0.5


def test_fp32_accumulation_keeps_small_bf16_updates(tok, monkeypatch):
    assert UltraEditor(tiny_llama(len(tok), torch.bfloat16), tok,
                       modules=MODULES).journal.accumulate          # on by default for bf16
    lost_rounded = _lost_fraction(torch.bfloat16, False, 40, monkeypatch, tok)
    lost_acc = _lost_fraction(torch.bfloat16, True, 40, monkeypatch, tok)
    lost_fp32 = _lost_fraction(torch.float32, False, 40, monkeypatch, tok)
    assert lost_rounded > 0.3            # per-turn rounding to bf16 loses a large part
    assert lost_acc < lost_rounded / 4   # one rounding of W0 + Δ: the updates add up
    assert lost_fp32 < 1e-3
