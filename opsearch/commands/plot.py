"""`opsearch plot RUN [-o DIR]`: PNG plots of a search (matplotlib, Agg backend).

- ``best_so_far.png``: best accuracy so far per architecture against candidates (every candidate
  counts on the x axis, rejected ones too: that is the budget spent), baselines as dashed lines;
- ``pareto.png``: pairwise scatter of the K accuracies, the Pareto front marked, baselines named;
- ``rejections.png``: candidates stopped by each filter, and each filter's mean time;
- ``rerank.png`` (runs with a re-ranking stage): search score against held-out score, with the
  95% interval over seeds as error bars.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Sequence

from opsearch import report
from opsearch.errors import UserError


def add_parser(subparsers) -> None:
    from opsearch.commands.common import run_parent

    p = subparsers.add_parser("plot", parents=[run_parent()], help="write PNG plots of a run")
    p.add_argument("-o", "--out", "--output-dir", dest="output_dir", default=None, metavar="DIR",
                   help="where to write the PNGs (default: a plots folder beside the study: "
                        "runs/RUN/plots, or <folder of the SQLite/journal file>/<study>/plots)")
    p.set_defaults(func=run)


def run(args) -> int:
    from opsearch.commands.common import run_target
    from opsearch.commands.show import load_run

    run_or_url, name = run_target(args)
    trials, attrs, study_name = load_run(run_or_url, name)
    out_dir = args.output_dir or default_dir(run_or_url, study_name)
    paths = write_plots(trials, attrs, out_dir)
    for path in paths:
        print(path)
    return 0


def default_dir(run_or_url: str, study_name: str) -> str:
    """The plots folder of a run: beside its study (`commands.common.run_dir`), never the
    current directory's runs/ for a study that lives elsewhere."""
    from opsearch.commands.common import run_dir
    from opsearch.study import resolve

    url, _ = resolve(run_or_url, study_name)
    return os.path.join(run_dir(url, study_name), "plots")


def figures(trials: Sequence[Any], study_attrs: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, matplotlib Figure) of each plot, drawn with pyplot's current backend (inline in a
    notebook); what `write_plots` saves and `SearchRun.plot` returns. The caller closes them."""
    import matplotlib.pyplot as plt

    from opsearch import rerank_stats

    archs = report.archs_of(trials, study_attrs)
    reranked = rerank_stats.summarize(trials, archs, study_attrs)
    search = report.search_trials(trials)  # the search's plots never see re-ranking items
    drawings = [("best_so_far", _best_so_far), ("pareto", _pareto), ("rejections", _rejections)]
    if reranked:  # one more plot once the run has a re-ranking stage
        drawings.append(("rerank", lambda plt, trials, archs: _rerank(plt, reranked)))
    return [(name, draw(plt, search, archs)) for name, draw in drawings]


def write_plots(trials: Sequence[Any], study_attrs: dict[str, Any], out_dir: str) -> list[str]:
    """Write the PNGs (Agg: no window opens); returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from opsearch.files import write_atomically

    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        from opsearch.study import DISK_FULL_ERRNOS, disk_full_error
        if e.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(OSError(e.errno, e.strerror, out_dir)) from None
        raise UserError(f"cannot create {out_dir}: {e.strerror}") from None
    paths = []
    for name, fig in figures(trials, study_attrs):
        path = os.path.join(out_dir, name + ".png")
        try:  # whole or not at all; a full disk: DiskFull, exit 4
            write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110,
                                                         bbox_inches="tight"), mode="wb")
        finally:
            plt.close(fig)
        paths.append(path)
    return paths


def _colors(plt, n: int) -> list:
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _baselines(trials, archs) -> list[tuple[str, tuple[float, ...]]]:
    out = []
    for t in trials:
        if report.kind(t) == "baseline":
            accs = report.accuracies(t, archs)
            if accs:
                out.append((report.name_of(t), accs))
    return out


def _best_so_far(plt, trials, archs):
    fig, ax = plt.subplots(figsize=(8, 4.8))
    series = report.best_so_far(trials, archs)
    colors = _colors(plt, len(archs))
    total = sum(1 for t in trials if report.kind(t) != "baseline")
    for arch, color in zip(archs, colors):
        pts = series.get(arch) or []
        if pts:
            xs, ys = zip(*pts)
            xs, ys = list(xs) + [total], list(ys) + [ys[-1]]
            ax.step(xs, ys, where="post", color=color, label=f"{arch} (best candidate)", lw=2)
    baselines = _baselines(trials, archs)
    for arch_index, (arch, color) in enumerate(zip(archs, colors)):
        if baselines:
            best_name, best_accs = max(baselines, key=lambda b: b[1][arch_index])
            ax.axhline(best_accs[arch_index], color=color, ls="--", lw=1,
                       label=f"{arch}: best baseline ({best_name})")
    ax.set_xlabel("candidates (all, rejected included)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Best accuracy so far per architecture")
    ax.set_xlim(0, max(total, 1))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    else:
        _empty(ax, "no evaluated candidate yet")
    return fig


