"""Will a turn fit? Predict the peak memory of one editing turn, item by item, before loading.

``plan_turn(config, dtype, modules, edits, micro_batch, budget_bytes)`` takes a model config (a
built-in name such as ``"mistral-7b"``, a local ``config.json`` or folder, a
``transformers.PretrainedConfig`` or a model) and returns a :class:`TurnPlan`: the bytes of

=====================  ===========================================================================
weights                every parameter and buffer in ``dtype`` (tied embeddings counted once),
                       counted on an empty-weights instance of the architecture (no memory used)
activations            what autograd keeps for one micro-batch from the earliest edited module on
                       (no weight gradient is computed: the graph starts there), the logits of the
                       answer rows and the backward's working set
captured rows          the turn's keys K (N x d_in) and output gradients G (N x d_out) of every
                       edited module, in the activation dtype, while they are stacked
statistics             the running count/mean/M2 (float64) per weight shape, with the turn's copy
solver                 pseudo-values, the N x N Gram and its factor, and the factor A (N x d_out,
                       float32) of every module, held until all modules are solved
key memory             ``memory > 0``: the d_in x d_in float64 memory per module, its new copy and
                       the turn's Cholesky factor
preserved keys         ``preserve > 0``: the preserved rows (float32) and their float64 Gram
gradient covariance    ``whiten > 0``: Σ g gᵀ (d_out x d_out float64) per weight shape; in the
                       solve its Σ^{-1/2} per shape and one ``eigh``'s working copies
bfloat16 weights       ``matmul_dtype="bfloat16"`` with float32 weights: the turn's bfloat16
                       copies of the linear weights it does not edit, and one edited weight's cast
delta record           the base copy of the edited weights; with ``accumulate`` (default for
                       bf16/fp16) the float32 accumulated delta
rollback history       ``history`` snapshots kept plus the turn's own (float32 deltas when
                       accumulating, weight copies otherwise)
=====================  ===========================================================================

The turn's peak is the weights and everything the editor keeps between turns, plus the larger
of its two phases: forward/backward (activations of one micro-batch beside the rows captured so
far) and solve/apply (stacked rows, solver, the snapshot being taken). ``N`` is
``edits x answer_tokens`` (the paper's prompts give about 4 answer tokens per request) and the
micro-batch's padded length is ``seq_len`` tokens.

The activation model is measured on the Llama decoder layer (Llama, Mistral, Qwen2 and the
embedded SmolLM2 share it): per token and layer ``(2e + 8)h + 3eI + 2e·kv + 4·heads + 8`` bytes
with sdpa attention (``e`` the element size; the two RMSNorms keep float32 copies), and
``(3e + 8)h + 3eI + heads·L·(4 + e) + 8`` with eager attention (its probabilities are kept).
Other architectures use the same form with their hidden and MLP sizes (an estimate).

Command line (``ultraedit plan``)::

    python -m ultraedit.plan --config mistral-7b --dtype bf16 --edits 100 [--budget-gib 24]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

__all__ = ["plan_turn", "request_shape", "request_lengths", "TurnPlan", "PlanItem", "BUILTIN_CONFIGS",
           "load_config", "main"]

GiB = 1 << 30
MiB = 1 << 20

# Built-in configurations (the fields that size a turn), by name.
BUILTIN_CONFIGS: Dict[str, Dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, tie_word_embeddings=False,
                       max_position_embeddings=32768),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, tie_word_embeddings=False,
                       max_position_embeddings=8192),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False,
                       max_position_embeddings=32768),
    "gpt-j-6b": dict(model_type="gptj", vocab_size=50400, n_embd=4096, n_layer=28, n_head=16,
                     rotary_dim=64, n_positions=2048, tie_word_embeddings=False),
    "gpt2-xl": dict(model_type="gpt2", vocab_size=50257, n_embd=1600, n_layer=48, n_head=25,
                    n_positions=1024),
}
ALIASES = {"mistral-7b-v0.3": "mistral-7b", "llama3-8b": "llama-3-8b",
           "llama-3-8b-instruct": "llama-3-8b", "smollm2": "smollm2-135m",
           "smollm2-135m-instruct": "smollm2-135m", "embedded": "smollm2-135m",
           "default": "smollm2-135m"}   # as the editing commands name the embedded model

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32",
           "fp64": "float64", "float64": "float64"}
_ELEM = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


@dataclass
class PlanItem:
    """One line of the prediction: ``name``, ``bytes`` and what it counts."""
    name: str
    bytes: int
    detail: str = ""
    phase: str = "kept"      # "kept" (whole turn), "forward/backward" or "solve/apply"


@dataclass
class TurnPlan:
    """The prediction: items, the peak (``total_bytes``) and whether it fits ``budget_bytes``."""
    model: str
    dtype: str
    modules: List[str]
    edits: int
    micro_batch: int
    n_rows: int
    seq_len: int
    items: List[PlanItem]
    total_bytes: int
    peak_phase: str
    budget_bytes: int
    fits: bool
    reason: str
    settings: Dict[str, Any] = field(default_factory=dict)

    def item(self, name: str) -> int:
        return sum(i.bytes for i in self.items if i.name == name)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        w = 19   # the item column: the longest item name, "gradient covariance"
        lines = [f"turn plan: {self.model}, {self.dtype}, {self.edits} edits in micro-batches of "
                 f"{self.micro_batch} ({self.seq_len} tokens), N = {self.n_rows} rows, "
                 f"{len(self.modules)} modules ({self.modules[0]} ...)",
                 f"{'item':<{w}} {'phase':<17} {'MiB':>10}  counts"]
        for it in self.items:
            lines.append(f"{it.name:<{w}} {it.phase:<17} {it.bytes / MiB:>10.1f}  {it.detail}")
        lines.append(f"{'peak':<{w}} {self.peak_phase:<17} {self.total_bytes / MiB:>10.1f}  "
                     f"= {self.total_bytes / GiB:.2f} GiB (kept items + the larger phase; the "
                     f"solve/apply phase counts its solves or its apply, whichever is larger)")
        lines.append(self.reason)
        return "\n".join(lines)


# ------------------------------------------------------------------------------ configs
def load_config(config: Any):
    """A ``transformers`` config from a built-in name, a ``config.json`` path or folder, a
    config object, a model, or a dict with ``model_type``."""
    import transformers as tf

    if hasattr(config, "config") and hasattr(config, "parameters"):   # a model
        return config.config
    if isinstance(config, tf.PretrainedConfig):
        return config
    if isinstance(config, dict):
        data = dict(config)
        return tf.AutoConfig.for_model(data.pop("model_type"), **data)
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be a name, a path, a config or a model, got "
                        f"{type(config).__name__}")
    name = str(config)
    key = ALIASES.get(name.lower(), name.lower())
    if key in BUILTIN_CONFIGS:
        return load_config(BUILTIN_CONFIGS[key])
    path = name if not os.path.isdir(name) else os.path.join(name, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config {name!r} is neither a built-in name "
                                f"({', '.join(sorted([*BUILTIN_CONFIGS, *ALIASES]))}) nor a "
                                f"config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a JSON model config: {err}") from None
    if "model_type" not in data:
        raise ValueError(f"{path} has no model_type")
    return load_config(data)


def _dtype_name(dtype) -> str:
    text = str(dtype).replace("torch.", "").lower()
    if text not in _DTYPES:
        raise ValueError(f"dtype must be one of bf16, fp16, fp32, fp64, got {dtype!r}")
    return _DTYPES[text]


_EMPTY_MODELS: Dict[Any, Any] = {}


def _empty_model(cfg, dtype_name: str):
    """The architecture with its parameters on the meta device (no memory), in ``dtype``; the
    last few are kept (``micro_batch="auto"`` plans every turn on the same model)."""
    import torch
    import transformers as tf
    from accelerate import init_empty_weights

    try:
        key = (type(cfg).__name__, cfg.to_json_string(use_diff=False), dtype_name)
    except (TypeError, ValueError, AttributeError):   # a config that does not serialize
        key = None
    if key is not None and key in _EMPTY_MODELS:
        return _EMPTY_MODELS[key]
    with init_empty_weights():
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype_name))
    model.tie_weights()   # tied embeddings are one tensor (counted once)
    if key is not None:
        if len(_EMPTY_MODELS) >= 4:
            _EMPTY_MODELS.pop(next(iter(_EMPTY_MODELS)))
        _EMPTY_MODELS[key] = model
    return model


def _get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.*)$")


def _layer_of(name: str):
    m = _LAYER.search(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def request_lengths(tokenizer, requests) -> List[tuple]:
    """``(prompt_tokens, target_tokens)`` of each request as the editor tokenizes it
    (``ultraedit.tokenization.encode_request``, special prefix included)."""
    from .tokenization import encode_request, special_prefix
    from .turn import EditRequest

    prefix = special_prefix(tokenizer)
    out = []
    for r in (EditRequest.coerce(r) for r in requests):
        p_ids, t_ids = encode_request(tokenizer, r.prompt, r.target, prefix)
        out.append((len(p_ids), len(t_ids)))
    return out


def request_shape(tokenizer, requests, micro_batch: int = 10,
                  lengths: Optional[Sequence[tuple]] = None) -> Dict[str, Any]:
    """``{"answer_tokens", "seq_len", "logit_columns"}`` of actual requests, as the editor
    tokenizes them in micro-batches of ``micro_batch`` (to pass to :func:`plan_turn`).

    A request of ``P`` prompt and ``T`` target tokens is ``P + T - 1`` tokens long with answer
    positions ``P-1 .. P+T-2`` (right padded): ``answer_tokens`` is the mean ``T``, ``seq_len``
    the longest request, ``logit_columns`` the answer rows per request of the micro-batch with
    the most (only answer rows are projected to the vocabulary, so a micro-batch's logits are
    ``micro_batch x logit_columns`` rows). ``lengths``: :func:`request_lengths` of the
    requests, if already known. The micro-batches are those the editor runs: in length order
    when that pads fewer tokens (:func:`ultraedit.turn.bucket_order`)."""
    from .turn import bucket_order

    if lengths is None:
        lengths = request_lengths(tokenizer, requests)
    order = bucket_order([p + t - 1 for p, t in lengths], micro_batch)
    if order is not None:
        lengths = [lengths[i] for i in order]
    answer, seq, cols = 0, 0, 0
    for i in range(0, len(lengths), micro_batch):
        chunk = lengths[i:i + micro_batch]
        answer += sum(t for _, t in chunk)
        seq = max(seq, max(p + t - 1 for p, t in chunk))
        cols = max(cols, -(-sum(t for _, t in chunk) // len(chunk)))
    return {"answer_tokens": answer / max(1, len(lengths)), "seq_len": seq, "logit_columns": cols}


# ------------------------------------------------------------------------------ the plan
# argument -> (must be an integer, smallest value allowed, whether that value is allowed)
_PLAN_NUMBERS = {"budget_bytes": (False, 0, False), "answer_tokens": (False, 0, False),
                 "seq_len": (True, 1, True), "history": (True, 0, True),
                 "memory": (False, 0, True), "preserve": (False, 0, True),
                 "preserved_rows": (True, 0, True), "steps": (True, 1, True),
                 "whiten": (False, 0, True), "logit_columns": (True, 1, True)}


def _check_plan_numbers(**values) -> None:
    """A ``ValueError`` naming the first argument that is not a finite number in its range."""
    for name, value in values.items():
        if value is None and name == "logit_columns":
            continue
        integer, low, inclusive = _PLAN_NUMBERS[name]
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value) and (value >= low if inclusive else value > low)
              and (not integer or int(value) == value))
        if not ok:
            kind = "an integer" if integer else "a number"
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ValueError(f"{name} must be {kind} {bound}, got {value!r}")


def plan_turn(config: Any, dtype="bf16", modules: Optional[Union[str, Sequence[str]]] = None,
              edits: int = 100, micro_batch: int = 10, budget_bytes: int = 24 * GiB,
              answer_tokens: float = 4, seq_len: int = 32, positions: str = "answer",
              accumulate="auto", history: int = 1, memory: float = 0.0, preserve: float = 0.0,
              preserved_rows: int = 0, steps: int = 1, whiten: float = 0.0,
              attn_implementation: Optional[str] = None,
              act_dtype=None, logit_columns: Optional[int] = None,
              delta_device: Optional[str] = None, backward_group: int = 1,
              matmul_dtype: str = "model") -> TurnPlan:
    """Predict the peak memory of one turn (see the module docstring).

    Args:
        config: built-in name, ``config.json`` (or its folder), config object or model.
        dtype: the weights' dtype (``"bf16"``, ``"fp16"``, ``"fp32"``, a ``torch.dtype``).
        modules: edited modules (names, globs, ``re:``); None = the paper's for the
            architecture (``ultraedit.modules.paper_module_names``).
        edits, micro_batch: requests per turn and per forward/backward.
        budget_bytes: the memory the turn may use (default 24 GiB, a consumer GPU).
        answer_tokens: answer tokens per request, on average (rows captured per request at
            answer positions; 1 with ``positions="subject"``).
        logit_columns: answer rows per request in the fullest micro-batch (the logits are
            computed for answer rows only); default ``2 x answer_tokens``.
        seq_len: padded tokens of a micro-batch (prompt + target).
        accumulate: ``"auto"`` (on for bf16/fp16), True, False: the float32 delta record.
        history: turns ``rollback`` can undo.
        memory, preserve: ν and μ of the key memory and the preserved subjects;
            ``preserved_rows``: the preserved key rows per module.
        steps: capture/solve/apply steps per turn (a multi-step turn snapshots before its first).
        whiten: ε of the whitened value gradients (> 0: their covariance is kept).
        attn_implementation: "sdpa" (default) or "eager".
        act_dtype: the activations' dtype (default: ``dtype``).
        delta_device: ``"cpu"`` when the editor keeps base, delta and history off the device
            (``UltraEditor(delta_device="cpu")``): those items are listed as ``host`` and not
            counted in the device's peak.
        backward_group: micro-batches that share one backward (``EditConfig.backward_group``):
            their activations and answer logits are alive at once. Each is counted at a
            micro-batch's peak, transient tensors included: an upper bound (measured 1.0-1.5x
            the allocator's peak, ``tests/test_plan.py``).
        matmul_dtype: ``EditConfig.matmul_dtype``; ``"bfloat16"`` with float32 weights counts
            the turn's bfloat16 copies of the linear weights it does not edit (kept for the
            whole turn) and the cast of the largest edited one.
    """
    from .hooks import refuse_output_embedding
    from .modules import module_dims, paper_module_names, resolve_modules

    if int(edits) != edits or edits < 1 or int(micro_batch) != micro_batch or micro_batch < 1:
        raise ValueError(f"edits and micro_batch must be positive integers, got {edits!r}, "
                         f"{micro_batch!r}")
    if matmul_dtype not in ("model", "bfloat16"):
        raise ValueError(f"matmul_dtype must be 'model' or 'bfloat16', got {matmul_dtype!r}")
    if int(backward_group) != backward_group or backward_group < 1:
        raise ValueError(f"backward_group must be a positive integer, got {backward_group!r}")
    _check_plan_numbers(budget_bytes=budget_bytes, answer_tokens=answer_tokens, seq_len=seq_len,
                        history=history, memory=memory, preserve=preserve,
                        preserved_rows=preserved_rows, steps=steps, whiten=whiten,
                        logit_columns=logit_columns)
    if delta_device not in (None, "cpu") and not str(delta_device).startswith("cuda"):
        raise ValueError(f"delta_device must be 'cpu' or a CUDA device, got {delta_device!r}")
    cfg = load_config(config)
    dname = _dtype_name(dtype)
    aname = _dtype_name(act_dtype) if act_dtype is not None else dname
    e_w, e = _ELEM[dname], _ELEM[aname]
    model = _empty_model(cfg, dname)
    if modules is None:
        modules = paper_module_names(model)
    resolved = resolve_modules(model, modules, positions)
    refuse_output_embedding(model, dict(resolved))   # what the editor refuses is not planned
    names = [n for n, _ in resolved]
    dims = {n: module_dims(m) for n, m in resolved}
    numels = {n: m.weight.numel() for n, m in resolved}

    seen, weights = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        key = id(p)
        if key not in seen:
            seen.add(key)
            weights += p.numel() * (e_w if p.is_floating_point() else p.element_size())

    n_req_rows = 1 if positions == "subject" else float(answer_tokens)
    N = max(1, round(int(edits) * n_req_rows))
    B = min(int(micro_batch), int(edits))
    n_mb = -(-int(edits) // int(micro_batch))
    group = min(int(backward_group), n_mb)   # micro-batches alive at once
    L = int(seq_len)
    T = B * L

    h = int(_get(cfg, "hidden_size", "n_embd"))
    inter = int(_get(cfg, "intermediate_size", "n_inner", default=None) or 4 * h)
    heads = int(_get(cfg, "num_attention_heads", "n_head"))
    kv_heads = int(_get(cfg, "num_key_value_heads", default=heads) or heads)
    head_dim = int(_get(cfg, "head_dim", default=None) or h // heads)
    kv = kv_heads * head_dim
    vocab = int(_get(cfg, "vocab_size"))
    n_layers = int(_get(cfg, "num_hidden_layers", "n_layer"))
    attn = attn_implementation or getattr(cfg, "_attn_implementation", None) or "sdpa"
    if attn == "eager":
        per_token_layer = (3 * e + 8) * h + 3 * e * inter + heads * L * (4 + (e if e != 4 else 0)) + 8
    else:
        per_token_layer = (2 * e + 8) * h + 3 * e * inter + 2 * e * kv + 4 * heads + 8
    mlp_part = 3 * e * inter

    # the graph starts at the earliest edited module: layers after it are kept whole, its own
    # layer from that module on (an MLP module keeps the MLP's intermediate tensors only)
    layer_sub = sorted((_layer_of(n) for n in names), key=lambda x: (x[0] is None, x[0] or 0))
    first, sub = layer_sub[0]
    if first is None:
        kept_layers, first_part = n_layers, 0
    else:
        kept_layers = n_layers - first - 1
        is_mlp = any(s in sub for s in ("mlp", "fc", "ffn", "feed_forward"))
        if is_mlp and any(s in sub for s in ("down_proj", "fc_out", "c_proj", "fc2", "w2")):
            first_part = 0                      # nothing of its layer is kept after it
        elif is_mlp and "up_proj" in sub:
            first_part = mlp_part // 3          # act(gate) for the product's gradient
        elif is_mlp and "gate_proj" in sub:
            first_part = 2 * mlp_part // 3      # gate's output for act's gradient, up's output
        else:
            first_part = mlp_part if is_mlp else per_token_layer
    saved = group * T * (kept_layers * per_token_layer + first_part + 4 * h + 4)
    if logit_columns is None:
        logit_columns = 2 * math.ceil(float(answer_tokens))
    logit_cols = group * B * min(L, max(1, int(logit_columns)))
    logits = logit_cols * vocab * (2 * e + 8)
    backward_ws = T * (e * h * 2 + e * inter * 3)

    rows = {n: N * (dims[n][0] + dims[n][1]) * e for n in names}
    rows_total = sum(rows.values())
    per_mb_rows = rows_total * B // max(1, min(int(edits), B * n_mb)) if n_mb > 1 else rows_total
    shapes = {dims[n] for n in names}
    stats = sum(2 * 3 * 8 * (d_in + d_out) for d_in, d_out in shapes)
    acc = (dname in ("bfloat16", "float16")) if accumulate == "auto" else bool(accumulate)
    acc_e = 8 if dname == "float64" else 4
    w_edit = sum(numels.values())
    base = w_edit * e_w
    delta = w_edit * acc_e if acc else 0
    snap_e = acc_e if acc else e_w
    # steady state: `history` snapshots kept, one more taken during the turn
    turn_snap = w_edit * snap_e if (history or steps > 1) else 0
    mem_bytes = sum(8 * dims[n][0] ** 2 for n in names) if memory > 0 else 0
    # whiten: Σ g gᵀ and Σ g per weight shape; in the solve Σ^{-1/2} per shape, and one eigh's
    # copies of the covariance, its eigenvectors and a product (largest d_out)
    white_bytes = sum(8 * (d_out ** 2 + d_out + 1) for _, d_out in shapes) if whiten > 0 else 0
    white_turn = (sum(8 * d_out ** 2 for _, d_out in shapes)
                  + 3 * 8 * max(d_out for _, d_out in shapes) ** 2) if whiten > 0 else 0
    # a turn record holds the weights' snapshot and a copy of the statistics (key memory and
    # gradient covariance too)
    stats_copy = stats // 2 + mem_bytes + white_bytes
    kept_snaps = int(history) * (w_edit * snap_e + stats_copy)
    # dual (N <= d_in): A is N x d_out; primal: the dense ΔW, d_in x d_out
    factors_A = sum(4 * min(N, dims[n][0]) * dims[n][1] for n in names)
    one_solve = max(4 * N * dims[n][1] + 2 * 4 * min(N, dims[n][0]) ** 2 for n in names)
    apply_tmp = max(4 * N * (dims[n][0] + dims[n][1]) for n in names) if acc else 0
    # the turn's system (transient) and Cholesky factor of νM + μP + λI, per module
    # (the preserved Gram without the turn's subjects is one more transient copy)
    mem_factors = sum(8 * dims[n][0] ** 2 for n in names) if (memory > 0 or preserve > 0) else 0
    mem_turn = (mem_factors + 8 * max(dims[n][0] for n in names) ** 2 * (2 if preserve > 0 else 1)
                if mem_factors else 0)
    pres = (sum(4 * int(preserved_rows) * dims[n][0] + 8 * dims[n][0] ** 2 for n in names)
            if preserve > 0 else 0)

    items = [
        PlanItem("weights", weights, f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B "
                 f"parameters in {dname}"),
        PlanItem("delta record", base + delta,
                 f"base copy of {len(names)} edited weights ({w_edit / 1e6:.1f} M values, "
                 f"{dname})" + (" + float32 accumulated delta" if acc else "")),
        PlanItem("rollback history", kept_snaps,
                 f"{history} snapshot(s) of the edited weights ({'float32 delta' if acc else dname})"
                 " and of the statistics" + (" and key memory" if mem_bytes else "")),
        PlanItem("statistics", stats, f"running count/mean/M2 (float64) of {len(shapes)} "
                 f"weight shape(s), committed + the turn's copy"),
    ]
    if mem_bytes:
        items.append(PlanItem("key memory", mem_bytes, "d_in x d_in float64 per module"))
    if white_bytes:
        items.append(PlanItem("gradient covariance", white_bytes,
                              "d_out x d_out float64 per weight shape (whiten)"))
    low_copies, low_cast = _low_precision_bytes(model, names, dname, matmul_dtype)
    if low_copies:
        items.append(PlanItem("bfloat16 weights", low_copies + low_cast,
                              "the turn's bfloat16 copies of the linear weights it does not "
                              "edit (matmul_dtype) and one edited weight's cast"))
    if pres:
        items.append(PlanItem("preserved keys", pres, f"{preserved_rows} rows (float32) and "
                              f"their float64 Gram per module"))
    fb = [
        # the backward frees the logits' tensors before it reaches the layers' working set
        PlanItem("activations", saved + max(logits, backward_ws),
                 (f"one micro-batch of {B} x {L} tokens" if group == 1 else
                  f"{group} micro-batches of {B} x {L} tokens (one backward)")
                 + f": kept by autograd from "
                 f"{names[0]} on ({kept_layers} whole layers) {saved / MiB:.0f} MiB, logits of "
                 f"{logit_cols} answer rows {logits / MiB:.0f} MiB or the backward's working set "
                 f"{backward_ws / MiB:.0f} MiB, whichever is larger", "forward/backward"),
        PlanItem("captured rows", rows_total - per_mb_rows,
                 f"K and G of the micro-batches before the last (N = {N})", "forward/backward"),
    ]
    if steps > 1:   # a later step captures while the previous step's rows and factors live on
        fb.append(PlanItem("solver", rows_total + factors_A + mem_factors,
                           "the previous step's stacked K and G, its factors A"
                           + (" and the turn's memory/preserved factors" if mem_factors else ""),
                           "forward/backward"))
        fb.append(PlanItem("rollback history", turn_snap + stats_copy,
                           "the multi-step turn's snapshot, taken before its first step",
                           "forward/backward"))
    sa = [
        PlanItem("captured rows", rows_total * (2 if n_mb > 1 else 1),
                 f"K (N x d_in) and G (N x d_out) in {aname}, N = {N}"
                 + (", per micro-batch and stacked" if n_mb > 1 else ""), "solve/apply"),
        PlanItem("solver", factors_A + one_solve + mem_turn + white_turn,
                 "A (N x d_out, float32; the dense ΔW when N > d_in) of every module, one "
                 "module's pseudo-values, Gram and "
                 "factor" + (", the memory/preserved system and factor" if mem_turn else "")
                 + (", the whitening matrices and one eigh's copies" if white_turn else ""),
                 "solve/apply"),
        PlanItem("rollback history", turn_snap + stats_copy * (2 if steps > 1 else 1) + apply_tmp,
                 "the turn's own snapshot" + (", float32 copies of K and A for the apply"
                                              if acc else ""), "solve/apply"),
    ]
    # the solves end before the apply starts: their transients and the turn's snapshot do not
    # coexist (the factors A and the memory factors do)
    solve_part = sa[1].bytes
    apply_part = factors_A + mem_factors + (0 if delta_device == "cpu" else sa[2].bytes)
    off_device = delta_device is not None and str(delta_device) == "cpu"
    if off_device:
        for it in items + sa:
            if it.name in ("delta record", "rollback history"):
                it.phase = "host"
    kept = sum(i.bytes for i in items if i.phase != "host")
    fb_total = sum(i.bytes for i in fb)
    sa_total = sa[0].bytes + max(solve_part, apply_part)
    if fb_total >= sa_total:
        phase, peak_items = "forward/backward", fb
    else:
        phase, peak_items = "solve/apply", sa
    items += fb + sa
    total = kept + max(fb_total, sa_total)
    fits = total <= int(budget_bytes)
    budget_gib = int(budget_bytes) / GiB
    if fits:
        reason = (f"fits in {budget_gib:g} GiB: peak {total / GiB:.2f} GiB "
                  f"({(budget_bytes - total) / GiB:.2f} GiB to spare)")
    else:
        counted = [i for i in items[:len(items) - len(fb) - len(sa)] + peak_items
                   if i.phase != "host" and i.name != "weights"]
        big = sorted(counted, key=lambda i: -i.bytes)[:2]
        reason = (f"does not fit in {budget_gib:g} GiB: peak {total / GiB:.2f} GiB, "
                  f"{(total - budget_bytes) / GiB:.2f} GiB over; weights {weights / GiB:.2f} GiB, "
                  f"then " + ", ".join(f"{i.name} {i.bytes / GiB:.2f} GiB ({i.phase})" for i in big)
                  + ". Lower it with fewer edited modules, history=0, delta_device='cpu' or a "
                  "smaller micro_batch")
    model_name = config if isinstance(config, str) else getattr(cfg, "model_type", "model")
    return TurnPlan(model=str(model_name), dtype=dname, modules=names, edits=int(edits),
                    micro_batch=int(micro_batch), n_rows=N, seq_len=L, items=items,
                    total_bytes=int(total), peak_phase=phase, budget_bytes=int(budget_bytes),
                    fits=fits, reason=reason,
                    settings=dict(answer_tokens=answer_tokens, logit_columns=logit_columns, positions=positions,
                                  accumulate=acc, history=history, memory=memory,
                                  preserve=preserve, preserved_rows=preserved_rows, steps=steps,
                                  whiten=whiten, matmul_dtype=matmul_dtype,
                                  attn_implementation=attn, act_dtype=aname,
                                  delta_device=delta_device))


def _low_precision_bytes(model, edited: Sequence[str], dname: str, matmul_dtype: str):
    """``(copies, cast)``: the bytes of the bfloat16 copies a ``matmul_dtype="bfloat16"`` turn
    makes of the float32 ``nn.Linear`` weights (and biases) it does not edit, the output
    embedding excepted (:mod:`ultraedit.low_precision`), and of the largest edited weight's
    per-call cast; ``(0, 0)`` otherwise."""
    if matmul_dtype != "bfloat16" or dname != "float32":
        return 0, 0
    from .backward_rows import switchable

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    edited = set(edited)
    copies, cast = 0, 0
    for name, module in model.named_modules():
        if not switchable(module, (head,) if head is not None else ()):
            continue
        numel = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        if name in edited:
            cast = max(cast, 2 * numel)
        else:
            copies += 2 * numel
    return copies, cast


# ------------------------------------------------------------------------------ command line
DESCRIPTION = "Predict a turn's peak memory, item by item, and whether it fits a budget."


def build_parser(prog: str = "ultraedit plan") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``ultraedit plan`` (shared by this module's ``main`` and the CLI)."""
    p.add_argument("--config", required=True, help="built-in name (" + ", ".join(
        sorted(BUILTIN_CONFIGS)) + ") or a config.json / model folder")
    p.add_argument("--dtype", default="bf16",
                   help="weights' dtype: bf16, fp16, fp32, fp64 (default bf16)")
    p.add_argument("--modules", nargs="+", default=None, metavar="A,B,...|@FILE|paper",
                   help="edited modules (names, globs, re:...; comma- or space-separated, or "
                        "@FILE with one per line, as the editing commands take them); default "
                        "and 'paper': the paper's")
    p.add_argument("--edits", type=int, default=100, help="requests per turn (default 100)")
    p.add_argument("--micro-batch", type=int, default=10, help="requests per forward/backward")
    p.add_argument("--backward-group", type=int, default=1,
                   help="micro-batches per backward (EditConfig.backward_group, whose 'auto' "
                        "groups all of a turn's that fit on a CPU, and on CUDA when the turn "
                        "packs, else 1; default 1)")
    p.add_argument("--budget-gib", type=float, default=24.0, help="memory budget (default 24)")
    p.add_argument("--answer-tokens", type=float, default=4, help="answer tokens per request")
    p.add_argument("--seq-len", type=int, default=32, help="padded tokens per request")
    p.add_argument("--history", type=int, default=1)
    p.add_argument("--memory", type=float, default=0.0)
    p.add_argument("--preserve", type=float, default=0.0)
    p.add_argument("--preserved-rows", type=int, default=0)
    p.add_argument("--whiten", type=float, default=0.0, help="ε of the whitened value gradients "
                   "(> 0: their d_out x d_out covariance is kept)")
    p.add_argument("--matmul-dtype", default="model", choices=("model", "bfloat16"),
                   help="bfloat16: count a turn's bfloat16 copies of float32 linear weights "
                        "(EditConfig.matmul_dtype; default model)")
    p.add_argument("--delta-device", default=None, help="cpu: base, delta and history kept on "
                   "the host (UltraEditor(delta_device='cpu'))")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(argv: Optional[Sequence[str]] = None, prog: str = "ultraedit plan") -> int:
    """``ultraedit plan --config mistral-7b --dtype bf16 --edits 100``: exit 0 when the turn
    fits the budget, 1 when it does not, 2 on a usage error."""
    return run(build_parser(prog).parse_args(argv), prog)


