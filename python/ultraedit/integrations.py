"""One-line acceleration of existing UltraEdit code: the official implementation and EasyEdit.

::

    from ultraedit.integrations import apply_ultraedit_kernels, revert_ultraedit_kernels

    apply_ultraedit_kernels(editor)     # patch this editor OBJECT in place (not its class)
    ...                                 # use the editor exactly as before
    revert_ultraedit_kernels(editor)    # restore its original methods

Two kinds of editor are recognized by their interface (neither codebase is imported):

``"official"`` (XiaojieGu/UltraEdit, ``editor/ultraedit.py``)
    ``cache(tuples[, net_id])`` runs forward/backward per micro-batch, updates
    ``lifelong_normalizer`` and ``torch.save``\\ s every micro-batch's keys and output gradients
    to ``{config.editor.cache_dir}/.../{module_idx}_{idx}_keys.pth`` (and ``_values_grad.pth``);
    ``predict_param_shifts([net_id])`` loads them back and solves the d_in x d_in primal system
    with ``torch.linalg.solve``.  Patched: ``cache`` runs the ORIGINAL method (same forward,
    backward, tensors and normalizer updates) while its ``torch.save`` calls for ``*.pth`` files
    under ``cache_dir`` are kept in memory instead of being written (the directory itself is
    still created); ``predict_param_shifts`` reads them from memory, never from disk.

``"easyedit"`` (EasyEdit, ``easyeditor/models/ultraedit/ULTRAEDIT.py``)
    ``cache(batch) -> module_kv_map`` (already in memory); ``predict_param_shifts(module_kv_map)``.
    Patched: ``predict_param_shifts`` only.

The patched ``predict_param_shifts`` computes, per edited module, from the cached keys ``K``
(N x d_in), gradients ``G`` (N x d_out) and the editor's OWN normalizer buffers (already updated
by ``cache``; read, never written)::

    k̂, ĝ = split((cat(K, G) - normalizer.mean) / (normalizer.std + eps32))
    V     = -lr * ||k̂||² * ĝ
    ΔW    = (KᵀK + I)⁻¹ KᵀV  =  Kᵀ (KKᵀ + I)⁻¹ V                   (d_in x d_out)

by Cholesky: the dual N x N system when N <= d_in (no d_in x d_in matrix is formed), the primal
one otherwise (``method="auto"``, see :func:`ultraedit_kernels.choose_method`).  It returns the
same ``{module_name: ΔW}`` dict (float32, on the device of the model's first parameter).

**The official floor-division quirk.**  The official ``predict_param_shifts`` loads the keys of
``ceil(n_edits / batch_size)`` micro-batches but the gradients of only
``ceil(n_edits // batch_size)`` ones (``batch_size = config.dataset.batch_size``, the micro-batch
size; ``config.editor.batch_size`` is used when the config has no ``dataset.batch_size``).  When
``n_edits % batch_size != 0`` the last micro-batch's keys are paired with zero gradient rows (its
chunked normalization zero-pads the shorter gradient matrix).  By default
(``reproduce_floor_quirk=True``) the patched version does exactly the same, so its numbers agree
with the original's; ``reproduce_floor_quirk=False`` uses every cached micro-batch's gradients.
When ``n_edits`` is a multiple of the micro-batch size both are identical.

Differences that remain: the result agrees with the original to float32 precision (both are
checked against a float64 evaluation of the original formula), not bitwise; a system that cannot
be factorized even in float64 raises :class:`ultraedit_kernels.SolveError` where
``torch.linalg.solve`` would return garbage or raise; ``torch.save`` is redirected process-wide
while a patched official ``cache`` runs (only for ``.pth`` paths under ``cache_dir``; anything
else is saved normally).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ultraedit_kernels import METHODS, FrozenStats, param_shift

__all__ = [
    "IntegrationError", "KINDS", "apply_ultraedit_kernels", "revert_ultraedit_kernels",
    "detect_editor_kind", "is_patched", "shift_from_normalizer", "normalizer_for",
]

KINDS = ("official", "easyedit")
_STATE_ATTR = "_ultraedit_kernels_patch"
_MISSING = object()
_FILE_RE = re.compile(r"(\d+)_(\d+)_(keys|values_grad)\.pth")
_log = logging.getLogger("ultraedit.integrations")


class IntegrationError(TypeError):
    """The object is not an editor this module knows how to patch (the message says why)."""


# ------------------------------------------------------------------------------ the formula
def _normalizer_buffers(normalizer) -> Tuple[torch.Tensor, torch.Tensor]:
    missing = [b for b in ("mean", "std") if not isinstance(getattr(normalizer, b, None), torch.Tensor)]
    if missing:
        raise IntegrationError(
            f"the normalizer {type(normalizer).__name__} has no tensor buffer(s) {missing}; "
            f"expected a RunningMeanStd with buffers n, mean, var (M2) and std")
    return normalizer.mean, normalizer.std


def shift_from_normalizer(keys: torch.Tensor, values_grad: torch.Tensor, normalizer, lr: float,
                          ridge: float = 1.0, method: str = "auto") -> torch.Tensor:
    """UltraEdit ``ΔW`` (d_in x d_out, float32) normalized by a ``RunningMeanStd``-style module.

    The adapter between the other codebases' normalizer and this project's backend: the
    normalizer's own ``mean`` and ``std`` buffers (float32, length d_in + d_out; ``std`` is
    whatever formula the normalizer keeps, e.g. the official ``sqrt(M2 / (n - 1 + eps))``) are
    used as they are, in float64.  The normalizer must already include these rows.

    Equivalent PyTorch (what the original editors compute, in float32)::

        z = (torch.cat([keys, values_grad], 1) - normalizer.mean) / (normalizer.std + eps32)
        k_hat, g_hat = z.split([d_in, d_out], 1)
        V = -lr * (k_hat * k_hat).sum(1, keepdim=True) * g_hat
        dW = torch.linalg.solve(keys.T @ keys + ridge * I, keys.T @ V)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    mean, std = _normalizer_buffers(normalizer)
    n_rows, d_in = keys.shape
    if values_grad.shape[0] != n_rows:
        raise ValueError(f"keys and values_grad must have the same rows, got {n_rows} and "
                         f"{values_grad.shape[0]}")
    dim = d_in + values_grad.shape[1]
    if mean.numel() != dim or std.numel() != dim:
        raise ValueError(f"the normalizer tracks {mean.numel()} features but d_in + d_out = "
                         f"{d_in} + {values_grad.shape[1]} = {dim}")
    stats = FrozenStats(mean.to(keys.device), std.to(keys.device))
    return param_shift(keys, values_grad, stats, lr=float(lr), ridge=float(ridge), method=method)


