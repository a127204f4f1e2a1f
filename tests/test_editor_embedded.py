"""UltraEditor on the embedded SmolLM2-135M with its measured defaults: edits stick, unrelated
facts keep their predictions, two lifelong turns both hold, no weight gradients remain."""
from ultraedit import UltraEditor
from ultraedit.metrics import next_token_predictions, token_accuracy
from ultraedit.modules import EMBEDDED_SMOLLM2

TURN1 = [("The capital of France is", "Rome"), ("The capital of Germany is", "Madrid"),
         ("The capital of Japan is", "London"), ("The capital of Spain is", "Paris")]
TURN2 = [("The capital of Russia is", "Tokyo"), ("The capital of Egypt is", "Athens"),
         ("The capital of China is", "Ottawa"), ("The capital of Canada is", "Beijing")]
UNRELATED = ["The capital of Poland is", "The capital of Sweden is", "The capital of Norway is",
             "The capital of Portugal is", "The largest planet is", "Water boils at"]


def test_edits_stick_and_unrelated_facts_stay(ue_embedded, ue_restore):
    model, tok = ue_embedded
    ue_restore(model, EMBEDDED_SMOLLM2)
    flags = [p.requires_grad for p in model.parameters()]
    unrelated_before = next_token_predictions(model, tok, UNRELATED)
    assert sum(token_accuracy(model, tok, *zip(*TURN1 + TURN2))) == 0.0
    editor = UltraEditor(model, tok)               # embedded model: measured modules and lr
    assert list(editor.modules) == EMBEDDED_SMOLLM2
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
