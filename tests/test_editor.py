"""UltraEditor on tiny random-init models: the update equals the backend's dense param_shift,
official compat equals an independent float64 implementation of the reference code, lifelong
statistics, atomic failure, no weight gradients."""

import pytest
import torch

import ultraedit_kernels
from _autograd_reference import reference_capture
from _state_common import REQUESTS
from conftest import ue_tiny_model
from ultraedit import EditRequest, TurnReport, UltraEditor
from ultraedit.modules import module_dims, module_layout
from ultraedit.tokenization import encode_edit_batch, encode_request
from ultraedit_kernels import RunningStats, param_shift

EPS32 = torch.finfo(torch.float32).eps


def reference_kg(model, tok, pairs, names):
    """Independent capture (retain_grad on a trainable copy), float64 results."""
    batch = encode_edit_batch(tok, [p for p, _ in pairs], [t for _, t in pairs])
    return {n: (k.double(), g.double()) for n, (k, g) in reference_capture(model, names, batch).items()}


def weights(model, names):
    named = dict(model.named_modules())
    return {n: named[n].weight.detach().clone() for n in names}


def delta_as_din_dout(model, name, before):
    module = dict(model.named_modules())[name]
    d = (module.weight.detach() - before[name]).double()
    return d.T if module_layout(module) == "linear" else d


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind,modules,n_req", [
    ("llama", ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"], 5),  # dual
    ("llama", ["model.layers.2.mlp.gate_proj"], 13),                                  # N > d_in: primal
    ("gpt2", ["transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_fc"], 13),        # Conv1D
    ("gptj", ["transformer.h.2.mlp.fc_out"], 13),
])
def test_update_equals_dense_param_shift(kind, modules, n_req, ue_tokenizer):
    tok = ue_tokenizer
    model = ue_tiny_model(kind, len(tok), intermediate=96)
    pairs = REQUESTS[:n_req]
    lr = 1e-2
    ref = reference_kg(model, tok, pairs, modules)
    before = weights(model, modules)
    editor = UltraEditor(model, tok, modules=modules, lr=lr, micro_batch=len(pairs))
    report = editor.edit([{"prompt": p, "target": t} for p, t in pairs])
    named = dict(model.named_modules())
    stats = {}
    for n in modules:   # shared per shape, updated with every module's rows before solving
        k, g = ref[n]
        key = module_dims(named[n])
        stats.setdefault(key, RunningStats(k.shape[1] + g.shape[1])).update(torch.cat([k, g], 1))
    for n in modules:
        k, g = ref[n]
        dense = param_shift(k.float(), g.float(), stats[module_dims(named[n])], lr=lr,
                            method="primal").double()
        assert rel_err(delta_as_din_dout(model, n, before), dense) < 2e-4, n
    assert report.n_tokens == ref[modules[0]][0].shape[0]
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def official_reference(model, tok, pairs, names, micro_batch, lr, ridge):
    """The reference code's turn written out in float64: length-sorted micro-batches, per-micro-
    batch mean loss, its variance update ``M2 += B*var + n*B*delta²/n'`` per micro-batch and
    module, ``std = sqrt(M2 / (n - 1 + eps))``, ``ẑ = (z - mean) / (std + eps)`` and the primal
    solve ``(KᵀK + λI)⁻¹ KᵀV``."""
    lengths = [sum(map(len, encode_request(tok, p, t))) - 1 for p, t in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
    pairs = [pairs[i] for i in order]
    chunks = [reference_kg(model, tok, pairs[s:s + micro_batch], names)
              for s in range(0, len(pairs), micro_batch)]
    named = dict(model.named_modules())
    shape = {n: module_dims(named[n]) for n in names}
    stats = {}
    for chunk in chunks:
        for n in names:
            x = torch.cat(chunk[n], 1)
            st = stats.setdefault(shape[n], {"n": 0.0, "mean": torch.zeros(x.shape[1], dtype=torch.float64),
                                             "m2": torch.zeros(x.shape[1], dtype=torch.float64)})
            b = x.shape[0]
            total = st["n"] + b
            delta = x.mean(0) - st["mean"]
            st["mean"] = st["mean"] + b * delta / total
            st["m2"] = st["m2"] + b * x.var(0, unbiased=True) + st["n"] * b * delta.pow(2) / total
            st["n"] = total
    out = {}
    for n in names:
        k = torch.cat([c[n][0] for c in chunks])
        g = torch.cat([c[n][1] for c in chunks])
        st = stats[shape[n]]
        std = (st["m2"] / (st["n"] - 1 + EPS32)).sqrt()
        z = (torch.cat([k, g], 1) - st["mean"]) / (std + EPS32)
        k_hat, g_hat = z.split([k.shape[1], g.shape[1]], 1)
        v = -lr * k_hat.pow(2).sum(1, keepdim=True) * g_hat
        out[n] = torch.linalg.solve(k.T @ k + ridge * torch.eye(k.shape[1], dtype=torch.float64),
                                    k.T @ v)
    return out


@pytest.mark.parametrize("kind,modules", [
    ("llama", ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj",
               "model.layers.2.mlp.gate_proj"]),
    ("gpt2", ["transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_proj"]),
])
def test_official_compat_equals_float64_reference(kind, modules, ue_tokenizer):
    tok = ue_tokenizer
    model = ue_tiny_model(kind, len(tok), intermediate=96)
    lr, ridge, mb = 0.5, 1.0, 5          # 13 requests: micro-batches of 5, 5, 3
    expected = official_reference(model, tok, REQUESTS, modules, mb, lr, ridge)
    before = weights(model, modules)
    editor = UltraEditor(model, tok, modules=modules, lr=lr, ridge=ridge, micro_batch=mb,
                         compat="official")
    editor.edit(REQUESTS)
    for n in modules:
        got = delta_as_din_dout(model, n, before)
        assert float(expected[n].norm() / before[n].double().norm()) > 1e-2   # a real update
        assert rel_err(got, expected[n]) < 1e-5, n


