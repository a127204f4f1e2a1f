"""ultraedit: lifelong UltraEdit knowledge editing for Hugging Face causal LMs.

    from ultraedit import UltraEditor, EditRequest, load_model
    model, tok = load_model()                       # embedded SmolLM2-135M-Instruct
    editor = UltraEditor(model, tok)                # default modules/lr for the architecture
    report = editor.edit([EditRequest("The capital of France is", "Rome", subject="France")])

Imports are lazy so that ``import ultraedit`` (and the CLI's ``--help``) stays fast: torch and
transformers load only when an editor, request type or model loader is first used.
"""

__all__ = ["UltraEditor", "EditRequest", "TurnReport", "EditConfig", "load_model", "apply_delta"]

_LAZY = {
    "UltraEditor": "ultraedit.editor",
    "EditRequest": "ultraedit.editor",
    "TurnReport": "ultraedit.editor",
    "EditConfig": "ultraedit.config",
    "load_model": "ultraedit.models",
    "apply_delta": "ultraedit.checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ultraedit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
