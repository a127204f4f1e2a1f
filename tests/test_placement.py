"""Editing models that accelerate dispatched with offloaded layers (CPU RAM, disk).

Every edit of an offloaded model must equal the same edit of the unsplit model bit for bit
(same arithmetic on the same CPU: the offload hooks only move the weights), persist across
forwards and ``save_pretrained``, and a failed turn must leave the offloaded values unchanged.
"""
import hashlib
import os

import pytest
import torch

from conftest import ue_tiny_model
from ultraedit import UltraEditor
from ultraedit.placement import PlacementError, weight_slots

accelerate = pytest.importorskip("accelerate")

MODULES = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.up_proj"]
TURNS = [[("The capital of France is", "Rome"), ("The capital of Spain is", "Berlin")],
         [("The currency of Japan is", "the euro")]]
PAPER = dict(positions="answer", steps=1, hold_done=False, memory=0, preserve=0, protect_mean=0)


def _editor(model, tok, **kw):
    return UltraEditor(model, tok, **{"modules": MODULES, "lr": 5e-2, "micro_batch": 2, **PAPER,
                                      **kw})


def _logits(model, tok):
    batch = tok(["The capital of France is", "A quiet morning in"], return_tensors="pt",
                padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _offloaded(kind, tok, tmp_path, dtype=torch.float32):
    model = ue_tiny_model("llama", len(tok), seed=3).to(dtype)
    if kind == "cpu":
        accelerate.cpu_offload(model, execution_device="cpu")
    elif kind == "disk":  # dispatch_model: layers 1-2 to .dat files in the offload folder
        dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
              "lm_head": "cpu"}
        accelerate.dispatch_model(model, dm, offload_dir=str(tmp_path / "offload"))
    elif kind == "block":  # one hook per decoder layer loads all its submodules' weights
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module
        from accelerate.utils import PrefixedDataset
        store = {k: v.clone() for k, v in model.state_dict().items()}
        for i in (1, 2):
            add_hook_to_module(model.model.layers[i], AlignDevicesHook(
                execution_device="cpu", offload=True, place_submodules=True,
                weights_map=PrefixedDataset(store, f"model.layers.{i}.")))
    elif kind == "device_map":  # from_pretrained: layers 1-2 on disk, read from the checkpoint
        import transformers as tf
        ue_tiny_model("llama", len(tok), seed=3).to(dtype).save_pretrained(tmp_path / "ckpt")
        dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
              "lm_head": "cpu"}
        model = tf.AutoModelForCausalLM.from_pretrained(
            tmp_path / "ckpt", device_map=dm, offload_folder=str(tmp_path / "offload"),
            dtype=dtype, attn_implementation="eager").eval()
    for name in MODULES:
        assert model.get_submodule(name).weight.device.type == "meta"
    return model


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("kind,dtype", [("cpu", torch.float32), ("block", torch.float32),
                                        ("disk", torch.float32),
                                        ("device_map", torch.float32),
                                        ("disk", torch.bfloat16)])
