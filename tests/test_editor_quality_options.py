"""UltraEditor's memory-free quality options: ``protect_mean`` (mean-key row) and ``steps``."""

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from _state_common import one_thread  # noqa: F401 (autouse: one torch thread)
from conftest import ue_tiny_model
from ultraedit import UltraEditor

ROOT = Path(__file__).resolve().parents[1]
# the editor before these options existed: the default path must stay bit-identical to it
BEFORE = "50646fd"

REQUESTS = [
    ("The capital of France is", "Rome"),
    ("The capital of Germany is", "Madrid"),
    ("The capital of Italy is", "Berlin"),
    ("The capital of Spain is", "Tokyo"),
    ("The official language of Peru is", "Japanese"),
    ("Paris is in", "Japan"),
]
MODS = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj",
        "model.layers.2.self_attn.o_proj"]


def model_for(tok, seed=0):
    return ue_tiny_model("llama", len(tok), seed=seed)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _module_before(name, alias=None):
    """``python/ultraedit/<name>.py`` as it was at BEFORE, as module ``ultraedit.<alias>``."""
    try:
        src = subprocess.run(["git", "show", f"{BEFORE}:python/ultraedit/{name}.py"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the pre-option editor is not in this checkout's git history")
    mod = types.ModuleType(f"ultraedit.{alias or name}")
    mod.__package__ = "ultraedit"
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{name}_before_options.py", "exec"), mod.__dict__)
    return mod


def old_editor_class():
    import ultraedit

    # the old editor imports its weight tracker from ``.delta`` (since merged into ``.state``)
    delta = _module_before("delta", "_delta_before_options")
    saved = sys.modules.get("ultraedit.delta")
    sys.modules["ultraedit.delta"] = delta
    try:
        return _module_before("editor", "_editor_before_options").UltraEditor
    finally:
        if saved is None:
            sys.modules.pop("ultraedit.delta", None)
            ultraedit.__dict__.pop("delta", None)
        else:
            sys.modules["ultraedit.delta"] = saved


@pytest.mark.parametrize("kwargs", [{}, {"protect_mean": 0.0, "steps": 1},
                                    {"protect_mean": 0, "steps": 1, "normalizer": "module"},
                                    {"compat": "official"}])
def test_defaults_bit_identical_to_the_editor_before(ue_tokenizer, kwargs, monkeypatch):
    # forwards in the given order, as the old editor ran them (length-bucketed forwards round
    # differently: tests/test_turn.py compares them with the given order's)
    monkeypatch.setattr("ultraedit.turn.bucket_order", lambda lengths, size: None)
    Old = old_editor_class()
    base = {k: v for k, v in kwargs.items() if k not in ("protect_mean", "steps")}
    m_new, m_old = model_for(ue_tokenizer), model_for(ue_tokenizer)
    # one backward per micro-batch, as the old editor ran them (a shared backward projects the
    # vocabulary in one product of more rows, which a BLAS may round differently:
    # tests/test_backward_group.py compares the two)
    e_new = UltraEditor(m_new, ue_tokenizer, modules=MODS, lr=1e-2, micro_batch=4,
                        backward_group=1, **kwargs)
    e_old = Old(m_old, ue_tokenizer, modules=MODS, lr=1e-2, micro_batch=4, **base)
    assert e_new.protect_mean == 0.0 and e_new.steps == 1
    for t in range(2):
        reqs = REQUESTS[t * 3:(t + 1) * 3] + REQUESTS[:2]
        r_new, r_old = e_new.edit(reqs), e_old.edit(reqs)
        assert r_new.n_tokens == r_old.n_tokens and r_new.loss == r_old.loss
        assert r_new.capture_bytes == r_old.capture_bytes
    assert same(weights(m_new), weights(m_old))
    for k in e_old.stats:
        for p, v in e_old.stats[k].state_dict().items():
            assert torch.equal(v, e_new.stats[k].state_dict()[p])


def mean_key_response(tok, protect_mean):
    """|ΔWᵀμ_k| / |ΔW| per module after one turn (μ_k: the committed statistics' key mean)."""
    model = model_for(tok)
    before = weights(model)
    # a small ridge: the tiny model's keys have norms ~1, far below the embedded model's ~1e3,
    # so with λ = 1 the ridge, not the rows, would decide the solution
    ed = UltraEditor(model, tok, modules=MODS, lr=5e-2, protect_mean=protect_mean,
                     normalizer="module", ridge=1e-7)
    ed.edit(REQUESTS)
    after = weights(model)
    out = {}
    for name in MODS:
        dw = (after[name + ".weight"] - before[name + ".weight"]).double()  # d_out x d_in
        d_in = dw.shape[1]
        mu = ed.stats[ed.stats_key(name)].mean[:d_in].double()
        out[name] = float((dw @ mu).norm() / (dw.norm() * mu.norm()))
    return out


def test_protect_mean_shrinks_the_mean_key_response(ue_tokenizer):
    plain = mean_key_response(ue_tokenizer, 0.0)
    prot = mean_key_response(ue_tokenizer, 50.0)
    for name in MODS:
        assert plain[name] > 0
        # o_proj's mean input is nearly orthogonal to its update already (~2e-4)
        assert prot[name] < 0.1 * plain[name] or prot[name] < 1e-3, (name, plain[name], prot[name])
    assert all(prot[n] < 0.1 * plain[n] for n in MODS if "down_proj" in n)


def test_protect_mean_primal_branch(ue_tokenizer):
    # N + 1 > d_in (32 for o_proj): the dense primal solve with the extra row
    model = model_for(ue_tokenizer)
    before = weights(model)
    ed = UltraEditor(model, ue_tokenizer, modules=["model.layers.2.self_attn.o_proj"], lr=5e-2,
                     protect_mean=4.0, ridge=1e-4)
    rep = ed.edit(REQUESTS * 4)
    assert rep.n_tokens + 1 > 32
    name = "model.layers.2.self_attn.o_proj.weight"
    dw = (weights(model)[name] - before[name]).double()
    mu = ed.stats[ed.stats_key("model.layers.2.self_attn.o_proj")].mean[:32].double()
    assert dw.norm() > 0 and float((dw @ mu).norm() / (dw.norm() * mu.norm())) < 0.05


def test_two_steps_equal_two_turns_of_one_step(ue_tokenizer):
    m2, m1 = model_for(ue_tokenizer), model_for(ue_tokenizer)
    before = weights(m2)
    e2 = UltraEditor(m2, ue_tokenizer, modules=MODS, lr=1e-2, steps=2)
    e1 = UltraEditor(m1, ue_tokenizer, modules=MODS, lr=1e-2, steps=1)
    rep = e2.edit(REQUESTS)
    e1.edit(REQUESTS)
    one_step = weights(m1)
    e1.edit(REQUESTS)
    assert e2.turns == 1 and rep.n_edits == len(REQUESTS)
    assert not same(weights(m2), before) and not same(weights(m2), one_step)
    assert same(weights(m2), weights(m1))
    for k in e1.stats:
        assert int(e2.stats[k].count) == int(e1.stats[k].count)
    # the two steps are one rollback entry
    e2.rollback(1)
    assert e2.turns == 0 and e2.stats == {} and same(weights(m2), before)


def test_failed_later_step_leaves_the_turn_undone(ue_tokenizer, monkeypatch):
    model = model_for(ue_tokenizer)
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-2, steps=3, protect_mean=1.0)
    ed.edit(REQUESTS[:3])
    before = weights(model)
    stats = {k: {p: t.clone() for p, t in v.state_dict().items()} for k, v in ed.stats.items()}
    calls = {"n": 0}
    import ultraedit.editor as editor_mod
    real = editor_mod.solve

    def flaky(*args, **kwargs):  # one call per module and step
        calls["n"] += 1
        if calls["n"] == 2 * len(MODS) + 2:  # inside the third step
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(editor_mod, "solve", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        ed.edit(REQUESTS[3:])
    assert ed.turns == 1 and same(weights(model), before)
    for k, v in ed.stats.items():
        for p, t in v.state_dict().items():
            assert torch.equal(t, stats[k][p])
    monkeypatch.undo()
    ed.rollback(1)  # the history still holds the first turn
    assert ed.turns == 0


def test_accumulate_mode_steps(ue_tokenizer):
    model = model_for(ue_tokenizer)
    before = weights(model)
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-2, steps=2, protect_mean=1.0,
                     accumulate=True, history=2)
    ed.edit(REQUESTS[:3])
    ed.edit(REQUESTS[3:])
    ed.rollback(2)
    assert same(weights(model), before)


@pytest.mark.parametrize("kwargs,match", [
    ({"protect_mean": -1.0}, "protect_mean"), ({"protect_mean": float("nan")}, "protect_mean"),
    ({"protect_mean": float("inf")}, "protect_mean"), ({"protect_mean": "1"}, "protect_mean"),
    ({"protect_mean": True}, "protect_mean"),
    ({"steps": 0}, "steps"), ({"steps": -2}, "steps"), ({"steps": 1.5}, "steps"),
    ({"steps": 2.0}, "steps"), ({"steps": "2"}, "steps"), ({"steps": True}, "steps"),
])
def test_bad_values_are_clear_errors(ue_tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        UltraEditor(model_for(ue_tokenizer), ue_tokenizer, modules=MODS, **kwargs)


def test_non_embedded_models_keep_the_papers_behaviour(ue_tokenizer):
    ed = UltraEditor(model_for(ue_tokenizer), ue_tokenizer, modules=MODS)
    assert ed.protect_mean == 0.0 and ed.steps == 1


def test_options_survive_save_and_load(ue_tokenizer, tmp_path):
    model = model_for(ue_tokenizer)
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-2, steps=2, protect_mean=3.0)
    ed.edit(REQUESTS[:3])
    ed.save_state(tmp_path / "st")
    back = UltraEditor.load_state(tmp_path / "st", model, ue_tokenizer)
    assert back.steps == 2 and back.protect_mean == 3.0
