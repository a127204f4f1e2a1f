"""The state/delta directory format's guarantees: a checksummed manifest (a flipped bit anywhere
is a clear StateError), only our own directories are replaced, and a process killed between
the two renames of a save leaves a path that still loads (the old or the new state)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _state_common import MODULES, one_thread, tiny_llama, turn_requests  # noqa: F401
from conftest import ue_make_tokenizer
from ultraedit import UltraEditor
from ultraedit.serialization import MANIFEST, StateError, read_dir, write_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return ue_make_tokenizer(with_bos=True)


@pytest.fixture(scope="module")
def saved_state(tok, tmp_path_factory):
    ed = UltraEditor(tiny_llama(len(tok)), tok, modules=MODULES, lr=1e-6, micro_batch=3)
    ed.edit(turn_requests(0))
    path = tmp_path_factory.mktemp("state") / "st"
    ed.save_state(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ------------------------------------------------------------------ integrity
def test_bit_flips_anywhere_in_the_manifest_are_state_errors(saved_state, tmp_path):
    """Every byte of the manifest with one bit flipped (a random bit per byte; every bit of
    the configuration's bytes) is refused with a StateError."""
    path = _copy(saved_state, tmp_path / "st")
    raw = (path / MANIFEST).read_bytes()
    config = range(raw.index(b'"config"'), raw.index(b"}", raw.index(b'"config"')) + 1)
    gen = torch.Generator().manual_seed(0)
    flips = [(i, int(torch.randint(8, (1,), generator=gen))) for i in range(len(raw))]
    flips += [(i, bit) for i in config for bit in range(8)]
    for i, bit in flips:
        bad = bytearray(raw)
        bad[i] ^= 1 << bit
        (path / MANIFEST).write_bytes(bytes(bad))
        with pytest.raises(StateError):
            read_dir(path, expect_kind="state")
    (path / MANIFEST).write_bytes(raw)
    read_dir(path, expect_kind="state")  # the intact manifest reads


def test_a_flipped_lr_does_not_load(saved_state, tmp_path, tok):
    path = _copy(saved_state, tmp_path / "st")
    text = (path / MANIFEST).read_text()
    assert '"lr": 1e-06' in text
    (path / MANIFEST).write_text(text.replace('"lr": 1e-06', '"lr": 1e-16'))
    with pytest.raises(StateError, match="checksum"):
        UltraEditor.load_state(path, tiny_llama(len(tok)), tok)
    (path / MANIFEST).write_text(text.replace('"lr": 1e-06', '"lr": 1E-06'))  # same value
    with pytest.raises(StateError, match="checksum"):
        UltraEditor.load_state(path, tiny_llama(len(tok)), tok)


# ------------------------------------------------------------------ only our directories
@pytest.mark.parametrize("foreign", [
    {MANIFEST: json.dumps({"name": "my project", "version": 3}), "notes.txt": "mine"},
    {MANIFEST: "not json at all", "data.bin": "1234"},
])
def test_a_foreign_folder_with_a_manifest_is_not_replaced(foreign, tmp_path, tok):
    path = tmp_path / "project"
    path.mkdir()
    for name, text in foreign.items():
        (path / name).write_text(text)
    ed = UltraEditor(tiny_llama(len(tok)), tok, modules=MODULES)
    with pytest.raises(StateError, match="refusing to overwrite"):
        ed.save_state(path)
    with pytest.raises(StateError, match="refusing to overwrite"):
        ed.export_delta(path)
    assert {p.name: p.read_text() for p in path.iterdir()} == foreign
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # nothing left beside it


def test_a_state_and_an_export_never_replace_each_other(saved_state, tmp_path, tok):
    """A saved state is the only way to resume: an export to its folder is refused (every
    format), and so is a save over an export."""
    state = _copy(saved_state, tmp_path / "st")
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    ed = UltraEditor(tiny_llama(len(tok)), tok, modules=MODULES)
    for fmt in ("delta", "peft", "merged"):
        with pytest.raises(StateError, match="refusing to overwrite"):
            ed.export_delta(state, format=fmt)
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    export = tmp_path / "delta"
    ed.export_delta(export)
    exported = {p.name: p.read_bytes() for p in export.iterdir()}
    with pytest.raises(StateError, match="holds an export, not a saved state"):
        ed.save_state(export)
    assert {p.name: p.read_bytes() for p in export.iterdir()} == exported
    ed.export_delta(export)   # an export over our export is still replaced


def test_our_state_with_a_users_file_in_it_is_not_replaced(saved_state, tmp_path, tok):
    path = _copy(saved_state, tmp_path / "st")
    (path / "notes.txt").write_text("mine")
    ed = UltraEditor(tiny_llama(len(tok)), tok, modules=MODULES)
    with pytest.raises(StateError, match="notes.txt"):
        ed.save_state(path)
    assert (path / "notes.txt").read_text() == "mine"


def test_our_state_is_replaced(saved_state, tmp_path, tok):
    path = _copy(saved_state, tmp_path / "st")
    ed = UltraEditor(tiny_llama(len(tok)), tok, modules=MODULES)
    ed.save_state(path)
    assert read_dir(path, "state")[0]["turns"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]


# ------------------------------------------------------------------ killed between the renames
_KILLED_SAVE = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{root!r}, {python!r}]
    import torch
    import ultraedit.serialization as S

    path, kill_at, fresh = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "fresh"
    if not fresh:
        S.write_dir(path, {{"a.safetensors": {{"x": torch.zeros(3)}}}}, {{"kind": "state", "n": 1}})
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(1)
        if len(calls) == kill_at:
            os._exit(9)  # killed: no exception handler, no cleanup
        return real(src, dst)

    S.os.replace = replace
    S.write_dir(path, {{"a.safetensors": {{"x": torch.ones(3)}}}}, {{"kind": "state", "n": 2}})
