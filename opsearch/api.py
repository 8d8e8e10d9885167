"""`opsearch.search` and `opsearch.load`: the command line's search and its runs, from Python.

A second front end beside opsearch/cli.py, on the same path: the keys of the config file build
the same `SearchConfig`, and `commands.search.search_and_report` runs it as `opsearch search`
does, so the two give the same trials at the same seed. Bad input raises `UserError` with the
command's message; nothing here exits the interpreter.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from typing import Any

from opsearch.config import SearchConfig, load_toml
from opsearch.errors import UserError
from opsearch.run import SearchRun

# Keys whose value is a table: merged into the config file's table (as `-O section.key=value`
# does), where any other key replaces the file's value (as a flag does).
TABLE_KEYS = ("space_options", "algorithm_options", "evaluator", "filter_options", "rerank", "funnel")


def search(config: SearchConfig | str | os.PathLike | Mapping[str, Any] | None = None, /, *,
           progress: str = "auto", **keys: Any) -> SearchRun:
    """Run (or resume) a search to its budget, then its re-ranking stage; returns the run.

    `config`: a `SearchConfig`, a TOML config file's path, or a dict of its keys; `keys`: the
    same keys (``budget=20``, ``archs=[...]``, ``evaluator={"steps": 300}``) on top of it. The
    space is a name or the function decorated with `@opsearch.search_space`. The same call again
    resumes the study (stored under runs/<name>/ unless ``storage`` says otherwise).
    `progress`: auto (a bar in a notebook, the command's lines elsewhere), lines, bar, none."""
    from opsearch.commands.search import search_and_report
    from opsearch.progress import make_progress

    resolved = build(config, keys)
    _check_workers_can_load(resolved)
    with _keep_matplotlib_backend():  # the PNGs are drawn with Agg; a notebook keeps inline
        run = search_and_report(resolved, make_progress(resolved, progress))
    return SearchRun(run.url, run.study_name)


def load(name: str, storage: str | None = None) -> SearchRun:
    """An existing run, named as the commands take RUN: a run name (runs/NAME/study.db), a
    storage URL holding one study, or with `storage` the study's name in that storage."""
    from opsearch.study import open_run, resolve

    if not isinstance(name, str):
        raise UserError(f"a run is named by a string, got {name!r}")
    run_or_url, study = (storage, name) if storage else (name, None)
    opened = open_run(run_or_url, study)  # UserError when there is none
    return SearchRun(resolve(run_or_url, study)[0], opened.study_name, opened)


def build(config: Any, keys: Mapping[str, Any]) -> SearchConfig:
    """The SearchConfig of `search`'s arguments: defaults < `config` < `keys`."""
    source = "options"
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, SearchConfig):
        data = config.to_dict()
    elif isinstance(config, (str, os.PathLike)):
        data, source = load_toml(os.fspath(config)), f"config file {os.fspath(config)}"
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        raise UserError(f"config must be a SearchConfig, a TOML file's path or a dict of its "
                        f"keys, got {type(config).__name__}")
    for key, value in keys.items():
        if key == "space" and callable(value):
            value = space_name(value)
        if key in TABLE_KEYS and isinstance(value, Mapping) and isinstance(data.get(key), dict):
            data[key] = _merged(data[key], value)
        else:
            data[key] = value
    if callable(data.get("space")):
        data["space"] = space_name(data["space"])
    return SearchConfig.from_dict(data, source)


def space_name(fn: Any) -> str:
    """The name a function was registered under with `@search_space`."""
    from opsearch import registry

    for name, entry in registry.search_spaces.items():
        if entry is fn:
            return name
    raise UserError(f"space {getattr(fn, '__name__', fn)!r} is not a registered search space: "
                    "decorate it with @opsearch.search_space(\"name\")")


def _merged(table: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(table)
    for key, value in update.items():
        out[key] = (_merged(out[key], value) if isinstance(value, Mapping)
                    and isinstance(out.get(key), Mapping) else value)
    return out


def _check_workers_can_load(config: SearchConfig) -> None:
    """Worker processes start afresh: they find the built-in and installed plugins and the
    `plugins` files, not what this session registered (a notebook cell, an imported module).
    Say so before the search starts, instead of workers that fail and leave one to do the work."""
    from importlib import metadata

    from opsearch import registry
    from opsearch.local_run import resolved_workers

    if resolved_workers(config) <= 1:
        return
    for path in config.plugins:
        registry.load_plugin_file(path)
    entry_modules = [ep.value.split(":")[0] for ep in metadata.entry_points(group=registry.ENTRY_POINT_GROUP)]
    files = {os.path.abspath(p) for p in config.plugins}
    used = [(registry.search_spaces, config.space), (registry.algorithms, config.algorithm),
            (registry.evaluators, config.evaluator_plugin), (registry.datasets, config.dataset)]
    used += [(registry.architectures, a) for a in config.archs]
    used += [(registry.rejection_filters, f) for f in config.filters or ()]
    for reg, name in used:
        module_name = getattr(reg.get(name), "__module__", None) or ""
        if any(module_name == m or module_name.startswith(m + ".") for m in entry_modules):
            continue
        file = getattr(sys.modules.get(module_name), "__file__", None)
        if file and os.path.abspath(file) in files:
            continue
        raise UserError(f"{reg.kind} {name!r} is defined in this Python session, which the "
                        f"{resolved_workers(config)} worker processes cannot see: put it in a file "
                        "and pass plugins=[\"that_file.py\"], or search with workers=1")


@contextlib.contextmanager
def _keep_matplotlib_backend():
    """`write_plots` switches matplotlib to Agg; switch back after, so that a notebook's figures
    still show inline."""
    import matplotlib

    before = matplotlib.get_backend()  # a Jupyter kernel's is inline (MPLBACKEND)
    try:
        yield
    finally:
        if matplotlib.get_backend() != before:
            with contextlib.suppress(Exception):
                matplotlib.use(before, force=True)
