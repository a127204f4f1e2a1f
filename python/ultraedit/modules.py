"""Which modules an edit changes: defaults by architecture, and name/pattern overrides.

An edited module is an ``nn.Linear`` (weight d_out x d_in) or a GPT-2 ``Conv1D``
(``transformers.pytorch_utils.Conv1D``, weight d_in x d_out). Both map ``d_in -> d_out``.

Defaults (``default_module_names``) are the UltraEdit paper's published choices where it has
one, given for the reference depth and mapped proportionally to other depths
(layer ``i`` of a ``ref``-layer model -> ``round(i * n_layers / ref)``):

=============  =====  ============================================================
model_type      ref   modules (reference model)
=============  =====  ============================================================
llama            32   mlp.gate_proj 11-15 + mlp.up_proj 18-24    (LLaMA-3-8B-Instruct)
mistral          32   mlp.down_proj 29-30                        (Mistral-7B-v0.3)
qwen2            28   mlp.gate_proj + mlp.up_proj 18-26          (Qwen2.5-7B-Instruct)
gemma*           62   mlp.gate_proj + mlp.up_proj 52-60          (Gemma-3-27B)
phi3             40   mlp.down_proj 30-38                        (Phi-4)
phi              32   mlp.fc2 24-30               (no paper choice; Phi-4's relative depth)
gptj             28   mlp.fc_out 18-26                           (GPT-J-6B)
gpt2             48   mlp.c_proj 36-45  (no paper choice; GPT-J's relative depth)
=============  =====  ============================================================

Any other architecture (OPT, GPT-NeoX, Falcon, BLOOM, StableLM, OLMo, GPTBigCode, a
mixture-of-experts model's shared expert, ...) gets the MLP's output projection found by
structure (:func:`mlp_output_template`: in the first decoder layer, the one Linear/Conv1D that maps
a wider input to the hidden size), at GPT-J's relative depth (18-26 of 28) for answer positions.
A model where no single such module exists (a mixture of experts without a shared expert) needs
``modules=``.

The embedded SmolLM2-135M-Instruct (llama, 30 layers, hidden 576, MLP 1536) has its own
*measured* default (``EMBEDDED_SMOLLM2``), chosen by the measurement in experiments/tuning.md.

Overrides: a name, or a list of names, each one of
  * an exact module name (``model.layers.3.mlp.down_proj``; a trailing ``.weight`` is dropped),
  * a glob (``model.layers.2[2-8].mlp.down_proj``, ``*.mlp.c_proj``),
  * a regular expression prefixed with ``re:`` (``re:model\\.layers\\.(2[2-8])\\.mlp\\.down_proj``).
Every item must match at least one module, and every matched module must be Linear/Conv1D;
otherwise ``resolve_modules`` raises before anything is touched.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

__all__ = ["resolve_modules", "default_module_names", "paper_module_names", "mlp_output_template",
           "module_layout", "module_dims", "ARCH_DEFAULTS", "EMBEDDED_SMOLLM2", "EMBEDDED_SMOLLM2_SUBJECT",
           "is_embedded_smollm2"]

# model_type -> (reference depth, [(module template with {i}, first layer, last layer)])
ARCH_DEFAULTS: Dict[str, Tuple[int, List[Tuple[str, int, int]]]] = {
    "llama": (32, [("model.layers.{i}.mlp.gate_proj", 11, 15),
                   ("model.layers.{i}.mlp.up_proj", 18, 24)]),
    "mistral": (32, [("model.layers.{i}.mlp.down_proj", 29, 30)]),
    "qwen2": (28, [("model.layers.{i}.mlp.gate_proj", 18, 26),
                   ("model.layers.{i}.mlp.up_proj", 18, 26)]),
    "gemma": (62, [("model.layers.{i}.mlp.gate_proj", 52, 60),
                   ("model.layers.{i}.mlp.up_proj", 52, 60)]),
    "phi3": (40, [("model.layers.{i}.mlp.down_proj", 30, 38)]),
    "phi": (32, [("model.layers.{i}.mlp.fc2", 24, 30)]),
    "gptj": (28, [("transformer.h.{i}.mlp.fc_out", 18, 26)]),
    "gpt2": (48, [("transformer.h.{i}.mlp.c_proj", 36, 45)]),
}
for _alias in ("gemma2", "gemma3", "gemma3_text"):
    ARCH_DEFAULTS[_alias] = ARCH_DEFAULTS["gemma"]
ARCH_DEFAULTS["qwen3"] = ARCH_DEFAULTS["qwen2"]

# The measured default for the embedded model (experiments/tuning.md): mlp.down_proj of layers 24-28.
EMBEDDED_SMOLLM2 = [f"model.layers.{i}.mlp.down_proj" for i in range(24, 29)]
# with keys captured at the subject's last token (``positions="subject"``): early MLPs, where the
# subject's representation is built (measured, experiments/tuning.md: 4-8 without preserved subjects,
# 2-6 with them, the default)
EMBEDDED_SMOLLM2_SUBJECT = [f"model.layers.{i}.mlp.down_proj" for i in range(2, 7)]


def is_embedded_smollm2(model: nn.Module) -> bool:
    """True for the SmolLM2-135M architecture (llama, 30 layers, hidden 576, MLP 1536)."""
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "model_type", None) == "llama"
            and getattr(cfg, "num_hidden_layers", None) == 30
            and getattr(cfg, "hidden_size", None) == 576
            and getattr(cfg, "intermediate_size", None) == 1536)


def _n_layers(cfg) -> int:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the number of layers of a {type(cfg).__name__}; "
                     f"pass modules=... explicitly")


# the MLP's output projection per architecture (the modules edited at subject positions)
MLP_OUT: Dict[str, str] = {
    "llama": "model.layers.{i}.mlp.down_proj", "mistral": "model.layers.{i}.mlp.down_proj",
    "qwen2": "model.layers.{i}.mlp.down_proj", "qwen3": "model.layers.{i}.mlp.down_proj",
    "gemma": "model.layers.{i}.mlp.down_proj", "gemma2": "model.layers.{i}.mlp.down_proj",
    "gemma3": "model.layers.{i}.mlp.down_proj", "gemma3_text": "model.layers.{i}.mlp.down_proj",
    "phi3": "model.layers.{i}.mlp.down_proj", "phi": "model.layers.{i}.mlp.fc2",
    "gptj": "transformer.h.{i}.mlp.fc_out", "gpt2": "transformer.h.{i}.mlp.c_proj",
}


# where an architecture the tables above do not name gets its MLP output projections for answer
# positions: GPT-J's choice (fc_out 18-26 of 28), the paper's one MLP-output choice of a
# 28-layer model
_GENERIC_ANSWER = (28, 18, 26)


def _hidden_size(cfg) -> Optional[int]:
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def mlp_output_template(model: nn.Module) -> Optional[str]:
    """``"<decoder layers>.{i}.<MLP output projection>"`` for ``model``: from ``MLP_OUT`` for the
    architectures it names, else found by structure: the first ``nn.ModuleList`` with one entry
    per layer holds the decoder layers, and in its first layer the one Linear/Conv1D whose input
    is wider than the hidden size and whose output is the hidden size is the MLP's output
    projection. None when there is no such single module."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type in MLP_OUT:
        return MLP_OUT[model_type]
    try:
        n = _n_layers(cfg)
    except ValueError:
        return None
    hidden = _hidden_size(cfg)
    stacks = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) == n and name]
    if hidden is None or not stacks:
        return None
    prefix, layers = stacks[0]
    found = []
    for rel, sub in layers[0].named_modules():
        try:
            d_in, d_out = module_dims(sub)
        except (TypeError, AttributeError):
            continue
        if d_out == hidden and d_in > hidden:
            found.append(rel)
    return f"{prefix}.{{i}}.{found[0]}" if len(found) == 1 else None


