"""The funnel: asynchronous successive halving over training length inside the search (ASHA,
Li et al. 2020), for K objectives.

Rung 0 is the quality filter (``steps[0]`` steps, default 100). A candidate that passes it is
trained on to rung 1 (``steps[1]``) and recorded as usual, with user attributes ``rung = 1`` and
``rung_steps``. Whenever a rung holds at least ``min_candidates`` finished candidates, the top
``1/eta`` of them by non-dominated rank over the K accuracies (ties: the higher mean, then the
earlier trial) are promoted to the next rung, as soon as they are in that top, never demoted.

A promotion is one WAITING trial of the run's stage study ``<run>/promotion`` (opsearch/trials.py;
the run's own study for a run stored before stage studies) (**contract**: ``kind = "promotion"``, ``of_trial``
= the candidate's trial number, ``rung``, plus ``graph``, ``formula``, ``hash``; once done
``verdict``, ``acc/<arch>``, ``rung_steps``, ``elapsed_s``; values = the accuracies at that
rung), handed out to workers like a candidate: it trains the layer from scratch with
``steps[rung]`` steps (the same seed as flat evaluation, so the top rung gives exactly what a
flat search with ``[evaluator] steps = steps[-1]`` would). Which promotions are due is computed
from the study alone, so any worker on any machine enqueues them, a resumed search finds them,
and a lost worker's promotion is reaped and enqueued again like a candidate. Enqueueing is
idempotent under the workers' lock; two machines may race and enqueue one promotion twice:
every reader keeps the earlier one.

What sees which rung: the search algorithm gets every candidate's rung-1 objectives (one
fidelity for all, so its comparisons are fair; a promotion is not fed back). The leaderboard,
the Pareto front, `export` and the re-ranking stage's selection see each candidate at the
highest rung it finished (`at_highest_rung`), ranked by rung first, then mean accuracy (ASHA's
incumbent: the best candidate of the highest rung). Baselines (option ``baselines``) are
evaluated at the top rung (``"top"``, the default: the leaderboard compares the best candidates
with them at full length) or at rung 1 (``"first"``: the fidelity the candidates are compared
at and the algorithm is fed, for a fraction of the cost; they are references, never promoted,
and the re-ranking stage trains them at full length on held-out data). The budget counts
candidates; promotions are extra work within it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

from opsearch import faults
from opsearch.config import FUNNEL_DEFAULTS as DEFAULTS
from opsearch.config import DEFAULT_EVALUATOR, check_funnel_options
from opsearch.errors import UserError
from opsearch.pareto import nondominated_ranks
from opsearch.trials import LOST, SEARCH_KINDS
from opsearch.trials import by_number as search_by_number

KIND = "promotion"
QUALITY_STEPS = 100  # the quality filter's default steps: rung 0


def default_steps(top: int, eta: int, first: int = QUALITY_STEPS) -> list[int]:
    """[first, ..., top/eta, top]: the top rung divided by eta while it stays above rung 0."""
    rungs = [top]
    while rungs[-1] // eta > first:
        rungs.append(rungs[-1] // eta)
    return [first] + rungs[::-1]


@dataclass
class Funnel:
    """The funnel of a search: rung steps (rung 0 = the quality filter), eta, min_candidates."""

    steps: list[int]
    eta: int = 3
    min_candidates: int = 3
    baselines: str = "top"

    @property
    def top(self) -> int:
        return len(self.steps) - 1

    @classmethod
    def from_config(cls, config) -> "Funnel | None":
        """The funnel of a SearchConfig; None when off (the default). Without ``steps``: the top
        rung is the evaluator's ``steps``, divided by eta down to the quality filter's steps."""
        options = dict(config.funnel)
        check_funnel_options(options)
        own = {k: options.get(k, d) for k, d in DEFAULTS.items()}
        if not own["enabled"]:
            return None
        from opsearch import registry
        from opsearch.evaluation import make_eval_config

        plugin = registry.evaluators.get(config.evaluator_plugin)
        values = plugin.config_to_dict(make_eval_config(config))
        if "steps" not in values:
            raise UserError(f"funnel: the evaluator {config.evaluator_plugin!r} has no 'steps' "
                            "option to train candidates for longer")
        quality = dict(config.filter_options.get("quality") or {})
        if own["steps"] is None:
            first = int(quality.get("steps", QUALITY_STEPS))
            steps = default_steps(int(values["steps"]), own["eta"], first)
            if len(steps) < 2 or steps[0] >= steps[1]:
                raise UserError(f"funnel: the evaluator's steps ({values['steps']}) must exceed the "
                                f"quality filter's ({first})")
        else:
            steps = list(own["steps"])
        if "steps" in quality and int(quality["steps"]) != steps[0]:
            raise UserError(f"funnel: rung 0 is the quality filter: funnel.steps[0] = {steps[0]} "
                            f"but filter_options.quality.steps = {quality['steps']}")
        return cls(steps, own["eta"], own["min_candidates"], own["baselines"])

    @property
    def baseline_rung(self) -> int:
        return self.top if self.baselines == "top" else 1

    def filter_options(self, filter_options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The search's filter options with the quality filter at rung 0's steps."""
        out = {k: dict(v) for k, v in filter_options.items()}
        out.setdefault("quality", {})["steps"] = self.steps[0]
        return out

    def eval_config(self, config, rung: int, evaluator_plugin: str = DEFAULT_EVALUATOR):
        """An evaluator config (the plugin's) that trains to rung `rung`'s steps."""
        from opsearch import registry

        plugin = registry.evaluators.get(evaluator_plugin)
        values = plugin.config_to_dict(config)
        values["steps"] = int(self.steps[rung])
        return plugin.config_from_dict(values)

    def describe(self) -> str:
        return (f"funnel: rungs {' -> '.join(map(str, self.steps))} steps, eta {self.eta}, "
                f"promoting from {self.min_candidates} candidates per rung, baselines at rung "
                f"{self.baseline_rung}")


