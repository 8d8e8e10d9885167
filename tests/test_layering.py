"""The flow reads one way: the core (opsearch/, but not opsearch/commands/) imports nothing from
the built-in plugins (plugins/, search_spaces/, trainers/) or the commands.

Read from the source with `ast`, so no module is imported (an import with side effects, or a
lazy import inside a function, cannot hide an edge). `importlib.import_module("...")` calls with
a literal or f-string name count as imports too. The command line itself (opsearch/cli.py,
opsearch/__main__.py) sits above the commands and is not part of the core.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "opsearch"
FORBIDDEN = ("trainers", "plugins", "search_spaces", "commands")
COMMAND_LINE = {"cli.py", "__main__.py"}


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
