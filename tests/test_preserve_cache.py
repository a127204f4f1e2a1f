"""Preserved-subject keys are cached on disk per model: a second editor on the same unedited
model loads them (bit-identical to a fresh capture); a corrupt entry is ignored and recaptured."""
import pytest
import torch

import ultraedit.preserve as preserve
from conftest import ue_tiny_model
from ultraedit import UltraEditor

MODULES = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
OPTS = dict(modules=MODULES, positions="subject", preserve=1.0,
            preserve_subjects=["France", "Japan", "Peru"], preserve_contexts=["{s}", "I saw {s}"])


class Count:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = preserve._capture_rows

        def counted(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(preserve, "_capture_rows", counted)


def _keys(editor):
    return {n: pk.keys for n, pk in editor.state.preserved.items()}


def test_second_editor_loads_the_keys_bit_identical(tmp_path, ue_tokenizer, monkeypatch):
    monkeypatch.setenv(preserve.CACHE_ENV, str(tmp_path / "cache"))
    count = Count(monkeypatch)
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=3)
    first = UltraEditor(model, ue_tokenizer, **OPTS)
    assert count.calls == 1 and len(list((tmp_path / "cache").iterdir())) == 1
    second = UltraEditor(model, ue_tokenizer, **OPTS)
    assert count.calls == 1                                  # from the cache
    assert (first.preserve_cached, second.preserve_cached) == (False, True)
    monkeypatch.setenv(preserve.CACHE_ENV, "off")
    fresh = UltraEditor(model, ue_tokenizer, **OPTS)         # the cache disabled: captured
    assert count.calls == 2
    for a, b, c in zip(_keys(first).values(), _keys(second).values(), _keys(fresh).values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert second.state.preserved[MODULES[0]].owners == fresh.state.preserved[MODULES[0]].owners


def test_the_key_follows_weights_texts_and_modules(tmp_path, ue_tokenizer, ue_tokenizer_nobos,
                                                   monkeypatch):
    monkeypatch.setenv(preserve.CACHE_ENV, str(tmp_path / "cache"))
    count = Count(monkeypatch)
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=3)
    editor = UltraEditor(model, ue_tokenizer, **OPTS)
    editor.edit([("The capital of France is", "Rome", "France")])   # the weights change
    UltraEditor(model, ue_tokenizer, **OPTS)
    assert count.calls == 2
    UltraEditor(model, ue_tokenizer, **{**OPTS, "preserve_contexts": ["{s} is"]})
    UltraEditor(model, ue_tokenizer, **{**OPTS, "modules": MODULES[:1]})
    UltraEditor(model, ue_tokenizer_nobos, **OPTS)           # another tokenizer (no BOS)
    with torch.no_grad():   # a weight the edited modules do not hold, upstream of them
        model.model.embed_tokens.weight[5, 0] += 1.0
    UltraEditor(model, ue_tokenizer, **OPTS)
    assert count.calls == 6


def test_a_corrupt_entry_is_ignored_and_recaptured(tmp_path, ue_tokenizer, monkeypatch):
    monkeypatch.setenv(preserve.CACHE_ENV, str(tmp_path / "cache"))
    count = Count(monkeypatch)
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=3)
    first = UltraEditor(model, ue_tokenizer, **OPTS)
    entry = next((tmp_path / "cache").iterdir())
    data = bytearray((entry / "preserve.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (entry / "preserve.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="ignoring the preserved-key cache entry"):
        again = UltraEditor(model, ue_tokenizer, **OPTS)
    assert count.calls == 2
    for a, b in zip(_keys(first).values(), _keys(again).values()):
        assert torch.equal(a, b)
    UltraEditor(model, ue_tokenizer, **OPTS)                  # the entry was rewritten
    assert count.calls == 2


def test_offloaded_model_keys_are_cached_and_equal_the_unsplit_capture(tmp_path, ue_tokenizer,
                                                                        monkeypatch):
    accelerate = pytest.importorskip("accelerate")
    fresh = UltraEditor(ue_tiny_model("llama", len(ue_tokenizer), seed=3), ue_tokenizer, **OPTS)
    monkeypatch.setenv(preserve.CACHE_ENV, str(tmp_path / "cache"))
    count = Count(monkeypatch)
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=3)
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
          "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
          "lm_head": "cpu"}
    accelerate.dispatch_model(model, dm, offload_dir=str(tmp_path / "offload"))
    UltraEditor(model, ue_tokenizer, **OPTS)
    second = UltraEditor(model, ue_tokenizer, **OPTS)
    assert count.calls == 1
    for a, b in zip(_keys(fresh).values(), _keys(second).values()):
        assert torch.equal(a, b)


