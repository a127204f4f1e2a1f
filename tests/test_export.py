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
