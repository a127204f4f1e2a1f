"""EditConfig: validated once, presets by name and by model fingerprint, dict round trips."""
import dataclasses
import json
import types

import pytest

from conftest import ue_tiny_model
from ultraedit import UltraEditor
from ultraedit.config import (BEYOND_PAPER, EditConfig, model_fingerprint, preset_names,
                              resolve_config)

MODS = ["model.layers.1.mlp.down_proj"]


def fake_model(**cfg):
    return types.SimpleNamespace(config=types.SimpleNamespace(**cfg))


SMOLLM2 = dict(model_type="llama", num_hidden_layers=30, hidden_size=576,
               intermediate_size=1536, vocab_size=49152)


def test_presets():
    paper = EditConfig.paper()
    assert paper == EditConfig() and paper.lr == 1e-6 and paper.ridge == 1.0
    assert paper.micro_batch == 10 and paper.beyond_paper() == {}
    assert EditConfig.official().compat == "official" and EditConfig.official().beyond_paper() == {}
    assert "smollm2-135m" in preset_names()
    smol = EditConfig.from_preset("smollm2-135m")
    assert smol.beyond_paper() == {"steps": 12, "hold_done": True, "positions": "subject",
                                   "memory": 4.0, "preserve": 0.3, "whiten": 1e-3}
    assert smol.lr == 5e-5
    # the same with a logit margin and a smaller step, for long streams; by name only
    assert "smollm2-135m-lifelong" in preset_names()
    assert EditConfig.from_preset("smollm2-135m-lifelong") == smol.replace(hold_margin=1.0,
                                                                           lr=3.5e-5, recheck=4)
    assert EditConfig.from_preset("paper") == paper
    assert EditConfig.from_preset("official", lr=1e-3).lr == 1e-3
    with pytest.raises(ValueError, match="no preset 'nope'.*smollm2-135m"):
        EditConfig.from_preset("nope")


def test_for_model_matches_the_whole_fingerprint():
    assert EditConfig.for_model(fake_model(**SMOLLM2)) == EditConfig.from_preset("smollm2-135m")
    assert model_fingerprint(fake_model(**SMOLLM2)) == SMOLLM2
    for key in SMOLLM2:  # any other value of any fingerprint field: the paper's settings
        other = dict(SMOLLM2, **{key: "other" if key == "model_type" else SMOLLM2[key] + 1})
        assert EditConfig.for_model(fake_model(**other)) == EditConfig.paper()
    assert EditConfig.for_model(object()) == EditConfig.paper()


def test_official_without_a_config_turns_the_options_beyond_the_paper_off():
    cfg = resolve_config(fake_model(**SMOLLM2), None, {"compat": "official"})
    assert cfg.compat == "official" and cfg.beyond_paper() == {}
    assert EditConfig.for_model(fake_model(**SMOLLM2), compat="official") == cfg
    assert cfg.lr == 5e-5  # the model's measured lr stays
    assert set(BEYOND_PAPER) <= set(EditConfig.field_names())


def test_dict_round_trip_and_unknown_keys(tmp_path):
    cfg = EditConfig(modules=["a", "b"], lr=1e-3, steps=3, hold_done=True, preserve=0.5,
                     preserve_subjects=["France", "Lima"], delta_device="cpu")
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and d["modules"] == ["a", "b"]
    assert EditConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match=r"unknown EditConfig option\(s\) \['lrr'\]"):
        EditConfig.from_dict({**d, "lrr": 1.0})
    with pytest.raises(TypeError, match="unknown editor option"):
        cfg.replace(stepz=2)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"config": {"lr": 2e-4, "steps": 2}}))
    assert EditConfig.from_preset(path) == EditConfig(lr=2e-4, steps=2)


def test_every_field_documents_itself_for_a_command_line():
    for f in dataclasses.fields(EditConfig):
        assert f.metadata.get("help"), f.name
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(EditConfig)}
    assert choices["compat"] == ("fixed", "official") and choices["positions"] == ("answer", "subject")


@pytest.mark.parametrize("bad,match", [
    ({"lr": 0}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr": "x"}, "lr"),
    ({"ridge": -1}, "ridge"), ({"micro_batch": 0}, "micro_batch"), ({"micro_batch": 1.5}, "micro_batch"),
    ({"compat": "x"}, "compat"), ({"normalizer": "x"}, "normalizer"), ({"positions": "x"}, "positions"),
    ({"compat": "official", "positions": "subject"}, "compat='official'"),
    ({"steps": 0}, "steps"), ({"steps": True}, "steps"), ({"hold_done": 1}, "hold_done"),
    ({"memory": -1.0}, "memory"), ({"preserve": float("inf")}, "preserve"),
    ({"protect_mean": True}, "protect_mean"), ({"history": -1}, "history"),
    ({"accumulate": "yes"}, "accumulate"), ({"preserve_subjects": "France"}, "list of subject"),
])
def test_bad_values_are_refused_once_with_the_field_named(bad, match):
    with pytest.raises(ValueError, match=match):
        EditConfig(**bad)


def test_options_that_cancel_out_warn():
    with pytest.warns(UserWarning, match="preserve_subjects/preserve_contexts have no effect"):
        EditConfig(preserve_subjects=["France"])
    with pytest.warns(UserWarning, match="hold_margin has no effect without hold_done"):
        EditConfig(hold_margin=1.0)


def test_turning_holding_off_takes_a_presets_margin_and_recheck_with_it(recwarn):
    smol = EditConfig.from_preset("smollm2-135m-lifelong")
    off = smol.replace(hold_done=False)
    assert (off.hold_done, off.hold_margin, off.recheck) == (False, 0.0, 0) and not recwarn.list
    resolved = resolve_config(fake_model(**SMOLLM2), "smollm2-135m-lifelong", {"hold_done": False})
    assert (resolved.hold_margin, resolved.recheck) == (0.0, 0)
    with pytest.warns(UserWarning, match="hold_margin has no effect"):   # asked for: warned
        smol.replace(hold_done=False, hold_margin=2.0)
    with pytest.warns(UserWarning, match="recheck has no effect"):
        smol.replace(hold_done=False, recheck=4)


@pytest.mark.parametrize("change", [{"positions": "answer"},
                                    {"compat": "official", "positions": "answer"},
                                    {"key_contexts": 4}])
def test_options_recheck_cannot_act_on_take_a_presets_recheck_with_them(change, recwarn):
    cfg = EditConfig.from_preset("smollm2-135m-lifelong", **change)
    assert cfg.recheck == 0 and cfg.hold_margin == 1.0 and not recwarn.list
    assert EditConfig.from_preset("smollm2-135m-lifelong").replace(**change).recheck == 0
    assert EditConfig.from_preset("smollm2-135m-lifelong", key_contexts=0).recheck_every == 4


def test_editor_takes_a_config_and_overrides(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer))
    cfg = EditConfig.paper(modules=MODS, lr=1e-3)
    ed = UltraEditor(model, ue_tokenizer, cfg, steps=2)
    assert ed.config == cfg.replace(steps=2) and ed.lr == 1e-3 and ed.steps == 2
    assert list(ed.modules) == MODS
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-6, compat="official")
    assert ed.config == EditConfig.official(modules=MODS)
    assert UltraEditor(model, ue_tokenizer, {"modules": MODS, "lr": 1e-4}).lr == 1e-4
    with pytest.raises(TypeError, match="unknown editor option"):
        UltraEditor(model, ue_tokenizer, modules=MODS, learning_rate=1e-3)
    with pytest.raises(TypeError, match="pass modules=... and the other options as keywords"):
        UltraEditor(model, ue_tokenizer, MODS)
