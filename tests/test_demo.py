"""The ``ultraedit demo`` command: argument parsing and a small run on the embedded model."""
import json

import pytest

from ultraedit.cli import build_parser, main
from ultraedit.data.records import drop_edited_locality as _drop_edited_locality


def test_parser_defaults_and_options():
    args = build_parser().parse_args(["demo"])
    assert (args.turns, args.edits_per_turn, args.model, args.json, args.seed) == (2, 50, None, None, 0)
    args = build_parser().parse_args(["demo", "--turns", "3", "--edits-per-turn", "7", "--lr", "1e-4",
                                      "--modules", "a,b", "--model", "/m", "--json", "o.json"])
    assert (args.turns, args.edits_per_turn, args.lr, args.modules, args.model) == (3, 7, 1e-4, "a,b", "/m")
    args = build_parser().parse_args(["demo", "--steps", "4", "--positions", "answer", "--memory",
                                      "0", "--no-hold-done", "--preserve", "2"])
    assert (args.steps, args.positions, args.memory, args.hold_done, args.preserve) == (
        4, "answer", 0.0, False, 2.0)
    args = build_parser().parse_args(["demo"])
    assert (args.steps, args.positions, args.memory, args.hold_done,
            args.preserve) == (None,) * 5  # the editor's
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


@pytest.mark.parametrize("args, needle", [
    (["--json", "{tmp}"], "is a folder"),
    (["--json", "{tmp}/no/such/out.json"], "does not exist"),
    (["--threads", "-1"], "--threads"),
    (["--turns", "0"], "--turns"),
    (["--relations", "capital,nope"], "nope"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, monkeypatch, args, needle):
    """Checked before the model loads: exit 2, one line, nothing written."""
    import ultraedit.models

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(ultraedit.models, "load_model", no_work)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["demo", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ultraedit demo: error: ") and needle in err
    assert list(tmp_path.iterdir()) == []


def test_edited_prompts_are_not_locality():
    from ultraedit.data.records import EditRecord
    a = EditRecord(prompt="The capital of A is", target="X", paraphrases=["A's capital is"],
                   locality=[("The capital of B is", "Y"), ("The capital of C is", "Z")])
    b = EditRecord(prompt="The capital of B is", target="W", locality=[("A's capital is", "Q")])
    out = _drop_edited_locality([a, b])
    assert [lp.prompt for lp in out[0].locality] == ["The capital of C is"]
    assert out[1].locality == []


@pytest.mark.embedded
def test_demo_small_run(tmp_path, ue_embedded, capsys):
    path = tmp_path / "out.json"
    rc = main(["demo", "--turns", "2", "--edits-per-turn", "3", "--json", str(path),
               "--no-progress", "--threads", "1"])
    assert rc == 0
    data = json.loads(path.read_text())
    before, after = data["metrics"]["before"], data["metrics"]["after"]
    assert set(before) == set(after) == {"es", "gs", "ls"}
    assert all(0.0 <= v <= 1.0 for v in list(before.values()) + list(after.values()))
    assert after["es"] >= before["es"] + 0.3
    assert data["edits"] == 6
    assert len(data["timing"]["turn_s"]) == len(data["timing"]["fwd_bwd_s"]) == 2
    assert data["memory"]["peak_bytes"] > 0
    assert data["settings"]["preserve"] == 0.3 and data["timing"]["preserve_s"] > 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "forward+backward" in out
