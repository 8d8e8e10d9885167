"""A search's results from Python: the object `opsearch.search` and `opsearch.load` return.

Notebook users read a run as tables, figures and a layer to put in their own model, not as
printed reports. Every method reads the study through the functions behind `opsearch show`,
`export`, `plot` and `rerank`, so that a notebook and the command line never disagree about a
run. Like the command line it sits above the commands (tests/test_layering.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from opsearch import report
from opsearch.errors import UserError

# The stored contract (README, "Stored results") as columns, in this order; acc/<arch> follow.
CONTRACT_COLUMNS = ("kind", "verdict", "formula", "layer", "elapsed_s")
# What a trial of another kind carries: re-ranking items, funnel promotions, rejections.
KIND_COLUMNS = ("stage", "seed", "of_trial", "rung", "grade", "reason", "hash", "graph")


def _pandas():
    try:
        import pandas
    except ImportError:
        raise UserError("tables need pandas: pip install pandas (or opsearch[notebook])") from None
    return pandas


class SearchRun:
    """One run (an Optuna study in its storage). Cheap to make: every method reads the study
    afresh, so a run being searched by workers elsewhere shows its latest trials."""

    def __init__(self, url: str, study_name: str, study=None):
        self.url = url
        self.name = study_name
        self._study = study  # one storage connection for the object's life

    def __repr__(self) -> str:
        return f"SearchRun({self.name!r}, storage={self.url!r})"

    # -- the stored study -------------------------------------------------------------------

    @property
    def study(self):
        """The optuna.Study (for Optuna's own tools): the search's trials, candidates and
        baselines; re-ranking items and promotions are in the stage studies beside it
        (``<name>/rerank``, ``<name>/promotion``), which the tables here read too. It reads the
        storage on each call, so it shows trials finished since."""
        if self._study is None:
            from opsearch.study import open_run

            self._study = open_run(self.url, self.name)
        return self._study

    def _read(self) -> tuple[list[Any], dict[str, Any]]:
        """The run's trials, then its stage studies' (rerank items, promotions), and its attrs."""
        from opsearch.study import run_trials

        study = self.study
        return run_trials(study), dict(study.user_attrs)

    @property
    def archs(self) -> list[str]:
        trials, attrs = self._read()
        return report.archs_of(trials, attrs)

    @property
    def config(self):
        """The run's stored SearchConfig (what `opsearch.search` needs to resume it)."""
        from opsearch.config import SearchConfig

        try:
            stored = json.loads(self.study.user_attrs.get("config") or "null")
        except ValueError:
            stored = None
        if not isinstance(stored, dict):
            raise UserError(f"study {self.name!r} is not an opsearch run (no stored config)")
        return SearchConfig.from_dict(stored, source=f"run {self.name}")

    # -- tables -----------------------------------------------------------------------------

    def trials_dataframe(self, kind: str | None = None, all_attrs: bool = False):
        """One row per trial, like `optuna.Study.trials_dataframe`: number (in its study: the
        run's, or for rerank items and promotions their stage study's), state, times, the
        contract attributes (kind, verdict, formula, layer, elapsed_s, acc/<arch>) and their
        mean, and what other kinds carry (stage, seed, of_trial, rung, ...). `kind` keeps one
        kind (candidate, baseline, rerank, promotion); `all_attrs` adds every other user attribute
        as ``user_attrs_<key>``."""
        pd = _pandas()
        trials, attrs = self._read()
        archs = report.archs_of(trials, attrs)
        from opsearch.trials import in_order

        rows = []
        for t in in_order(trials):
            if kind is not None and report.kind(t) != kind:
                continue
            a = t.user_attrs
            row: dict[str, Any] = {"number": t.number, "state": t.state.name,
                                   "datetime_start": t.datetime_start,
                                   "datetime_complete": t.datetime_complete,
                                   "duration": (t.datetime_complete - t.datetime_start
                                                if t.datetime_start and t.datetime_complete else None)}
            row["kind"] = report.kind(t)
            row["verdict"] = report.verdict(t)
            for key in CONTRACT_COLUMNS[2:]:
                row[key] = a.get(key)
            accs = [a.get(f"acc/{arch}") for arch in archs]
            for arch, acc in zip(archs, accs):
                row[f"acc/{arch}"] = float(acc) if _number(acc) else math.nan
            row["mean"] = (sum(accs) / len(accs)) if accs and all(_number(x) for x in accs) else math.nan
            for key in KIND_COLUMNS:
                row[key] = a.get(key)
            if all_attrs:
                known = set(row) | {f"acc/{arch}" for arch in archs}
                row.update({f"user_attrs_{k}": v for k, v in sorted(a.items()) if k not in known})
            rows.append(row)
        columns = (["number", "state", "datetime_start", "datetime_complete", "duration"]
                   + list(CONTRACT_COLUMNS) + [f"acc/{arch}" for arch in archs] + ["mean"]
                   + list(KIND_COLUMNS))
        extra = sorted({k for row in rows for k in row} - set(columns))  # all_attrs
        frame = pd.DataFrame(rows, columns=columns + extra)
        unused = [c for c in KIND_COLUMNS if not frame[c].notna().any()]  # e.g. no stage yet
        return frame.drop(columns=unused)

    def leaderboard(self, top: int | None = 10):
        """The `top` candidates by mean accuracy and every baseline, best first (`opsearch show`):
        trial, kind, name, one column per architecture, mean, pareto, elapsed_s (rung with the
        funnel)."""
        trials, attrs = self._read()
        archs = report.archs_of(trials, attrs)
        if top is not None and top < 0:
            raise UserError(f"--top must be >= 0, got {top}")
        return _rows_frame(report.leaderboard(trials, archs, top), archs)

    def pareto_front(self):
        """The candidates and baselines no other one beats on every architecture at once (the
        front of `opsearch show` and `opsearch plot`), best mean first."""
        trials, attrs = self._read()
        archs = report.archs_of(trials, attrs)
        return _rows_frame([r for r in report.scored_rows(trials, archs) if r.pareto], archs)

    def summary(self, top: int | None = 10) -> dict[str, Any]:
        """Everything `opsearch show --json` reports under ``summary`` (plain data)."""
        trials, attrs = self._read()
        return report.summary(trials, attrs, top=top)

    # -- the re-ranking stage ---------------------------------------------------------------

    def reranked(self, stage: str | None = None):
        """The re-ranked table of a stage (the latest by default) as a DataFrame, one row per
        layer, held-out best first; empty when the run has no stage. ``frame.attrs["rerank"]``
        holds the whole statistics (`opsearch show --json`, key ``rerank``): rank agreement, the
        contest of the two best, the task."""
        from opsearch import rerank_stats

        trials, attrs = self._read()
        archs = report.archs_of(trials, attrs)
        return _rerank_frame(rerank_stats.summarize(trials, archs, attrs, stage=stage), archs)

    def rerank(self, top: int | None = None, seeds: int | None = None, *,
               max_seeds: int | None = None, dataset: str | None = None,
               data_dir: str | None = None, workers: int | None = None, progress: str = "auto",
               **options: Any):
        """Run (or resume) a re-ranking stage, as `opsearch rerank` does: the `top` candidates
        and the baselines, `seeds` seeds each, on held-out data; `options` are further
        [rerank] keys (correction, baselines, stage, or any evaluator key of the held-out task,
        e.g. ``steps=600``). Returns the re-ranked table (`reranked`)."""
        from opsearch.commands.rerank import prepare_stage, run_stage
        from opsearch.study import resolve

        study = self.study
        config, task = prepare_stage(study, resolve(self.url, self.name)[0], options, top_k=top,
                                     seeds=seeds, max_seeds=max_seeds, dataset=dataset,
                                     data_dir=data_dir, workers=workers)
        from opsearch.progress import make_progress

        result = run_stage(config, task, make_progress(config, progress, command="rerank"))
        return _rerank_frame(result, list(config.archs))

    # -- the layer ----------------------------------------------------------------------------

    def best(self, trial: int | None = None) -> "FoundLayer":
        """The found layer: by default what `opsearch export` picks (the re-ranked best when the
        run has a stage, else the best mean accuracy over the architectures); `trial` picks one.
        Call it with a channel count for a fresh `nn.Module`."""
        from opsearch import rerank_stats
        from opsearch.commands.export import layer_options, select_trial, trial_graph, trial_surround

        trials, attrs = self._read()
        archs = report.archs_of(trials, attrs)
        why = f"trial {trial}, as asked"
        if trial is None:
            picked = rerank_stats.reranked_best(trials, archs, attrs)
            if picked is not None:
                trial, why = picked
            else:
                best = report.best_trial(trials, archs)
                if best is None:
                    raise UserError("the run has no evaluated candidate to export yet")
                trial, why = best.number, "the best mean accuracy over the architectures at the search"
        chosen = select_trial(trials, archs, trial)
        accs = report.accuracies(chosen, archs)
        g = trial_graph(chosen)
        from opsearch import graph

        return FoundLayer(trial=chosen.number, graph=g, formula=graph.formula(g),
                          surround=trial_surround(chosen, attrs), options=layer_options(attrs),
                          accuracies=dict(zip(archs, accs)) if accs else {}, why=why,
                          layer=chosen.user_attrs.get("layer") if report.kind(chosen) == "baseline" else None)

    # -- figures ------------------------------------------------------------------------------

    def plot(self) -> dict[str, Any]:
        """The figures of `opsearch plot` (best so far, Pareto front, rejections, re-ranking) as
        matplotlib Figures by name; a notebook shows them inline."""
        from opsearch.commands.plot import figures

        trials, attrs = self._read()
        return dict(figures(trials, attrs))


@dataclass
class FoundLayer:
    """A layer a search found: ``layer(num_channels)`` builds a fresh `nn.Module` (the compiled
    graph, with the run's surround and layer options: what the search trained), ``source()``
    the standalone code of `opsearch export`."""

    trial: int
    graph: Any  # opsearch.LayerGraph
    formula: str
    surround: str = "none"
    options: dict[str, Any] = field(default_factory=dict)  # eps, groups, momentum of the run
    accuracies: dict[str, float] = field(default_factory=dict)  # at the search
    why: str = ""  # how it was picked
    layer: str | None = None  # a baseline's known-layer name

    def __call__(self, num_channels: int, *, compile: bool = False):
        from opsearch import layers

        return layers.build(self.graph, num_channels, compile=compile, surround=self.surround,
                            **self.options)

    def source(self, class_name: str = "SearchedLayer", torch_compile: bool = False) -> str:
        if not class_name.isidentifier():
            raise UserError(f"--class-name must be a Python identifier, got {class_name!r}")
        from opsearch.compile import export_source

        return export_source(self.graph, class_name=class_name, torch_compile=torch_compile,
                             surround=self.surround, **self.options)

    def __repr__(self) -> str:
        what = f"{self.layer} (baseline)" if self.layer else self.formula
        return f"FoundLayer(trial {self.trial}: {what})"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rows_frame(rows, archs):
    pd = _pandas()
    records = [{"trial": r.trial, "kind": r.kind, "name": r.name, **r.accuracies, "mean": r.mean,
                "pareto": r.pareto, "elapsed_s": r.elapsed_s, "rung": r.rung} for r in rows]
    frame = pd.DataFrame(records, columns=["trial", "kind", "name", *archs, "mean", "pareto",
                                           "elapsed_s", "rung"])
    if not frame["rung"].notna().any():  # the funnel's column, only with the funnel
        frame = frame.drop(columns="rung")
    return frame


def _rerank_frame(result: dict[str, Any] | None, archs):
    """The re-ranked table: ranks, the search's score, the held-out mean with its 95% interval
    per architecture and overall, and per baseline the difference, corrected p and word."""
    pd = _pandas()
    records = []
    baselines = [r["name"] for r in (result or {}).get("layers", []) if r["kind"] == "baseline"]
    for r in (result or {}).get("layers", []):
        o = r["overall"]
        row = {"heldout_rank": r["heldout_rank"], "search_rank": r["search_rank"],
               "trial": r["of_trial"], "kind": r["kind"], "name": r["name"], "seeds": len(r["seeds"]),
               "search_mean": r["search_mean"], "mean": o["mean"], "low": o.get("low"),
               "high": o.get("high")}
        row.update({arch: r["per_arch"][arch]["mean"] for arch in archs})
        for b in baselines:
            vs = r["vs"].get(b) or {}
            row[f"vs {b}"] = vs.get("diff")
            row[f"p vs {b}"] = vs.get("p_corrected", vs.get("p"))
            row[f"word vs {b}"] = vs.get("word")
        records.append(row)
    columns = (["heldout_rank", "search_rank", "trial", "kind", "name", "seeds", "search_mean",
                "mean", "low", "high", *archs]
               + [f"{w}{b}" for b in baselines for w in ("vs ", "p vs ", "word vs ")])
    frame = pd.DataFrame(records, columns=columns)
    frame.attrs["rerank"] = result
    return frame
