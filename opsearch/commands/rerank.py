"""`opsearch rerank RUN`: the re-ranking stage on an existing study (README "Re-ranking").

Trains the top K candidates of the run (by the search's own rule) and its baselines again with
S seeds on a held-out task, as trials of the same study (seeds disjoint from the search's; the
two best candidates with more seeds, up to --max-seeds, while they are not distinguishable),
then prints the re-ranked table. Running it again resumes: finished items are kept, missing ones
are trained. The search itself is not
continued (its budget is taken as what the study holds).
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any

from opsearch.errors import UserError

# Baselines the table compares against in columns (every baseline is in --json).
TABLE_BASELINES = ("bn_relu", "evonorm_b0", "evonorm_s0")


def add_parser(subparsers) -> None:
    from opsearch.commands.common import run_parent

    p = subparsers.add_parser(
        "rerank", parents=[run_parent()],
        help="re-train the best candidates and the baselines with several seeds on held-out data",
        description="Re-rank a run: its top K candidates and its baselines, S seeds each, on a "
                    "held-out task (default: the held-out split of the run's dataset). Resumable.")
    p.add_argument("--top", dest="top_k", type=int, default=None, metavar="K",
                   help="candidates to re-rank (default: the run's rerank.top_k, else 5)")
    p.add_argument("--seeds", type=int, default=None, metavar="S",
                   help="seeds per layer (default: the run's rerank.seeds, else 3)")
    p.add_argument("--max-seeds", dest="max_seeds", type=int, default=None, metavar="M",
                   help="seeds the best candidate and the runner-up get at most while they are "
                        "not distinguishable (default: the run's rerank.max_seeds, else 8)")
    p.add_argument("--rerank-dataset", "--dataset", dest="dataset", default=None, metavar="D",
                   help="held-out dataset (default: the held-out split of the run's dataset)")
    p.add_argument("--data-dir", dest="data_dir", default=None, help="directory of that dataset's files")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default 1)")
    p.add_argument("-O", "--option", action="append", default=[], metavar="rerank.KEY=VALUE",
                   help="a rerank option: top_k, seeds, max_seeds, correction (holm, bh, "
                        "none), baselines, dataset, stage, or any "
                        "evaluator key of the held-out task (e.g. -O rerank.steps=600)")
    p.add_argument("--json", action="store_true", help="print the statistics as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def table_options(texts: list[str]) -> dict[str, Any]:
    """``-O rerank.KEY=VALUE`` options as a (nested) table of the stage's settings."""
    from opsearch.config import parse_option

    table: dict[str, Any] = {}
    for text in texts:
        path, value = parse_option(text)
        if path[0] != "rerank":
            raise UserError(f"option {text!r}: opsearch rerank takes rerank.KEY=VALUE options")
        node = table
        for part in path[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"option {text!r}: rerank.{part} is not a table")
        node[path[-1]] = value
    return table


def _merge(table: dict[str, Any], options: dict[str, Any]) -> None:
    for key, value in options.items():
        if isinstance(value, dict) and isinstance(table.get(key), dict):
            table[key] = dict(table[key])
            _merge(table[key], value)
        else:
            table[key] = value


def rerank_config(stored: dict[str, Any], url: str, study_name: str, counted: int,
                  options: dict[str, Any] | None = None, *, top_k: int | None = None,
                  seeds: int | None = None, max_seeds: int | None = None, dataset: str | None = None,
                  data_dir: str | None = None, workers: int | None = None):
    """The run's stored SearchConfig with the stage switched on, the [rerank] `options` and the
    flags applied, the budget held at what the study has (so no new candidate is proposed) and
    the storage pinned."""
    from opsearch.config import SearchConfig

    data = dict(stored)
    table = dict(data.get("rerank") or {})
    _merge(table, options or {})
    for key, value in (("top_k", top_k), ("seeds", seeds), ("max_seeds", max_seeds)):
        if value is not None:
            if value <= 0:
                flag = {"top_k": "top", "max_seeds": "max-seeds"}.get(key, key)
                raise UserError(f"--{flag} must be positive, got {value}")
            table[key] = value
    if dataset is not None:
        table["dataset"] = dataset
    if data_dir is not None:
        table["data_dir"] = data_dir
    table["enabled"] = True
    data.update(rerank=table, storage=url, name=study_name, budget=max(1, counted), plots=False)
    if workers is not None:
        data["workers"] = workers
    return SearchConfig.from_dict(data, source="rerank")


