"""Statistics of the re-ranking stage: pure functions over the study's trials (scipy.stats).

The unit is the seed. The architectures of a run are fixed, not sampled from a population, so
they are a blocking factor, never replicates: the score of a (layer, seed) is its mean accuracy
over the architectures, and every test and interval of a layer's overall score is over seeds
(degrees of freedom = seeds - 1).

For each layer of a stage (a re-ranked candidate or baseline):

- the mean accuracy and a 95% Student-t interval per architecture (over seeds) and overall (over
  the per-seed means), clipped to [0, 1]: an accuracy cannot leave it, and intersecting an
  interval with the parameter's range keeps its coverage. Clipping rather than a transformed scale
  (logit, arcsine) because accuracies of exactly 0 or 1 occur and because the interval then stays
  one around the arithmetic mean that the table prints;
- the difference to each baseline: Student's paired t-test over the seeds both layers have, on
  the per-seed means over the architectures (scipy.stats.ttest_rel of the two seed-mean vectors;
  df = common seeds - 1), with a 95% interval of the mean difference (clipped to [-1, 1]);
- every such comparison of the stage is one family, corrected for multiple comparisons (Holm's
  step-down by default, Benjamini-Hochberg on request, `rerank.correction`): each comparison
  carries its raw p, its corrected p, and the word (better / worse / not distinguishable) that
  the corrected p at alpha 0.05 gives;
- the rank at the search against the rank on the held-out task, and the agreement of the two
  rankings (Kendall's tau and Spearman's rho, scipy.stats.kendalltau / spearmanr).

Why not Wilcoxon's signed-rank test: what a user asks is whether the mean accuracy differs, which
is what the t-test tests (and gives an interval for); with 3 seeds the signed-rank test cannot
reach p < 0.25. Degenerate cases are decided without a test: identical results on every seed ->
p = 1, "not distinguishable"; the same non-zero difference on every seed (no variance to test
against) -> p = 0; fewer than 2 common seeds -> no p (left out of the family).

The contest (`contest`): the best candidate against the runner-up (the question the stage
answers), with the same paired seed test, uncorrected (one planned comparison, outside the
table's family). When they are not distinguishable, the stage trains both with more seeds, one
at a time, up to `rerank.max_seeds` (opsearch/rerank.py), and reports "distinguishable" or a
"tie" with the number of seeds it took. Looking again after each seed makes the contest's
error rate somewhat larger than alpha; it decides where to spend seeds, the table decides claims.

A rerank item may exist twice when workers on two machines enqueued it at once (opsearch/rerank.py
explains why that race is allowed): the first one finished counts, the other is ignored.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

import numpy as np

from opsearch.config import CORRECTIONS
from opsearch.trials import LOST

ALPHA = 0.05
CONFIDENCE = 0.95
KIND = "rerank"
UNIT = "seed"
TEST = ("paired t-test over per-seed means across architectures (scipy.stats.ttest_rel over "
        "seeds, df = seeds - 1; architectures are a blocking factor)")
INTERVALS = "Student t over seeds, clipped to [0, 1]"
DEFAULT_CORRECTION = "holm"
DEFAULT_MAX_SEEDS = 8


def _kind(t: Any) -> str:
    return str(t.user_attrs.get("kind", "candidate"))


# --------------------------------------------------------------------------------------------
# Elementary statistics


def _clip(value: float, bounds: tuple[float, float] | None) -> float:
    if bounds is None:
        return value
    return min(max(value, bounds[0]), bounds[1])


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE,
                  bounds: tuple[float, float] | None = (0.0, 1.0)) -> dict[str, Any]:
    """n, mean and a Student-t interval of the mean, clipped to `bounds` (accuracies: [0, 1]);
    None below 2 values; zero width when every value is equal."""
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
    return {"n": n, "mean": mean, "low": _clip(float(low), bounds), "high": _clip(float(high), bounds)}


def paired_test(x: Sequence[float], y: Sequence[float], alpha: float = ALPHA) -> dict[str, Any]:
    """x against y over the same units (pairs): mean difference x - y with a 95% interval
    (within [-1, 1]), the paired t-test's p (df = pairs - 1), and an uncorrected word (better /
    worse / not distinguishable)."""
    from scipy import stats

    a = np.asarray(x, dtype=float)
    b = np.asarray(y, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired samples must have the same length")
    d = a - b
    n = len(d)
    out: dict[str, Any] = {"n": n, "df": n - 1 if n >= 2 else None,
                           "diff": float(d.mean()) if n else None, "low": None, "high": None,
                           "p": None, "word": "not distinguishable"}
    if n == 0:
        out["word"] = "no common seeds"
        return out
    if np.all(d == 0):
        out.update(p=1.0, low=0.0, high=0.0)
        return out
    if n < 2:
        out["word"] = "too few seeds"
        return out
    ci = mean_interval(d, bounds=(-1.0, 1.0))
    out["low"], out["high"] = ci["low"], ci["high"]
    if np.all(d == d[0]):
        p = 0.0  # the same non-zero difference on every pair: no variance to weigh it against
    else:
        p = float(stats.ttest_rel(a, b).pvalue)
    out["p"] = p
    if math.isfinite(p) and p < alpha:
        out["word"] = "better" if out["diff"] > 0 else "worse"
    return out


def seed_means(by_seed: dict[int, Sequence[float]], seeds: Sequence[int]) -> list[float]:
    """A layer's score per seed: its mean accuracy over the architectures (the blocks)."""
    return [float(np.mean(by_seed[s])) for s in seeds]


