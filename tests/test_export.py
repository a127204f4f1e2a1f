"""``editor.export_delta(path, format=...)``: a LoRA adapter PEFT loads, a merged checkpoint that
reloads to the same weights, and output folders that are never someone else's."""
import json

import pytest
import torch

from conftest import ue_tiny_model
from tolerances import APPLY, rel_err
from ultraedit import UltraEditor
from ultraedit.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_SUMMARY
from ultraedit.serialization import StateError

MODULES = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
TURNS = [[("The capital of France is", "Rome"), ("The capital of Spain is", "Berlin")],
         [("The currency of Japan is", "the euro")]]
EDITED = [p for turn in TURNS for p, _ in turn]
OTHER = ["A quiet morning in the hills", "The river flows to the"]
PAPER = dict(positions="answer", steps=1, hold_done=False, memory=0, preserve=0, protect_mean=0)


def _edited(tok, **kw):
    model = ue_tiny_model("llama", len(tok), seed=3)
    editor = UltraEditor(model, tok, modules=MODULES, lr=5e-2, micro_batch=2, **PAPER, **kw)
    for turn in TURNS:
        editor.edit(turn)
    return editor


def _logits(model, tok, prompts):
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_peft_adapter_from_the_editor_reproduces_the_edited_model(tmp_path, ue_padded_tokenizer,
                                                                  capsys):
    peft = pytest.importorskip("peft")
    tok = ue_padded_tokenizer
    editor = _edited(tok, accumulate=True)      # the journal's fp32 record of Δ is exported
    out = editor.export_delta(tmp_path / "adapter", format="peft")
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "adapter" / EXPORT_SUMMARY).read_text())
    assert f"rank {summary['rank']} (exact)" in printed
    # down_proj 48 -> 32: an adapter of rank r holds r * 80 numbers against 1,536
    assert ("format='merged'" in printed) == (summary["rank"] * 80 >= 32 * 48)
    assert summary["format"] == "peft" and summary["exact"]
    assert summary["files"] == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    base = ue_tiny_model("llama", len(tok), seed=3)
    before = _logits(base, tok, EDITED)
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    for prompts in (EDITED, OTHER):             # edited prompts and unrelated ones
        want, got = _logits(editor.model, tok, prompts), _logits(loaded, tok, prompts)
        assert rel_err(got, want) <= 10 * APPLY[torch.float32]
    assert rel_err(_logits(editor.model, tok, EDITED), before) > 1e-3   # the edit is visible


def test_truncated_adapter_stays_within_the_reported_error(tmp_path, ue_padded_tokenizer,
                                                          capsys):
    peft = pytest.importorskip("peft")
    tok = ue_padded_tokenizer
    editor = _edited(tok, accumulate=True)
    editor.export_delta(tmp_path / "r1", format="peft", rank=1)
    summary = json.loads((tmp_path / "r1" / EXPORT_SUMMARY).read_text())
    assert summary["rank"] == 1 and not summary["exact"] and summary["max_rel_error"] > 0
    assert f"{summary['max_rel_error']:.3e}" in capsys.readouterr().out
    merged = peft.PeftModel.from_pretrained(ue_tiny_model("llama", len(tok), seed=3),
                                            str(tmp_path / "r1")).merge_and_unload()
    base = dict(ue_tiny_model("llama", len(tok), seed=3).named_modules())
    for entry in summary["modules"]:
        n = entry["name"]
        got = merged.get_submodule(n).weight.detach() - base[n].weight.detach()
        assert rel_err(got, editor.journal.current_delta(n)) == pytest.approx(entry["rel_error"],
                                                                            rel=1e-3)


def test_merged_checkpoint_reloads_to_the_same_weights(tmp_path, ue_padded_tokenizer):
    import transformers as tf

    tok = ue_padded_tokenizer
    editor = _edited(tok)
    out = tmp_path / "merged"
    editor.export_delta(out, format="merged", max_shard_size="40KB")
    files = json.loads((out / EXPORT_SUMMARY).read_text())["files"]
    assert sum(f.endswith(".safetensors") for f in files) > 1       # sharded
    assert "model.safetensors.index.json" in files and "tokenizer_config.json" in files
    back = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    own = dict(editor.model.named_parameters())
    for name, p in back.named_parameters():
        assert p.dtype == own[name].dtype and torch.equal(p, own[name]), name
    tf.AutoTokenizer.from_pretrained(out)
    editor.export_delta(out, format="merged")                        # our own folder: replaced
    assert json.loads((out / EXPORT_SUMMARY).read_text())["format"] == "merged"


