"""UltraEditor's ``hold_done`` (held rows, early end) and ``positions="subject"``."""

import pytest
import torch

from _state_common import one_thread  # noqa: F401 (autouse: one torch thread)
from conftest import ue_tiny_model
from fp64_reference import pseudo_values_fp64
from ultraedit import UltraEditor
from ultraedit.tokenization import encode_request, subject_token_index

MODS = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
REQUESTS = [
    {"prompt": "The capital of France is", "target": "Rome", "subject": "France"},
    {"prompt": "The capital of Germany is", "target": "Madrid", "subject": "Germany"},
    {"prompt": "The capital of Italy is", "target": "Berlin", "subject": "Italy"},
    {"prompt": "The official language of Peru is", "target": "Japanese", "subject": "Peru"},
    {"prompt": "Paris is in", "target": "Japan", "subject": "Paris"},
]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def force_prediction(model, tok):
    """Make the model predict one word everywhere (a bias on its logit); returns that word.

    The word is a one-token target: ``encode_request`` gives exactly that token for it."""
    for t in range(len(tok)):
        word = tok.decode([t])
        if not word.startswith(" ") or not word.strip().isalpha():
            continue
        if encode_request(tok, "The capital of France is", word.strip())[1] == [t]:
            break
    else:
        raise AssertionError("no one-token word in the test vocabulary")

    def bias(module, inputs, out):
        out = out.clone()
        out[..., t] += 1e3
        return out

    model.lm_head.register_forward_hook(bias)
    return word.strip()


def stats_equal(a, b):
    return a.keys() == b.keys() and all(
        a[k].state_dict().keys() == b[k].state_dict().keys()
        and all(torch.equal(a[k].state_dict()[p], b[k].state_dict()[p]) for p in a[k].state_dict())
        for k in a)


