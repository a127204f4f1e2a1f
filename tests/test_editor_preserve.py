"""UltraEditor's preserved subjects (``preserve=μ``, ``ultraedit.preserve``)."""

import pytest
import torch

from _state_common import one_thread  # noqa: F401 (autouse: one torch thread)
from conftest import ue_tiny_model
from fp64_reference import pseudo_values_fp64
from test_editor_hold_positions import MODS, REQUESTS, Spy, stats_equal
from ultraedit import UltraEditor
from ultraedit.preserve import PreservedKeys, capture_subject_keys, default_subjects
from ultraedit.tokenization import encode_request, subject_token_index

# odd count, names with spaces, one subject that REQUESTS edits (France) and one it does not
SUBJECTS = ["France", "Spain", "New York", "Lima", "Kenya", "the Netherlands", "Oslo"]
CONTEXTS = ("{s}", "I read a long article about {s}")


def hand_keys(model, tok, name, subjects, contexts=CONTEXTS):
    """The module's input at the subject's last token, one full forward per text."""
    module = dict(model.named_modules())[name]
    rows = []
    for s in subjects:
        for c in contexts:
            text = c.format(s=s)
            text = text[:1].upper() + text[1:]
            subject = s if s in text else s[:1].upper() + s[1:]
            ids = encode_request(tok, text, "x")[0]
            box = []
            h = module.register_forward_pre_hook(lambda m, a: box.append(a[0][0].detach()))
            with torch.no_grad():
                model(torch.tensor([ids]))
            h.remove()
            rows.append(box[0][subject_token_index(tok, text, subject)].double())
    return torch.stack(rows)


@pytest.mark.parametrize("kind,mods", [("llama", MODS), ("gpt2", ["transformer.h.1.mlp.c_proj"])])
def test_capture_equals_a_full_forward_per_text(ue_tokenizer, kind, mods):
    model = ue_tiny_model(kind, len(ue_tokenizer), seed=3)
    named = dict(model.named_modules())
    got = capture_subject_keys(model, ue_tokenizer, {m: named[m] for m in mods}, SUBJECTS,
                               batch_size=4)  # several batches of unequal lengths
    for m in mods:
        pk = got[m]
        assert pk.owners == [s for s in SUBJECTS for _ in CONTEXTS]
        torch.testing.assert_close(pk.keys.double(), hand_keys(model, ue_tokenizer, m, SUBJECTS),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pk.gram, pk.keys.double().T @ pk.keys.double())


def test_gram_without_leaves_out_every_row_of_the_subjects():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(9, 7, generator=gen) + 0.5
    owners = ["a", "b", "c", "a", "b", "c", "d", "d", "a"]
    pk = PreservedKeys(keys, owners)
    kept = keys.double()[[i for i, o in enumerate(owners) if o not in ("a", "d")]]
    torch.testing.assert_close(pk.gram_without({"a", "d", "zz"}), kept.T @ kept)
    torch.testing.assert_close(pk.gram_without(()), keys.double().T @ keys.double())
    assert pk.gram_without(()) is not pk.gram  # the caller may change it
    with pytest.raises(ValueError, match="len\\(owners\\)"):
        PreservedKeys(keys, owners[:-1])
    with pytest.raises(FloatingPointError):
        PreservedKeys(keys.index_fill(0, torch.tensor([2]), float("nan")), owners)


@pytest.mark.parametrize("memory", [0.0, 2.0])
def test_preserved_turns_solve_the_float64_system(ue_tokenizer, monkeypatch, memory):
    """Each turn's ΔW = (KᵀK + νM + μK_p'ᵀK_p' + λI)⁻¹KᵀV with K_p' without the turn's subjects."""
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=2)
    named = dict(model.named_modules())
    want_keys = {m: hand_keys(model, ue_tokenizer, m, SUBJECTS) for m in MODS}
    spy = Spy(monkeypatch)
    lr, ridge, mu = 1e-2, 0.5, 3.0
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=lr, ridge=ridge, memory=memory,
                     preserve=mu, preserve_subjects=SUBJECTS, steps=1, positions="subject")
    assert ed.preserve_s > 0
    first = {}
    for turn, reqs in enumerate((REQUESTS[:3], REQUESTS[3:])):
        spy.calls.clear()
        ed.edit(reqs)
        edited = {r["subject"] for r in reqs}
        keep = [i for i, s in enumerate(s for s in SUBJECTS for _ in CONTEXTS) if s not in edited]
        assert len(keep) < len(SUBJECTS) * len(CONTEXTS) or turn == 1
        for call in spy.calls:
            k = call["k"].double()
            v = pseudo_values_fp64(call["k"], call["g"], call["mean"], call["std"], lr)
            kp = want_keys[call["name"]][keep]
            system = k.T @ k + mu * kp.T @ kp + ridge * torch.eye(k.shape[1], dtype=torch.float64)
            if turn == 1 and memory:
                m = first[call["name"]]
                system += memory * m.T @ m
            dw = torch.linalg.solve(system, k.T @ v)
            (kind, t), factor_keys = call["out"]
            got = factor_keys.double().T @ t.double() if kind == "dual" else t.double()
            torch.testing.assert_close(got, dw, rtol=1e-4, atol=1e-4 * float(dw.abs().max()))
            first[call["name"]] = k
    assert named[MODS[0]].weight.grad is None