def test_mined_subjects_are_cached_per_model(tmp_path, ue_tokenizer, ue_tokenizer_nobos,
                                             monkeypatch):
    """The mined names are read back for the same weights and tokenizer, mined again for
    others; the key cache entry follows the expanded names (':generic' vs ':tables')."""
    monkeypatch.setenv(preserve.CACHE_ENV, str(tmp_path / "cache"))
    mined = []

    def fake(model, tok):
        mined.append(model)
        return ["Ada Lovelace", f"Bach{len(mined)}"]

    monkeypatch.setattr(preserve, "mine_subjects", fake)
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=3)
    first = preserve.mined_subjects(model, ue_tokenizer)
    assert preserve.mined_subjects(model, ue_tokenizer) == first == ["Ada Lovelace", "Bach1"]
    assert len(mined) == 1 and len(list((tmp_path / "cache").glob("mined-*.json"))) == 1
    assert preserve.mined_subjects(model, ue_tokenizer_nobos) == ["Ada Lovelace", "Bach2"]
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 0] += 1.0
    assert preserve.mined_subjects(model, ue_tokenizer) == ["Ada Lovelace", "Bach3"]
    for entry in (tmp_path / "cache").glob("mined-*.json"):
        entry.write_text("not json")                                 # corrupt: mined again
    assert preserve.mined_subjects(model, ue_tokenizer) == ["Ada Lovelace", "Bach4"]
    assert preserve.mined_subjects(model, ue_tokenizer) == ["Ada Lovelace", "Bach4"]
    monkeypatch.setenv(preserve.CACHE_ENV, "off")
    preserve.mined_subjects(model, ue_tokenizer)
    assert len(mined) == 5
    monkeypatch.setattr(preserve, "mine_subjects", lambda model, tok: [])
    with pytest.raises(ValueError, match="named no entity"):
        preserve.mined_subjects(model, ue_tokenizer)

    monkeypatch.setenv(preserve.CACHE_ENV, str(tmp_path / "keys"))
    monkeypatch.setattr(preserve, "mined_subjects", lambda model, tok: ["Ada Lovelace", "Bach"])
    count = Count(monkeypatch)
    opts = {**OPTS, "preserve_subjects": None}
    generic = UltraEditor(model, ue_tokenizer, **opts)
    UltraEditor(model, ue_tokenizer, **{**opts, "preserve_subjects": [":generic"]})
    assert count.calls == 1   # the same names: the same entry
    UltraEditor(model, ue_tokenizer, **{**opts, "preserve_subjects": ["Ada Lovelace"]})
    assert count.calls == 2
    assert generic.state.preserved[MODULES[0]].owners == [s for s in ("Ada Lovelace", "Bach")
                                                          for _ in range(2)]


def _entry_inputs(tmp_path, ue_tokenizer, monkeypatch):
    monkeypatch.setenv(preserve.CACHE_ENV, "off")
    editor = UltraEditor(ue_tiny_model("llama", len(ue_tokenizer), seed=3), ue_tokenizer, **OPTS)
    keys = editor.state.preserved
    return keys, keys[MODULES[0]].owners


def test_concurrent_writers_of_one_entry_all_succeed(tmp_path, ue_tokenizer, monkeypatch):
    """Two processes that start at once capture the same keys and both cache them: each writes
    in a folder of its own, the first rename wins, the other keeps it; neither warns, disturbs
    the other's half-written files or leaves its own behind."""
    import threading
    import warnings

    keys, owners = _entry_inputs(tmp_path, ue_tokenizer, monkeypatch)
    cache = tmp_path / "cache"
    cache.mkdir()
    foreign = cache / ".other.ultraedit-new"      # another writer's entry, half-written
    foreign.mkdir()
    (foreign / "preserve.safetensors").write_bytes(b"half")
    for trial in range(8):
        path = cache / f"entry{trial}"
        barrier = threading.Barrier(3)
        caught = []

        def write():
            barrier.wait()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                preserve._write_cached(path, keys, owners)
            caught.extend(str(w.message) for w in seen)

        threads = [threading.Thread(target=write) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert caught == []
        got = preserve._read_cached(path, {n: torch.nn.Linear(1, 1) for n in MODULES}, owners)
        assert got is not None and all(torch.equal(got[n].keys, keys[n].keys) for n in MODULES)
    assert (foreign / "preserve.safetensors").read_bytes() == b"half"
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [".other.ultraedit-new"] + [f"entry{i}" for i in range(8)])


def test_a_corrupt_entry_is_replaced_in_place(tmp_path, ue_tokenizer, monkeypatch):
    keys, owners = _entry_inputs(tmp_path, ue_tokenizer, monkeypatch)
    path = tmp_path / "cache" / "entry"
    preserve._write_cached(path, keys, owners)
    (path / "preserve.safetensors").write_bytes(b"garbage")
    assert not preserve._valid_entry(path)
    preserve._write_cached(path, keys, owners)
    assert preserve._valid_entry(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["entry"]
