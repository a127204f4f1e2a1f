"""The preset's turns with the model's forward and backward in bfloat16 autocast on the CPU,
against float32: scores and turn times.

Measured on the 2-core EPYC (Zen 4, ``avx512_bf16``): ``F.linear`` at the embedded model's
shapes (150 tokens; 576 -> 1536, 1536 -> 576, 576 -> 49,152) ran 2.2-2.7x faster in bfloat16
(oneDNN) than in float32, and the forward and backward are ~90% of a preset turn. Here every
``editor.edit`` call runs under ``torch.autocast("cpu", dtype=torch.bfloat16)``: the model's
matrix products (and the editor's float32 ones; the solve with the key memory and preserved keys
runs in float64, which autocast leaves alone) take bfloat16 inputs, and the captured keys and
gradients (bfloat16 values) are handed to the solver as float32. The evaluation runs in float32
either way. A prototype: nothing of it ships.

``--only bf16-weights`` keeps a bfloat16 copy of every ``nn.Linear``'s weight that the edit does
not change (made once) and, while ``editor.edit`` runs, computes each linear layer as
``F.linear(x.bfloat16(), W_bf16)`` (the result cast back to float32, so that everything
between the products stays float32, as under autocast's other rules); the edited modules cast their float32 weight at each call
(it changes at every step). Autocast instead casts every weight at every call, which at a few
hundred tokens costs about as much as the bfloat16 product itself.

    PYTHONPATH=python python experiments/bf16_forward.py --only float32 --records R --json f32.json
    PYTHONPATH=python python experiments/bf16_forward.py --only bf16 --records R --json bf16.json
"""
from __future__ import annotations

import argparse

import _common


def _bf16_forward(module, editing, frozen):
    import torch
    import torch.nn.functional as F

    plain = module.forward
    weight = module.weight.detach().to(torch.bfloat16) if frozen else None
    bias = None if module.bias is None else module.bias.detach().to(torch.bfloat16)

    def forward(x):
        if not editing["on"]:
            return plain(x)
        w = weight if frozen else module.weight.to(torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), w, bias).to(x.dtype)
    return forward


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("float32", "bf16", "bf16-weights"), default="bf16",
                    help="the variant this process runs")
    _common.add_stream_args(ap)
    a = ap.parse_args(argv)
    model, tok, records = _common.load_stream(a)

    import torch
    from ultraedit import UltraEditor, hooks

    editor = UltraEditor(model, tok)
    if a.only != "float32":
        # the captured keys and gradients (bfloat16 values) reach the solver as float32
        rows = hooks.CaptureSession._rows
        hooks.CaptureSession._rows = staticmethod(lambda r, x: rows(r, x).float())
        editing = {"on": False}
        if a.only == "bf16-weights":
            edited = set(editor.modules)
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear):
                    module.forward = _bf16_forward(module, editing, frozen=name not in edited)
        edit = editor.edit

        def edit_in_bf16(*args, **kwargs):
            editing["on"] = True
            try:
                if a.only == "bf16":
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        return edit(*args, **kwargs)
                return edit(*args, **kwargs)
            finally:
                editing["on"] = False

        editor.edit = edit_in_bf16
    _common.score_and_save(model, tok, records, editor, a, variant=a.only)


if __name__ == "__main__":
    main()