def seed_test(a: dict[int, Sequence[float]], b: dict[int, Sequence[float]],
              alpha: float = ALPHA) -> dict[str, Any]:
    """Layer a against layer b, the seed as the unit: the paired t-test over the seeds both have,
    on each seed's mean over the architectures (`paired_test`; ``n`` = common seeds)."""
    seeds = sorted(set(a) & set(b))
    return paired_test(seed_means(a, seeds), seed_means(b, seeds), alpha)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: the i-th smallest (from 0) of m
    is multiplied by m - i, made non-decreasing along that order, capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def adjust(pvalues: Sequence[float], method: str = DEFAULT_CORRECTION) -> list[float]:
    """The family's adjusted p-values: holm, bh (Benjamini-Hochberg) or none."""
    if not len(pvalues):
        return []
    if method == "holm":
        return holm(pvalues)
    if method == "bh":
        from scipy import stats

        return [float(p) for p in stats.false_discovery_control(np.asarray(pvalues, dtype=float),
                                                                method="bh")]
    if method == "none":
        return [float(p) for p in pvalues]
    raise ValueError(f"unknown correction {method!r}; known: {', '.join(CORRECTIONS)}")


def correct(tests: Sequence[dict[str, Any]], method: str = DEFAULT_CORRECTION,
            alpha: float = ALPHA) -> int:
    """Correct a family of `paired_test` results in place: ``p_corrected`` and ``word`` (from the
    corrected p; the raw test's word is kept as ``word_uncorrected``). Tests without a p (too few
    seeds) are not part of the family. Returns the family's size."""
    family = [t for t in tests if t.get("p") is not None]
    for t in tests:
        t.setdefault("word_uncorrected", t["word"])
        t.setdefault("p_corrected", None)
    for t, q in zip(family, adjust([t["p"] for t in family], method)):
        t["p_corrected"] = q
        if math.isfinite(q) and q < alpha and t["diff"] != 0:
            t["word"] = "better" if t["diff"] > 0 else "worse"
        else:
            t["word"] = "not distinguishable"
    return len(family)


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
# The contest: the best candidate against the runner-up, with more seeds while undecided


def contest(results: dict[int, dict[int, tuple[float, ...]]], candidates: Sequence[int],
            max_seeds: int = DEFAULT_MAX_SEEDS, alpha: float = ALPHA) -> dict[str, Any] | None:
    """The best candidate and the runner-up by held-out mean (over each one's seeds), their seed
    test (uncorrected), and where it stands: ``distinguishable``, ``tie`` (not distinguishable
    with `max_seeds` common seeds) or ``undecided`` (fewer seeds so far). ``want`` is how many
    seeds each of the two should have next (more than now only while undecided). None below two
    candidates with results."""
    scored = []
    for c in candidates:
        by_seed = results.get(c)
        if by_seed:
            scored.append((-float(np.mean(seed_means(by_seed, sorted(by_seed)))), c))
    if len(scored) < 2:
        return None
    scored.sort()
    best, runner = scored[0][1], scored[1][1]
    a, b = results[best], results[runner]
    test = seed_test(a, b, alpha)
    common = test["n"]
    if test["word"] in ("better", "worse"):
        status = "distinguishable"
    elif common >= max_seeds:
        status = "tie"
    else:
        status = "undecided"
    have = max(len(a), len(b))
    want = have
    if status == "undecided" and len(a) == len(b) == common:
        want = have + 1  # both have every seed the other has: one more for both
    return {"best": best, "runner_up": runner, "seeds": common, "max_seeds": max_seeds,
            "diff": test["diff"], "low": test["low"], "high": test["high"], "p": test["p"],
            "word": test["word"], "status": status, "want": min(want, max(max_seeds, have))}


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
        elif a.get("verdict") != LOST:  # a lost item was enqueued again
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
                  task: dict[str, Any] | None = None, correction: str = DEFAULT_CORRECTION,
                  max_seeds: int = DEFAULT_MAX_SEEDS,
                  search_seeds: Sequence[int] = ()) -> dict[str, Any]:
    """Per layer: intervals, seed-unit tests against each baseline (corrected over the stage's
    family), ranks; the agreement of the rankings; the contest of the two best candidates."""
    from opsearch.funnel import at_highest_rung
    from opsearch.trials import search_mean

    from opsearch.trials import by_number as search_by_number

    by_number = search_by_number(at_highest_rung(trials))  # the funnel: highest rung's score
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
        overall = mean_interval(seed_means(by_seed, seeds))
        layers.append({"of_trial": of_trial, "kind": kind, "name": name, "seeds": seeds,
                       "search_mean": search_mean(origin, archs) if origin is not None else None,
                       "per_arch": per_arch, "overall": overall, "vs": {}})
    baselines = [layer for layer in layers if layer["kind"] == "baseline"]
    family = []
    for layer in layers:
        for base in baselines:
            if base is layer:
                continue
            test = seed_test(items.results[layer["of_trial"]], items.results[base["of_trial"]])
            layer["vs"][base["name"]] = test
            family.append(test)
    family_size = correct(family, correction)
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
    used = sorted({s for by_seed in items.results.values() for s in by_seed})
    return {
        "stage": items.stage,
        "task": task,
        "archs": list(archs),
        "alpha": ALPHA,
        "unit": UNIT,
        "test": TEST,
        "intervals": INTERVALS,
        "correction": correction,
        "correction_method": CORRECTIONS.get(correction, correction),
        "family": family_size,
        "seeds_used": used,
        "search_seeds": sorted(set(int(s) for s in search_seeds)),
        "seeds_disjoint": not set(used) & set(int(s) for s in search_seeds),
        "layers": layers,
        "agreement": agreement,
        "contest": contest(items.results, [r["of_trial"] for r in candidates], max_seeds),
        "best_trial": best["of_trial"] if best else None,
        "pending": items.pending,
        "failed": items.failed,
        "duplicates_ignored": items.duplicates_ignored,
        "complete": items.pending == 0,
    }