def prepare_stage(study, url: str, options: dict[str, Any] | None = None, **flags):
    """(config, task) of a re-ranking stage on an existing run: every name, option and the
    held-out data checked before anything is written (UserError otherwise). `flags`: the
    keywords of `rerank_config`. Shared by `opsearch rerank` and `SearchRun.rerank`."""
    from opsearch import report
    from opsearch.rerank import RerankTask

    attrs = dict(study.user_attrs)
    try:
        stored = json.loads(attrs.get("config") or "{}")
    except ValueError:
        stored = {}
    if not isinstance(stored, dict) or "archs" not in attrs:
        raise UserError(f"study {study.study_name!r} is not an opsearch run (no stored config)")
    from opsearch.study import run_trials

    trials = run_trials(study)
    archs = report.archs_of(trials, attrs)
    counted = sum(1 for t in trials if report.kind(t) == "candidate"
                  and t.user_attrs.get("verdict") != "failed:worker_lost")
    config = rerank_config(stored, url, study.study_name, counted, options, **flags)
    task = RerankTask.from_config(config)
    if report.best_trial(trials, archs) is None:
        raise UserError(f"run {study.study_name!r} has no evaluated candidate to re-rank yet")
    return config, task


def run_stage(config, task, progress=None) -> dict[str, Any]:
    """Train the stage's missing items (resuming it), then its statistics
    (`rerank_stats.summarize`)."""
    from opsearch import rerank_stats, report
    from opsearch.local_run import run_search

    done = run_search(config, progress=progress, enqueue_missing_baselines=False)
    trials = done.frozen_trials()
    attrs = done.storage.get_study_user_attrs(done.study_id)
    return rerank_stats.summarize(trials, report.archs_of(trials, attrs), attrs, stage=task.stage,
                                  correction=task.correction, max_seeds=max(task.max_seeds, task.seeds))