""")


@pytest.mark.parametrize("kill_at,expect", [(1, 1), (2, 1)])
def test_a_save_killed_during_the_renames_leaves_a_loadable_state(tmp_path, kill_at, expect):
    """kill_at=1: before the old state is moved aside; 2: between the two renames (the path is
    gone until the next read or write puts the old state back)."""
    path = tmp_path / "st"
    script = _KILLED_SAVE.format(root=str(ROOT), python=str(ROOT / "python"))
    proc = subprocess.run([sys.executable, "-c", script, str(path), str(kill_at), "existing"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "st")
    assert leftovers, "the kill left nothing to recover (the test did not hit the renames)"
    assert path.exists() == (kill_at == 1)
    manifest, files = read_dir(path, "state")            # recovers, then reads
    assert manifest["n"] == expect and torch.equal(files["a.safetensors"]["x"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]  # leftovers removed
    write_dir(path, {"a.safetensors": {"x": torch.full((3,), 2.0)}}, {"kind": "state", "n": 3})
    assert read_dir(path, "state")[0]["n"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]


def test_a_fresh_save_killed_after_writing_installs_the_new_state(tmp_path):
    path = tmp_path / "st"
    script = _KILLED_SAVE.format(root=str(ROOT), python=str(ROOT / "python"))
    # nothing to move aside: the only rename (new -> path) is call 1
    proc = subprocess.run([sys.executable, "-c", script, str(path), "1", "fresh"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert not path.exists()
    assert read_dir(path, "state")[0]["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]


def test_a_save_interrupted_between_renames_keeps_the_editor_state(tok, tmp_path, monkeypatch):
    """An error between the renames of a real editor state puts the previous state back; what
    a save could not clean up is removed by the next load."""
    import ultraedit.serialization as S

    model = tiny_llama(len(tok))
    ed = UltraEditor(model, tok, modules=MODULES, lr=1e-3, micro_batch=3)
    ed.edit(turn_requests(0))
    path = ed.save_state(tmp_path / "st")
    weights = {n: m.weight.detach().clone() for n, m in ed.modules.items()}
    ed.edit(turn_requests(1))

    class Killed(BaseException):
        pass

    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(src, dst)

    monkeypatch.setattr(S.os, "replace", replace)
    monkeypatch.setattr(S.shutil, "rmtree", lambda *a, **k: None)  # a kill cleans nothing up
    with pytest.raises(Killed):
        ed.save_state(path)
    monkeypatch.undo()
    back = UltraEditor.load_state(path, tiny_llama(len(tok)), tok)
    assert back.turns == 1
    for n, m in back.modules.items():
        assert torch.equal(m.weight, weights[n])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]


@pytest.mark.parametrize("where", ["creating", "writing", "renaming"])
def test_json_write_interrupted_anywhere_leaves_no_temporary_file(tmp_path, monkeypatch, where):
    """A KeyboardInterrupt (Ctrl-C) inside the call that creates the temporary file, while it is
    written, or at the rename: the old file stays whole and nothing else stays behind."""
    import ultraedit.serialization as ser

    out = tmp_path / "r.json"
    ser.write_json_atomic({"old": 1}, out)
    real_open, real_replace, real_dump = os.open, os.replace, json.dump

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def open_then_interrupt(*args, **kwargs):
        real_open(*args, **kwargs)          # the file exists, its descriptor is never returned
        raise KeyboardInterrupt

    if where == "creating":
        monkeypatch.setattr(ser.os, "open", open_then_interrupt)
    elif where == "writing":
        monkeypatch.setattr(ser.json, "dump", interrupted)
    else:
        monkeypatch.setattr(ser.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ser.write_json_atomic({"new": 2}, out)
    monkeypatch.setattr(ser.os, "open", real_open)
    monkeypatch.setattr(ser.os, "replace", real_replace)
    monkeypatch.setattr(ser.json, "dump", real_dump)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert json.loads(out.read_text()) == {"old": 1}


def test_a_symlinked_state_folder_is_saved_through_the_link(tmp_path, tok):
    """The state lands in the link's target, the link stays, and a second save works."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    ed = UltraEditor(tiny_llama(len(tok)), tok, modules=MODULES)
    ed.save_state(link)
    ed.save_state(link)
    assert link.is_symlink() and (real / MANIFEST).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_json_through_a_symlink_and_to_a_fifo(tmp_path):
    """A symlinked JSON file's target is replaced (the link stays); a FIFO is written in place."""
    import os
    import threading

    from ultraedit.serialization import write_json_atomic

    target = tmp_path / "target.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_json_atomic({"a": 1}, link)
    assert link.is_symlink() and json.loads(target.read_text()) == {"a": 1}
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    write_json_atomic({"b": 2}, fifo)
    reader.join(10)
    assert json.loads(got[0]) == {"b": 2} and fifo.exists() and not fifo.is_file()
