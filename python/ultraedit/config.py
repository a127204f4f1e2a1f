"""EditConfig: every setting of the editing method in one validated, serializable object.

    from ultraedit import EditConfig, UltraEditor
    cfg = EditConfig.paper()                   # the paper's method (lr 1e-6, ridge 1, answer positions)
    cfg = EditConfig.official()                # the reference code's numerics (compat="official")
    cfg = EditConfig.for_model(model)          # the measured preset for this model, else the paper's
    cfg = EditConfig.from_preset("smollm2-135m")
    editor = UltraEditor(model, tok, cfg, lr=1e-4)   # keyword overrides are EditConfig fields

Values are checked once, in ``__post_init__`` (also after ``dataclasses.replace``), so a bad
value fails before any model is touched. ``to_dict()``/``from_dict()`` are the one spelling of
the options used by state files and run records; a command line derives its flags from
``dataclasses.fields(EditConfig)`` (each field's ``metadata["help"]``).

Measured presets are JSON files in ``ultraedit/presets/`` (``{"name", "description",
"fingerprint", "config"}``). :meth:`EditConfig.for_model` picks the preset whose
**model fingerprint** equals the model's: the values of ``config.model_type``,
``num_hidden_layers``, ``hidden_size``, ``intermediate_size`` and ``vocab_size``
(:func:`model_fingerprint`); every other model gets :meth:`EditConfig.paper`. User presets
(e.g. written by ``ultraedit tune``) are found first: ``for_model(model, presets=[files or
folders])`` and the folders or files of ``$ULTRAEDIT_PRESETS`` (:func:`preset_files`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["EditConfig", "resolve_config", "model_fingerprint", "measured_preset", "preset_names",
           "PAPER_LR", "BEYOND_PAPER", "FINGERPRINT_KEYS", "PAPER_MICRO_BATCH", "preset_files",
           "PRESETS_ENV"]

PAPER_LR = 1e-6
# the paper's micro-batch: its loss is the mean over each group of 10 requests' answer tokens
PAPER_MICRO_BATCH = 10
# the options beyond the paper's method (all off in EditConfig.paper())
BEYOND_PAPER = ("protect_mean", "steps", "hold_done", "hold_margin", "positions", "memory",
                "preserve", "key_contexts", "whiten")
FINGERPRINT_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                    "vocab_size")
PRESET_DIR = Path(__file__).parent / "presets"
PRESETS_ENV = "ULTRAEDIT_PRESETS"   # folders or files of user presets (EditConfig.for_model)


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _check_number(name: str, value, positive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        what = "a positive finite number" if positive else "a finite number >= 0"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def value_list(text: str) -> List[str]:
    """A list-valued option as a command line gives it (the ``cli_type="list"`` fields, ``plan
    --modules``): comma-separated values, or ``@FILE`` with one value per line. ``ValueError``
    naming the problem."""
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as fh:
                return [ln.strip() for ln in fh if ln.strip()]
        except OSError as err:
            raise ValueError(f"cannot read {text[1:]!r}: {err.strerror}") from None
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"expected comma-separated values, got {text!r}")
    return items


def _check_names(name: str, value, what: str) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        raise ValueError(f"{name} must be a list of {what}, not one string")
    return tuple(value)


@dataclass(frozen=True)
class EditConfig:
    """The editing method's settings; defaults are the paper's (:meth:`paper`).

    See each field's ``metadata["help"]``; the formulas are in ``ultraedit.solver``.
    """

    modules: Optional[Tuple[str, ...]] = _opt(
        None, "edited modules: names, globs or 're:' regexes (default: the architecture's "
              "choice for the capture positions, ultraedit.modules)", cli_type="list")
    lr: float = _opt(PAPER_LR, "pseudo-value step: V = -lr * ||k^||^2 * g^ (the paper: 1e-6)")
    ridge: float = _opt(1.0, "ridge lambda of the least squares (the paper: 1)")
    micro_batch: Union[int, str] = _opt(
        PAPER_MICRO_BATCH, "requests per forward+backward (the paper: 10), or 'auto': the largest "
        "number whose predicted peak fits memory_budget_gib (ultraedit.plan), each forward's "
        "loss weighted so the gradients equal the paper's 10-request means")
    backward_group: Union[int, str] = _opt(
        "auto", "micro-batches whose answer rows share one vocabulary projection and one "
                "backward (1: each alone, the paper's loop; the same gradients either way, the "
                "group's activations held at once), or 'auto': as many as the memory budget "
                "fits on the CPU, and on CUDA for a turn that packs, else 1 (ultraedit.batching)")
    pack: str = _opt(
        "auto", "forward each backward group's requests as one sequence of their tokens, no "
                "padding, attention per request (the same gradients up to rounding): 'auto' on "
                "the CPU, and on CUDA when a backward group holds several micro-batches, when "
                "the model passes a check, 'on' anywhere (refused if it fails), "
                "'off' (ultraedit.packing)", choices=("auto", "on", "off"))
    matmul_dtype: str = _opt(
        "model", "dtype of the model's linear products while a turn captures (its forwards and "
                 "backwards): 'model' (the weights' own) or 'bfloat16' (float32 weights as "
                 "bfloat16 copies made once per turn: faster turns on CPUs with native bfloat16 "
                 "and on GPUs, keys and gradients with bfloat16's rounding; "
                 "ultraedit.low_precision)", choices=("model", "bfloat16"))
    memory_budget_gib: Optional[float] = _opt(
        None, "GiB a turn may use with micro_batch='auto' (default: the model's weights plus "
              "85% of the free memory: the CUDA devices' free memory, or the available RAM)")
    compat: str = _opt("fixed", "'fixed' (the reference code's bugs fixed) or 'official' (its "
                                "numerics: length-sorted requests, per-micro-batch statistics)",
                       choices=("fixed", "official"))
    normalizer: str = _opt("shape", "running statistics per weight 'shape' (the paper) or per "
                                    "'module'", choices=("shape", "module"))
    accumulate: Union[str, bool] = _opt(
        "auto", "keep the accumulated delta in fp32 and write W = round(W0 + delta): True, "
                "False or 'auto' (on for bf16/fp16/float64 weights)")
    delta_device: Optional[str] = _opt(None, "device of the base copy, delta and rollback "
                                             "history (default: each module's device)")
    history: int = _opt(1, "turns that rollback() can undo (each keeps a copy of the edited "
                           "weights)")
    protect_mean: float = _opt(0.0, "alpha >= 0 of the mean-key row sqrt(alpha*N)*mu_k with "
                                    "target 0 (0 = the paper)")
    steps: int = _opt(1, "capture + solve + apply steps per turn on the same requests "
                         "(1 = the paper)")
    hold_done: bool = _opt(False, "rows of requests the model already predicts get "
                                  "pseudo-value 0; the turn ends when all hold")
    hold_margin: float = _opt(0.0, "with hold_done: a request holds once its target's logit "
                                    "leads every other token's by this much at every answer "
                                    "position (0 = once it is the argmax)")
    recheck: int = _opt(0, "K >= 2 with hold_done and positions='subject': a step runs only "
                           "the requests that did not hold at their last step, the held ones "
                           "keep their last key, and every K-th step runs all (ultraedit.held; "
                           "0 or 1 = every step runs every request)")
    positions: str = _opt("answer", "capture keys at the 'answer' positions (the paper) or at "
                                    "the last 'subject' token", choices=("answer", "subject"))
    memory: float = _opt(0.0, "nu >= 0 of the key memory nu*M of earlier turns' keys "
                              "(0 = the paper)")
    preserve: float = _opt(0.0, "mu >= 0 of the preserved subjects' keys mu*Kp^T Kp "
                                "(0 = the paper)")
    preserve_subjects: Optional[Tuple[str, ...]] = _opt(
        None, "subject names to preserve, and sources: ':generic' (entities mined from the "
              "unedited model's continuations of generic prompts; the default) or ':tables' "
              "(the offline tables' countries and 1,000 largest cities)", cli_type="list")
    preserve_contexts: Optional[Tuple[str, ...]] = _opt(
        None, "texts around each preserved subject, '{s}' marks it (default: "
              "ultraedit.preserve.DEFAULT_CONTEXTS)", cli_type="list")
    key_contexts: int = _opt(
        0, "positions='subject': each edit's key is the mean of its subject's key in the "
           "rewrite prompt and in this many generic contexts (ultraedit.fact_keys; 0 = off)")
    whiten: float = _opt(
        0.0, "eps >= 0: whiten the output gradients with their running covariance "
             "Cov(g) + eps*tr(Cov(g))/d*I instead of dividing by their standard deviations "
             "(ultraedit.whitening; 0 = the paper)")

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.modules is not None:
            mods = self.modules
            if isinstance(mods, str):
                mods = (mods,)
            elif isinstance(mods, (list, tuple)) and all(isinstance(m, str) for m in mods):
                mods = tuple(mods)
            else:
                raise ValueError(f"modules must be a module name or pattern, or a list of them, "
                                 f"got {mods!r}")
            set_("modules", mods)
        if self.compat not in ("fixed", "official"):
            raise ValueError(f"compat must be 'fixed' or 'official', got {self.compat!r}")
        if self.positions not in ("answer", "subject"):
            raise ValueError(f"positions must be 'answer' or 'subject', got {self.positions!r}")
        if self.compat == "official" and self.positions != "answer":
            raise ValueError("compat='official' reproduces the reference code, which captures at "
                             "the answer positions; use positions='answer' with it")
        if self.pack not in ("auto", "on", "off"):
            raise ValueError(f"pack must be 'auto', 'on' or 'off', got {self.pack!r}")
        if self.matmul_dtype not in ("model", "bfloat16"):
            raise ValueError(f"matmul_dtype must be 'model' or 'bfloat16', got "
                             f"{self.matmul_dtype!r}")
        if self.normalizer not in ("shape", "module"):
            raise ValueError(f"normalizer must be 'shape' or 'module', got {self.normalizer!r}")
        mb = self.micro_batch
        if mb != "auto":
            if isinstance(mb, bool) or not isinstance(mb, (int, float)) or int(mb) != mb or mb < 1:
                raise ValueError(f"micro_batch must be a positive integer or 'auto', got {mb!r}")
            set_("micro_batch", int(mb))
        bg = self.backward_group
        if bg != "auto":
            if isinstance(bg, bool) or not isinstance(bg, (int, float)) or int(bg) != bg or bg < 1:
                raise ValueError(f"backward_group must be a positive integer or 'auto', got "
                                 f"{bg!r}")
            set_("backward_group", int(bg))
        if self.memory_budget_gib is not None:
            set_("memory_budget_gib", _check_number("memory_budget_gib", self.memory_budget_gib,
                                                    positive=True))
            if mb != "auto":
                warnings.warn("memory_budget_gib has no effect unless micro_batch='auto'",
                              stacklevel=3)
        try:
            lr = float(self.lr)
        except (TypeError, ValueError):
            lr = float("nan")
        if not (lr > 0 and lr != float("inf")):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        set_("lr", lr)
        try:
            ridge = float(self.ridge)
        except (TypeError, ValueError):
            ridge = float("nan")
        if not (ridge > 0 and ridge != float("inf")):
            raise ValueError(f"ridge must be a positive finite number, got {self.ridge!r}")
        set_("ridge", ridge)
        for name in ("protect_mean", "memory", "preserve", "whiten", "hold_margin"):
            set_(name, _check_number(name, getattr(self, name), positive=False))
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.hold_done, bool):
            raise ValueError(f"hold_done must be True or False, got {self.hold_done!r}")
        if self.hold_margin > 0 and not self.hold_done:
            warnings.warn("hold_margin has no effect without hold_done", stacklevel=3)
        rc = self.recheck
        if isinstance(rc, bool) or not isinstance(rc, int) or rc < 0:
            raise ValueError(f"recheck must be a non-negative integer, got {rc!r}")
        if rc > 1 and not self.recheck_every:
            warnings.warn("recheck has no effect without hold_done, with positions='answer', "
                          "compat='official' or key_contexts", stacklevel=3)
        if self.accumulate not in ("auto", True, False):
            raise ValueError(f"accumulate must be 'auto', True or False, got {self.accumulate!r}")
        h = self.history
        if isinstance(h, bool) or not isinstance(h, (int, float)) or int(h) != h or h < 0:
            raise ValueError(f"history must be a non-negative integer, got {h!r}")
        set_("history", int(h))
        if self.delta_device is not None:
            set_("delta_device", str(self.delta_device))
        set_("preserve_subjects", _check_names("preserve_subjects", self.preserve_subjects,
                                               "subject names"))
        if self.preserve_contexts is not None and isinstance(self.preserve_contexts, str):
            raise ValueError(f"preserve_contexts must be a non-empty list of texts with '{{s}}', "
                             f"got {self.preserve_contexts!r}")
        set_("preserve_contexts", _check_names("preserve_contexts", self.preserve_contexts,
                                               "texts"))
        from .fact_keys import MAX_KEY_CONTEXTS

        kc = self.key_contexts
        if isinstance(kc, bool) or not isinstance(kc, int) or not 0 <= kc <= MAX_KEY_CONTEXTS:
            raise ValueError(f"key_contexts must be an integer from 0 to {MAX_KEY_CONTEXTS}, "
                             f"got {kc!r}")
        if kc and self.positions != "subject":
            warnings.warn("key_contexts has no effect with positions='answer'", stacklevel=3)
        if self.preserve == 0 and (self.preserve_subjects is not None
                                   or self.preserve_contexts is not None):
            warnings.warn("preserve_subjects/preserve_contexts have no effect with preserve=0",
                          stacklevel=3)

    @property
    def recheck_every(self) -> int:
        """``recheck`` where it applies (``hold_done``, ``positions="subject"``,
        ``compat="fixed"``, no ``key_contexts``, and ``recheck >= 2``), else 0
        (``ultraedit.held``)."""
        return self.recheck if self.recheck > 1 and _recheck_can_act(vars(self)) else 0

    # ------------------------------------------------------------------ presets
    @classmethod
    def paper(cls, **overrides) -> "EditConfig":
        """The paper's method: lr 1e-6, ridge 1, micro-batches of 10, answer positions, one
        step, no state beyond the normalizer."""
        return cls(**overrides)

    @classmethod
    def official(cls, **overrides) -> "EditConfig":
        """The paper's settings with the reference code's numerics (``compat="official"``)."""
        return cls(**{"compat": "official", **overrides})

    @classmethod
    def from_preset(cls, name_or_path: Union[str, Path], **overrides) -> "EditConfig":
        """``"paper"``, ``"official"``, a preset name of ``ultraedit/presets`` (see
        :func:`preset_names`) or the path of a JSON file: a preset (its ``config``), a plain
        :meth:`to_dict`, or an ``ultraedit run`` / ``demo`` result (its ``edit_config``: the
        config it edited with)."""
        if name_or_path in ("paper", "official"):
            return getattr(cls, str(name_or_path))(**overrides)
        path = Path(name_or_path)
        if not path.suffix and (PRESET_DIR / f"{name_or_path}.json").is_file():
            path = PRESET_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ValueError(f"no preset {str(name_or_path)!r}: give 'paper', 'official', one of "
                             f"{preset_names()} or the path of a preset JSON file")
        data = _read_json(path)
        values = None
        if isinstance(data, dict):
            values = data["edit_config"] if "edit_config" in data else data.get("config", data)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a preset is a JSON object with a 'config' object")
        return cls.from_dict(_over_preset(values, overrides))

    @classmethod
    def for_model(cls, model, presets: Optional[Sequence[Union[str, Path]]] = None,
                  **overrides) -> "EditConfig":
        """The measured preset whose fingerprint equals ``model_fingerprint(model)``, else the
        paper's config. Searched in order: ``presets`` (preset files or folders of them), the
        folders or files of ``$ULTRAEDIT_PRESETS`` (separated by ``os.pathsep``; e.g. the output
        of ``ultraedit tune``), then the shipped presets; the first match wins. ``overrides``
        are laid over it; with ``compat="official"`` among them, the preset's options beyond the
        paper are the paper's (the reference code has none)."""
        found = _find_preset(model, presets)
        if found is not None:
            values = found[1]["config"]
            if overrides.get("compat") == "official":
                paper = cls().to_dict()
                values = {**values, **{k: paper[k] for k in BEYOND_PAPER}}
            return cls.from_dict(_over_preset(values, overrides))
        return cls.paper(**overrides)

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> Dict[str, Any]:
        """Every field as a JSON value (tuples as lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "EditConfig":
        """The inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"EditConfig.from_dict needs a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown EditConfig option(s) {unknown}; the options are "
                             f"{list(cls.field_names())}")
        return cls(**data)

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> "EditConfig":
        """A copy with ``changes`` (validated); unknown names are an error naming them.
        ``hold_done=False`` also turns the margin off, and ``recheck`` where it would have
        nothing to act on (:func:`_holding_follows`)."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise TypeError(f"unknown editor option(s) {unknown}; the options are "
                            f"{list(self.field_names())}")
        return dataclasses.replace(self, **_holding_follows(vars(self), changes))

    def beyond_paper(self) -> Dict[str, Any]:
        """The options that differ from the paper's method (empty for the paper's config)."""
        paper = EditConfig()
        return {k: getattr(self, k) for k in BEYOND_PAPER if getattr(self, k) != getattr(paper, k)}


def _recheck_can_act(values: Dict[str, Any]) -> bool:
    """Whether ``recheck`` has rows to skip in a config's ``values`` (missing: the defaults):
    held edits with keys at the subject, the fixed numerics and no ``key_contexts``."""
    get = lambda k: values.get(k, getattr(EditConfig, k))  # noqa: E731 (the field's default)
    return (bool(get("hold_done")) and get("positions") == "subject"
            and get("compat") == "fixed" and not get("key_contexts"))


def _holding_follows(base: Dict[str, Any], changes: Dict[str, Any]) -> Dict[str, Any]:
    """``changes`` laid over a config's values ``base`` (a preset's, or another config's).
    ``hold_done=False`` without a ``hold_margin`` also sets the margin to 0, and changes that
    leave ``recheck`` nothing to act on (:func:`_recheck_can_act`) without a ``recheck`` also set
    it to 0: both are part of holding, and a preset's value of them is not the caller's to be
    warned about."""
    out = dict(changes)
    if changes.get("hold_done") is False and "hold_margin" not in changes:
        out["hold_margin"] = 0.0
    if ("recheck" not in changes and _recheck_can_act(base)
            and not _recheck_can_act({**base, **changes})):
        out["recheck"] = 0
    return out


def _over_preset(values: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """A preset's config ``values`` with ``overrides`` laid over them (:func:`_holding_follows`)."""
    return {**values, **_holding_follows(values, overrides)}


