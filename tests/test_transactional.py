"""Transactional turns: bad input, NaN/Inf features or gradients, a non-positive-definite system
and an out-of-memory during the turn each raise a clear error (the solver first retries in
float64, as documented) and leave the model weights and the editor state bit-identical."""
import pytest
import torch

from _state_common import (MODULES, REQUESTS, assert_same, one_thread,  # noqa: F401 (autouse)
                           snapshot, tiny_llama, turn_requests)
from conftest import ue_make_tokenizer
from ultraedit import UltraEditor
import ultraedit.editor as editor_mod
import ultraedit.solver as solver_mod
from ultraedit.state import TurnJournal
from ultraedit_kernels import SolveError



@pytest.fixture(scope="module")
def tok():
    return ue_make_tokenizer(with_bos=True)


def _editor(tok, dtype=torch.float32, tokenizer=None, **kw):
    return UltraEditor(tiny_llama(len(tok), dtype), tokenizer or tok, modules=MODULES,
                       lr=1e-2, micro_batch=3, **kw)


def _check_refused(ed, requests, exc, match, arm=None):
    """One good turn, then (after ``arm()``, which returns a hook handle) the bad one must raise
    and change nothing; the model's flags are restored and no weight gradient exists."""
    ed.edit(turn_requests(0))
    before = snapshot(ed)
    handle = arm() if arm is not None else None
    try:
        with pytest.raises(exc, match=match):
            ed.edit(requests)
    finally:
        if handle is not None:
            handle.remove()
    assert_same(before, snapshot(ed))
    assert all(p.grad is None for p in ed.model.parameters())
    assert all(p.requires_grad for p in ed.model.parameters())   # flags restored
    return before


class _DroppingTokenizer:
    """A tokenizer that loses some token ids: a target made of them tokenizes to nothing."""

    def __init__(self, tok, text):
        self._tok = tok
        self._drop = set(tok(text, add_special_tokens=False)["input_ids"])

    def __call__(self, text, add_special_tokens=True, **kw):
        ids = [i for i in self._tok(text, add_special_tokens=add_special_tokens, **kw)["input_ids"]
               if i not in self._drop]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("bad, match", [
    (("", "Rome"), "empty prompt"),
    (("The capital of France is", "   "), "empty target"),
    (("The capital of France is " * 20, "Rome"), "longer than the model's context of 64"),
])
def test_bad_requests(tok, bad, match):
    _check_refused(_editor(tok), [REQUESTS[0], bad], ValueError, match)


@pytest.mark.parametrize("bad, match", [
    (("", "Rome"), "empty prompt"),
    (("The capital of France is " * 20, "Rome"), "longer than the model's context of 64"),
])
def test_check_requests_raises_what_edit_would_and_runs_nothing(tok, bad, match):
    ed = _editor(tok)
    before = snapshot(ed)
    with pytest.raises(ValueError, match=match):
        ed.check_requests([REQUESTS[0], bad])
    ed.check_requests(turn_requests(1))
    assert_same(before, snapshot(ed))


def test_target_that_tokenizes_to_nothing(tok):
    ed = _editor(tok, tokenizer=_DroppingTokenizer(tok, " \u00a4"))
    _check_refused(ed, [REQUESTS[0], ("The capital of Italy is", "\u00a4")], ValueError,
                   "tokenizes to no tokens")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_gradients(tok, dtype, value):
    ed = _editor(tok, dtype)

    def poison(module, args, output):           # finite forward, poisoned backward
        output.register_hook(lambda g: g * value)

    _check_refused(ed, turn_requests(1), FloatingPointError, "output gradients contain .* NaN/Inf",
                   arm=lambda: ed.model.model.norm.register_forward_hook(poison))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_shift_that_overflows_the_weights_dtype(tok, dtype):
    """A finite shift whose sum with the weight is not finite in the weight's dtype is refused
    and every module of the turn is put back."""
    from ultraedit.solver import Update

    ed = _editor(tok, dtype)
    ed.edit(turn_requests(0))
    before = snapshot(ed)
    name = MODULES[0]
    d_out, d_in = ed.modules[name].weight.shape
    keys = torch.zeros(1, d_in)
    # the dtype's largest value: finite, and twice it is not
    big = torch.full((d_in, d_out), torch.finfo(dtype).max, dtype=torch.float32)
    with pytest.raises(FloatingPointError, match=f"module '{name}'.*overflows"):
        with ed.journal.transaction(ed.state):
            ed.journal.apply({name: Update("primal", big, keys)})
            ed.journal.apply({name: Update("primal", big, keys)})
    assert_same(before, snapshot(ed))