# ------------------------------------------------------------------- reading the editors
def _cfg_get(obj, dotted: str, default=_MISSING):
    """``obj.a.b`` (attribute or mapping access); ``default`` (or _MISSING) when absent/None."""
    cur = obj
    for part in dotted.split("."):
        nxt = _MISSING
        try:
            nxt = getattr(cur, part)
        except Exception:  # omegaconf raises ConfigAttributeError; plain objects AttributeError
            if isinstance(cur, Mapping) and part in cur:
                nxt = cur[part]
        if nxt is _MISSING or nxt is None:
            return default
        cur = nxt
    return cur


def _module_shape(module) -> Tuple[int, int]:
    """(d_in, d_out): nn.Linear -> (in_features, out_features); GPT-2 Conv1D -> weight.shape."""
    if isinstance(module, torch.nn.Linear):
        return (module.in_features, module.out_features)
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    raise IntegrationError(f"edited module {type(module).__name__} is neither nn.Linear nor Conv1D")


def normalizer_for(lifelong_normalizer, shape: Tuple[int, int], net_id=None):
    """The normalizer of ``shape``: ``lifelong_normalizer[str(shape)]``, or for the official
    multi-iteration layout (a dict net_id -> ModuleDict) ``lifelong_normalizer[net_id][str(shape)]``.
    """
    key = str(tuple(shape))
    if not isinstance(lifelong_normalizer, Mapping) and not hasattr(lifelong_normalizer, "keys"):
        raise IntegrationError(f"lifelong_normalizer is a {type(lifelong_normalizer).__name__}, "
                               f"expected a ModuleDict keyed by str(shape) or a dict of them")
    if key in lifelong_normalizer:
        return lifelong_normalizer[key]
    keys = list(lifelong_normalizer.keys())
    nested = keys and all(hasattr(lifelong_normalizer[k], "keys") for k in keys)
    if nested:
        if net_id is None:
            if len(keys) != 1:
                raise IntegrationError(
                    f"lifelong_normalizer holds one ModuleDict per net_id {keys}; "
                    f"predict_param_shifts needs a net_id to pick one")
            net_id = keys[0]
        for candidate in (net_id, str(net_id)):
            if candidate in lifelong_normalizer:
                inner = lifelong_normalizer[candidate]
                if key in inner:
                    return inner[key]
                raise IntegrationError(f"lifelong_normalizer[{candidate!r}] has no entry {key!r} "
                                       f"(has {list(inner.keys())})")
        raise IntegrationError(f"lifelong_normalizer has no net_id {net_id!r} (has {keys})")
    raise IntegrationError(f"lifelong_normalizer has no entry {key!r} (has {keys})")


