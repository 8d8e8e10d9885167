"""`opsearch show RUN [--json] [--top N]`: leaderboard, Pareto front, rejection statistics."""
from __future__ import annotations

import json
import math
import sys
from typing import Any

from opsearch import report


def add_parser(subparsers) -> None:
    from opsearch.commands.common import run_parent

    p = subparsers.add_parser("show", parents=[run_parent()],
                              help="leaderboard, Pareto front and rejection statistics of a run")
    p.add_argument("--json", action="store_true",
                   help="one JSON object on stdout: the summary and every trial with its user attributes")
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help="candidates in the leaderboard (default 10; baselines are always shown)")
    p.set_defaults(func=run)


def load_run(run_or_url: str, name: str | None = None) -> tuple[list[Any], dict[str, Any], str]:
    """(trials, study user attrs, study name) of an existing run; UserError if there is none.

    `name` picks the study inside a storage URL (``--storage URL`` with RUN as the name)."""
    from opsearch.study import open_run, run_trials

    study = open_run(run_or_url, name)
    return run_trials(study), dict(study.user_attrs), study.study_name


def run(args) -> int:
    from opsearch.commands.common import run_target
    from opsearch.errors import UserError

    if args.top < 0:
        raise UserError(f"--top must be >= 0, got {args.top}")
    trials, attrs, study_name = load_run(*run_target(args))
    summary = report.summary(trials, attrs, top=args.top)
    if args.json:
        out = {"run": args.run, "study": study_name, "study_attrs": attrs, "summary": summary,
               "rerank": summary.get("rerank"), "trials": report.trials_json(trials)}
        json.dump(out, sys.stdout, default=_json_default, allow_nan=False)
        sys.stdout.write("\n")
        return 0
    print_summary(summary, title=f"run {args.run}")
    from opsearch import surround
    around = surround.of_run(attrs)
    if around != surround.NONE:  # the formulas above are what goes inside it
        print(f"candidates are surrounded: {around} ({surround.SURROUNDS[around]}); "
              "baselines are their known layers")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def print_summary(summary: dict[str, Any], title: str = "", file=None) -> None:
    """The summary as rich tables for a person (also used at the end of `opsearch search`)."""
    from rich.console import Console
    from rich.table import Table

    from rich.markup import escape

    out = file or sys.stdout
    console = Console(file=out, width=None if out.isatty() else 160)
    archs = summary["archs"]
    table = Table(title=f"Leaderboard {title}".strip(), title_justify="left")
    table.add_column("trial", justify="right")
    table.add_column("layer")
    for arch in archs:
        table.add_column(arch, justify="right")
    table.add_column("mean", justify="right")
    table.add_column("pareto", justify="center")
    rungs = any(row.get("rung") is not None for row in summary["leaderboard"])  # the funnel's
    if rungs:
        table.add_column("rung", justify="right")
    for row in summary["leaderboard"]:
        name = escape(row["name"])
        if row["kind"] == "baseline":
            name = f"[dim]{name} (baseline)[/dim]"
        table.add_row(str(row["trial"]), name,
                      *(f"{row['accuracies'][a]:.3f}" for a in archs),
                      f"{row['mean']:.3f}", "*" if row["pareto"] else "",
                      *([str(row.get("rung") if row.get("rung") is not None else "-")] if rungs else []))
    console.print(table)

    counts = summary["verdicts"]
    n = summary["candidates"]
    parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    console.print(f"{n} candidates: {parts or 'none'}; not trained (rejected or duplicate): "
                  f"{100 * summary['not_trained_share']:.1f}%")

    filters = Table(title="Rejection filters", title_justify="left")
    for col in ("filter", "ran", "rejected", "duplicates", "mean s", "total s"):
        filters.add_column(col, justify="right" if col != "filter" else "left")
    for s in summary["filters"]:
        filters.add_row(s["filter"], str(s["ran"]), str(s["rejected"]), str(s["duplicates"]),
                        f"{s['mean_s']:.4f}", f"{s['total_s']:.2f}")
    if summary["filters"]:
        console.print(filters)

    times = Table(title="Time per candidate", title_justify="left")
    for col in ("verdict", "count", "mean s", "total s"):
        times.add_column(col, justify="right" if col != "verdict" else "left")
    for name, d in sorted(summary["time_per_candidate"].items(), key=lambda kv: -kv[1]["total_s"]):
        times.add_row(name, str(int(d["count"])), f"{d['mean_s']:.3f}", f"{d['total_s']:.1f}")
    if summary["time_per_candidate"]:
        console.print(times)
    from opsearch.commands.rerank import print_rerank
    print_rerank(summary.get("rerank"), file=out)  # the re-ranking stage, when the run has one
