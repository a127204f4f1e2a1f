"""The editing-method options of ``ultraedit demo`` and ``ultraedit run``, derived from
:class:`ultraedit.config.EditConfig` (one flag per field, its help from the field's metadata),
and the editor they build.

``--preset NAME|FILE`` picks the starting config (default: the measured preset for the model,
else the paper's, as ``UltraEditor(model, tok)`` does); every flag given overrides one field.
List fields take comma-separated values or ``@FILE`` (one value per line).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..config import EditConfig, value_list
from ._common import UsageError

_DEST = "config_"   # argparse dest prefix of the EditConfig fields


class _ReadFrom(list):
    """A list option's values read from ``@FILE``; ``source`` is the file, an input that no
    output of the command may replace."""
    source = ""


def _list(text: str) -> List[str]:
    try:
        values = value_list(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if text.startswith("@"):
        values = _ReadFrom(values)
        values.source = text[1:]
    return values


def input_files(args: argparse.Namespace) -> List[Tuple[str, str]]:
    """``(flag, path)`` of every file the editing options read: ``--preset FILE`` and each
    ``--FIELD @FILE``; the outputs are checked against them before any work."""
    import os

    found = [("--preset", args.preset)] if args.preset and os.path.isfile(args.preset) else []
    for f in dataclasses.fields(EditConfig):
        value = getattr(args, _DEST + f.name, None)
        if isinstance(value, _ReadFrom):
            found.append((_flag(f.name), value.source))
    return found


def _str_or_bool(text: str):
    low = text.lower()
    if low in ("true", "yes", "on", "1"):
        return True
    if low in ("false", "no", "off", "0"):
        return False
    return text


def _int_or_auto(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")


_TYPES: Dict[str, Callable[[str], Any]] = {"float": float, "int": int, "str": str,
                                           "Optional[str]": str, "Union[str, bool]": _str_or_bool,
                                           "Union[int, str]": _int_or_auto,
                                           "Optional[float]": float}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_method_options(p: argparse.ArgumentParser) -> None:
    """``--preset`` and one flag per :class:`EditConfig` field (unset = the preset's value)."""
    g = p.add_argument_group(
        "editing method", "the fields of ultraedit.EditConfig; an option not given keeps the "
                          "preset's value")
    g.add_argument("--preset", metavar="NAME|FILE", default=None,
                   help="'paper', 'official', a measured preset (ultraedit/presets) or a preset "
                        "or config JSON file (default: the measured preset for the model, else "
                        "the paper's; with --compat official the paper's options)")
    for f in dataclasses.fields(EditConfig):
        meta = dict(f.metadata)
        kwargs: Dict[str, Any] = {"dest": _DEST + f.name, "default": None,
                                  "help": meta.get("help", "").replace("%", "%%")}  # argparse formats it
        if meta.get("cli_type") == "list":
            kwargs.update(type=_list, metavar="A,B,...|@FILE")
            if f.name == "modules":
                kwargs["help"] += "; 'paper': the paper's modules for the architecture"
        elif f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "choices" in meta:
            kwargs["choices"] = tuple(meta["choices"])
        elif f.type in _TYPES:
            kwargs["type"] = _TYPES[f.type]
            kwargs["metavar"] = f.name.upper()
        else:  # a new kind of field: give it a parser here
            raise TypeError(f"EditConfig.{f.name}: no command-line parser for type {f.type!r}")
        g.add_argument(_flag(f.name), **kwargs)


def given_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The EditConfig fields given on the command line."""
    given = {f.name: getattr(args, _DEST + f.name) for f in dataclasses.fields(EditConfig)
             if getattr(args, _DEST + f.name, None) is not None}
    return {k: list(v) if isinstance(v, _ReadFrom) else v for k, v in given.items()}


def resolve(args: argparse.Namespace, model, **changes) -> EditConfig:
    """The config of ``--preset`` with the given flags (and ``changes``) applied; a bad value is
    a :class:`UsageError` naming it."""
    from ..config import resolve_config
    from ..modules import paper_module_names, resolve_modules

    given = {**given_options(args), **changes}
    try:
        if given.get("modules") == ["paper"]:
            given["modules"] = paper_module_names(model)
        config = resolve_config(model, args.preset, given)
        if args.preset is None and not changes:
            note_paper_fallback(model, given)
        # modules that match nothing (or are not Linear) fail here, before any data is selected
        resolve_modules(model, config.modules, config.positions)
        return config
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None


def note_paper_fallback(model, given: Dict[str, Any]) -> None:
    """Say so on stderr when no measured preset fits ``model`` and the paper's settings are
    used as they are (its lr of 1e-6 barely changes small models), with what to do about it."""
    from ..config import measured_preset

    if measured_preset(model) is not None or "lr" in given:
        return
    cfg = getattr(model, "config", None)
    print(f"note: no measured preset for this {getattr(cfg, 'model_type', '?')} model: using the "
          f"paper's settings (lr 1e-6, {'the given modules' if 'modules' in given else 'its modules'}"
          f"), which barely change small models; `ultraedit tune --model DIR` searches a preset "
          f"for it, or give --lr/--preset (docs/config.md)", file=sys.stderr)


def check_field(name: str, value: Any) -> None:
    """The ValueError/TypeError an :class:`EditConfig` with ``name=value`` raises (``lr=-1``),
    with no warning: a field's warning depends on the fields beside it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        EditConfig.paper(**{name: value})


def check_method_options(args: argparse.Namespace) -> None:
    """Before the model loads: a ``--preset`` that names no preset (or a file that is not one),
    or an editing flag whose value no config accepts (``--lr -1``, ``--key-contexts 99``), is a
    :class:`UsageError`. What depends on the model (its modules, the preset's other fields
    combined with the flags) is checked by :func:`resolve` once the model is there."""
    try:
        if getattr(args, "preset", None) is not None:
            EditConfig.from_preset(args.preset)
        for name, value in given_options(args).items():
            if name != "modules":
                check_field(name, value)
        if getattr(args, _DEST + "delta_device", None) is not None:   # 'gpu9', 'cuda' on a CPU
            from ..state import storage_device

            storage_device(getattr(args, _DEST + "delta_device"))
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None


def preset_edit_wordings(name_or_path) -> Optional[str]:
    """The wording a preset file was tuned through (``tuning.edit_wordings``, written by
    ``ultraedit tune``), else None (a shipped preset, a config file, an older tuned preset)."""
    from ..config import _read_json

    if not name_or_path or not str(name_or_path).endswith(".json"):
        return None
    try:
        data = _read_json(name_or_path)
    except ValueError:
        return None
    tuning = data.get("tuning") if isinstance(data, dict) else None
    return tuning.get("edit_wordings") if isinstance(tuning, dict) else None


def build_editor(model, tokenizer, config: EditConfig, progress: bool = True):
    """``UltraEditor(model, tokenizer, config)``; says so first when it captures the preserved
    subjects' keys from the model (once, seconds to minutes), and afterwards whether they were
    captured or read from the cache. A setting the editor refuses (a module that is not a
    Linear, a name that matches nothing) is a :class:`UsageError`."""
    from ..editor import UltraEditor
    from ..preserve import announce_capture

    def announce(n_subjects):
        print(f"capturing the preserved subjects' keys once ({n_subjects} subjects), before the "
              f"first turn ...", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        with announce_capture(announce if progress else None, bars=progress):
            editor = UltraEditor(model, tokenizer, config)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    if progress and config.preserve > 0:
        how = "read from the cache" if editor.preserve_cached else "captured"
        print(f"preserved subjects' keys {how} in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr, flush=True)
    return editor


def resolved_config(editor) -> Dict[str, Any]:
    """The editor's config with its modules resolved to names: the ``to_dict()`` that, given
    back as ``--preset FILE`` or ``EditConfig.from_dict``, edits the same modules the same way."""
    return dataclasses.replace(editor.config, modules=tuple(editor.modules)).to_dict()