def _params_of(fn) -> Optional[List[inspect.Parameter]]:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def _missing_easyedit(editor) -> List[str]:
    missing = []
    predict = getattr(editor, "predict_param_shifts", None)
    params = _params_of(predict) if callable(predict) else None
    if params is None or not any(p.name == "module_kv_map" for p in params):
        missing.append("a predict_param_shifts(module_kv_map) method")
    if _cfg_get(editor, "config.inner_params") is _MISSING:
        missing.append("config.inner_params")
    if _cfg_get(editor, "config.lr") is _MISSING and _cfg_get(editor, "config.editor.lr") is _MISSING:
        missing.append("config.lr (or config.editor.lr)")
    return missing + _missing_common(editor)


def _missing_official(editor) -> List[str]:
    missing = []
    if not callable(getattr(editor, "cache", None)):
        missing.append("a cache(tuples) method")
    predict = getattr(editor, "predict_param_shifts", None)
    params = _params_of(predict) if callable(predict) else None
    required = [p.name for p in params or [] if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if params is None or any(p.name == "module_kv_map" for p in params) or set(required) - {"net_id"}:
        missing.append("a predict_param_shifts() method (no arguments, or only net_id)")
    for dotted in ("config.editor.cache_dir", "config.editor.lr", "config.model.edit_modules",
                   "config.dataset.n_edits"):
        if _cfg_get(editor, dotted) is _MISSING:
            missing.append(dotted)
    if (_cfg_get(editor, "config.dataset.batch_size") is _MISSING
            and _cfg_get(editor, "config.editor.batch_size") is _MISSING):
        missing.append("config.dataset.batch_size (or config.editor.batch_size)")
    return missing + _missing_common(editor)


def _missing_common(editor) -> List[str]:
    missing = []
    if not isinstance(getattr(editor, "model", None), torch.nn.Module):
        missing.append("model (an nn.Module)")
    if getattr(editor, "lifelong_normalizer", None) is None:
        missing.append("lifelong_normalizer")
    return missing


def detect_editor_kind(editor) -> str:
    """``"easyedit"`` or ``"official"``, from the interface; IntegrationError names what is missing."""
    state = getattr(editor, "__dict__", {}).get(_STATE_ATTR)
    if state is not None:
        return state.kind
    easy = _missing_easyedit(editor)
    if not easy:
        return "easyedit"
    official = _missing_official(editor)
    if not official:
        return "official"
    raise IntegrationError(
        f"cannot accelerate a {type(editor).__name__}: it is neither an EasyEdit ULTRAEDIT "
        f"(missing: {', '.join(easy)}) nor an official UltraEdit ULTRAEDIT "
        f"(missing: {', '.join(official)})")


# --------------------------------------------------------- in-memory features (official)
class _FeatureStore:
    """What the official ``cache`` would have written: (module_idx, idx, kind) -> tensor.

    Entries are overwritten like the files they replace; they persist until the next cache
    call overwrites them or the editor is reverted (as the files persist until the official
    code empties its cache directory).
    """

    def __init__(self):
        self.tensors: Dict[Tuple[int, int, str], torch.Tensor] = {}
        self.directory: Optional[str] = None

    def capture(self, obj, f, root: str) -> bool:
        if not isinstance(obj, torch.Tensor) or not isinstance(f, (str, os.PathLike)):
            return False
        path = os.path.abspath(os.fspath(f))
        if not (path + os.sep).startswith(root.rstrip(os.sep) + os.sep):
            return False
        match = _FILE_RE.fullmatch(os.path.basename(path))
        if match is None:
            return False
        self.tensors[(int(match[1]), int(match[2]), match[3])] = obj
        self.directory = os.path.dirname(path)
        return True

    def rows(self, module_idx: int, count: int, kind: str) -> List[torch.Tensor]:
        out = []
        for idx in range(count):
            t = self.tensors.get((module_idx, idx, kind))
            if t is None:
                raise KeyError(f"no cached {kind} for module {module_idx}, micro-batch {idx} "
                               f"(the official code would fail to load {module_idx}_{idx}_{kind}.pth)")
            out.append(t)
        return out


_SAVE_LOCK = threading.RLock()


@contextlib.contextmanager
def _saves_kept_in(store: _FeatureStore, root: str):
    """While active, ``torch.save(tensor, "<root>/.../<m>_<i>_keys|values_grad.pth")`` stores the
    tensor in ``store`` instead of writing it; every other call is passed to the real save."""
    root = os.path.abspath(os.fspath(root))
    with _SAVE_LOCK:
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if store.capture(obj, f, root):
                return None
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
        try:
            yield
        finally:
            torch.save = real_save


# ------------------------------------------------------------------------------- patching
@dataclass
class _PatchState:
    kind: str
    saved: Dict[str, Any] = field(default_factory=dict)  # name -> instance value or _MISSING
    store: Optional[_FeatureStore] = None
    method: str = "auto"
    reproduce_floor_quirk: bool = True


def is_patched(editor) -> bool:
    return _STATE_ATTR in getattr(editor, "__dict__", {})


def _output_device(editor) -> torch.device:
    try:
        return next(editor.model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _net_id_binder(original: Callable) -> Callable[..., Any]:
    sig = inspect.signature(original)

    def net_id(args, kwargs):
        bound = sig.bind(*args, **kwargs)
        return bound.arguments.get("net_id")
    return net_id


def _official_predict(editor, state: _PatchState, original: Callable) -> Callable:
    get_net_id = _net_id_binder(original)

    def predict_param_shifts(*args, **kwargs) -> Dict[str, torch.Tensor]:
        net_id = get_net_id(args, kwargs)
        cfg = editor.config
        n_edits = int(_cfg_get(cfg, "dataset.n_edits"))
        micro = _cfg_get(cfg, "dataset.batch_size")
        micro = int(micro if micro is not _MISSING else _cfg_get(cfg, "editor.batch_size"))
        n_key_batches = math.ceil(n_edits / micro)
        n_grad_batches = (math.ceil(n_edits // micro) if state.reproduce_floor_quirk
                          else n_key_batches)
        modules = list(_cfg_get(cfg, "model.edit_modules"))
        store = state.store
        if not store.tensors and modules:
            _log.warning("predict_param_shifts: nothing was cached in memory (cache ran before "
                         "the patch?); calling the original, which reads the files")
            return original(*args, **kwargs)
        lr = float(_cfg_get(cfg, "editor.lr"))
        out_device = _output_device(editor)
        shifts = {}
        for module_idx, name in enumerate(modules):
            shape = _module_shape(editor.model.get_submodule(name))
            normalizer = normalizer_for(editor.lifelong_normalizer, shape, net_id)
            keys = torch.cat(store.rows(module_idx, n_key_batches, "keys"))
            grads = torch.cat(store.rows(module_idx, n_grad_batches, "values_grad"))
            if grads.shape[0] < keys.shape[0]:  # the floor quirk: zero gradient rows
                grads = torch.cat([grads, grads.new_zeros(keys.shape[0] - grads.shape[0],
                                                          grads.shape[1])])
            shift = shift_from_normalizer(keys, grads, normalizer, lr, 1.0, state.method)
            shifts[name] = shift.to(out_device)
        return shifts

    return predict_param_shifts


def _official_cache(editor, state: _PatchState, original: Callable) -> Callable:
    def cache(*args, **kwargs):
        root = _cfg_get(editor, "config.editor.cache_dir")
        with _saves_kept_in(state.store, root):
            return original(*args, **kwargs)
    return cache


def _easyedit_predict(editor, state: _PatchState, original: Callable) -> Callable:
    def predict_param_shifts(module_kv_map) -> Dict[str, torch.Tensor]:
        cfg = editor.config
        lr = _cfg_get(cfg, "lr")
        lr = float(lr if lr is not _MISSING else _cfg_get(cfg, "editor.lr"))
        out_device = _output_device(editor)
        shifts = {}
        for module_idx, name in enumerate(list(cfg.inner_params)):
            shape = _module_shape(editor.model.get_submodule(name))
            normalizer = normalizer_for(editor.lifelong_normalizer, shape)
            entries = module_kv_map[module_idx]
            keys = torch.cat([entries[idx]["keys"] for idx in range(len(entries))])
            grads = torch.cat([entries[idx]["values_grad"] for idx in range(len(entries))])
            shifts[name] = shift_from_normalizer(keys, grads, normalizer, lr, 1.0,
                                                 state.method).to(out_device)
        return shifts
    return predict_param_shifts


def _install(editor, name: str, fn: Callable, original: Callable, state: _PatchState) -> None:
    fn.__name__ = original.__name__ if hasattr(original, "__name__") else name
    fn.__qualname__ = f"{type(editor).__name__}.{name} [ultraedit_kernels]"
    fn.__doc__ = (f"{name} accelerated by ultraedit_kernels (see ultraedit.integrations); "
                  f"revert with revert_ultraedit_kernels(editor).")
    fn.__wrapped_original__ = original
    state.saved[name] = editor.__dict__.get(name, _MISSING)
    object.__setattr__(editor, name, fn)


def apply_ultraedit_kernels(editor, *, method: str = "auto",
                            reproduce_floor_quirk: bool = True) -> str:
    """Patch ``editor`` (an official or EasyEdit ULTRAEDIT object) in place; returns its kind.

    Only this object changes (instance attributes shadow the class's methods).  Applying twice
    is a no-op.  ``method``: ``"auto"`` (dual Cholesky when N <= d_in), ``"dual"`` or
    ``"primal"``.  ``reproduce_floor_quirk`` (official kind only, default True): pair the last
    micro-batch's keys with zero gradient rows when ``n_edits % batch_size != 0``, exactly as
    the original does (see the module docstring).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if is_patched(editor):
        return editor.__dict__[_STATE_ATTR].kind
    kind = detect_editor_kind(editor)
    if not hasattr(editor, "__dict__"):
        raise IntegrationError(f"{type(editor).__name__} has no instance __dict__; cannot patch it")
    state = _PatchState(kind=kind, method=method, reproduce_floor_quirk=bool(reproduce_floor_quirk))
    predict = editor.predict_param_shifts
    if kind == "official":
        state.store = _FeatureStore()
        cache = editor.cache
        _install(editor, "cache", _official_cache(editor, state, cache), cache, state)
        _install(editor, "predict_param_shifts", _official_predict(editor, state, predict),
                 predict, state)
    else:
        _install(editor, "predict_param_shifts", _easyedit_predict(editor, state, predict),
                 predict, state)
    object.__setattr__(editor, _STATE_ATTR, state)
    return kind


def revert_ultraedit_kernels(editor) -> bool:
    """Undo :func:`apply_ultraedit_kernels`; returns False if ``editor`` was not patched.

    Every patched attribute is restored to exactly what the instance had before (usually
    nothing, so the class's methods show through again); features kept in memory are dropped.
    """
    state = getattr(editor, "__dict__", {}).get(_STATE_ATTR)
    if state is None:
        return False
    for name, previous in state.saved.items():
        if previous is _MISSING:
            object.__delattr__(editor, name)
        else:
            object.__setattr__(editor, name, previous)
    if state.store is not None:
        state.store.tensors.clear()
    object.__delattr__(editor, _STATE_ATTR)
    return True