def _no_default(model: nn.Module) -> ValueError:
    cfg = getattr(model, "config", None)
    return ValueError(f"no default edited modules for model_type "
                      f"{getattr(cfg, 'model_type', None)!r}: the tables name {sorted(MLP_OUT)} "
                      f"and no single MLP output projection was found in its decoder layers (a "
                      f"mixture of experts?); pass modules=[names or patterns] (--modules on the "
                      f"command line)")


def default_module_names(model: nn.Module, positions: str = "answer") -> List[str]:
    """The default edited module names for ``model`` (see the module docstring).

    ``positions="subject"``: for the embedded model its measured choice (down_proj 2-6, with
    preserved subjects); otherwise the MLP output projections of layers 4-8 of 30 (the embedded
    model's choice without preserved subjects), mapped to the model's depth; an early-layer
    choice like MEMIT's (GPT-J: 3-8 of 28), measured only on the embedded model.
    """
    if positions == "subject":
        if is_embedded_smollm2(model):
            return list(EMBEDDED_SMOLLM2_SUBJECT)
        template = mlp_output_template(model)
        if template is None:
            raise _no_default(model)
        n = _n_layers(model.config)
        layers = sorted({min(n - 1, round(i * n / 30)) for i in range(4, 9)})
        return _nested([template.format(i=i) for i in layers], model)
    if is_embedded_smollm2(model):
        return list(EMBEDDED_SMOLLM2)
    return paper_module_names(model)