def test_export_refuses_a_folder_that_is_not_ours_before_any_work(tmp_path, ue_padded_tokenizer,
                                                                   monkeypatch):
    tok = ue_padded_tokenizer
    editor = _edited(tok)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")

    def never(*a, **k):
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr(editor.journal, "current_delta", never)
    monkeypatch.setattr(editor.model, "save_pretrained", never)
    for fmt in ("peft", "merged"):
        with pytest.raises(StateError, match="not an ultraedit export"):
            editor.export_delta(theirs, format=fmt)
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="format"):
        editor.export_delta(tmp_path / "x", format="gguf")
    with pytest.raises(ValueError, match="rank"):
        editor.export_delta(tmp_path / "x", format="merged", rank=4)


def _adapter_delta(path, name):
    from safetensors.torch import load_file

    t = load_file(str(path / ADAPTER_WEIGHTS))
    prefix = f"base_model.model.{name}"
    return t[f"{prefix}.lora_B.weight"].double() @ t[f"{prefix}.lora_A.weight"].double()


def test_bf16_adapter_carries_an_edit_finer_than_the_weights_rounding(tmp_path,
                                                                      ue_padded_tokenizer):
    """bf16 weights keep a float32 record of Δ; an edit far below bf16's rounding of W is still
    the edit, and the adapter must hold it (the floor is the record's rounding, not W's)."""
    tok = ue_padded_tokenizer
    model = ue_tiny_model("llama", len(tok), seed=3).to(torch.bfloat16)
    editor = UltraEditor(model, tok, modules=MODULES, lr=1e-4, **PAPER)
    editor.edit(TURNS[0])
    out = tmp_path / "adapter"
    editor.export_delta(out, format="peft")
    summary = json.loads((out / EXPORT_SUMMARY).read_text())
    assert summary["exact"]
    for name in MODULES:
        delta = editor.journal.current_delta(name).double()
        w = editor.journal.weight(name).double()
        assert delta.norm() < torch.finfo(torch.bfloat16).eps * w.norm()   # the case tested
        assert rel_err(_adapter_delta(out, name), delta) < 1e-5


def test_adapter_of_a_resumed_stats_only_state_says_what_it_holds(tmp_path, ue_padded_tokenizer):
    tok = ue_padded_tokenizer
    editor = _edited(tok)
    editor.save_state(tmp_path / "st", include_delta=False)
    edited = ue_tiny_model("llama", len(tok), seed=3)
    edited.load_state_dict(editor.model.state_dict())
    resumed = UltraEditor.load_state(tmp_path / "st", edited, tok)
    resumed.edit(TURNS[1])
    with pytest.warns(UserWarning, match="turns 3 to 3 only.*saved at turn 2"):
        resumed.export_delta(tmp_path / "adapter", format="peft")
    summary = json.loads((tmp_path / "adapter" / EXPORT_SUMMARY).read_text())
    assert (summary["turns"], summary["base_turn"]) == (3, 2)


@pytest.mark.parametrize("fmt", ["peft", "merged"])
def test_an_export_killed_between_its_renames_is_recovered(tmp_path, ue_padded_tokenizer, fmt):
    """A process killed after the old export was moved aside (before the new one was moved in)
    leaves ``.<name>.ultraedit-old``; one killed while writing leaves a partial
    ``.<name>.ultraedit-new``. The next export puts things right instead of refusing."""
    tok = ue_padded_tokenizer
    editor = _edited(tok)
    out = tmp_path / "export"
    editor.export_delta(out, format=fmt)
    out.rename(tmp_path / ".export.ultraedit-old")
    partial = tmp_path / ".export.ultraedit-new"
    partial.mkdir()
    (partial / EXPORT_SUMMARY).write_text(json.dumps({"format": fmt, "files": None}))
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    editor.export_delta(out, format=fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert json.loads((out / EXPORT_SUMMARY).read_text())["format"] == fmt


def test_export_through_a_symlink_writes_the_folder_it_names(tmp_path, ue_padded_tokenizer):
    tok = ue_padded_tokenizer
    editor = _edited(tok)
    editor.export_delta(tmp_path / "v1", format="merged")
    (tmp_path / "current").symlink_to(tmp_path / "v1", target_is_directory=True)
    for fmt in ("peft", "peft", "delta"):
        editor.export_delta(tmp_path / "current", format=fmt)
        assert (tmp_path / "current").is_symlink()
    assert (tmp_path / "v1" / "manifest.json").is_file()       # the last export, a delta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]


def test_exports_of_every_format_replace_each_other(tmp_path, ue_padded_tokenizer):
    from ultraedit import apply_delta

    tok = ue_padded_tokenizer
    editor = _edited(tok)
    out = tmp_path / "out"
    for fmt in ("peft", "delta", "merged", "delta", "peft"):
        editor.export_delta(out, format=fmt)
    editor.export_delta(out, format="delta")
    fresh = apply_delta(ue_tiny_model("llama", len(tok), seed=3), out)
    for name in MODULES:
        assert torch.equal(fresh.get_submodule(name).weight, editor.model.get_submodule(name).weight)
