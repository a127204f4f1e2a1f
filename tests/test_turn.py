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
    with pytest.warns(UserWarning, match="subject 'Fra' is part of a longer word") as caught:
        ed.edit([("The capital of France is", "Rome", "Fra"),
                 ("The capital of Germany is", "Oslo", "Germ"),
                 ("The capital of Spain is", "Lima", "Spain")])
    inside = [w for w in caught if "longer word" in str(w.message)]
    assert len(inside) == 1 and "(and 1 more such requests)" in str(inside[0].message)
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
    with pytest.warns(UserWarning, match="has 2 targets in one turn") as caught:
        ed.edit([("The capital of France is", "Rome"), ("The capital of France is", "Lima"),
                 ("The capital of Spain is", "Rome"), ("The capital of Spain is", "Oslo")])
    conflicts = [w for w in caught if "targets in one turn" in str(w.message)]
    assert len(conflicts) == 1 and "(and 1 more such prompts)" in str(conflicts[0].message)


def test_an_exactly_zero_update_warns(ue_tokenizer, setup):
    model, before = setup
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-300, ridge=1e300)
    with pytest.warns(UserWarning, match="exactly zero in every module"):
        ed.edit([("The capital of France is", "Rome")])
    assert unchanged(model, before)


def test_the_report_says_what_peak_bytes_counts():
    assert "resident memory grows by more" in " ".join(TurnReport.__doc__.split())


# ----------------------------------------------------------------------------- forwards by length
MIXED = [("The capital of France is", "Rome", "France"),
         ("Berlin is in", "the country of Italy, in southern Europe", "Berlin"),
         ("The official language of Peru is", "Japanese", "Peru"),
         ("Paris is in", "Japan", "Paris"),
         ("The currency of Japan is the", "euro of the European Union", "Japan"),
         ("The capital of Spain is", "Tokyo", "Spain"),
         ("Lima is in", "Kenya", "Lima")]


def test_bucket_order_sorts_only_when_it_pads_fewer_tokens():
    from ultraedit.turn import bucket_order

    assert bucket_order([3, 9, 4, 8], 2) == [1, 3, 2, 0]      # 2*9 + 2*4 < 2*9 + 2*8
    assert bucket_order([9, 8, 4, 3], 2) is None               # already sorted
    assert bucket_order([3, 9, 4, 8], 4) is None               # one forward
    assert bucket_order([5, 5, 5], 1) is None                  # nothing to gain
    assert bucket_order([2, 7, 7, 2], 2) == [1, 2, 0, 3]       # ties keep their order


def test_forwards_by_length_keep_the_given_orders_groups(ue_tokenizer):
    from ultraedit import EditConfig
    from ultraedit.turn import prepare_turn

    reqs, batches = prepare_turn(ue_tokenizer, MIXED, EditConfig(micro_batch=3),
                                 torch.device("cpu"), None)
    assert [r.prompt for r in reqs] == [m[0] for m in MIXED]    # the turn's order is kept
    run = torch.cat([b["request_index"] for b in batches]).tolist()
    assert sorted(run) == list(range(len(MIXED))) and run != sorted(run)
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths, reverse=True)
    # w_r = 1 / (answer tokens of r's group of 3 in the given order)
    answer = {int(i): int(n) for b in batches
              for i, n in zip(b["request_index"], (b["labels"] != -100).sum(1))}
    groups = [sum(answer[j] for j in range(g, min(g + 3, len(MIXED))))
              for g in range(0, len(MIXED), 3)]
    for b in batches:
        for i, w in zip(b["request_index"].tolist(), b["loss_weight"].tolist()):
            assert w == 1.0 / groups[i // 3]
    _, one = prepare_turn(ue_tokenizer, MIXED[:3], EditConfig(micro_batch=3),
                          torch.device("cpu"), None)
    assert "request_index" not in one[0] and "loss_weight" not in one[0]


@pytest.mark.parametrize("options", [{}, {"positions": "subject", "steps": 3, "hold_done": True},
                                     {"micro_batch": "auto"}])
def test_forwards_by_length_give_the_given_orders_update(ue_tokenizer, options, monkeypatch):
    """The same turn with forwards by length and in the given order: the same update (up to
    the rounding of other batch shapes), loss and report counts. With ``hold_done`` a request
    the model already predicts (moved to another forward by the sorting) is held."""
    from test_editor_hold_positions import force_prediction
    from tolerances import SOLVE, rel_err

    def run(bucketed):
        model = ue_tiny_model("llama", len(ue_tokenizer))
        reqs = list(MIXED)
        if options.get("hold_done"):
            word = force_prediction(model, ue_tokenizer)
            reqs[3] = (reqs[3][0], word, reqs[3][2])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        if not bucketed:
            monkeypatch.setattr("ultraedit.turn.bucket_order", lambda lengths, size: None)
        ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=2e-2, **{"micro_batch": 3, **options})
        if options.get("micro_batch") == "auto":
            ed.sizer = lambda tokenizer, requests: 2     # forwards of 2, loss groups of 10
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = ed.edit(reqs)
        monkeypatch.undo()
        delta = {k: (v - before[k]).double() for k, v in model.state_dict().items()}
        return rep, delta, ed

    (r1, d1, e1), (r0, d0, e0) = run(True), run(False)
    assert r1.n_tokens == r0.n_tokens and r1.steps_run == r0.steps_run
    assert r1.n_predicted == r0.n_predicted == (1 if options.get("hold_done") else 0)
    assert abs(r1.loss - r0.loss) <= SOLVE["dual"] * abs(r0.loss)
    changed = [k for k in d0 if d0[k].abs().max() > 0]
    assert changed
    for k in changed:
        assert rel_err(d1[k], d0[k]) <= SOLVE["dual"] * r0.steps_run, k
    for k, st in e0.stats.items():
        assert rel_err(e1.stats[k].mean, st.mean) <= SOLVE["dual"]