def paper_module_names(model: nn.Module) -> List[str]:
    """The paper's module choice for ``model``'s architecture, mapped to its depth
    (``ARCH_DEFAULTS``); also for the embedded SmolLM2, whose editor default differs. An
    architecture the table does not name gets its MLP output projection
    (:func:`mlp_output_template`) at GPT-J's relative depth."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type in ARCH_DEFAULTS:
        ref, groups = ARCH_DEFAULTS[model_type]
    else:
        template = mlp_output_template(model)
        if template is None:
            raise _no_default(model)
        ref, groups = _GENERIC_ANSWER[0], [(template, *_GENERIC_ANSWER[1:])]
    n = _n_layers(cfg)
    names: List[str] = []
    for template, first, last in groups:
        layers = sorted({min(n - 1, round(i * n / ref)) for i in range(first, last + 1)})
        names += [template.format(i=i) for i in layers]
    return _nested(names, model)


def _nested(names: List[str], model: nn.Module) -> List[str]:
    # Some wrappers (e.g. multimodal Gemma 3) nest the text model one level deeper.
    available = dict(model.named_modules())
    if names and names[0] not in available:
        for prefix in ("language_model.", "model.language_model."):
            if prefix + names[0] in available:
                names = [prefix + x for x in names]
                break
            stripped = names[0].split(".", 1)[1]
            if prefix + stripped in available:
                names = [prefix + x.split(".", 1)[1] for x in names]
                break
    return names


def module_layout(module: nn.Module) -> str:
    """``"linear"`` (weight d_out x d_in) or ``"conv1d"`` (GPT-2 Conv1D, weight d_in x d_out)."""
    if isinstance(module, nn.Linear):
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency of the editor
        Conv1D = ()
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    raise TypeError(f"can only edit nn.Linear or GPT-2 Conv1D modules, got "
                    f"{type(module).__module__}.{type(module).__name__}")


def module_dims(module: nn.Module) -> Tuple[int, int]:
    """``(d_in, d_out)`` of a Linear/Conv1D module."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if module_layout(module) == "linear" else (w.shape[0], w.shape[1])


def _is_glob(item: str) -> bool:
    return any(c in item for c in "*?[")


def resolve_modules(model: nn.Module, spec: Optional[Union[str, Sequence[str]]] = None,
                    positions: str = "answer") -> List[Tuple[str, nn.Module]]:
    """Resolve ``spec`` to ``[(name, module)]`` in the model's module order, without duplicates.

    Raises ValueError for an item that matches no module (naming near misses) and TypeError for
    a matched module that is not Linear/Conv1D. Nothing in the model is modified.
    """
    if spec is None:
        items = default_module_names(model, positions)
    elif isinstance(spec, str):
        items = [spec]
    else:
        items = list(spec)
    if not items:
        raise ValueError("no modules to edit (empty modules list)")
    named = list(model.named_modules())
    names = [n for n, _ in named if n]
    chosen = set()
    for raw in items:
        if not isinstance(raw, str) or not raw:
            raise ValueError(f"module names/patterns must be non-empty strings, got {raw!r}")
        item = raw[:-len(".weight")] if raw.endswith(".weight") else raw
        if item.startswith("re:"):
            try:
                rx = re.compile(item[3:])
            except re.error as exc:
                raise ValueError(f"invalid module regex {item!r}: {exc}") from None
            hits = [n for n in names if rx.fullmatch(n)]
        elif _is_glob(item):
            hits = fnmatch.filter(names, item)
        else:
            hits = [item] if item in names else []
        if not hits:
            tail = item.rsplit(".", 1)[-1].strip("*?[]^$") or item
            near = [n for n in names if n.endswith(tail)][:3]
            hint = f"; modules with a similar name: {near}" if near else ""
            raise ValueError(f"no module of {type(model).__name__} matches {raw!r}{hint}")
        chosen.update(hits)
    result = [(n, m) for n, m in named if n in chosen]
    for name, module in result:
        try:
            module_layout(module)
        except TypeError as exc:
            raise TypeError(f"module {name!r}: {exc}") from None
        if getattr(module, "weight", None) is None or module.weight.dim() != 2:
            raise TypeError(f"module {name!r} has no 2-D weight to edit")
    return result
