"""Flags and helpers shared by the commands that act on an existing run.

Every such command (show, export, plot, rerank, launch, status, dashboard) takes the run the
same way, so a hint printed by one command works when pasted into another:

    opsearch show RUN                          # runs/RUN/study.db, study RUN
    opsearch show sqlite:///path/study.db      # a storage URL holding one study
    opsearch show NAME --storage URL           # study NAME inside the storage URL
"""
from __future__ import annotations

import argparse
import os
import shlex

RUN_HELP = ("run name (runs/RUN/study.db), or a storage URL holding one study; with --storage, "
            "the study's name inside that storage")


def run_parent() -> argparse.ArgumentParser:
    """An argparse parent with the positional RUN and --storage URL."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("run", metavar="RUN", help=RUN_HELP)
    parent.add_argument("--storage", default=None, metavar="URL",
                        help="Optuna storage URL (sqlite:///FILE, postgresql://..., journal:///FILE); "
                             "RUN is then the study's name in it")
    return parent


def plugin_parent() -> argparse.ArgumentParser:
    """An argparse parent with ``--plugin FILE`` (repeatable), for commands that look plugins up;
    the command calls `load_plugins(args)` before its first lookup."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--plugin", action="append", default=[], metavar="FILE",
                        help="import a Python file that registers plugins (repeatable)")
    return parent


def load_plugins(args) -> None:
    from opsearch import registry

    for path in getattr(args, "plugin", None) or []:
        registry.load_plugin_file(path)


def run_target(args) -> tuple[str, str | None]:
    """(run name or storage URL, explicit study name or None) from parsed RUN / --storage."""
    if getattr(args, "storage", None):
        return args.storage, args.run
    return args.run, None


def open_study(args):
    """The optuna.Study chosen by RUN / --storage; UserError (one line) if there is none."""
    from opsearch.study import open_run

    run_or_url, name = run_target(args)
    return open_run(run_or_url, name)


def run_hint(url: str, study_name: str, default_url: str | None = None) -> str:
    """The RUN arguments that select this study again, quoted for a shell.

    A run under runs/ is named by its name alone; any other storage by ``NAME --storage URL``,
    which works whatever else that storage holds."""
    if default_url is not None and url == default_url:
        return shlex.quote(study_name)
    return f"{shlex.quote(study_name)} --storage {shlex.quote(url)}"


def run_dir(url: str, study_name: str) -> str:
    """Where files of a run go by default (plots, logs): beside its SQLite or journal file, in a
    folder named after the study; runs/<study> for a database server."""
    from opsearch.study import runs_dir

    path = None
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
    elif url.startswith("journal:///"):
        path = url[len("journal://"):]
    elif "://" not in url:
        path = url
    if path and path != ":memory:":
        base = os.path.dirname(os.path.abspath(path))
        if os.path.basename(path) == "study.db" and os.path.basename(base) == study_name:
            return base  # runs/<name>/study.db: the run's own folder
        return os.path.join(base, study_name)
    return os.path.join(runs_dir(), study_name)