def test_offloaded_edit_equals_the_unsplit_edit(tmp_path, ue_padded_tokenizer, kind, dtype):
    tok = ue_padded_tokenizer
    ref = ue_tiny_model("llama", len(tok), seed=3).to(dtype)
    base_logits = _logits(ref, tok)
    ref_editor = _editor(ref, tok)
    model = _offloaded(kind, tok, tmp_path, dtype)
    ckpt = tmp_path / "ckpt" / "model.safetensors"
    ckpt_sha = _sha(ckpt) if ckpt.exists() else None
    editor = _editor(model, tok)
    assert {s.kind for s in editor.journal.slots.values()} == {
        "cpu" if kind in ("cpu", "block") else "disk"}
    for turn in TURNS:
        ref_editor.edit(turn)
        editor.edit(turn)
        for name in MODULES:  # bit-identical: the hooks only move the values
            assert torch.equal(editor.journal.weight(name), ref.get_submodule(name).weight)
    want = _logits(ref, tok)
    assert not torch.equal(want, base_logits)              # the edit is visible
    assert torch.equal(_logits(model, tok), want)          # ... in every later forward
    assert torch.equal(_logits(model, tok), want)
    if ckpt_sha is not None:                               # the user's checkpoint is never written
        assert _sha(ckpt) == ckpt_sha

    # save_pretrained reads offloaded weights through the hooks: the edit is in the files
    import transformers as tf
    if kind in ("cpu", "block"):  # no hf_device_map: transformers needs the values given
        from ultraedit.placement import tensor_values
        sd = {k: tensor_values(model, k, t) for k, t in model.state_dict().items()}
        model.save_pretrained(tmp_path / "saved", state_dict=sd)
    else:
        model.save_pretrained(tmp_path / "saved")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=dtype,
                                                   attn_implementation="eager").eval()
    saved = dict(back.named_parameters())
    for name, p in ref.named_parameters():     # every weight, the edited ones included
        assert torch.equal(saved[name], p), name

    # the LoRA export of an offloaded edit is the unsplit edit's
    from safetensors.torch import load_file
    got = load_file(editor.export_delta(tmp_path / "a", format="peft") + "/adapter_model.safetensors")
    want = load_file(ref_editor.export_delta(tmp_path / "b", format="peft")
                     + "/adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

    # the merged export of an offloaded model reloads to the unsplit edited model
    editor.export_delta(tmp_path / "merged", format="merged")
    merged = dict(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype)
                  .named_parameters())
    assert all(torch.equal(merged[n], p) for n, p in ref.named_parameters())

    # rollback restores the offloaded values of before the last turn
    editor.rollback()
    ref_editor.rollback()
    for name in MODULES:
        assert torch.equal(editor.journal.weight(name), ref.get_submodule(name).weight)


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_a_failed_turn_leaves_offloaded_weights_unchanged(tmp_path, ue_padded_tokenizer, kind,
                                                          monkeypatch):
    tok = ue_padded_tokenizer
    model = _offloaded(kind, tok, tmp_path)
    editor = _editor(model, tok, accumulate=False)
    editor.edit(TURNS[0])
    before = {n: editor.journal.weight(n).clone() for n in MODULES}
    files = {}
    if kind == "disk":
        files = {f: _sha(tmp_path / "offload" / f) for f in os.listdir(tmp_path / "offload")}
    real = type(editor.journal)._apply_module
    calls = []

    def fail_second(self, name, *args):
        calls.append(name)
        real(self, name, *args)       # the first module is written, then the turn fails
        if len(calls) == 2:
            raise RuntimeError("injected failure")

    monkeypatch.setattr(type(editor.journal), "_apply_module", fail_second)
    with pytest.raises(RuntimeError, match="injected"):
        editor.edit(TURNS[1])
    assert len(calls) == 2
    for n in MODULES:
        assert torch.equal(editor.journal.weight(n), before[n])
    if kind == "disk":
        assert {f: _sha(tmp_path / "offload" / f) for f in files} == files
        assert sorted(os.listdir(tmp_path / "offload")) == sorted(files)   # nothing left over
    assert editor.turns == 1


def test_an_uneditable_placement_fails_before_anything(ue_tokenizer, monkeypatch):
    tok = ue_tokenizer
    model = ue_tiny_model("llama", len(tok), seed=3)
    # a weight on the meta device that no offload hook provides
    mod = model.get_submodule(MODULES[0])
    mod.weight = torch.nn.Parameter(torch.empty_like(mod.weight, device="meta"))
    import ultraedit.preserve as preserve

    def never(*a, **k):
        raise AssertionError("the preserved keys were captured before the placement was checked")

    monkeypatch.setattr(preserve, "capture_preserved", never)
    with pytest.raises(PlacementError, match="meta weight"):
        _editor(model, tok, preserve=1.0, preserve_subjects=["France"])
    with pytest.raises(PlacementError, match="cannot hold an edit"):
        fp8 = ue_tiny_model("llama", len(tok), seed=3)
        weight_slots(fp8, {MODULES[0]: fp8.get_submodule(MODULES[0]).to(torch.float8_e4m3fn)})


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_apply_delta_and_load_state_onto_an_offloaded_base(tmp_path, ue_padded_tokenizer, kind):
    from ultraedit import apply_delta

    tok = ue_padded_tokenizer
    ref = ue_tiny_model("llama", len(tok), seed=3)
    ref_editor = _editor(ref, tok)
    ref_editor.edit(TURNS[0])
    ref_editor.export_delta(tmp_path / "delta")
    ref_editor.save_state(tmp_path / "state")
    model = apply_delta(_offloaded(kind, tok, tmp_path / "a"), tmp_path / "delta")
    assert torch.equal(_logits(model, tok), _logits(ref, tok))
    resumed = UltraEditor.load_state(tmp_path / "state", _offloaded(kind, tok, tmp_path / "b"), tok)
    resumed.edit(TURNS[1])
    ref_editor.edit(TURNS[1])
    for name in MODULES:
        assert torch.equal(resumed.journal.weight(name), ref.get_submodule(name).weight)