# --------------------------------------------------------------------------------------------
# Reading the rungs from the study


def _rung(trial: Any) -> int | None:
    r = trial.user_attrs.get("rung")
    return r if isinstance(r, int) and not isinstance(r, bool) else None


def _values(trial: Any) -> tuple[float, ...] | None:
    values = getattr(trial, "values", None)
    if trial.state.name != "COMPLETE" or not values:
        return None
    values = tuple(float(v) for v in values)
    return values if all(math.isfinite(v) for v in values) else None


def rung_results(trials: Sequence[Any]) -> dict[int, dict[int, tuple[float, ...]]]:
    """rung -> {candidate trial number: its accuracies at that rung}, from the study: rung 1 is
    the candidates' own evaluation, higher rungs their promotions (the earliest one, should two machines race)."""
    out: dict[int, dict[int, tuple[float, ...]]] = {}
    finished_promotions = []
    for t in trials:
        kind = t.user_attrs.get("kind", "candidate")
        if kind == "candidate" and t.user_attrs.get("verdict") == "evaluated" and _rung(t) == 1:
            values = _values(t)
            if values is not None:
                out.setdefault(1, {})[t.number] = values
        elif kind == KIND and _rung(t) is not None and _values(t) is not None:
            finished_promotions.append(t)
    finished_promotions.sort(key=lambda t: t.number)
    for t in finished_promotions:
        try:
            of = int(t.user_attrs["of_trial"])
        except (KeyError, TypeError, ValueError):
            continue
        out.setdefault(_rung(t), {}).setdefault(of, _values(t))
    return out


def ranked(results: dict[int, tuple[float, ...]]) -> list[int]:
    """Candidate numbers best first: non-dominated rank, then higher mean, then earlier trial."""
    numbers = list(results)
    ranks = nondominated_ranks([results[n] for n in numbers])
    order = sorted(range(len(numbers)), key=lambda i: (ranks[i], -sum(results[numbers[i]])
                                                      / len(results[numbers[i]]), numbers[i]))
    return [numbers[i] for i in order]


