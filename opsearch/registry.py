"""Name -> plugin registries, one per plugin kind (timm's register / create / list shape).

A plugin registers itself with a decorator when its module is imported; the name given to the
decorator is its name (the registry sets a registered class's ``name`` attribute to it).
Which modules hold plugins is not written here: the modules named in the entry-point group
``opsearch.plugins`` are imported on the first lookup. opsearch declares its own built-in
modules there (pyproject.toml), exactly as a third-party package declares its plugins, so the
core names none of them. An entry point named after a registry (``algorithms``, ``layers``...)
is imported on the first lookup in that registry only (so that finding a search space does not
import the trainers); any other name on the first lookup in any registry. A user's file comes in through :func:`load_plugin_file`
(``--plugin FILE`` on the command line).

Options are checked in one place, `Registry.check_options`: against the plugin's ``OPTIONS``
table when it has one, else against the keyword parameters of the function or constructor.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from importlib import metadata
from typing import Any, Callable, Mapping, TypeVar

from opsearch.errors import UserError
from opsearch.hints import closest_hint

T = TypeVar("T")

ENTRY_POINT_GROUP = "opsearch.plugins"
DISTRIBUTION = "opsearch"


def check_option_names(owner: str, given: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    """UserError naming the first unknown option, the known ones and the closest match."""
    for key in given:
        if key not in known:
            names = sorted(known)
            raise UserError(f"{owner}: unknown option {key!r}{closest_hint(key, names)}; "
                            f"known: {', '.join(names) or '(none)'}")


class Registry:
    """A named collection of plugins of one kind."""

    def __init__(self, kind: str, entry_point: str | None = None):
        self.kind = kind
        self.entry_point = entry_point  # the name of the entry points that fill this registry
        self._entries: dict[str, Any] = {}

    def register(self, name: str | None = None, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")`` registers a function, class or object."""

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
        if isinstance(obj, type):
            obj.name = name  # the decorator's name is the plugin's name
        self._entries[name] = obj

    def unregister(self, name: str) -> None:
        """Remove `name` (a plugin registered by a test or a notebook cell); unknown: UserError."""
        if name not in self._entries:
            raise UserError(self.unknown_message(name))
        del self._entries[name]

    def get(self, name: str) -> Any:
        """The plugin called `name`; an unknown name raises UserError listing the known ones."""
        self.load_builtins()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UserError(self.unknown_message(name)) from None

    def unknown_message(self, name: Any) -> str:
        known = self.names()
        return f"unknown {self.kind} {name!r}{closest_hint(name, known)}; known: {', '.join(known) or '(none)'}"

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
        """Import the plugin modules this registry may find entries in (each until it imported)."""
        _loader.load(self.entry_point)

    # -- options ----------------------------------------------------------------------------

    def options(self, name: str) -> dict[str, Any]:
        """Option name -> default of the plugin `name` (what `opsearch list` shows)."""
        return plugin_options(self.get(name))[0]

    def check_options(self, name: str, options: Mapping[str, Any]) -> None:
        """An unknown option raises UserError with the known ones and the closest match."""
        known, open_ended = plugin_options(self.get(name))
        if not open_ended:
            check_option_names(f"{self.kind} {name!r}", options, known)

    def create(self, name: str, *args: Any, **options: Any) -> Any:
        """``plugin(*args, **options)`` after checking the option names; a plugin's own
        TypeError or ValueError about its options becomes a UserError naming it."""
        plugin = self.get(name)
        self.check_options(name, options)
        try:
            return plugin(*args, **options)
        except UserError:
            raise
        except (TypeError, ValueError) as e:
            raise UserError(f"{self.kind} {name!r}: {e}") from e

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def plugin_options(plugin: Any) -> tuple[dict[str, Any], bool]:
    """(option name -> default, whether any other keyword is accepted too) of a plugin: its
    ``OPTIONS`` table (values with a ``default`` attribute, or the defaults themselves), else
    the keyword parameters of the function or constructor (those with a default, or keyword-only)."""
    table = getattr(plugin, "OPTIONS", None)
    if isinstance(table, Mapping):
        return {k: getattr(v, "default", v) for k, v in table.items()}, False
    target = plugin.__init__ if isinstance(plugin, type) else plugin
    if not callable(target):
        return {}, False
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return {}, True
    options: dict[str, Any] = {}
    open_ended = False
    for p in parameters:
        if p.kind is p.VAR_KEYWORD:
            open_ended = True
        elif p.name != "self" and p.kind is not p.VAR_POSITIONAL and (
                p.default is not p.empty or p.kind is p.KEYWORD_ONLY):
            options[p.name] = None if p.default is p.empty else p.default
    return options, open_ended


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


