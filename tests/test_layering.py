"""The flow reads one way: the core (opsearch/, but not opsearch/commands/) imports nothing from
the built-in plugins (plugins/, search_spaces/, trainers/) or the commands.

Read from the source with `ast`, so no module is imported (an import with side effects, or a
lazy import inside a function, cannot hide an edge). `importlib.import_module("...")` calls with
a literal or f-string name count as imports too. The front ends sit above the commands and are
not part of the core: the command line (opsearch/cli.py, opsearch/__main__.py) and the Python API
(opsearch/api.py, opsearch/run.py), which the package's __init__ alone names, on first use.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "opsearch"
FORBIDDEN = ("trainers", "plugins", "search_spaces", "commands")
COMMAND_LINE = {"cli.py", "__main__.py", "api.py", "run.py"}  # the front ends
PYTHON_API = ("opsearch.api", "opsearch.run")


def core_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py")
                  if p.relative_to(ROOT).parts[0] != "commands"
                  and not (p.parent == ROOT and p.name in COMMAND_LINE))


def module_name(path: Path) -> str:
    parts = ("opsearch",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and _is_import_module(node.func):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                found.append((node.lineno, str(arg.values[0].value)))
    return found


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))


def forbidden(name: str) -> bool:
    parts = name.split(".")
    if parts[0] in FORBIDDEN:
        return True
    return parts[0] == "opsearch" and len(parts) > 1 and parts[1] in FORBIDDEN


def violations(files: list[Path]) -> list[str]:
    return [f"{path.relative_to(ROOT.parent)}:{line} imports {name}"
            for path in files for line, name in imported_modules(path) if forbidden(name)]


def test_the_core_imports_no_plugin_and_no_command():
    files = core_files()
    assert {"engine.py", "rejection.py", "registry.py", "progress.py"} <= {p.name for p in files}
    assert not any("commands" in p.parts for p in files)
    assert violations(files) == []


def test_only_the_package_names_the_python_api():
    """`opsearch.search`, `opsearch.load` come from the __init__'s lazy `__getattr__`; no other
    core module reaches up into the front end (and through it, the commands)."""
    found = [f"{path.name}:{line} imports {name}" for path in core_files() if path.name != "__init__.py"
             for line, name in imported_modules(path)
             if name in PYTHON_API or name.startswith(tuple(m + "." for m in PYTHON_API))]
    assert found == []
    assert any(name == "opsearch.api" for _, name in imported_modules(ROOT / "__init__.py"))


@pytest.mark.parametrize("source, bad", [
    ("from opsearch.trainers.evaluator import Evaluator", True),
    ("def f():\n    from opsearch.plugins.rejection._probes import flush_denormals", True),
    ("from opsearch import commands", True),
    ("from .commands.show import print_summary", True),
    ("import importlib\nimportlib.import_module(f'opsearch.search_spaces.{x}')", True),
    ("import trainers.data", True),
    ("from opsearch import registry, report\nfrom opsearch.evaluation import Evaluator", False),
])
def test_the_walker_sees_every_kind_of_import(tmp_path, monkeypatch, source, bad):
    fake_root = tmp_path / "opsearch"
    fake_root.mkdir()
    (fake_root / "mod.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    assert bool(violations([fake_root / "mod.py"])) is bad


# --------------------------------------------------------------------------------------------
# No import cycles: every module of opsearch/ can be read (and changed) knowing only what is
# below it. An edge is any import at any depth, lazy ones included: a cycle hidden inside a
# function is still a cycle for the reader.

def import_graph(files: list[Path]) -> dict[str, set[str]]:
    """Module -> the opsearch modules it imports (``from opsearch import x`` counts as x)."""
    names = {module_name(p): p for p in files}
    graph = {name: set() for name in names}
    for name, path in names.items():
        for _, target in imported_modules(path):
            if target in names and target != name and target != "opsearch":
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles_in_opsearch():
    files = sorted(ROOT.rglob("*.py"))
    graph = import_graph(files)
    assert {"opsearch.engine", "opsearch.config", "opsearch.rerank"} <= set(graph)
    assert "opsearch.config" in graph["opsearch.engine"]  # the walker sees the edges
    assert cycles(graph) == []


def test_the_cycle_finder_finds_lazy_and_long_cycles(tmp_path, monkeypatch):
    fake_root = tmp_path / "opsearch"
    fake_root.mkdir()
    (fake_root / "a.py").write_text("from opsearch import b\n")
    (fake_root / "b.py").write_text("def f():\n    from opsearch.c import g\n")
    (fake_root / "c.py").write_text("import opsearch.a\n")
    (fake_root / "d.py").write_text("from opsearch import a\n")  # above the cycle, not in it
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    graph = import_graph(sorted(fake_root.glob("*.py")))
    assert cycles(graph) == [["opsearch.a", "opsearch.b", "opsearch.c"]]
    (fake_root / "c.py").write_text("x = 1\n")
    assert cycles(import_graph(sorted(fake_root.glob("*.py")))) == []
