"""The editor package's layers point one way: cli -> eval -> editor -> ... ; data/ below eval.
Checked on the source (every import, also inside functions), and the CLI starts without torch."""

import ast
import os
import subprocess
import sys

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python",
                   "ultraedit")


def _modules():
    for folder, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                yield (rel[:-len(".__init__")] if rel.endswith(".__init__") else rel), path


def _imports(module, path):
    """Absolute names of the ultraedit modules ``module`` imports."""
    is_pkg = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[:None if is_pkg else -1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out |= {target} | {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {name for name in out if name == "ultraedit" or name.startswith("ultraedit.")}


def _under(name, package):
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("layer, forbidden", [
    ("ultraedit.data", ("ultraedit.eval", "ultraedit.cli", "ultraedit.metrics",
                        "ultraedit.editor")),
    ("ultraedit.eval", ("ultraedit.cli",)),
])
def test_lower_layers_do_not_import_higher_ones(layer, forbidden):
    bad = [(m, name) for m, path in _modules() if _under(m, layer)
           for name in _imports(m, path) if any(_under(name, f) for f in forbidden)]
    assert not bad, bad


def test_only_the_cli_imports_the_cli():
    bad = [(m, name) for m, path in _modules() if not _under(m, "ultraedit.cli")
           for name in _imports(m, path) if _under(name, "ultraedit.cli")]
    assert not bad, bad


def test_cli_help_loads_neither_torch_nor_transformers():
    code = ("import sys; from ultraedit.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(PKG),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "[]"