search_spaces = Registry("search space", "search_spaces")
layers = Registry("layer", "layers")
algorithms = Registry("algorithm", "algorithms")
rejection_filters = Registry("rejection filter", "rejection_filters")
architectures = Registry("architecture", "architectures")
datasets = Registry("dataset", "datasets")
evaluators = Registry("evaluator", "evaluators")

ALL = {
    "search_spaces": search_spaces,
    "layers": layers,
    "algorithms": algorithms,
    "rejection_filters": rejection_filters,
    "architectures": architectures,
    "datasets": datasets,
    "evaluators": evaluators,
}


def search_space(name: str | None = None, *, replace: bool = False, surround: str = "none"):
    """Register a function returning a pyglove hyper-value whose materialisation is a candidate.

    `surround` says what the compiled layer puts around its candidates (opsearch/surround.py):
    "none" (the candidate is the whole norm-act layer) or "batchnorm" (the network keeps its
    BatchNorm and the candidate replaces the activation, as in an activation search); it is
    kept on the function as ``surround``."""
    from opsearch import surround as _surround

    checked = _surround.check(surround)
    register = search_spaces.register(name, replace=replace)

    def decorator(fn: T) -> T:
        fn.surround = checked
        return register(fn)

    return decorator


def space_surround(name: str) -> str:
    """The surround a registered search space declares (``none`` when it declares none)."""
    from opsearch import surround as _surround
    return _surround.check(getattr(search_spaces.get(name), "surround", _surround.NONE))


register_layer = layers.register
register_algorithm = algorithms.register
register_filter = rejection_filters.register
register_architecture = architectures.register
register_dataset = datasets.register
register_evaluator = evaluators.register


# --------------------------------------------------------------------------------------------
# Discovery


class EntryPointLoader:
    """Imports the modules of an entry-point group, each until it imported once.

    A module that fails to import stays pending: every later lookup tries it again and raises
    the same clear error, instead of leaving a registry silently empty for the process."""

    def __init__(self, group: str = ENTRY_POINT_GROUP, entry_points: list | None = None):
        self.group = group
        self._pending = list(entry_points) if entry_points is not None else None
        self._importing: set[str] = set()

    def _discover(self) -> list:
        found = sorted(metadata.entry_points(group=self.group),
                       key=lambda ep: (_dist_name(ep) != DISTRIBUTION, ep.value))
        if not any(_dist_name(ep) == DISTRIBUTION for ep in found):
            raise UserError(f"no built-in plugins: the {DISTRIBUTION} package is not installed "
                            f"(its entry points {self.group!r} are missing); run `pip install -e .` "
                            "in the repository")
        return found

    def load(self, registry: str | None = None) -> None:
        """Import the pending modules for one registry (named after it, or after none), or all."""
        if self._pending is None:
            self._pending = self._discover()
        for ep in list(self._pending):
            if ep.value in self._importing:  # it looks something up while being imported
                continue
            if registry is not None and ep.name != registry and ep.name in ALL:
                continue
            self._importing.add(ep.value)
            try:
                ep.load()
            except Exception as e:
                owner = _dist_name(ep) or "an installed package"
                raise UserError(f"plugin module {ep.value} (entry point {ep.name!r} of {owner}) "
                                f"failed to import: {type(e).__name__}: {e}") from e
            finally:
                self._importing.discard(ep.value)
            self._pending.remove(ep)


def _dist_name(ep: Any) -> str | None:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) if dist is not None else None


_loader = EntryPointLoader()


def load_entry_points() -> None:
    """Import every module named in the ``opsearch.plugins`` entry-point group (ours first)."""
    _loader.load()


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
    load_entry_points()  # the built-ins first, so that a user file can replace or extend them
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
