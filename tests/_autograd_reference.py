"""Independent capture for the editor tests: plain autograd on a trainable copy of the model.

Shared by test_hooks and test_editor: module inputs and output gradients at the answer rows,
obtained with ``retain_grad`` instead of the editor's hooks.
"""
import copy

import torch.nn.functional as F


def lm_loss(model, batch):
    """Mean cross-entropy over the answer positions (labels already shifted)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


def reference_capture(model, names, batch):
    """``{name: (K, G)}`` at the answer rows of ``batch`` for the modules ``names``."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    named = dict(model.named_modules())
    seen = {}

    def hook(name):
        def f(mod, inp, out):
            out.retain_grad()
            seen[name] = (inp[0].detach(), out)
        return f

    hs = [named[n].register_forward_hook(hook(n)) for n in names]
    lm_loss(model, batch).backward()
    for h in hs:
        h.remove()
    mask = batch["labels"] != -100
    return {n: (x[mask], out.grad[mask]) for n, (x, out) in seen.items()}
