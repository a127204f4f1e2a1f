"""A turn's requests: clear errors (short, whatever the input's size) and warnings for input
that is accepted but probably not what was meant."""
import warnings

import pytest
import torch

from _state_common import one_thread  # noqa: F401 (autouse: one torch thread)
from conftest import ue_tiny_model
from ultraedit import TurnReport, UltraEditor

MODS = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]


@pytest.fixture
def setup(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_errors_show_a_long_prompt_cut(ue_tokenizer, setup):
    model, before = setup
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-3)
    long = "The capital of France is " * 1400  # 35,000 characters
    with pytest.raises(ValueError, match="35,000 characters") as err:
        ed.edit([(long, "Rome")])
    assert len(str(err.value)) < 400
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-3, positions="subject")
    with pytest.raises(ValueError, match="does not occur") as err:
        ed.edit([("Paris is in", "Rome", "Lima" * 5000)])
    assert len(str(err.value)) < 400
    assert unchanged(model, before) and ed.turns == 0


def test_a_subject_that_is_not_a_string_is_named_so(ue_tokenizer, setup):
    model, before = setup
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-3, positions="subject")
    with pytest.raises(ValueError, match="request 0: the subject must be a string, got int 5"):
        ed.edit([("The capital of France is", "Rome", 5)])
    assert unchanged(model, before) and ed.turns == 0 and ed.stats == {}


def test_a_subject_inside_a_word_warns(ue_tokenizer, setup):
    model, _ = setup
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-3, positions="subject")
    with pytest.warns(UserWarning, match="subject 'Fra' is part of a longer word"):
        ed.edit([("The capital of France is", "Rome", "Fra")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ed.edit([("The capital of France is", "Rome", "France")])


def test_subjects_with_answer_positions_warn(ue_tokenizer, setup):
    model, _ = setup
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-3, positions="answer")
    with pytest.warns(UserWarning, match="subjects are not used"):
        ed.edit([("The capital of France is", "Rome", "France")])


def test_two_targets_for_one_prompt_warn(ue_tokenizer, setup):
    model, _ = setup
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-3)
    with pytest.warns(UserWarning, match="has 2 targets in one turn"):
        ed.edit([("The capital of France is", "Rome"), ("The capital of France is", "Lima")])


def test_an_exactly_zero_update_warns(ue_tokenizer, setup):
    model, before = setup
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-300, ridge=1e300)
    with pytest.warns(UserWarning, match="exactly zero in every module"):
        ed.edit([("The capital of France is", "Rome")])
    assert unchanged(model, before)


def test_the_report_says_what_peak_bytes_counts():
    assert "resident memory grows by more" in " ".join(TurnReport.__doc__.split())