def due(funnel: Funnel, trials: Sequence[Any]) -> list[tuple[int, int]]:
    """(candidate number, rung) of every promotion the rungs call for now (done ones included)."""
    rungs = rung_results(trials)
    out = []
    for r in range(1, funnel.top):
        results = rungs.get(r, {})
        n = len(results)
        if n < funnel.min_candidates:
            continue
        for number in ranked(results)[:n // funnel.eta]:
            out.append((number, r + 1))
    return out


def existing(trials: Sequence[Any]) -> set[tuple[int, int]]:
    """(of_trial, rung) of every promotion in the study, lost workers' copies apart."""
    out = set()
    for t in trials:
        if t.user_attrs.get("kind") != KIND or t.user_attrs.get("verdict") == LOST:
            continue
        try:
            out.add((int(t.user_attrs["of_trial"]), int(t.user_attrs["rung"])))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def enqueue_missing(run, funnel: Funnel) -> int:
    """Enqueue the promotions that are due and not in the study yet; returns how many.

    Call after `run.sync()` under the workers' lock."""
    trials = run.trials()
    by_number = search_by_number(trials)
    present = existing(trials)
    queued = 0
    for number, rung in due(funnel, trials):
        if (number, rung) in present:
            continue
        source = by_number[number]
        attrs = {"kind": KIND, "of_trial": number, "rung": rung,
                 **{k: source.user_attrs[k] for k in ("graph", "formula", "hash") if k in source.user_attrs}}
        run.enqueue(attrs)
        present.add((number, rung))
        queued += 1
        faults.point("promotion_enqueue")
    return queued


def at_highest_rung(trials: Sequence[Any]) -> list[Any]:
    """The trials with each funnelled candidate's values and ``acc/<arch>`` replaced by those of
    the highest rung it finished (user attribute ``rung`` set to it); promotion trials left out.
    Trials of a search without the funnel come back as they are."""
    promotions = [t for t in trials if t.user_attrs.get("kind") == KIND]
    if not promotions:
        return list(trials)
    rungs = rung_results(trials)
    best: dict[int, tuple[int, tuple[float, ...]]] = {}
    for r in sorted(rungs):
        for number, values in rungs[r].items():
            best[number] = (r, values)
    by_of: dict[tuple[int, int], Any] = {}
    for t in promotions:
        if _values(t) is not None:
            try:
                by_of.setdefault((int(t.user_attrs["of_trial"]), _rung(t)), t)
            except (KeyError, TypeError, ValueError):
                continue
    out = []
    for t in trials:
        if t.user_attrs.get("kind") == KIND:
            continue
        hit = best.get(t.number) if t.user_attrs.get("kind", "candidate") in SEARCH_KINDS else None
        if hit is None or hit[0] == _rung(t):
            out.append(t)
            continue
        rung, values = hit
        view = copy.copy(t)
        attrs = dict(t.user_attrs)
        source = by_of.get((t.number, rung))
        if source is not None:
            attrs.update({k: v for k, v in source.user_attrs.items()
                          if k.startswith("acc/") or k in ("rung_steps",)})
        attrs["rung"] = rung
        attrs["promoted_by"] = source.number if source is not None else None
        _set(view, attrs, values)
        out.append(view)
    return out


def _set(view: Any, attrs: dict[str, Any], values: tuple[float, ...]) -> None:
    """On a copy of an Optuna FrozenTrial or an engine TrialRecord (both have setters)."""
    view.user_attrs = attrs
    view.values = list(values) if hasattr(view, "_values") else tuple(values)


def rung_of(trial: Any) -> int | None:
    """The rung a trial (as `at_highest_rung` gives it) stands at; None outside the funnel."""
    return _rung(trial)
