"""Fact keys (``EditConfig.key_contexts``, ``ultraedit.fact_keys``): with subject positions each
edit's key row is the mean of its subject's key in the rewrite prompt and in the first n
generic contexts, captured from the model as it is at that step; gradients unchanged."""

import warnings

import pytest
import torch

from _state_common import one_thread  # noqa: F401 (autouse: one torch thread)
from conftest import ue_tiny_model
from test_editor_hold_positions import MODS, REQUESTS, Spy
from test_editor_preserve import hand_keys
from ultraedit import EditConfig, EditRequest, UltraEditor
from ultraedit.fact_keys import KEY_CONTEXTS, MAX_KEY_CONTEXTS, fact_keys

# one subject twice: its contexts are captured once and both rows get the same context part
TWICE = REQUESTS[:3] + [{"prompt": "France is a country whose capital is", "target": "Oslo",
                         "subject": "France"}]


def _editor(tok, seed=3, **kw):
    model = ue_tiny_model("llama", len(tok), seed=seed)
    opts = dict(modules=MODS, lr=1e-2, ridge=0.5, steps=2, positions="subject", micro_batch=2)
    return UltraEditor(model, tok, **{**opts, **kw})


@pytest.mark.parametrize("n", [1, 3])
def test_rows_are_the_mean_over_the_prompt_and_the_contexts(ue_tokenizer, n):
    ed = _editor(ue_tokenizer)
    reqs = [EditRequest.coerce(r) for r in TWICE]
    gen = torch.Generator().manual_seed(1)
    keys = {m: torch.randn(len(reqs), 48, generator=gen) for m in MODS}
    got = fact_keys(ed, reqs, keys, n)
    for m in MODS:
        ctx = hand_keys(ed.model, ue_tokenizer, m, [r.subject for r in reqs], KEY_CONTEXTS[:n])
        want = (keys[m].double() + ctx.reshape(len(reqs), n, -1).sum(1)) / (n + 1)
        assert got[m].dtype == keys[m].dtype and got[m] is not keys[m]
        torch.testing.assert_close(got[m].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[MODS[0]][0] - keys[MODS[0]][0] / (n + 1),
                               got[MODS[0]][3] - keys[MODS[0]][3] / (n + 1))   # France twice
    assert fact_keys(ed, reqs, keys, 0) is keys


def test_rows_must_be_one_per_request(ue_tokenizer):
    ed = _editor(ue_tokenizer)
    reqs = [EditRequest.coerce(r) for r in REQUESTS[:2]]
    with pytest.raises(RuntimeError, match="one row per request"):
        fact_keys(ed, reqs, {MODS[0]: torch.zeros(3, 48)}, 2)


def test_each_step_solves_with_the_fact_keys_of_the_model_as_it_is(ue_tokenizer, monkeypatch):
    """Spy on the solve: every step's K is fact_keys of that step's model and the prompt's own
    key; G is the rewrite prompt's gradient, the same as without fact keys at step 1."""
    n = 2
    spy = Spy(monkeypatch)
    plain = _editor(ue_tokenizer)
    plain.edit(TWICE)
    first_plain = {c["name"]: c for c in spy.calls[:len(MODS)]}
    spy.calls.clear()
    ed = _editor(ue_tokenizer, key_contexts=n, memory=1.0)
    seen = []
    real = fact_keys

    def watch(editor, reqs, keys, k):
        out = real(editor, reqs, keys, k)
        # at this point the model is the one the step captured on: recompute by hand
        subjects = [r.subject for r in reqs]
        seen.append({m: ((keys[m].double() + hand_keys(editor.model, ue_tokenizer, m, subjects,
                                                      KEY_CONTEXTS[:k])
                          .reshape(len(reqs), k, -1).sum(1)) / (k + 1)) for m in keys})
        return out

    import ultraedit.editor as editor_mod
    monkeypatch.setattr(editor_mod, "fact_keys", watch)
    ed.edit(TWICE)
    assert len(seen) == 2 and len(spy.calls) == 2 * len(MODS)
    for step, want in enumerate(seen):
        for c in spy.calls[step * len(MODS):(step + 1) * len(MODS)]:
            torch.testing.assert_close(c["k"].double(), want[c["name"]], rtol=1e-5, atol=1e-5)
    for c in spy.calls[:len(MODS)]:   # same model before the first update: same gradients
        assert torch.equal(c["g"], first_plain[c["name"]]["g"])
        assert not torch.equal(c["k"], first_plain[c["name"]]["k"])
    assert not torch.allclose(seen[0][MODS[1]], seen[1][MODS[1]])   # recaptured after step 1
    # the key memory holds the last step's fact keys
    for m in MODS:
        k = spy.calls[len(MODS) + MODS.index(m)]["k"].double()
        torch.testing.assert_close(ed.state.memory[m].gram.double(), k.T @ k, rtol=1e-6,
                                   atol=1e-6)


def test_off_is_the_old_path(ue_tokenizer, monkeypatch):
    import ultraedit.editor as editor_mod

    def boom(*a, **k):
        raise AssertionError("fact_keys called with key_contexts=0")

    monkeypatch.setattr(editor_mod, "fact_keys", boom)
    _editor(ue_tokenizer).edit(TWICE)
    with pytest.warns(UserWarning, match="key_contexts has no effect"):
        ed = _editor(ue_tokenizer, positions="answer", key_contexts=2)
    ed.edit([{k: v for k, v in r.items() if k != "subject"} for r in TWICE])


def test_config_field_is_validated_and_serialized():
    assert EditConfig().key_contexts == 0 and "key_contexts" not in EditConfig().beyond_paper()
    cfg = EditConfig(positions="subject", key_contexts=MAX_KEY_CONTEXTS)
    assert EditConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.beyond_paper()["key_contexts"] == MAX_KEY_CONTEXTS
    for bad in (-1, MAX_KEY_CONTEXTS + 1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="key_contexts"):
            EditConfig(positions="subject", key_contexts=bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EditConfig(positions="subject", key_contexts=3)   # no warning with subject positions
    assert all("{s}" in c for c in KEY_CONTEXTS) and len(set(KEY_CONTEXTS)) == MAX_KEY_CONTEXTS