def measured_preset(model, presets: Optional[Sequence[Union[str, Path]]] = None) -> Optional[Path]:
    """The preset file :meth:`EditConfig.for_model` takes for ``model`` (the first whose
    fingerprint equals ``model_fingerprint(model)``, searched as it searches), or None: then
    it takes the paper's config."""
    found = _find_preset(model, presets)
    return None if found is None else found[0]


def _find_preset(model, presets) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """``(path, contents)`` of the preset :func:`measured_preset` names, read once, or None."""
    fp = model_fingerprint(model)
    for path in preset_files(presets):
        data = _read_json(path)
        want = data.get("fingerprint", {}) if isinstance(data, dict) else None
        if want and isinstance(data.get("config"), dict) and all(
                fp.get(k) == v for k, v in want.items()):
            return Path(path), data
    return None


def resolve_config(model, config=None, overrides: Optional[Dict[str, Any]] = None) -> EditConfig:
    """The config an editor on ``model`` runs with.

    ``config``: an :class:`EditConfig`, a dict (:meth:`EditConfig.from_dict`), a preset name or
    path (:meth:`EditConfig.from_preset`), or None for :meth:`EditConfig.for_model` (then, with
    ``compat="official"`` among the overrides, the options beyond the paper are the paper's:
    the reference code has none). ``overrides``: EditConfig fields; a None value means "not
    given" (the config's value is kept)."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(EditConfig.field_names()))
    if unknown:
        raise TypeError(f"unknown editor option(s) {unknown}; the options are "
                        f"{list(EditConfig.field_names())}")
    if config is None:
        return EditConfig.for_model(model, **given)
    if isinstance(config, dict):
        config = EditConfig.from_dict(config)
    elif isinstance(config, (str, Path)):
        config = EditConfig.from_preset(config)
    elif not isinstance(config, EditConfig):
        raise TypeError(f"config must be an EditConfig, a dict, a preset name or None, got "
                        f"{type(config).__name__} (pass modules=... and the other options as "
                        f"keywords)")
    return config.replace(**given) if given else config


def model_fingerprint(model) -> Dict[str, Any]:
    """What identifies a model for its measured preset: ``config.model_type``, the numbers of
    layers, the hidden and MLP sizes and the vocabulary size (None where the config lacks one)."""
    cfg = getattr(model, "config", None)
    return {k: getattr(cfg, k, None) for k in FINGERPRINT_KEYS}


def preset_files(presets: Optional[Sequence[Union[str, Path]]] = None) -> List[Path]:
    """The preset files :meth:`EditConfig.for_model` searches, in order: ``presets`` (files, or
    folders whose ``*.json`` are taken in name order), those of ``$ULTRAEDIT_PRESETS``, then the
    shipped ones. A path that does not exist is a ValueError naming it (and the variable)."""
    if isinstance(presets, (str, Path)):
        presets = [presets]
    given = [(p, "presets") for p in presets or ()]
    env = os.environ.get(PRESETS_ENV, "")
    given += [(p, f"${PRESETS_ENV}") for p in env.split(os.pathsep) if p.strip()]
    out: List[Path] = []
    for item, where in given:
        path = Path(item).expanduser()
        if path.is_dir():
            out += sorted(path.glob("*.json"))
        elif path.is_file():
            out.append(path)
        else:
            raise ValueError(f"{where}: no preset file or folder {str(item)!r}")
    return out + [PRESET_DIR / f"{name}.json" for name in preset_names()]


def preset_names() -> List[str]:
    """The measured presets shipped in ``ultraedit/presets``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the preset {path}: {exc}") from None