def test_preserve_lowers_the_change_on_preserved_subjects(ue_tokenizer):
    """On the preserved subjects' own keys, the edit moves the outputs far less than without."""
    def change(mu):
        model = ue_tiny_model("llama", len(ue_tokenizer), seed=4)
        named = dict(model.named_modules())
        before = {m: named[m].weight.detach().clone() for m in MODS}
        others = [s for s in SUBJECTS if s not in {r["subject"] for r in REQUESTS[:3]}]
        keys = {m: hand_keys(model, ue_tokenizer, m, others).float() for m in MODS}
        ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=5e-2, steps=1, positions="subject",
                         preserve=mu, preserve_subjects=SUBJECTS)
        ed.edit(REQUESTS[:3])
        return sum(float((keys[m] @ (named[m].weight.detach() - before[m]).T).norm())
                   for m in MODS)
    assert change(1e3) < 0.25 * change(0.0)  # the tiny model's keys are short: μ must be large


def test_preserve_survives_save_load_and_rollback(ue_tokenizer, tmp_path):
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=2)
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, lr=1e-2, steps=1, positions="subject",
                     preserve=2.0, preserve_subjects=SUBJECTS, history=2)
    ed.edit(REQUESTS[:2])
    ed.save_state(tmp_path / "s")
    fresh = ue_tiny_model("llama", len(ue_tokenizer), seed=2)
    back = UltraEditor.load_state(tmp_path / "s", fresh, ue_tokenizer)
    assert back.preserve == 2.0 and stats_equal(back.stats, ed.stats)
    assert stats_equal(back.state.memory, ed.state.memory)
    for m in MODS:  # the saved keys (of the unedited model), not keys of the edited one
        assert back.preserved[m].owners == ed.preserved[m].owners
        assert torch.equal(back.preserved[m].keys, ed.preserved[m].keys)
    ed.edit(REQUESTS[2:])
    back.edit(REQUESTS[2:])
    named_a, named_b = dict(model.named_modules()), dict(fresh.named_modules())
    for m in MODS:
        assert torch.equal(named_a[m].weight, named_b[m].weight)
    ed.rollback(1)
    assert torch.equal(ed.preserved[MODS[0]].keys, back.preserved[MODS[0]].keys)


def test_preserve_validation(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer))
    for bad in (-1.0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="preserve"):
            UltraEditor(model, ue_tokenizer, modules=MODS, preserve=bad)
    with pytest.raises(ValueError, match="list of subject names"):
        UltraEditor(model, ue_tokenizer, modules=MODS, preserve=1.0, preserve_subjects="France")
    with pytest.raises(ValueError, match="empty"):
        UltraEditor(model, ue_tokenizer, modules=MODS, preserve=1.0, preserve_subjects=[])
    with pytest.raises(ValueError, match="non-empty string"):
        UltraEditor(model, ue_tokenizer, modules=MODS, preserve=1.0, preserve_subjects=["a", " "])
    for bad in ("{s}", [], ["no subject here"], [3]):
        with pytest.raises(ValueError, match="preserve_contexts|'\\{s\\}'"):
            UltraEditor(model, ue_tokenizer, modules=MODS, preserve=1.0, preserve_subjects=["a"],
                        preserve_contexts=bad)
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, preserve=1.0, preserve_subjects=SUBJECTS,
                     preserve_contexts=["In {s}", "{s}", "We went to {s}"])
    assert ed.preserved[MODS[0]].keys.shape[0] == 3 * len(SUBJECTS)
    ed = UltraEditor(model, ue_tokenizer, modules=MODS)
    assert ed.preserve == 0.0 and ed.preserved == {}  # the paper; nothing captured
    assert UltraEditor(model, ue_tokenizer, modules=MODS, compat="official").preserve == 0.0


