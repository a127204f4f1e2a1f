"""The editor's shape: its modules import one way (no cycles), the editor stays thin, and it
reaches the backend only through its public names (and the backend's profiling ranges)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "python" / "ultraedit"
CORE = ["config", "solver", "state", "serialization", "checkpoint", "turn", "editor", "hooks",
        "tokenization", "modules", "models", "preserve", "placement", "batching", "plan"]


def imports(name):
    """The ``ultraedit`` modules that ``ultraedit.<name>`` imports (anywhere in the file)."""
    out = set()
    for node in ast.walk(ast.parse((PKG / f"{name}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            target = (node.module or "").split(".")[0]
            out.update([target] if target else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ultraedit."):
            out.add(node.module.split(".")[1])
    return out - {name}


def test_the_core_modules_import_one_way():
    graph = {m: imports(m) for m in CORE}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = [m for m in CORE if m in reach(m)]
    assert not cycles, f"import cycles through {cycles}"
    assert "editor" not in set().union(*(graph[m] for m in CORE if m != "editor"))


def test_the_editor_is_thin_and_uses_the_public_backend():
    src = (PKG / "editor.py").read_text()
    assert len(src.splitlines()) <= 300
    for name in CORE:
        code = (PKG / f"{name}.py").read_text()
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ultraedit_kernels"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name}.py imports {private} from {node.module}"
                assert node.module in ("ultraedit_kernels", "ultraedit_kernels._profiling"), \
                    f"{name}.py imports from {node.module}"
