"""``ultraedit run --export-delta PATH --export-format F --export-rank R``."""
import json

import pytest

from conftest import ue_tiny_model
from test_cli_run import COUNTERFACT, _base, _write
from ultraedit.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, ue_tokenizer):
    d = tmp_path_factory.mktemp("tiny_llama_export")
    ue_tiny_model("llama", len(ue_tokenizer)).save_pretrained(d)
    ue_tokenizer.save_pretrained(d)
    return str(d)


def test_run_exports_a_peft_adapter(model_dir, tmp_path):
    pytest.importorskip("peft")
    data = _write(tmp_path / "counterfact.json", COUNTERFACT)
    out = tmp_path / "adapter"
    assert main(_base(model_dir, data, tmp_path, "--format", "counterfact", "--eval", "end",
                      "--no-generation", "--modules", "model.layers.1.mlp.down_proj",
                      "--export-delta", str(out), "--export-format", "peft",
                      "--export-rank", "2")) == 0
    summary = json.loads((out / "ultraedit_export.json").read_text())
    assert summary["format"] == "peft" and summary["rank"] <= 2
    assert (out / "adapter_model.safetensors").is_file()
    run = json.loads((tmp_path / "r.json").read_text())
    assert run["export"]["format"] == "peft" and run["export"]["rank"] == 2


def test_export_options_are_checked_before_the_run(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "counterfact.json", COUNTERFACT)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("x")
    assert main(_base(model_dir, data, tmp_path, "--export-delta", str(theirs))) == 2
    assert "not an ultraedit export" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()                 # nothing ran
    assert main(_base(model_dir, data, tmp_path, "--export-delta", str(tmp_path / "d"),
                      "--export-rank", "4")) == 2
    assert main(_base(model_dir, data, tmp_path, "--export-format", "peft")) == 2
