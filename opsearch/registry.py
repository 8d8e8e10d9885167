"""Name -> object registries, one per plugin kind (timm's register/create/list shape).

Built-in plugins register themselves when their module is imported; a registry imports its
built-in modules lazily, on the first lookup, so that `import opsearch` stays cheap. Third-party
packages register through the entry-point group ``opsearch.plugins`` (each entry point names a
module, imported for its side effects), and a user's file through :func:`load_plugin_file`
(``--plugin FILE`` on the command line).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from importlib import metadata
from typing import Any, Callable, Iterable, TypeVar

from opsearch.errors import UserError

T = TypeVar("T")

ENTRY_POINT_GROUP = "opsearch.plugins"


class Registry:
    """A named collection of plugins of one kind."""

    def __init__(self, kind: str, builtin_modules: Iterable[str] = ()):
        self.kind = kind
        self._builtin_modules = tuple(builtin_modules)
        self._entries: dict[str, Any] = {}
        self._loaded = False

    def register(self, name: str | None = None, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")`` registers a function or class."""

        def decorator(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"cannot register {obj!r} as a {self.kind}: no name given")
            self.add(key, obj, replace=replace)
            return obj

        return decorator

    def add(self, name: str, obj: Any, *, replace: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        existing = self._entries.get(name)
        if existing is not None and existing is not obj and not replace:
            same_origin = (getattr(existing, "__module__", None), getattr(existing, "__qualname__", None)) == (
                getattr(obj, "__module__", None), getattr(obj, "__qualname__", None))
            if not same_origin:
                raise UserError(f"{self.kind} {name!r} is already registered by {_origin(existing)}")
        self._entries[name] = obj

    def get(self, name: str) -> Any:
        """The plugin called `name`; an unknown name raises UserError listing the known ones."""
        self.load_builtins()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UserError(self.unknown_message(name)) from None

    def unknown_message(self, name: Any) -> str:
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; known: {', '.join(known) or '(none)'}"

    def names(self) -> list[str]:
        self.load_builtins()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, Any]]:
        self.load_builtins()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self.load_builtins()
        return name in self._entries

    def load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtin_modules:
            importlib.import_module(module)
        load_entry_points()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


search_spaces = Registry("search space", ["opsearch.search_spaces"])
layers = Registry("layer", ["opsearch.search_spaces.known_layers"])
algorithms = Registry("algorithm", ["opsearch.plugins.algorithms"])
rejection_filters = Registry("rejection filter", ["opsearch.plugins.rejection"])
architectures = Registry("architecture", ["opsearch.trainers.architectures"])
datasets = Registry("dataset", ["opsearch.trainers.data"])

ALL = {
    "search_spaces": search_spaces,
    "layers": layers,
    "algorithms": algorithms,
    "rejection_filters": rejection_filters,
    "architectures": architectures,
    "datasets": datasets,
}


def search_space(name: str | None = None, *, replace: bool = False):
    """Register a function returning a pyglove hyper-value whose materialisation is a candidate."""
    return search_spaces.register(name, replace=replace)


register_layer = layers.register
register_algorithm = algorithms.register
register_filter = rejection_filters.register
register_architecture = architectures.register
register_dataset = datasets.register

_entry_points_loaded = False


def load_entry_points() -> None:
    """Import every module named in the ``opsearch.plugins`` entry-point group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # a broken third-party plugin must not take the CLI down
            raise UserError(f"plugin entry point {ep.name!r} ({ep.value}) failed to load: "
                            f"{type(e).__name__}: {e}") from e


_loaded_files: dict[str, Any] = {}


def load_plugin_file(path: str | os.PathLike) -> Any:
    """Import a user's Python file so that its decorators register plugins; returns the module."""
    path = os.path.abspath(os.fspath(path))
    if path in _loaded_files:
        return _loaded_files[path]
    if not os.path.isfile(path):
        raise UserError(f"plugin file not found: {path}")
    if not path.endswith(".py"):
        raise UserError(f"plugin file must be a Python file ending in .py: {path}")
    # The registries' own built-ins first, so a user file can replace or extend them.
    for registry in ALL.values():
        registry.load_builtins()
    module_name = "opsearch_user_plugin_" + str(abs(hash(path)))
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except UserError:
        sys.modules.pop(module_name, None)
        raise
    except SyntaxError as e:
        sys.modules.pop(module_name, None)
        raise UserError(f"plugin file {path} line {e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise UserError(f"plugin file {path} failed to import: {type(e).__name__}: {e}") from e
    _loaded_files[path] = module
    return module
