"""Statistics of the re-ranking stage: pure functions over the study's trials (scipy.stats).

For each layer of a stage (a re-ranked candidate or baseline): the mean accuracy and a 95%
t-interval per architecture and overall (the overall score of a seed is its mean over the
architectures, so the overall interval is over seeds); the difference to each baseline with a
paired test; the rank at the search against the rank on the held-out task, and the agreement of
the two rankings (Kendall's tau and Spearman's rho, scipy.stats.kendalltau / spearmanr).

The paired test is Student's paired t-test (scipy.stats.ttest_rel) over the (seed, architecture)
pairs both layers have. Why not Wilcoxon's signed-rank test: what a user asks is whether the mean
accuracy differs, which is what the t-test tests (and gives an interval for), while the
signed-rank test looks at ranks only and, with the default 3 seeds x 3 architectures = 9 pairs, is
coarse (its smallest two-sided p is 0.004, and six pairs all of one sign are needed to reach
0.05). The pairs of one seed share the seed, so they are not fully independent: read p as a
guide, uncorrected for the several comparisons of a table. Degenerate cases are decided without a
test: identical results on every pair -> p = 1, "not distinguishable"; the same non-zero
difference on every pair (no variance to test against) -> p = 0; fewer than 2 pairs -> no p.

A rerank item may exist twice when workers on two machines enqueued it at once (opsearch/rerank.py
explains why that race is allowed): the first one finished counts, the other is ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

import numpy as np

ALPHA = 0.05
CONFIDENCE = 0.95
KIND = "rerank"
WORDS = ("better", "worse", "not distinguishable")


def _kind(t: Any) -> str:
    return str(t.user_attrs.get("kind", "candidate"))


# --------------------------------------------------------------------------------------------
# Elementary statistics


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """n, mean and a Student-t interval of the mean (None below 2 values; zero width when every
    value is equal)."""
    from scipy import stats

    v = np.asarray([float(x) for x in values], dtype=float)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None}
    mean = float(v.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "low": None, "high": None}
    sem = float(stats.sem(v))
    if sem == 0.0 or not math.isfinite(sem):
        return {"n": n, "mean": mean, "low": mean, "high": mean}
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return {"n": n, "mean": mean, "low": float(low), "high": float(high)}


def paired_test(x: Sequence[float], y: Sequence[float], alpha: float = ALPHA) -> dict[str, Any]:
    """x against y over the same pairs: mean difference x - y with a 95% interval, the paired
    t-test's p, and a word (better / worse / not distinguishable)."""
    from scipy import stats

    a = np.asarray(x, dtype=float)
    b = np.asarray(y, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired samples must have the same length")
    d = a - b
    n = len(d)
    out: dict[str, Any] = {"n": n, "diff": float(d.mean()) if n else None, "low": None,
                           "high": None, "p": None, "word": "not distinguishable"}
    if n == 0:
        out["word"] = "no common seeds"
        return out
    if np.all(d == 0):
        out.update(p=1.0, low=0.0, high=0.0)
        return out
    if n < 2:
        out["word"] = "too few pairs"
        return out
    ci = mean_interval(d)
    out["low"], out["high"] = ci["low"], ci["high"]
    if np.all(d == d[0]):
        p = 0.0  # the same non-zero difference on every pair: no variance to weigh it against
    else:
        p = float(stats.ttest_rel(a, b).pvalue)
    out["p"] = p
    if math.isfinite(p) and p < alpha:
        out["word"] = "better" if out["diff"] > 0 else "worse"
    return out


def rank_agreement(search: Sequence[float], heldout: Sequence[float]) -> dict[str, Any]:
    """Kendall's tau and Spearman's rho between two scorings of the same layers (None below 3
    layers, or when one scoring is constant)."""
    from scipy import stats

    n = len(search)
    out: dict[str, Any] = {"n": n, "kendall_tau": None, "kendall_p": None, "spearman": None,
                           "spearman_p": None}
    if n < 3 or len(set(search)) < 2 or len(set(heldout)) < 2:
        return out
    tau = stats.kendalltau(search, heldout)
    rho = stats.spearmanr(search, heldout)
    for key, value in (("kendall_tau", tau.statistic), ("kendall_p", tau.pvalue),
                       ("spearman", rho.statistic), ("spearman_p", rho.pvalue)):
        out[key] = float(value) if value is not None and math.isfinite(value) else None
    return out


def ranks(scores: Sequence[float]) -> list[int]:
    """1 = best (highest); ties share the better rank."""
    from scipy import stats

    if not len(scores):
        return []
    return [int(r) for r in stats.rankdata([-s for s in scores], method="min")]


# --------------------------------------------------------------------------------------------
# Reading the stage's trials


@dataclass
class StageItems:
    """A stage's results by layer and seed, plus what is missing."""

    stage: str
    results: dict[int, dict[int, tuple[float, ...]]] = field(default_factory=dict)  # of_trial -> seed -> accs
    pending: int = 0
    failed: int = 0
    duplicates_ignored: int = 0
    last_number: int = -1


def _finished_at(t: Any) -> tuple:
    complete = getattr(t, "datetime_complete", None)
    return (complete if isinstance(complete, datetime) else datetime.max, t.number)


def collect(trials: Sequence[Any], archs: Sequence[str]) -> dict[str, StageItems]:
    """Every stage's items; for an (of_trial, seed) finished twice, the first one finished."""
    stages: dict[str, StageItems] = {}
    finished: dict[tuple[str, int, int], list[Any]] = {}
    for t in trials:
        if _kind(t) != KIND:
            continue
        a = t.user_attrs
        try:
            stage, of_trial, seed = str(a["stage"]), int(a["of_trial"]), int(a["seed"])
        except (KeyError, TypeError, ValueError):
            continue
        s = stages.setdefault(stage, StageItems(stage))
        s.last_number = max(s.last_number, t.number)
        state = t.state.name
        if state in ("WAITING", "RUNNING"):
            s.pending += 1
        elif state == "COMPLETE":
            finished.setdefault((stage, of_trial, seed), []).append(t)
        elif a.get("verdict") != "failed:worker_lost":  # a lost item was enqueued again
            s.failed += 1
    for (stage, of_trial, seed), items in finished.items():
        items.sort(key=_finished_at)
        s = stages[stage]
        s.duplicates_ignored += len(items) - 1
        accs = _accs(items[0], archs)
        if accs is None:
            s.failed += 1
            continue
        s.results.setdefault(of_trial, {})[seed] = accs
    # items still waiting for a layer already complete elsewhere do not make it pending twice
    return stages


def _accs(t: Any, archs: Sequence[str]) -> tuple[float, ...] | None:
    values = getattr(t, "values", None)
    if values is not None and len(values) == len(archs):
        accs = tuple(float(v) for v in values)
    else:
        accs = []
        for arch in archs:
            v = t.user_attrs.get(f"acc/{arch}")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                return None
            accs.append(float(v))
        accs = tuple(accs)
    return accs if accs and all(math.isfinite(a) for a in accs) else None


# --------------------------------------------------------------------------------------------
# The stage's report


def stage_summary(trials: Sequence[Any], archs: Sequence[str], items: StageItems,
                  task: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per layer: intervals, paired tests against each baseline, ranks; and the agreement."""
    from opsearch.funnel import at_highest_rung
    from opsearch.rerank import search_mean

    by_number = {t.number: t for t in at_highest_rung(trials)}  # the funnel: highest rung's score
    layers = []
    for of_trial, by_seed in items.results.items():
        origin = by_number.get(of_trial)
        kind = _kind(origin) if origin is not None else "candidate"
        if origin is None:
            name = "?"
        elif kind == "baseline":
            name = str(origin.user_attrs.get("layer") or origin.user_attrs.get("formula") or "?")
        else:
            name = str(origin.user_attrs.get("formula") or "?")
        seeds = sorted(by_seed)
        per_arch = {a: mean_interval([by_seed[s][i] for s in seeds]) for i, a in enumerate(archs)}
        overall = mean_interval([float(np.mean(by_seed[s])) for s in seeds])
        layers.append({"of_trial": of_trial, "kind": kind, "name": name, "seeds": seeds,
                       "search_mean": search_mean(origin, archs) if origin is not None else None,
                       "per_arch": per_arch, "overall": overall, "vs": {}})
    baselines = [layer for layer in layers if layer["kind"] == "baseline"]
    for layer in layers:
        for base in baselines:
            if base is layer:
                continue
            x, y = _pairs(items.results[layer["of_trial"]], items.results[base["of_trial"]])
            layer["vs"][base["name"]] = paired_test(x, y)
    layers.sort(key=lambda r: (-(r["overall"]["mean"] if r["overall"]["mean"] is not None else -1),
                               r["of_trial"]))
    for layer, rank in zip(layers, ranks([r["overall"]["mean"] for r in layers])):
        layer["heldout_rank"] = rank
    scored = [r for r in layers if r["search_mean"] is not None]
    for layer, rank in zip(scored, ranks([r["search_mean"] for r in scored])):
        layer["search_rank"] = rank
    for layer in layers:
        layer.setdefault("search_rank", None)
    agreement = rank_agreement([r["search_mean"] for r in scored],
                               [r["overall"]["mean"] for r in scored])
    candidates = [r for r in layers if r["kind"] == "candidate"]
    best = candidates[0] if candidates else None
    return {
        "stage": items.stage,
        "task": task,
        "archs": list(archs),
        "alpha": ALPHA,
        "test": "paired t-test (scipy.stats.ttest_rel) over common (seed, architecture) pairs",
        "layers": layers,
        "agreement": agreement,
        "best_trial": best["of_trial"] if best else None,
        "pending": items.pending,
        "failed": items.failed,
        "duplicates_ignored": items.duplicates_ignored,
        "complete": items.pending == 0,
    }


def _pairs(a: dict[int, tuple[float, ...]], b: dict[int, tuple[float, ...]]
           ) -> tuple[list[float], list[float]]:
    x, y = [], []
    for seed in sorted(set(a) & set(b)):
        for va, vb in zip(a[seed], b[seed]):
            x.append(va)
            y.append(vb)
    return x, y


def summarize(trials: Sequence[Any], archs: Sequence[str], study_attrs: dict | None = None,
              stage: str | None = None) -> dict[str, Any] | None:
    """The report of one stage (the given one, else the latest); None when the run has none.
    ``stages`` lists every stage of the run."""
    from opsearch.rerank import stage_tasks

    stages = collect(trials, archs)
    if not stages or (stage is not None and stage not in stages):
        return None
    chosen = stages[stage] if stage is not None else max(stages.values(), key=lambda s: s.last_number)
    tasks = stage_tasks(study_attrs or {})
    out = stage_summary(trials, archs, chosen, tasks.get(chosen.stage))
    out["stages"] = sorted(stages, key=lambda name: stages[name].last_number)
    return out


def reranked_best(trials: Sequence[Any], archs: Sequence[str]) -> tuple[int, str] | None:
    """(trial number, why) of the best candidate after re-ranking (latest stage), or None when
    the run has no re-ranked candidate: what `opsearch export` picks by default."""
    result = summarize(trials, archs)
    if not result or result["best_trial"] is None:
        return None
    best = next(r for r in result["layers"] if r["of_trial"] == result["best_trial"])
    o = best["overall"]
    why = (f"the best candidate after re-ranking (stage {result['stage']}: held-out mean "
           f"{o['mean']:.4f} over {o['n']} seed{'s' if o['n'] != 1 else ''}, rank "
           f"#{best['search_rank']} at the search)")
    if not result["complete"]:
        why += f"; re-ranking incomplete ({result['pending']} items left)"
    return best["of_trial"], why
