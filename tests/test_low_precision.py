"""``matmul_dtype="bfloat16"``: a turn's linear products in bfloat16, against the same products
written in plain PyTorch; the model and the editor's other work untouched."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _autograd_reference import lm_loss
from conftest import ue_tiny_model
from tolerances import BF16, assert_within
from ultraedit import EditConfig, UltraEditor
from ultraedit import low_precision
from ultraedit.hooks import CaptureSession
from ultraedit.low_precision import ProductWeights, product_weights
from ultraedit.tokenization import encode_edit_batch

PROMPTS = ["The capital of France is", "Paris is in", "The official language of Peru is"]
TARGETS = ["Rome", "Japan and Peru", "Japanese"]
EDITED = ("model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj")


def _plain_bf16_linears(model):
    """Every Linear but the head as ``F.linear(x.bfloat16(), W.bfloat16(), b).float()``, plain
    autograd: the plain-PyTorch composition of the option's math."""
    head = model.get_output_embeddings()
    for module in model.modules():
        if type(module) is nn.Linear and module is not head:
            def forward(x, m=module):
                bias = None if m.bias is None else m.bias.bfloat16()
                return F.linear(x.bfloat16(), m.weight.bfloat16(), bias).to(x.dtype)
            module.forward = forward
    return model


def _capture(model, batch, products=None, mask=None):
    """``{name: (K, G)}`` of the EDITED modules at ``mask`` (default: the answer positions)."""
    mods = {n: dict(model.named_modules())[n] for n in EDITED}
    with CaptureSession(model, mods, products=products) as cap:
        cap.set_mask(batch["labels"] != -100 if mask is None else mask, batch["labels"] != -100)
        with torch.enable_grad():
            lm_loss(model, batch).backward()
        return cap.pop()


def test_bfloat16_products_capture_what_plain_bfloat16_linears_capture(ue_tokenizer):
    model = ue_tiny_model("llama", len(ue_tokenizer), seed=11)
    batch = encode_edit_batch(ue_tokenizer, PROMPTS, TARGETS)
    want = _capture(copy.deepcopy(model).double(), batch)
    plain = _capture(_plain_bf16_linears(copy.deepcopy(model)), batch)
    products = product_weights("bfloat16", [dict(model.named_modules())[n] for n in EDITED])
    got = _capture(model, batch, products)
    for name in EDITED:
        assert torch.equal(got[name][0], plain[name][0])    # the same forward products
        for i in (0, 1):                                     # K, G against float64
            assert_within(got[name][i], want[name][i], "bf16_products", BF16, plain[name][i])
    assert not any("forward" in m.__dict__ for m in model.modules())   # restored on exit


def test_copies_once_per_turn_casts_edited_weights_at_each_call():
    frozen, edited, wide = nn.Linear(5, 3), nn.Linear(3, 5, bias=False), nn.Linear(4, 2).double()
    products = ProductWeights(torch.bfloat16, [edited])
    w, b = products.of(frozen)
    assert w.dtype == b.dtype == torch.bfloat16 and products.of(frozen)[0] is w
    assert torch.equal(w, frozen.weight.detach().bfloat16())
    first = products.of(edited)[0]
    with torch.no_grad():
        edited.weight.add_(1.0)
    assert torch.equal(products.of(edited)[0], edited.weight.bfloat16()) and not torch.equal(
        first, products.of(edited)[0])
    assert products.of(wide) == (wide.weight, wide.bias)   # not float32: its own dtype
    assert products.nbytes == 2 * (15 + 3)
    assert product_weights("model", [edited]) is None


def test_a_cpu_without_native_bfloat16_warns(monkeypatch):
    monkeypatch.setattr(low_precision, "_warned_cpu", False)
    monkeypatch.setattr(low_precision, "_cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        ProductWeights(torch.bfloat16, []).of(nn.Linear(2, 2))
    monkeypatch.setattr(low_precision, "_warned_cpu", False)
    monkeypatch.setattr(low_precision, "_cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProductWeights(torch.bfloat16, []).of(nn.Linear(2, 2))


def test_a_turn_with_bfloat16_products_edits_like_float32(ue_tokenizer):
    """The same requests, settings and model: ΔW within bfloat16's rounding of the float32
    turn's; the unedited weights and the evaluation untouched."""
    base = ue_tiny_model("llama", len(ue_tokenizer), seed=12)
    requests = [{"prompt": p, "target": t} for p, t in zip(PROMPTS, TARGETS)]
    deltas = {}
    for dtype in ("model", "bfloat16"):
        model = copy.deepcopy(base)
        editor = UltraEditor(model, ue_tokenizer, modules=list(EDITED), lr=1e-3, steps=2,
                             matmul_dtype=dtype)
        editor.edit(requests)
        named, before = dict(model.named_parameters()), dict(base.named_parameters())
        deltas[dtype] = {n: (named[n + ".weight"] - before[n + ".weight"]).detach()
                         for n in EDITED}
        for n, p in named.items():
            if n.rsplit(".", 1)[0] not in EDITED:
                assert torch.equal(p, before[n]), n
        assert not any("forward" in m.__dict__ for m in model.modules())
    for n in EDITED:
        assert deltas["model"][n].norm() > 0
        assert_within(deltas["bfloat16"][n], deltas["model"][n], "bf16_products", BF16)


def test_the_option_is_checked():
    with pytest.raises(ValueError, match="matmul_dtype must be 'model' or 'bfloat16'"):
        EditConfig(matmul_dtype="float16")
    assert EditConfig.from_dict(EditConfig(matmul_dtype="bfloat16").to_dict()).matmul_dtype \
        == "bfloat16"


@pytest.mark.parametrize("dense", [True, False])
def test_a_wide_span_back_propagates_over_all_rows(dense, ue_tokenizer, monkeypatch):
    """With bfloat16 products a span of at least ``LOW_PRECISION_DENSE_SHARE`` of the rows
    back-propagates over every row (the rows before it get gradients that never reach a
    captured row), a narrower one over its own rows only; K and G are the same either way up
    to the products' rounding."""
    from ultraedit import backward_rows
    from ultraedit.backward_rows import backward_span

    model = ue_tiny_model("llama", len(ue_tokenizer), seed=12)
    batch = encode_edit_batch(ue_tokenizer, PROMPTS, TARGETS)
    mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
    mask[torch.arange(3), torch.tensor([3, 1, 5])] = True           # inside each prompt
    span = backward_span(mask, batch["labels"] != -100)
    share = int(span.sum()) / span.numel()
    monkeypatch.setattr(backward_rows, "LOW_PRECISION_DENSE_SHARE",
                        share if dense else share + 1e-3)
    mods = {n: dict(model.named_modules())[n] for n in EDITED}
    want = _capture(copy.deepcopy(model).double(), batch, mask=mask)
    seen = {}

    def pre_hook(module, args):   # the gradient of layer 2's attention input: q, k and v's
        args[0].register_hook(lambda g: seen.setdefault("g", g.detach()))

    handle = model.model.layers[2].self_attn.q_proj.register_forward_pre_hook(pre_hook)
    try:
        got = _capture(model, batch, product_weights("bfloat16", mods.values()), mask)
    finally:
        handle.remove()
    assert seen["g"][~span].abs().sum() > 0 if dense else not seen["g"][~span].any()
    for name in EDITED:
        for i in (0, 1):
            assert_within(got[name][i], want[name][i], "bf16_products", BF16)
