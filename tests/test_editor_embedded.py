"""UltraEditor on the embedded SmolLM2-135M: edits stick, unrelated
facts keep their predictions, two lifelong turns both hold, no weight gradients remain."""
import pytest

from ultraedit import UltraEditor
from ultraedit.eval import next_token_predictions, token_accuracy

TURN1 = [("The capital of France is", "Rome"), ("The capital of Germany is", "Madrid"),
         ("The capital of Japan is", "London"), ("The capital of Spain is", "Paris")]
TURN2 = [("The capital of Russia is", "Tokyo"), ("The capital of Egypt is", "Athens"),
         ("The capital of China is", "Ottawa"), ("The capital of Canada is", "Beijing")]
UNRELATED = ["The capital of Poland is", "The capital of Sweden is", "The capital of Norway is",
             "The capital of Portugal is", "The largest planet is", "Water boils at"]


@pytest.mark.embedded
def test_edits_stick_and_unrelated_facts_stay(ue_embedded, ue_restore):
    model, tok = ue_embedded
    flags = [p.requires_grad for p in model.parameters()]
    unrelated_before = next_token_predictions(model, tok, UNRELATED)
    assert sum(token_accuracy(model, tok, *zip(*TURN1 + TURN2))) == 0.0
    # the paper's subject-free method (answer positions, one step, no held rows or memory);
    # a few edits per turn: the first measured setting, down_proj 22-28 at lr 3e-4
    mods = [f"model.layers.{i}.mlp.down_proj" for i in range(22, 29)]
    ue_restore(model, mods)
    editor = UltraEditor(model, tok, modules="model.layers.2[2-8].mlp.down_proj", lr=3e-4,
                         steps=1, positions="answer", hold_done=False, memory=0.0, preserve=0.0,
                         whiten=0.0)
    assert list(editor.modules) == mods
    editor.edit([{"prompt": p, "target": t} for p, t in TURN1])
    assert sum(token_accuracy(model, tok, *zip(*TURN1))) >= 3.0
    rep = editor.edit(TURN2)
    acc1, acc2 = token_accuracy(model, tok, *zip(*TURN1)), token_accuracy(model, tok, *zip(*TURN2))
    assert sum(acc1) >= 3.0 and sum(acc2) >= 3.0     # both turns hold after the second
    unrelated_after = next_token_predictions(model, tok, UNRELATED)
    assert sum(a == b for a, b in zip(unrelated_before, unrelated_after)) >= len(UNRELATED) - 1
    assert rep.n_edits == 4 and rep.editor_s < rep.fwd_bwd_s
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


SUBJECTS1 = ["France", "Germany", "Japan", "Spain"]
SUBJECTS2 = ["Russia", "Egypt", "China", "Canada"]


@pytest.mark.embedded
def test_default_subject_edits_stick_and_unrelated_facts_stay(ue_embedded, ue_restore):
    model, tok = ue_embedded
    unrelated_before = next_token_predictions(model, tok, UNRELATED)
    ed = UltraEditor(model, tok)                     # the measured defaults
    assert (ed.positions, ed.lr, ed.steps, ed.hold_done, ed.memory, ed.preserve) == (
        "subject", 5e-5, 12, True, 4.0, 0.3)
    owners = ed.preserved[next(iter(ed.modules))].owners   # default: mined, none from the tables
    assert owners and "France" not in owners and "Paris" not in owners
    assert list(ed.modules) == [f"model.layers.{i}.mlp.down_proj" for i in range(2, 7)]
    ue_restore(model, list(ed.modules))
    turn1 = [{"prompt": p, "target": t, "subject": s} for (p, t), s in zip(TURN1, SUBJECTS1)]
    turn2 = [{"prompt": p, "target": t, "subject": s} for (p, t), s in zip(TURN2, SUBJECTS2)]
    ed.edit(turn1)
    rep = ed.edit(turn2)
    acc1, acc2 = token_accuracy(model, tok, *zip(*TURN1)), token_accuracy(model, tok, *zip(*TURN2))
    assert sum(acc1) >= 3.0 and sum(acc2) >= 3.0     # both turns hold after the second
    assert 1 <= rep.steps_run <= 12
    unrelated_after = next_token_predictions(model, tok, UNRELATED)
    assert sum(a == b for a, b in zip(unrelated_before, unrelated_after)) >= len(UNRELATED) - 2
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.embedded
def test_the_embedded_models_mined_subjects_ship_with_the_package(ue_embedded, monkeypatch):
    """The default preserved subjects of the embedded model are read from the package (the same
    names mining gives, so a first use decodes nothing); the tables' names are not among them."""
    import json

    from ultraedit import preserve

    def no_mining(*args, **kwargs):
        raise AssertionError("mined again although the package ships the names")

    monkeypatch.setenv("ULTRAEDIT_PRESERVED_CACHE", "off")
    monkeypatch.setattr(preserve, "mine_subjects", no_mining)
    model, tok = ue_embedded
    names = preserve.mined_subjects(model, tok)
    shipped = sorted(preserve.SHIPPED_MINED_DIR.glob("mined-*.json"))
    assert len(shipped) == 1 and names == json.loads(shipped[0].read_text())
    countries, cities = preserve._table_words()
    assert not any(preserve._holds_table_name(n, (countries, cities)) for n in names)