def test_nan_features(tok):
    ed = _editor(tok)
    mod = ed.modules[MODULES[0]]
    _check_refused(ed, turn_requests(1), FloatingPointError,
                   f"module '{MODULES[0]}'.*inputs \\(keys\\)",
                   arm=lambda: mod.register_forward_pre_hook(
                       lambda m, args: (args[0] * float("nan"),)))


def test_non_positive_definite_system_raises_solve_error(tok, monkeypatch):
    ed = _editor(tok)
    ed.edit(turn_requests(0))
    before = snapshot(ed)
    calls = []

    def failing(a, b):
        calls.append(a.dtype)
        return torch.zeros_like(b), torch.ones(a.shape[:-2], dtype=torch.int32)

    monkeypatch.setattr(solver_mod, "spd_solve", failing)
    with pytest.raises(SolveError, match="not positive definite even in float64"):
        ed.edit(turn_requests(1))
    assert calls == [torch.float32, torch.float64]       # the float64 retry was tried
    assert_same(before, snapshot(ed))


def test_failed_factorization_recovers_in_float64(tok, monkeypatch):
    ref = _editor(tok)
    ref.edit(turn_requests(0))
    ref.edit(turn_requests(1))

    ed = _editor(tok)
    ed.edit(turn_requests(0))
    real = solver_mod.spd_solve
    state = {"failed": 0}

    def once(a, b):
        if not state["failed"]:
            state["failed"] += 1
            return torch.zeros_like(b), torch.ones(a.shape[:-2], dtype=torch.int32)
        return real(a, b)

    monkeypatch.setattr(solver_mod, "spd_solve", once)
    ed.edit(turn_requests(1))                             # documented recovery: float64 retry
    assert state["failed"] == 1 and ed.turns == 2
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(ed.model.state_dict()[k], v, rtol=1e-4, atol=1e-6)


def test_out_of_memory_in_the_solves(tok, monkeypatch):
    ed = _editor(tok)
    real = editor_mod.solve
    calls = []

    def oom_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("simulated: out of memory in the second solve")
        return real(*a, **k)

    ed.edit(turn_requests(0))
    monkeypatch.setattr(editor_mod, "solve", oom_second)
    calls.clear()
    before = snapshot(ed)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        ed.edit(turn_requests(1))
    assert_same(before, snapshot(ed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_memory_while_applying(tok, dtype, monkeypatch):
    """The first module is already changed (and, accumulating, the second module's Δ too) when
    the error hits: everything is restored from the turn's snapshots."""
    import ultraedit.state as state_mod

    ref = _editor(tok, dtype)
    ref.edit(turn_requests(0))
    ref.edit(turn_requests(1))

    ed = _editor(tok, dtype, history=0)                 # the transaction needs no history
    ed.edit(turn_requests(0))
    before = snapshot(ed)
    applied = []
    if ed.journal.accumulate:            # fail after Δ += update, before W is written
        real = state_mod.reconstruct

        def flaky(*a, **k):
            applied.append(1)
            if len(applied) == 2:
                raise torch.OutOfMemoryError("simulated: out of memory writing the weight")
            return real(*a, **k)

        monkeypatch.setattr(state_mod, "reconstruct", flaky)
    else:
        real = TurnJournal._apply_module

        def flaky(self, *a, **k):
            applied.append(1)
            if len(applied) == 2:
                raise torch.OutOfMemoryError("simulated: out of memory applying the update")
            return real(self, *a, **k)

        monkeypatch.setattr(TurnJournal, "_apply_module", flaky)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        ed.edit(turn_requests(1))
    assert len(applied) >= 2            # (restoring may call reconstruct again)
    assert_same(before, snapshot(ed))
    monkeypatch.undo()
    ed.edit(turn_requests(1))                           # and the editor works on, exactly
    assert_same(snapshot(ref), snapshot(ed))


def test_one_request_alone_a_string_and_inference_mode(tok):
    """One request need not be wrapped in a list; a bare string and inference_mode are named."""
    from ultraedit import EditConfig, EditRequest

    ed = _editor(tok)
    assert ed.edit(EditRequest(*REQUESTS[0])).n_edits == 1
    assert ed.edit({"prompt": REQUESTS[0][0], "target": REQUESTS[0][1]}).n_edits == 1
    before = snapshot(ed)
    with pytest.raises(TypeError, match="takes a list of requests"):
        ed.edit("The capital of France is")
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            ed.edit(turn_requests(1))
    assert_same(before, snapshot(ed))
    with pytest.raises(ValueError, match="modules must be a module name"):
        EditConfig(modules=5)