def run(args) -> int:
    from opsearch.commands.common import open_study, run_hint, run_target
    from opsearch.study import resolve, run_url

    study = open_study(args)
    url = resolve(*run_target(args))[0]
    config, task = prepare_stage(study, url, table_options(args.option), top_k=args.top_k,
                                 seeds=args.seeds, max_seeds=args.max_seeds, dataset=args.dataset,
                                 data_dir=args.data_dir, workers=args.workers)
    progress = None
    if not args.quiet:
        from opsearch.progress import SearchProgress
        progress = SearchProgress(config, command="rerank")
        progress.console.print(f"[bold]opsearch rerank[/] stage {task.stage}: {task.describe()}")
    start = time.time()
    result = run_stage(config, task, progress)
    if args.json:
        json.dump({"run": args.run, "study": study.study_name, "rerank": result}, sys.stdout,
                  allow_nan=False, default=str)
        sys.stdout.write("\n")
    else:
        print_rerank(result)
        hint = run_hint(url, study.study_name, run_url(study.study_name))
        print(f"done in {time.time() - start:.0f} s; next: opsearch show {hint}   |   "
              f"opsearch export {hint} -o layer.py", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# The table (also printed by `opsearch show` and at the end of `opsearch search`)


def _interval(d: dict[str, Any]) -> str:
    """mean ± half the interval; an interval clipped at 0 or 1 is not symmetric: [low, high]."""
    if d.get("mean") is None:
        return "-"
    if d.get("low") is None:
        return f"{d['mean']:.3f}"
    below, above = d["mean"] - d["low"], d["high"] - d["mean"]
    if abs(below - above) > 5e-4:
        return f"{d['mean']:.3f} [{d['low']:.2f}, {d['high']:.2f}]"
    return f"{d['mean']:.3f}±{(d['high'] - d['low']) / 2:.3f}"


def _versus(d: dict[str, Any] | None) -> str:
    if not d:
        return ""
    if d.get("diff") is None:
        return d.get("word", "")
    p = d.get("p_corrected", d.get("p"))  # the word follows the corrected p
    colour = {"better": "green", "worse": "red"}.get(d["word"], "dim")
    word = "n.d." if d["word"] == "not distinguishable" else d["word"]
    return f"[{colour}]{d['diff']:+.3f} {word}[/]" + (f" p_adj={p:.2g}" if p is not None else "")


def _contest(c: dict[str, Any] | None) -> str | None:
    if not c:
        return None
    p = f", p={c['p']:.2g}" if c.get("p") is not None else ""
    diff = f"{c['diff']:+.4f}" if c.get("diff") is not None else "?"
    head = (f"best candidate (trial {c['best']}) vs runner-up (trial {c['runner_up']}) over "
            f"{c['seeds']} seeds: {diff}{p}")
    if c["status"] == "distinguishable":
        return f"{head}: distinguishable"
    if c["status"] == "tie":
        return f"{head}: [yellow]a tie[/] (not distinguishable after {c['seeds']} seeds, the maximum)"
    return f"{head}: not distinguishable yet (up to {c['max_seeds']} seeds)"


def print_rerank(result: dict[str, Any] | None, file=None) -> None:
    """The re-ranked table: held-out mean ± half the 95% interval per architecture and overall,
    paired tests against bn_relu and the EvoNorms, ranks, and the agreement of the rankings."""
    if not result:
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    out = file or sys.stdout
    console = Console(file=out, width=None if out.isatty() else 200, highlight=False)
    archs = result["archs"]
    layers = result["layers"]
    names = [r["name"] for r in layers if r["kind"] == "baseline"]
    versus = [b for b in TABLE_BASELINES if b in names] or names[:3]
    task = result.get("task") or {}
    split = (task.get("dataset_options") or {}).get("split")
    what = (f"{task.get('dataset', '?')}{' held-out split' if split == 'heldout' else ''}, "
            f"{task.get('steps', '?')} steps" if task else "")
    counts = sorted({len(r["seeds"]) for r in layers})
    seeds = (f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}") if counts else "0"
    table = Table(title=f"Re-ranked on {escape(what)} ({seeds} seeds; the unit is the seed; "
                        f"stage {escape(result['stage'])})",
                  title_justify="left")
    for col in ("held-out", "search", "trial", "layer"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for arch in archs:
        table.add_column(arch, justify="right")
    table.add_column("mean [95% CI]", justify="right")
    for b in versus:
        table.add_column(f"vs {b}", justify="right")
    for r in layers:
        name = escape(r["name"][:60])
        if r["kind"] == "baseline":
            name = f"[dim]{name} (baseline)[/dim]"
        o = r["overall"]
        mean = "-" if o["mean"] is None else (
            f"{o['mean']:.3f}" + (f" [{o['low']:.3f}, {o['high']:.3f}]" if o.get("low") is not None else ""))
        search = "-" if r["search_rank"] is None else f"#{r['search_rank']} ({r['search_mean']:.3f})"
        table.add_row(f"#{r['heldout_rank']}", search, str(r["of_trial"]), name,
                      *(_interval(r["per_arch"][a]) for a in archs), mean,
                      *(_versus(r["vs"].get(b)) for b in versus))
    console.print(table)
    a = result["agreement"]
    if a.get("spearman") is not None:
        line = (f"search ranking vs held-out ranking over {a['n']} layers: Kendall tau "
                f"{a['kendall_tau']:.2f} (p={a['kendall_p']:.2g}), Spearman {a['spearman']:.2f} "
                f"(p={a['spearman_p']:.2g})")
        if a["spearman"] < 0.5:
            line += " [yellow]- the search's ranking did not hold: trust the held-out one[/]"
        console.print(line)
    else:
        console.print(f"rank agreement: too few layers ({a.get('n', 0)}) or constant scores")
    contest = _contest(result.get("contest"))
    if contest:
        console.print(contest)
    correction = result.get("correction_method") or "uncorrected"
    notes = [f"unit: {result.get('unit', 'seed')}; vs: {result['test']}, alpha {result['alpha']}, "
             f"p and word corrected over the stage's {result.get('family', '?')} comparisons, "
             f"every layer against every baseline ({correction}; --json has them all)",
             f"± is half the 95% interval ({result.get('intervals', 'Student t over seeds')}; "
             "one clipped at 0 or 1 is printed as its two ends)"]
    if result.get("seeds_disjoint") is False:
        notes.append("[yellow]this stage's seeds include the search's seed "
                     f"({', '.join(map(str, result.get('search_seeds') or []))}): a lucky "
                     "initialisation may carry over; run opsearch rerank again for a stage with "
                     "disjoint seeds[/]")
    if result.get("pending"):
        notes.append(f"{result['pending']} items still to train (run opsearch rerank again to finish)")
    if result.get("failed"):
        notes.append(f"{result['failed']} items failed")
    if result.get("duplicates_ignored"):
        notes.append(f"{result['duplicates_ignored']} duplicated items ignored (first finished counts)")
    if result.get("best_trial") is not None:
        best = next(r for r in layers if r["of_trial"] == result["best_trial"])
        notes.append(f"best candidate held out: trial {best['of_trial']} "
                     f"({escape(best['name'][:60])}); opsearch export picks it")
    for n in notes:
        console.print(f"[dim]{n}[/]")
