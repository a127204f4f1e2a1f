"""A state directory written by an earlier version of the editor (``tests/golden/state-v1``:
format version 1, a bf16 tiny Llama after one turn with subject positions, held edits, the key
memory and preserved subjects) still loads, and the editor resumes from it."""
import json
from pathlib import Path

import torch

from _state_common import one_thread  # noqa: F401 (autouse: one torch thread)
from conftest import ue_tiny_model
from test_golden import SUBJECTS, TURNS, fingerprint, requests, sha

GOLDEN = Path(__file__).parent / "golden"


def test_version_1_state_loads_and_resumes(ue_tokenizer):
    from ultraedit import UltraEditor

    meta = json.loads((GOLDEN / "state-v1.json").read_text())
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=5).to(torch.bfloat16)
    ed = UltraEditor.load_state(GOLDEN / "state-v1", model, ue_tokenizer)
    assert ed.turns == 1
    assert (ed.lr, ed.steps, ed.hold_done, ed.positions, ed.memory, ed.preserve) == \
        (2e-2, 2, True, "subject", 4.0, 0.3)
    assert [pk.owners for pk in ed.preserved.values()] == [[s for s in SUBJECTS for _ in "ab"]] * 2
    # the edited weights are rebuilt from base + Δ (elementwise: exact on any machine)
    assert {n: sha(m.weight) for n, m in ed.modules.items()} == meta["weights_at_save"]
    ed.edit(requests(TURNS[1], True))
    assert ed.turns == 2
    if meta["fingerprint"] == fingerprint():  # the turn's solves round as on the recording machine
        assert {n: sha(m.weight) for n, m in ed.modules.items()} == meta["weights_after_next_turn"]