class Spy:
    """Records every module's solve of every step: inputs and the update
    (``out = ((kind, tensor), keys)``, ``ΔW = keysᵀ tensor`` for ``kind="dual"``)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = UltraEditor._solve

        def spy(editor, keys, grads, hold, *args):
            out = real(editor, keys, grads, hold, *args)
            for name, upd in out.items():
                st = editor.state.stats[editor.stats_key(name)]
                self.calls.append(dict(name=name, k=keys[name].clone(), g=grads[name].clone(),
                                       mean=st.mean.clone(), std=st.std.clone(),
                                       hold=None if hold is None else hold.clone(),
                                       out=((upd.kind, upd.tensor), upd.keys)))
            return out

        monkeypatch.setattr(UltraEditor, "_solve", spy)


# ------------------------------------------------------------------ subject positions
@pytest.mark.parametrize("fixture", ["ue_tokenizer", "ue_tokenizer_nobos"])
def test_subject_token_index_is_the_last_subject_token(fixture, request):
    tok = request.getfixturevalue(fixture)
    for r in REQUESTS:
        ids, _ = encode_request(tok, r["prompt"], r["target"])
        i = subject_token_index(tok, r["prompt"], r["subject"])
        text = tok.decode(ids[:i + 1], skip_special_tokens=True)
        assert text.endswith(r["subject"]) or r["subject"].startswith(text.split()[-1])
        assert tok.decode(ids[:i], skip_special_tokens=True) != tok.decode(
            ids[:i + 1], skip_special_tokens=True)


def test_subject_token_index_errors(ue_tokenizer):
    with pytest.raises(ValueError, match="does not occur"):
        subject_token_index(ue_tokenizer, "The capital of France is", "Spain")
    with pytest.raises(ValueError, match="empty subject"):
        subject_token_index(ue_tokenizer, "The capital of France is", " ")


def test_subject_positions_capture_one_row_per_request(ue_tokenizer, monkeypatch):
    model = ue_tiny_model("llama", len(ue_tokenizer))
    named = dict(model.named_modules())
    # the module inputs at each request's subject token, from a plain forward
    expected = {m: [] for m in MODS}
    for r in REQUESTS:
        ids, _ = encode_request(ue_tokenizer, r["prompt"], r["target"])
        i = subject_token_index(ue_tokenizer, r["prompt"], r["subject"])
        seen = {}
        hs = [named[m].register_forward_hook(lambda mod, inp, out, m=m: seen.__setitem__(m, inp[0]))
              for m in MODS]
        with torch.no_grad():
            model(torch.tensor([ids]))
        for h in hs:
            h.remove()
        for m in MODS:
            expected[m].append(seen[m][0, i])
    spy = Spy(monkeypatch)
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-2, positions="subject", steps=1,
                     micro_batch=2)
    before = weights(model)
    rep = ed.edit(REQUESTS)
    assert ed.positions == "subject" and rep.n_edits == len(REQUESTS)
    assert rep.n_tokens == sum(len(encode_request(ue_tokenizer, r["prompt"], r["target"])[1])
                               for r in REQUESTS)  # still the answer tokens
    for call in spy.calls:
        torch.testing.assert_close(call["k"], torch.stack(expected[call["name"]]),
                                   rtol=1e-5, atol=1e-6)
    assert not same(weights(model), before)


def test_subject_positions_need_a_subject_and_touch_nothing_without(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer))
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-2, positions="subject")
    before = weights(model)
    bad = REQUESTS[:2] + [{"prompt": "Paris is in", "target": "Japan"}]
    with pytest.raises(ValueError, match="request 2 .*has no subject"):
        ed.edit(bad)
    with pytest.raises(ValueError, match="request 0: subject 'Spain' does not occur"):
        ed.edit([{"prompt": "The capital of France is", "target": "Rome", "subject": "Spain"}])
    assert ed.turns == 0 and ed.stats == {} and same(weights(model), before)


def test_positions_validation(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer))
    with pytest.raises(ValueError, match="positions must be"):
        UltraEditor(model, ue_tokenizer, modules=MODS, positions="object")
    with pytest.raises(ValueError, match="compat='official'"):
        UltraEditor(model, ue_tokenizer, modules=MODS, compat="official", positions="subject")
    assert UltraEditor(model, ue_tokenizer, modules=MODS).positions == "answer"  # the paper
    # default modules for subject positions: early MLP output projections
    ed = UltraEditor(model, ue_tokenizer, positions="subject")
    assert list(ed.modules) and all(n.endswith("mlp.down_proj") for n in ed.modules)
    gpt2 = ue_tiny_model("gpt2", len(ue_tokenizer))
    ed = UltraEditor(gpt2, ue_tokenizer, positions="subject")
    assert all(n.endswith("mlp.c_proj") for n in ed.modules)


# ------------------------------------------------------------------ hold_done
def test_hold_done_changes_nothing_when_every_edit_holds(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=3)
    word = force_prediction(model, ue_tokenizer)
    reqs = [{"prompt": r["prompt"], "target": word} for r in REQUESTS]
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-2, steps=4, hold_done=True)
    before = weights(model)
    rep = ed.edit(reqs)
    assert rep.steps_run == 0 and rep.n_predicted == len(reqs)
    assert same(weights(model), before) and ed.stats == {} and ed.turns == 1


def test_hold_margin_holds_only_targets_that_lead_by_the_margin(ue_tokenizer):
    """A 1e3 logit bias makes every request predicted: it holds with a margin below that lead
    and not with one above it (every step then runs; the gradient of a target predicted with
    probability 1 is 0 in float32, so the update is zero and says so)."""
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=3)
    word = force_prediction(model, ue_tokenizer)
    reqs = [{"prompt": r["prompt"], "target": word} for r in REQUESTS]
    before = weights(model)
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-2, steps=2, hold_done=True,
                     hold_margin=10.0)
    rep = ed.edit(reqs)
    assert rep.steps_run == 0 and rep.n_predicted == len(reqs) and same(weights(model), before)
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-2, steps=2, hold_done=True,
                     hold_margin=1e4)
    with pytest.warns(UserWarning, match="exactly zero"):
        rep = ed.edit(reqs)
    assert rep.steps_run == 2 and rep.n_predicted == 0


def test_hold_margin_validation():
    from ultraedit.config import EditConfig

    with pytest.raises(ValueError, match="hold_margin"):
        EditConfig(hold_done=True, hold_margin=-1.0)
    with pytest.warns(UserWarning, match="hold_margin has no effect"):
        EditConfig(hold_margin=1.0)
    assert EditConfig(hold_done=True, hold_margin=1).hold_margin == 1.0


def test_held_rows_get_zero_pseudo_values(ue_tokenizer, monkeypatch):
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=3)
    held_prompts = {REQUESTS[0]["prompt"], REQUESTS[3]["prompt"]}
    word = force_prediction(model, ue_tokenizer)
    reqs = [dict(r, target=word) if r["prompt"] in held_prompts else r for r in REQUESTS]
    spy = Spy(monkeypatch)
    lr, ridge = 1e-2, 0.7
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=lr, ridge=ridge, steps=1,
                     hold_done=True)
    rep = ed.edit(reqs)
    assert rep.steps_run == 1 and rep.n_predicted == 2
    for call in spy.calls:
        hold = call["hold"]
        # one row per answer token; the held requests have one-token targets
        n_rows = [len(encode_request(ue_tokenizer, r["prompt"], r["target"])[1]) for r in reqs]
        expect = torch.cat([torch.full((n,), r["prompt"] in held_prompts) for n, r in
                            zip(n_rows, reqs)])
        assert torch.equal(hold, expect)
        v = pseudo_values_fp64(call["k"], call["g"], call["mean"], call["std"], lr)
        v[hold] = 0
        k = call["k"].double()
        dw = k.T @ torch.linalg.solve(k @ k.T + ridge * torch.eye(k.shape[0], dtype=torch.float64), v)
        kind, t = call["out"][0]
        got = call["out"][1].double().T @ t.double() if kind == "dual" else t.double()
        torch.testing.assert_close(got, dw, rtol=1e-4, atol=1e-4 * float(dw.abs().max()))


def test_hold_done_ends_the_turn_early_and_is_one_rollback_entry(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=1)
    mods = MODS + ["model.layers.2.self_attn.o_proj"]
    ed = UltraEditor(model, ue_tokenizer, modules=mods, lr=0.1, steps=40, hold_done=True)
    before = weights(model)
    rep = ed.edit(REQUESTS[:3])
    assert rep.n_predicted == 3 and 1 <= rep.steps_run < 40
    ed.rollback(1)
    assert ed.turns == 0 and ed.stats == {} and same(weights(model), before)


def test_hold_done_validation_and_state_roundtrip(ue_tokenizer, tmp_path):
    model = ue_tiny_model("llama", len(ue_tokenizer))
    with pytest.raises(ValueError, match="hold_done"):
        UltraEditor(model, ue_tokenizer, modules=MODS, hold_done="yes")
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-2, hold_done=True, steps=2,
                     positions="subject")
    ed.edit(REQUESTS[:2])
    ed.save_state(tmp_path / "s")
    back = UltraEditor.load_state(tmp_path / "s", model, ue_tokenizer)
    assert back.hold_done is True and back.positions == "subject" and back.steps == 2


# ------------------------------------------------------------------ key memory
def test_memory_second_turn_solves_with_the_first_turns_keys(ue_tokenizer, monkeypatch):
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=2)
    spy = Spy(monkeypatch)
    lr, ridge, nu = 1e-2, 0.5, 3.0
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=lr, ridge=ridge, memory=nu, steps=1)
    ed.edit(REQUESTS[:3])
    first = {c["name"]: c["k"].double() for c in spy.calls}
    for name, k in first.items():
        mem = ed.state.memory[name]
        torch.testing.assert_close(mem.gram, k.T @ k)
        assert int(mem.count) == k.shape[0]
    spy.calls.clear()
    ed.edit(REQUESTS[3:])
    for call in spy.calls:
        k = call["k"].double()
        v = pseudo_values_fp64(call["k"], call["g"], call["mean"], call["std"], lr)
        m = first[call["name"]]
        system = k.T @ k + nu * (m.T @ m) + ridge * torch.eye(k.shape[1], dtype=torch.float64)
        dw = torch.linalg.solve(system, k.T @ v)
        (kind, t), factor_keys = call["out"]
        got = factor_keys.double().T @ t.double() if kind == "dual" else t.double()
        torch.testing.assert_close(got, dw, rtol=1e-4, atol=1e-4 * float(dw.abs().max()))


def test_memory_rolls_back_and_survives_save_load(ue_tokenizer, tmp_path):
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=2)
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-2, memory=1.0, steps=2, history=2)
    ed.edit(REQUESTS[:2])
    after_one = ed.state.snapshot()
    ed.edit(REQUESTS[2:])
    assert not stats_equal(ed.state.memory, after_one["memory"])
    assert not stats_equal(ed.stats, after_one["stats"])
    ed.save_state(tmp_path / "s")
    back = UltraEditor.load_state(tmp_path / "s", ue_tiny_model("llama", len(ue_tokenizer), seed=2),
                                  ue_tokenizer)
    assert back.memory == 1.0 and stats_equal(back.stats, ed.stats)
    assert stats_equal(back.state.memory, ed.state.memory)
    ed.rollback(1)
    assert stats_equal(ed.stats, after_one["stats"])
    assert stats_equal(ed.state.memory, after_one["memory"])


def test_memory_validation(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer))
    for bad in (-1.0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="memory"):
            UltraEditor(model, ue_tokenizer, modules=MODS, memory=bad)
    assert UltraEditor(model, ue_tokenizer, modules=MODS).memory == 0.0  # the paper


@pytest.mark.parametrize("steps", [1, 3])
def test_rollback_after_a_turn_that_changed_nothing_undoes_only_that_turn(ue_tokenizer, steps):
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=3)
    word = force_prediction(model, ue_tokenizer)
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-2, steps=steps, hold_done=True,
                     history=3)
    base = weights(model)
    ed.edit(REQUESTS[:3])                                       # a real turn
    after_real = weights(model)
    stats = {k: v.clone() for k, v in ed.stats.items()}
    rep = ed.edit([dict(r, target=word) for r in REQUESTS[3:]])  # every edit already holds
    assert rep.steps_run == 0 and ed.turns == 2 and same(weights(model), after_real)
    ed.rollback()                                               # undoes the no-op turn only
    assert ed.turns == 1 and same(weights(model), after_real) and stats_equal(ed.stats, stats)
    ed.rollback()
    assert ed.turns == 0 and same(weights(model), base) and ed.stats == {}
