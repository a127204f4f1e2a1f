"""Rollback restores weights, statistics and turn count of before the last turns bit for bit,
within the bounded history the user sets."""
import pytest
import torch

from _state_common import (MODULES, REQUESTS, assert_same, one_thread,  # noqa: F401 (autouse)
                           snapshot, tiny_llama, turn_requests)
from conftest import ue_make_tokenizer
from ultraedit import UltraEditor
from ultraedit.state import RollbackError


@pytest.fixture(scope="module")
def tok():
    return ue_make_tokenizer(with_bos=True)


def _editor(tok, dtype=torch.float32, **kw):
    return UltraEditor(tiny_llama(len(tok), dtype), tok, modules=MODULES, lr=1e-2,
                       micro_batch=3, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollback_one_turn_is_bit_exact(tok, dtype):
    ed = _editor(tok, dtype)
    ed.edit(turn_requests(0))
    before = snapshot(ed)
    ed.edit(REQUESTS)                     # dual and primal updates
    assert ed.journal.rollback_available == 1
    ed.rollback()
    assert_same(before, snapshot(ed))
    # continuing after the rollback equals never having made the turn
    ed.edit(turn_requests(1))
    ref = _editor(tok, dtype)
    ref.edit(turn_requests(0))
    ref.edit(turn_requests(1))
    assert_same(snapshot(ref), snapshot(ed))


def test_rollback_several_turns_to_the_start(tok):
    ed = _editor(tok, history=3)
    start = snapshot(ed)
    snaps = []
    for t in range(4):
        snaps.append(snapshot(ed))
        ed.edit(turn_requests(t))
    assert ed.journal.rollback_available == 3          # bounded: the oldest turn fell out
    with pytest.raises(RollbackError, match="cannot roll back 4 turn.*holds 3.*history=3"):
        ed.rollback(4)
    ed.rollback(2)
    assert_same(snaps[2], snapshot(ed))
    assert ed.turns == 2
    ed.rollback(1)
    assert_same(snaps[1], snapshot(ed))
    with pytest.raises(RollbackError, match="holds 0 .*less those rolled back"):
        ed.rollback(1)
    assert start["turns"] == 0


def test_rollback_to_turn_zero_with_accumulation(tok):
    ed = _editor(tok, torch.bfloat16, history=2)
    start = snapshot(ed)
    ed.edit(turn_requests(0))
    ed.edit(turn_requests(1))
    ed.rollback(2)
    assert_same(start, snapshot(ed))
    assert ed.stats == {} and all(d is None for d in ed.journal.delta.values())


def test_history_zero_disables_rollback(tok):
    ed = _editor(tok, history=0)
    ed.edit(turn_requests(0))
    with pytest.raises(RollbackError, match="history=0"):
        ed.rollback()
    with pytest.raises(ValueError, match="positive integer"):
        ed.rollback(0)


def test_export_after_rollback_matches_weights(tok, tmp_path):
    import ultraedit

    ed = _editor(tok, torch.bfloat16, history=2)
    ed.edit(turn_requests(0))
    ed.edit(turn_requests(1))
    ed.rollback()
    ed.export_delta(tmp_path / "d")
    fresh = ultraedit.apply_delta(tiny_llama(len(tok), torch.bfloat16), tmp_path / "d")
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ed.model.state_dict()[k])


def test_multi_application_turn_is_one_rollback_entry_and_atomic(tok):
    """Several applications inside one journal transaction are one history entry; an error
    inside it restores every application's changes."""
    from ultraedit.solver import Update

    ed = _editor(tok, torch.bfloat16, history=2)
    ed.edit(turn_requests(0))
    before = snapshot(ed)
    journal = ed.journal
    names = list(ed.modules)
    gen = torch.Generator().manual_seed(0)
    ups = {n: Update("dual", torch.randn(5, ed._dims[n][1], generator=gen) * 1e-2,
                     torch.randn(5, ed._dims[n][0], generator=gen)) for n in names}

    with pytest.raises(RuntimeError, match="abort"):
        with journal.transaction(ed.state):
            journal.apply(ups)
            journal.apply(ups)
            raise RuntimeError("abort")
    assert journal.rollback_available == 1                 # the first edit() only
    assert_same(before, snapshot(ed))

    with journal.transaction(ed.state):
        journal.apply(ups)
        journal.apply(ups)
        ed.state.turns += 1
    assert journal.rollback_available == 2
    assert not torch.equal(ed.modules[names[0]].weight, before["model"][names[0] + ".weight"])
    ed.rollback()
    assert_same(before, snapshot(ed))


def test_a_rollback_that_fails_keeps_its_entry(tok, monkeypatch):
    """A restore that raises (e.g. out of memory) leaves the history entry for another try."""
    ed = _editor(tok)
    ed.edit(turn_requests(0))
    before = snapshot(ed)
    ed.edit(turn_requests(1))
    real = ed.journal._write_from

    def fail_once(*args):
        monkeypatch.setattr(ed.journal, "_write_from", real)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ed.journal, "_write_from", fail_once)
    with pytest.raises(RuntimeError, match="out of memory"):
        ed.rollback()
    assert ed.journal.rollback_available == 1
    ed.rollback()
    assert_same(before, snapshot(ed))


@pytest.mark.parametrize("device, match", [("bogus", "is not a device"), ("meta", "no values")])
def test_a_delta_device_that_cannot_hold_the_history_is_refused(tok, device, match):
    with pytest.raises(ValueError, match=f"delta_device.*{match}"):
        _editor(tok, delta_device=device)


def test_an_accumulating_editor_refuses_weights_changed_behind_its_back(tok):
    """bf16 weights are kept as base + float32 delta: a change made outside the editor would be
    overwritten by the next turn, so the turn is refused and nothing changes."""
    ed = _editor(tok, torch.bfloat16)
    assert ed.journal.accumulate
    ed.edit(turn_requests(0))
    with torch.no_grad():
        ed.modules[MODULES[0]].weight[0, 0] += 1.0
    before = snapshot(ed)
    with pytest.raises(ValueError, match=f"module '{MODULES[0]}'.*changed outside the editor"):
        ed.edit(turn_requests(1))
    assert_same(before, snapshot(ed))


def test_an_accumulating_editor_refuses_modules_that_share_a_weight(tok):
    model = tiny_llama(len(tok), torch.bfloat16)
    first, second = (model.get_submodule(m) for m in (MODULES[0], MODULES[2]))   # both down_proj
    second.weight = first.weight
    with pytest.raises(ValueError, match="share one weight tensor"):
        UltraEditor(model, tok, modules=MODULES, lr=1e-2)


def test_rollback_after_a_resume_says_the_history_is_not_saved(tok, tmp_path):
    ed = _editor(tok, history=2)
    ed.edit(turn_requests(0))
    ed.edit(turn_requests(1))
    resumed = UltraEditor.load_state(ed.save_state(tmp_path / "st"), tiny_llama(len(tok)), tok)
    with pytest.raises(RollbackError, match="holds 0 .*a saved state does not keep the history"):
        resumed.rollback()
    with pytest.raises(RollbackError, match=r"holds 2 \(history=2; pass"):
        ed.rollback(3)


def test_float64_weights_without_accumulation_are_warned_about(tok):
    with pytest.warns(UserWarning, match="accumulate=False"):
        _editor(tok, torch.float64, accumulate=False)