def module_spec(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    """``--modules`` values as one list: each value comma-separated or ``@FILE`` (one per line);
    ``None`` (the paper's modules) for no value or ``paper``."""
    from .config import value_list

    if not values:
        return None
    items: List[str] = []
    for value in values:
        try:
            items += value_list(value)
        except ValueError as err:
            raise ValueError(f"--modules: {err}") from None
    return None if items == ["paper"] else items


def run(args: argparse.Namespace, prog: str = "ultraedit plan") -> int:
    """Plan from parsed :func:`add_arguments` options; print the table (or JSON)."""
    try:
        if not (math.isfinite(args.budget_gib) and args.budget_gib > 0):
            raise ValueError(f"--budget-gib must be a positive number, got {args.budget_gib!r}")
        plan = plan_turn(args.config, args.dtype, module_spec(args.modules), edits=args.edits,
                         micro_batch=args.micro_batch, budget_bytes=int(args.budget_gib * GiB),
                         answer_tokens=args.answer_tokens, seq_len=args.seq_len,
                         history=args.history, memory=args.memory, preserve=args.preserve,
                         preserved_rows=args.preserved_rows, whiten=args.whiten,
                         delta_device=args.delta_device, backward_group=args.backward_group,
                         matmul_dtype=args.matmul_dtype)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_dict(), indent=1) if args.json else plan.format())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main(prog="python -m ultraedit.plan"))