def _pareto(plt, trials, archs):
    rows = report.scored_rows(trials, archs)
    cands = [r for r in rows if r.kind != "baseline"]
    bases = [r for r in rows if r.kind == "baseline"]
    pairs = list(itertools.combinations(range(len(archs)), 2)) or [(0, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.6), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        if not archs:
            _empty(ax, "no architectures recorded")
            continue
        ai, aj = archs[i], archs[j]
        if i == j:  # one objective: accuracy against trial number
            get_x = lambda r: r.trial  # noqa: E731
            ax.set_xlabel("trial")
        else:
            get_x = lambda r, a=ai: r.accuracies[a]  # noqa: E731
            ax.set_xlabel(f"{ai} accuracy")
        ax.set_ylabel(f"{aj} accuracy")
        off = [r for r in cands if not r.pareto]
        on = sorted((r for r in cands if r.pareto), key=get_x)
        ax.scatter([get_x(r) for r in off], [r.accuracies[aj] for r in off], s=18, c="0.6",
                   alpha=0.7, label="candidates")
        ax.scatter([get_x(r) for r in on], [r.accuracies[aj] for r in on], s=40, c="tab:red",
                   edgecolors="k", linewidths=0.5, label="candidates on the Pareto front", zorder=3)
        for r in bases:  # a baseline on the front gets a red edge
            ax.scatter([get_x(r)], [r.accuracies[aj]], marker="*", s=160, c="tab:blue",
                       edgecolors="tab:red" if r.pareto else "k", linewidths=1.5 if r.pareto else 0.5,
                       zorder=4, label="baselines (red edge: on the front)" if r is bases[0] else None)
            ax.annotate(r.name, (get_x(r), r.accuracies[aj]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.grid(alpha=0.3)
        if not rows:
            _empty(ax, "no evaluated candidate yet")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][0].legend(handles, labels, fontsize=8, loc="lower right")
    fig.suptitle("Accuracy per architecture; Pareto front over all K objectives, candidates and baselines together")
    fig.tight_layout()
    return fig


def _rejections(plt, trials, archs):
    stats = report.filter_stats(trials)
    counts = report.verdict_counts(trials)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    labels = [s.filter for s in stats]
    rejected = [s.rejected for s in stats]
    duplicates = [s.duplicates for s in stats]
    xs = range(len(labels))
    ax1.bar(xs, rejected, color="tab:red", label="rejected")
    ax1.bar(xs, duplicates, bottom=rejected, color="tab:orange", label="duplicates (not trained)")
    for x, r, d in zip(xs, rejected, duplicates):
        ax1.text(x, r + d, str(r + d), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(list(xs))
    ax1.set_xticklabels(labels, rotation=20)
    from matplotlib.ticker import MaxNLocator

    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_ylim(0, max([r + d for r, d in zip(rejected, duplicates)] + [1]) * 1.12)
    total = sum(counts.values())
    ax1.set_title(f"Candidates stopped per filter ({total} candidates; "
                  f"{counts.get('evaluated', 0)} fully evaluated)", fontsize=10)
    ax1.set_ylabel("candidates")
    ax1.legend(fontsize=8)
    ax2.bar(xs, [s.mean_s for s in stats], color="tab:gray")
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(labels, rotation=20)
    if any(s.mean_s > 0 for s in stats):
        ax2.set_yscale("log")
    ax2.set_ylabel("mean seconds per candidate it ran on (log)")
    ax2.set_title("Cost of each filter", fontsize=10)
    if not stats:
        _empty(ax1, "no filter statistics recorded")
        _empty(ax2, "")
    fig.tight_layout()
    return fig


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _rerank(plt, result):
    """Search score (one seed, search proxy) against held-out score (mean over seeds, 95%
    t-interval): every re-ranked layer, and a zoom on the contenders (within 0.05 of the best
    held-out mean), where the question of the stage is decided."""
    layers = [r for r in result["layers"] if r["search_mean"] is not None]
    best = max((r["overall"]["mean"] for r in layers), default=0.0)
    top = [r for r in layers if r["overall"]["mean"] >= best - 0.05]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, rows_all, title in ((axes[0], layers, "all re-ranked layers"),
                                (axes[1], top, "contenders (held-out mean within 0.05 of the best)")):
        for kind, color, marker in (("candidate", "tab:red", "o"), ("baseline", "tab:blue", "*")):
            rows = [r for r in rows_all if r["kind"] == kind]
            if not rows:
                continue
            xs = [r["search_mean"] for r in rows]
            ys = [r["overall"]["mean"] for r in rows]
            o = [r["overall"] for r in rows]
            err = [[0 if d["low"] is None else d["mean"] - d["low"] for d in o],
                   [0 if d["high"] is None else d["high"] - d["mean"] for d in o]]
            ax.errorbar(xs, ys, yerr=err, fmt=marker, color=color, ecolor=color, capsize=3,
                        ms=9 if marker == "*" else 6, label=f"{kind}s")
            for r, x, y in zip(rows, xs, ys):
                label = r["name"] if kind == "baseline" else f"#{r['of_trial']}"
                ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("search score (mean accuracy over the architectures, 1 seed)")
        ax.set_ylabel("held-out score (mean over seeds, 95% interval)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
        else:
            _empty(ax, "no re-ranked layer yet")
    a = result["agreement"]
    agreement = (f"Kendall tau {a['kendall_tau']:.2f}, Spearman {a['spearman']:.2f} over {a['n']} layers"
                 if a.get("spearman") is not None else "too few layers for a rank agreement")
    fig.suptitle(f"Re-ranking, stage {result['stage']}: {agreement}", fontsize=10)
    fig.tight_layout()
    return fig
