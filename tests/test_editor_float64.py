"""float64 models edit end to end: the capture, the loss, the solve and the fp64 delta record
stay in float64; turns save, load, export and roll back exactly."""
import pytest
import torch

from _state_common import one_thread  # noqa: F401 (autouse: one torch thread)
from conftest import ue_tiny_model
from fp64_reference import pseudo_values_fp64
from tolerances import TOLERANCES
from test_editor_hold_positions import Spy
from ultraedit import UltraEditor, apply_delta

REQUESTS = [("The capital of France is", "Rome"), ("Paris is in", "Japan and Peru"),
            ("The capital of Italy is", "Berlin"), ("The currency of Japan is the", "euro")]
CASES = [("llama", ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.up_proj"]),
         ("gpt2", ["transformer.h.1.mlp.c_proj"])]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind,mods", CASES)
@pytest.mark.parametrize("options", [{}, {"protect_mean": 1.0, "hold_done": True, "steps": 2},
                                     {"memory": 1.0}])
def test_float64_model_turns_save_export_and_roll_back(ue_tokenizer, tmp_path, kind, mods,
                                                         options):
    model = ue_tiny_model(kind, len(ue_tokenizer), seed=1).double()
    before = weights(model)
    ed = UltraEditor(model, ue_tokenizer, modules=mods, lr=1e-3, micro_batch=3, history=2,
                     **options)
    ed.edit(REQUESTS)
    ed.edit(REQUESTS[:2])
    after = weights(model)
    assert all(after[m + ".weight"].dtype == torch.float64 for m in mods)
    assert not all(torch.equal(after[m + ".weight"], before[m + ".weight"]) for m in mods)
    assert ed.journal.accumulate and all(d.dtype == torch.float64 for d in ed.journal.delta.values())
    ed.export_delta(tmp_path / "d")
    fresh = apply_delta(ue_tiny_model(kind, len(ue_tokenizer), seed=1).double(), tmp_path / "d")
    assert all(torch.equal(v, after[k]) for k, v in fresh.state_dict().items())
    ed.save_state(tmp_path / "s")
    back = UltraEditor.load_state(tmp_path / "s", ue_tiny_model(kind, len(ue_tokenizer),
                                                                seed=1).double(), ue_tokenizer)
    assert all(torch.equal(v, after[k]) for k, v in back.model.state_dict().items())
    ed.rollback(2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_float64_update_matches_the_float64_oracle(ue_tokenizer, monkeypatch):
    spy = Spy(monkeypatch)
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=1).double()
    lr, ridge = 1e-3, 0.5
    ed = UltraEditor(model, ue_tokenizer, modules=CASES[0][1], lr=lr, ridge=ridge)
    ed.edit(REQUESTS * 2)  # 40 rows: dual for down_proj (d_in 48), primal for up_proj (d_in 32)
    rtol = TOLERANCES["dual"][torch.float64]   # float64 from the capture through the solve
    kinds = set()
    for call in spy.calls:
        k = call["k"]
        assert k.dtype == torch.float64 and call["g"].dtype == torch.float64
        v = pseudo_values_fp64(k, call["g"], call["mean"], call["std"], lr)
        eye = torch.eye(k.shape[1], dtype=torch.float64)
        dw = torch.linalg.solve(k.T @ k + ridge * eye, k.T @ v)
        (kind, t), keys = call["out"]
        kinds.add(kind)
        assert t.dtype == torch.float64
        got = keys.T @ t if kind == "dual" else t
        torch.testing.assert_close(got, dw, rtol=rtol, atol=rtol * float(dw.abs().max()))
    assert kinds == {"dual", "primal"}
