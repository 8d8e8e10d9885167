"""Flags and helpers shared by the commands that act on an existing run.

Every such command (show, export, plot, rerank, launch, status, dashboard) takes the run the
same way, so a hint printed by one command works when pasted into another:

    opsearch show RUN                          # runs/RUN/study.db, study RUN
    opsearch show sqlite:///path/study.db      # a storage URL holding one study
    opsearch show NAME --storage URL           # study NAME inside the storage URL
"""
from __future__ import annotations

import argparse

from opsearch.study import run_dir, run_hint  # noqa: F401  (re-exported for the commands)

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
