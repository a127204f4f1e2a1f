"""``recheck``: a step that skips the held requests computes, for the requests it runs, the keys
and gradients a step over all of them computes; the held ones keep their last keys with zero
gradients and stay out of the statistics; every K-th step runs all; ``recheck`` 0 and 1 are the
same turns; the option validates and says when it has no effect."""
import warnings

import pytest
import torch

from _same_turns import F64, fact_requests
from conftest import ue_tiny_model
from ultraedit import EditConfig, UltraEditor
from ultraedit.held import HeldRows
from ultraedit.turn import input_device, prepare_turn

MODULES = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
pytestmark = pytest.mark.filterwarnings("ignore:prompt .* targets in one turn")


def _editor(tok, **kw):
    model = ue_tiny_model("llama", len(tok), seed=3).double()
    kw = {"modules": MODULES, "lr": 1e-3, "positions": "subject", "steps": 4,
          "hold_done": True, "micro_batch": 3, **kw}
    return UltraEditor(model, tok, **kw)


def _turn(editor, n):
    reqs, batches = prepare_turn(editor.tokenizer, fact_requests(n), editor.config,
                                 input_device(editor.model), editor._max_length, editor.sizer)
    return reqs, batches


def _capture(editor, batches):
    from ultraedit.turn import TurnMeter
    parts, n_pred, hold, _ = editor._capture(batches, 1, TurnMeter(editor.model), False, False,
                                             None)
    return parts, n_pred, hold


@pytest.mark.parametrize("backward_group", [1, 3])
def test_a_skipping_step_runs_its_requests_as_a_full_step_does(backward_group, ue_tokenizer):
    editor = _editor(ue_tokenizer, recheck=4, backward_group=backward_group)
    reqs, batches = _turn(editor, 8)
    full, _, _ = _capture(editor, batches)
    keys = {n: p[0][0] if len(p) == 1 else torch.cat([x[0] for x in p]) for n, p in full.items()}
    grads = {n: p[0][1] if len(p) == 1 else torch.cat([x[1] for x in p]) for n, p in full.items()}

    held = HeldRows(len(reqs), 4)
    held.merge(full, 0, None)                       # step 0: every request ran
    held.held = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0], dtype=torch.bool)   # as if predicted
    run = held.batches(batches, 1)
    assert sum(b["labels"].shape[0] for b in run) == 4
    parts, n_pred, hold = held.merge(*_capture(editor, run))
    ran = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    for name, [(k, g)] in parts.items():
        torch.testing.assert_close(k, keys[name], **F64)        # fresh rows equal; held: last keys
        torch.testing.assert_close(g[ran], grads[name][ran], **F64)
        assert not g[~ran].any()
    assert hold is not None and bool(hold[~ran].all()) and n_pred >= 4
    # the statistics get the rows that ran, and only those
    sub, k_sub, g_sub = held.fresh_rows(parts, {n: p[0][0] for n, p in parts.items()},
                                        {n: p[0][1] for n, p in parts.items()})
    assert all(k.shape[0] == 4 for k in k_sub.values())
    assert held.batches(batches, 3) is batches      # every 4th step runs all requests


def test_recheck_0_and_1_are_the_same_turns(ue_tokenizer):
    a, b = _editor(ue_tokenizer, recheck=0), _editor(ue_tokenizer, recheck=1)
    for reqs in (fact_requests(7), fact_requests(5, offset=2)):
        ra, rb = a.edit(reqs), b.edit(reqs)
        assert (ra.steps_run, ra.n_predicted) == (rb.steps_run, rb.n_predicted)
    for n, m in a.modules.items():
        assert torch.equal(b.modules[n].weight, m.weight)


def test_a_turn_with_recheck_counts_only_the_rows_that_ran(ue_tokenizer, monkeypatch):
    """A tiny random model predicts no counterfactual target, so here every request with an odd
    number of answer tokens counts as predicted: the turn then skips those requests."""
    import ultraedit.batching as batching
    monkeypatch.setattr(batching, "_predicted",
                        lambda rows, target, mask, margin=0.0: mask.sum(1) % 2 == 1)
    editor = _editor(ue_tokenizer, recheck=3, steps=6)
    ran = []
    real = HeldRows.batches

    def batches(self, batches_, step):
        out = real(self, batches_, step)
        ran.append(sum(b["labels"].shape[0] for b in out))
        return out
    monkeypatch.setattr(HeldRows, "batches", batches)
    base = {n: m.weight.detach().clone() for n, m in editor.modules.items()}
    report = editor.edit(fact_requests(8))
    assert 0 <= report.n_predicted <= 8 and report.steps_run <= 6
    steps = report.steps_run
    stats = next(iter(editor.stats.values()))
    # one row per request and module that ran, two modules of one shape share the statistics
    assert float(stats.count) == 2 * sum(ran[:steps])
    assert min(ran) < 8 and ran[2] == 8    # held requests skipped; the third step runs all
    editor.rollback()
    for n, m in editor.modules.items():
        assert torch.equal(m.weight, base[n])


@pytest.mark.parametrize("bad", [-1, 1.5, "4", True])
def test_recheck_validates(bad):
    with pytest.raises(ValueError, match="recheck"):
        EditConfig(recheck=bad)


def test_recheck_without_effect_warns_and_is_off():
    with pytest.warns(UserWarning, match="recheck has no effect"):
        cfg = EditConfig(recheck=4, steps=3, hold_done=False, positions="subject")
    assert cfg.recheck_every == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = EditConfig(recheck=4, steps=3, hold_done=True, positions="subject")
    assert cfg.recheck_every == 4
