"""What a search found, as plain data: leaderboard, Pareto front, rejection and time statistics.

Pure functions over a list of Optuna `FrozenTrial`s and the study's user attributes, so that
`opsearch show`, `opsearch plot`, `opsearch export` and the end of `opsearch search` share one
reading of the stored contract (README, "Stored results"):

- trial user attrs: ``verdict`` (``evaluated`` | ``rejected:<filter>`` | ``duplicate:<trial>`` |
  ``failed:<reason>``), ``formula``, ``graph``, ``elapsed_s``, ``acc/<arch>``, ``kind``
  (``candidate`` | ``baseline``; ``rerank`` items are left out of everything here but the
  ``rerank`` key of `summary`), ``layer`` (a baseline's name), ``filter_s/<filter>``;
- trial values: one accuracy per architecture, in the order of the study attr ``archs``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from opsearch.pareto import pareto_mask
from opsearch.trials import (ACC_PREFIX, accuracies, archs_of, category, in_order, kind,  # noqa: F401
                             name_of, search_trials, verdict)

FILTER_PREFIX = "filter_s/"


# --------------------------------------------------------------------------------------------
# Reading one trial


# --------------------------------------------------------------------------------------------
# Leaderboard


@dataclass
class Row:
    trial: int
    kind: str  # candidate | baseline
    name: str  # formula, or a baseline's layer name
    verdict: str
    accuracies: dict[str, float]
    mean: float
    pareto: bool = False
    elapsed_s: float | None = None
    rung: int | None = None  # with the funnel: the highest rung the accuracies come from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scored_rows(trials: Sequence[Any], archs: Sequence[str]) -> list[Row]:
    """Every evaluated candidate and baseline with its accuracies (duplicates are left out: they
    repeat the trial they equal), Pareto marks over all of them, best mean first. With the funnel
    (opsearch/funnel.py), each candidate at the highest rung it finished."""
    from opsearch.funnel import at_highest_rung, rung_of

    rows = []
    for t in search_trials(at_highest_rung(trials)):
        k = kind(t)
        if k != "baseline" and category(t) != "evaluated":
            continue
        accs = accuracies(t, archs)
        if accs is None or any(not math.isfinite(a) for a in accs):
            continue
        elapsed = t.user_attrs.get("elapsed_s")
        rows.append(Row(t.number, k, name_of(t), verdict(t), dict(zip(archs, accs)),
                        float(np.mean(accs)) if accs else float("nan"), False,
                        float(elapsed) if isinstance(elapsed, (int, float)) else None, rung_of(t)))
    for row, on_front in zip(rows, pareto_mask([list(r.accuracies.values()) for r in rows])):
        row.pareto = bool(on_front)
    rows.sort(key=lambda r: (-r.mean, r.trial))
    return rows


def leaderboard(trials: Sequence[Any], archs: Sequence[str], top: int | None = 10) -> list[Row]:
    """The ``top`` candidates by mean accuracy, plus every baseline, best mean first."""
    rows = scored_rows(trials, archs)
    candidates = [r for r in rows if r.kind != "baseline"]
    keep = {r.trial for r in (candidates if top is None else candidates[:max(0, top)])}
    return [r for r in rows if r.kind == "baseline" or r.trial in keep]


def best_trial(trials: Sequence[Any], archs: Sequence[str]) -> Any | None:
    """The candidate with the best mean accuracy over the architectures (evaluated or
    duplicate; a duplicate's graph is a different spelling of the same function), at the highest
    rung it finished when the search ran the funnel."""
    from opsearch.funnel import at_highest_rung

    best, best_mean = None, -math.inf
    for t in search_trials(at_highest_rung(trials)):
        if kind(t) == "baseline" or category(t) not in ("evaluated", "duplicate"):
            continue
        accs = accuracies(t, archs)
        if not accs or any(not math.isfinite(a) for a in accs):
            continue
        mean = float(np.mean(accs))
        if mean > best_mean:
            best, best_mean = t, mean
    return best


# --------------------------------------------------------------------------------------------
# Rejections and time


@dataclass
class FilterStats:
    filter: str
    ran: int = 0  # candidates the filter looked at
    rejected: int = 0  # candidates it stopped (rejected:<filter>)
    duplicates: int = 0  # candidates it found equal to an earlier trial (equivalence)
    mean_s: float = 0.0
    total_s: float = 0.0


def filter_stats(trials: Sequence[Any]) -> list[FilterStats]:
    """Per filter: how many candidates it saw, stopped, and its mean time (from ``filter_s/*``),
    in the order the pipeline runs them (the order they appear in the trials)."""
    trials = search_trials(trials)
    stats: dict[str, FilterStats] = {}
    for t in trials:
        if kind(t) == "baseline":
            continue
        for key, value in t.user_attrs.items():
            if key.startswith(FILTER_PREFIX) and isinstance(value, (int, float)):
                s = stats.setdefault(key[len(FILTER_PREFIX):], FilterStats(key[len(FILTER_PREFIX):]))
                s.ran += 1
                s.total_s += float(value)
        v = verdict(t)
        if v.startswith("rejected:"):
            name = v.split(":", 1)[1]
            stats.setdefault(name, FilterStats(name)).rejected += 1
    for t in trials:  # a duplicate counts for the filter that found it (its metric/<f>/same_as)
        if kind(t) != "baseline" and category(t) == "duplicate":
            name = next((key.split("/")[1] for key in t.user_attrs
                         if key.startswith("metric/") and key.endswith("/same_as")), "duplicate")
            stats.setdefault(name, FilterStats(name)).duplicates += 1
    for s in stats.values():
        s.mean_s = s.total_s / s.ran if s.ran else 0.0
    # pipeline order: most candidates seen first
    return sorted(stats.values(), key=lambda s: (-s.ran, s.filter))


def verdict_counts(trials: Sequence[Any]) -> dict[str, int]:
    """Candidates per category: evaluated, duplicate, rejected, failed, running, ..."""
    counts: dict[str, int] = {}
    for t in search_trials(trials):
        if kind(t) == "baseline":
            continue
        c = category(t)
        counts[c] = counts.get(c, 0) + 1
    return counts


def time_per_candidate(trials: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Wall seconds (``elapsed_s``) per candidate category: count, mean, total."""
    out: dict[str, dict[str, float]] = {}
    for t in search_trials(trials):
        if kind(t) == "baseline":
            continue
        e = t.user_attrs.get("elapsed_s")
        if not isinstance(e, (int, float)) or not math.isfinite(e):
            continue
        d = out.setdefault(category(t), {"count": 0, "mean_s": 0.0, "total_s": 0.0})
        d["count"] += 1
        d["total_s"] += float(e)
    for d in out.values():
        d["mean_s"] = d["total_s"] / d["count"] if d["count"] else 0.0
    return out


def best_so_far(trials: Sequence[Any], archs: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """Per architecture: (candidate index, best accuracy among the first candidates) at each
    candidate that has one, in trial order; the index counts every candidate, rejected ones too."""
    series: dict[str, list[tuple[int, float]]] = {a: [] for a in archs}
    best = {a: -math.inf for a in archs}
    index = 0
    for t in sorted(search_trials(trials), key=lambda t: t.number):
        if kind(t) == "baseline":
            continue
        index += 1
        accs = accuracies(t, archs) if category(t) in ("evaluated", "duplicate") else None
        if not accs:
            continue
        for a, v in zip(archs, accs):
            if math.isfinite(v) and v > best[a]:
                best[a] = v
            if best[a] > -math.inf:
                series[a].append((index, best[a]))
    return series


def summary(trials: Sequence[Any], study_attrs: dict | None = None, top: int | None = 10) -> dict[str, Any]:
    """Everything `opsearch show` reports, as JSON-ready data."""
    from opsearch import rerank_stats

    archs = archs_of(trials, study_attrs)
    counts = verdict_counts(trials)
    candidates = sum(counts.values())
    rejected = counts.get("rejected", 0)
    duplicates = counts.get("duplicate", 0)
    return {
        "archs": archs,
        "candidates": candidates,
        "verdicts": counts,
        "rejected_share": rejected / candidates if candidates else 0.0,
        "not_trained_share": (rejected + duplicates) / candidates if candidates else 0.0,
        "filters": [asdict(s) for s in filter_stats(trials)],
        "time_per_candidate": time_per_candidate(trials),
        "leaderboard": [r.to_dict() for r in leaderboard(trials, archs, top)],
        "best_trial": getattr(best_trial(trials, archs), "number", None),
        # the re-ranking stage's statistics (latest stage; None before any): opsearch/rerank_stats.py
        "rerank": rerank_stats.summarize(trials, archs, study_attrs),
    }


def trials_json(trials: Iterable[Any]) -> list[dict[str, Any]]:
    """Trials as JSON-ready dicts: number, state, values, user attributes."""
    out = []
    for t in in_order(trials):  # numbers count per study: the run's, then its stage studies'
        values = getattr(t, "values", None)
        out.append({"number": t.number, "state": t.state.name,
                    "values": [_finite_or_none(v) for v in values] if values else None,
                    "user_attrs": dict(t.user_attrs)})
    return out


def _finite_or_none(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


__all__ = ["Row", "FilterStats", "archs_of", "accuracies", "best_so_far", "best_trial", "category",
           "filter_stats", "kind", "leaderboard", "name_of", "pareto_mask", "scored_rows",
           "search_trials", "summary", "time_per_candidate", "trials_json", "verdict", "verdict_counts"]