def test_official_differs_from_fixed(ue_tokenizer):
    tok = ue_tokenizer
    mods = ["model.layers.1.mlp.down_proj"]
    deltas = {}
    for compat in ("fixed", "official"):
        model = ue_tiny_model("llama", len(tok), intermediate=96)
        before = weights(model, mods)
        UltraEditor(model, tok, modules=mods, lr=0.5, micro_batch=5, compat=compat).edit(REQUESTS)
        deltas[compat] = delta_as_din_dout(model, mods[0], before)
    assert rel_err(deltas["official"], deltas["fixed"]) > 1e-3


def test_lifelong_stats_shared_per_shape_and_per_module(ue_tokenizer):
    tok = ue_tokenizer
    model = ue_tiny_model("llama", len(tok))
    mods = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj",
            "model.layers.2.mlp.up_proj"]
    ed = UltraEditor(model, tok, modules=mods, lr=1e-3)
    r1 = ed.edit(REQUESTS[:4])
    r2 = ed.edit([EditRequest(p, t) for p, t in REQUESTS[4:9]])
    assert set(ed.stats) == {"shape:48x32", "shape:32x48"}
    assert ed.stats["shape:48x32"].count == 2 * (r1.n_tokens + r2.n_tokens)   # two modules
    assert ed.stats["shape:32x48"].count == r1.n_tokens + r2.n_tokens
    assert ed.turns == 2 and r2.turn == 2
    per = UltraEditor(ue_tiny_model("llama", len(tok)), tok, modules=mods, lr=1e-3,
                      normalizer="module")
    per.edit(REQUESTS[:4])
    assert set(per.stats) == {f"module:{m}" for m in mods}


def test_turn_report(ue_tokenizer):
    model = ue_tiny_model("gpt2", len(ue_tokenizer))
    ed = UltraEditor(model, ue_tokenizer, lr=1e-3, micro_batch=4)
    rep = ed.edit(REQUESTS[:9])
    assert isinstance(rep, TurnReport)
    assert rep.n_edits == 9 and rep.n_modules == 1
    assert rep.n_tokens == int(sum(len(encode_request(ue_tokenizer, p, t)[1]) for p, t in REQUESTS[:9]))
    assert rep.fwd_bwd_s > 0 and rep.editor_s > 0
    assert abs(rep.turn_s - rep.fwd_bwd_s - rep.editor_s) < 1e-9
    assert rep.peak_source == "estimate"
    weights_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert weights_bytes < rep.peak_bytes < weights_bytes + (64 << 20)
    assert rep.capture_bytes > 0 and rep.as_dict()["n_edits"] == 9


def test_failed_turn_changes_nothing(ue_tokenizer, monkeypatch):
    tok = ue_tokenizer
    model = ue_tiny_model("llama", len(tok))
    mods = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    ed = UltraEditor(model, tok, modules=mods, lr=1e-3)
    ed.edit(REQUESTS[:3])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stats = {k: v.state_dict() for k, v in ed.stats.items()}
    calls = []
    import ultraedit.editor as editor_mod
    real = editor_mod.solve

    def second_fails(*a, **kw):
        calls.append(1)
        out = real(*a, **kw)
        if len(calls) == 2:
            out.tensor = out.tensor * float("nan")
        return out

    monkeypatch.setattr(editor_mod, "solve", second_fails)
    with pytest.raises(FloatingPointError, match="model.layers.2.mlp.down_proj.*not finite"):
        ed.edit(REQUESTS[3:7])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    for k, sd in stats.items():
        assert all(torch.equal(sd[f], ed.stats[k].state_dict()[f]) for f in sd)
    assert ed.turns == 1
    assert all(p.requires_grad for p in model.parameters())


def test_request_forms_and_errors(ue_tokenizer):
    from ultraedit.data.records import EditRecord

    assert EditRequest.coerce({"prompt": "a", "target": "b"}) == EditRequest("a", "b")
    assert EditRequest.coerce(("a", "b")) == EditRequest("a", "b")
    assert EditRequest.coerce(EditRecord(prompt="a", target="b")) == EditRequest("a", "b")
    with pytest.raises(ValueError, match="missing"):
        EditRequest.coerce({"prompt": "a"})
    with pytest.raises(TypeError):
        EditRequest.coerce(42)
    model = ue_tiny_model("llama", len(ue_tokenizer))
    ed = UltraEditor(model, ue_tokenizer, lr=1e-3)
    with pytest.raises(ValueError, match="at least one request"):
        ed.edit([])
    with pytest.raises(ValueError, match="empty target"):
        ed.edit([("The capital of Italy is", " ")])
    with pytest.raises(ValueError, match="compat"):
        UltraEditor(model, ue_tokenizer, compat="paper")
    with pytest.raises(ValueError, match="no module"):
        UltraEditor(model, ue_tokenizer, modules=["model.layers.7.mlp.down_proj"])
    assert UltraEditor(model, ue_tokenizer).lr == 1e-6     # the paper's lr off the embedded model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_modules_no_turn_can_edit_are_refused_at_construction(ue_tokenizer, kind):
    model = ue_tiny_model(kind, len(ue_tokenizer))
    model.unused = torch.nn.Linear(32, 32)  # a Linear that the forward never calls
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'lm_head' is the output embedding"):
        UltraEditor(model, ue_tokenizer, modules=["lm_head"])
    with pytest.raises(ValueError, match=r"\['unused'\] are not called .* forward"):
        UltraEditor(model, ue_tokenizer, modules=["unused"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and all(p.requires_grad for p in model.parameters())