def run_settings(study_attrs: dict[str, Any] | None) -> dict[str, Any]:
    """What the statistics need from the run's stored config: the search's seed, the correction
    and the contest's maximum seeds (defaults where the config does not say)."""
    try:
        config = json.loads((study_attrs or {}).get("config") or "{}")
    except (TypeError, ValueError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    table = config.get("rerank") if isinstance(config.get("rerank"), dict) else {}
    seed = config.get("seed", 0)
    return {"search_seeds": [seed] if isinstance(seed, int) and not isinstance(seed, bool) else [0],
            "correction": table.get("correction", DEFAULT_CORRECTION)
            if table.get("correction") in CORRECTIONS else DEFAULT_CORRECTION,
            "max_seeds": max(int(table.get("max_seeds") or DEFAULT_MAX_SEEDS),
                             int(table.get("seeds") or 0))}


def summarize(trials: Sequence[Any], archs: Sequence[str], study_attrs: dict | None = None,
              stage: str | None = None, correction: str | None = None,
              max_seeds: int | None = None) -> dict[str, Any] | None:
    """The report of one stage (the given one, else the latest); None when the run has none.
    ``stages`` lists every stage of the run. `correction` and `max_seeds` default to the run's
    stored ``[rerank]`` settings."""
    from opsearch.trials import stage_tasks

    stages = collect(trials, archs)
    if not stages or (stage is not None and stage not in stages):
        return None
    chosen = stages[stage] if stage is not None else max(stages.values(), key=lambda s: s.last_number)
    tasks = stage_tasks(study_attrs or {})
    settings = run_settings(study_attrs)
    out = stage_summary(trials, archs, chosen, tasks.get(chosen.stage),
                        correction=correction or settings["correction"],
                        max_seeds=max_seeds or settings["max_seeds"],
                        search_seeds=settings["search_seeds"])
    out["stages"] = sorted(stages, key=lambda name: stages[name].last_number)
    return out


def reranked_best(trials: Sequence[Any], archs: Sequence[str],
                  study_attrs: dict | None = None) -> tuple[int, str] | None:
    """(trial number, why) of the best candidate after re-ranking (latest stage), or None when
    the run has no re-ranked candidate: what `opsearch export` picks by default."""
    result = summarize(trials, archs, study_attrs)
    if not result or result["best_trial"] is None:
        return None
    best = next(r for r in result["layers"] if r["of_trial"] == result["best_trial"])
    o = best["overall"]
    why = (f"the best candidate after re-ranking (stage {result['stage']}: held-out mean "
           f"{o['mean']:.4f} over {o['n']} seed{'s' if o['n'] != 1 else ''}, rank "
           f"#{best['search_rank']} at the search)")
    c = result.get("contest")
    if c and c["best"] == best["of_trial"] and c["status"] == "tie":
        why += (f"; tied with trial {c['runner_up']} after {c['seeds']} seeds "
                f"(p={c['p']:.2g})" if c.get("p") is not None else
                f"; tied with trial {c['runner_up']} after {c['seeds']} seeds")
    if not result["complete"]:
        why += f"; re-ranking incomplete ({result['pending']} items left)"
    return best["of_trial"], why