def test_default_subjects_are_countries_then_cities():
    from ultraedit.data.offline import city_table, country_table

    names = default_subjects(n_cities=5)
    countries = [r["name"] for r in country_table()]
    assert names[:len(countries)] == countries
    assert names[len(countries):] == [c["name"] for c in city_table()[:5]]
    assert len(set(names)) == len(names)


# ------------------------------------------------------------------ the subjects' sources
def test_sources_expand_in_place_without_duplicates(ue_tokenizer, monkeypatch):
    import ultraedit.preserve as preserve

    monkeypatch.setattr(preserve, "mined_subjects", lambda model, tok: ["Ada Lovelace", "Lima"])
    model = object()
    assert preserve.resolve_subjects([":tables"]) == default_subjects()
    assert preserve.resolve_subjects(None, model, ue_tokenizer) == ["Ada Lovelace", "Lima"]
    assert preserve.DEFAULT_SOURCE == preserve.GENERIC
    assert preserve.resolve_subjects(["Oslo", ":generic", "Lima", "Oslo"], model,
                                     ue_tokenizer) == ["Oslo", "Ada Lovelace", "Lima"]
    with pytest.raises(ValueError, match="unknown preserved-subject source ':cities'"):
        preserve.resolve_subjects([":cities"])
    with pytest.raises(ValueError, match="mined from a model"):
        preserve.resolve_subjects([":generic"])


def test_extract_spans_finds_names_not_function_words():
    from ultraedit.preserve import extract_spans

    text = ("J.K. Rowling wrote Harry Potter and the Philosopher's Stone. He said it's true; "
            "I'm sure. The Beatles met IBM and Coca-Cola in the Bank of England's hall, "
            "Jamaican Jamaican Jamaican.\nSo Steve Jobs & Ada")
    assert extract_spans(text) == ["J.K. Rowling", "Harry Potter", "Philosopher Stone",
                                   "Beatles", "IBM", "Coca-Cola", "Bank of England",
                                   "Steve Jobs", "Ada"]
    assert extract_spans("he went home. it was late") == []


def _fake_continuations(monkeypatch, tok, texts):
    """greedy_continuations answers each prompt with ``texts[prompt]`` (else nothing)."""
    import ultraedit.eval.probing as probing

    seen = []

    def fake(model, tokenizer, ids, n):
        prompts = [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        seen.append(prompts)
        return [tokenizer.encode(texts.get(p, " and so on."), add_special_tokens=False)
                for p in prompts]

    monkeypatch.setattr(probing, "greedy_continuations", fake)
    return seen


def test_mined_subjects_leave_out_the_tables_and_go_one_round_deeper(ue_tokenizer, monkeypatch):
    from ultraedit.preserve import mine_subjects

    texts = {"My favourite writer is": " Ada Lovelace, who lived in Paris and Rome.",
             "My favourite band is": " the Rolling Stones from the United Kingdom. Ada Lovelace",
             "Ada Lovelace is": " a friend of Charles Babbage.",
             "Rolling Stones is": " a band."}
    seen = _fake_continuations(monkeypatch, ue_tokenizer, texts)
    prompts = ["My favourite writer is", "My favourite band is"]
    got = mine_subjects(None, ue_tokenizer, prompts)
    # Paris, Rome and the United Kingdom are table names: left out
    assert got == ["Ada Lovelace", "Rolling Stones", "Charles Babbage"]
    assert seen == [prompts, ["Ada Lovelace is", "Rolling Stones is"]]
    assert mine_subjects(None, ue_tokenizer, prompts, rounds=1) == ["Ada Lovelace",
                                                                    "Rolling Stones"]
    assert mine_subjects(None, ue_tokenizer, prompts, limit=1) == ["Ada Lovelace"]
    assert "Paris" in mine_subjects(None, ue_tokenizer, prompts, rounds=1, exclude_tables=False)


def test_the_default_preserves_mined_subjects(ue_tokenizer, monkeypatch):
    import ultraedit.preserve as preserve

    monkeypatch.setenv(preserve.CACHE_ENV, "off")
    monkeypatch.setattr(preserve, "mine_subjects", lambda model, tok: ["Ada Lovelace", "Bach"])
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=3)
    ed = UltraEditor(model, ue_tokenizer, modules=MODS, positions="subject", preserve=1.0)
    assert ed.preserved[MODS[0]].owners == [s for s in ("Ada Lovelace", "Bach")
                                            for _ in CONTEXTS]
    tables = UltraEditor(model, ue_tokenizer, modules=MODS, positions="subject", preserve=1.0,
                         preserve_subjects=[":tables"], preserve_contexts=["{s}"])
    assert tables.preserved[MODS[0]].owners == default_subjects()
