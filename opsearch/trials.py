"""Reading one stored trial: what every reader of a study shares (the report, the re-ranking
stage and its statistics, the funnel, the commands), so that none of them imports another to
learn what a trial's kind, verdict or accuracies are. The stored contract: README, "Stored
results".

Where trials live. The run's study holds the search: candidates and baselines, whose values are
the search's objectives at the search's fidelity, so that Optuna's own tools (``best_trials``,
optuna-dashboard, ``optuna.visualization``) read it as the search. Evaluations whose values mean
something else live in a stage study beside it, in the same storage: ``<run>/rerank`` (every
re-ranking stage's items, told apart by ``stage``) and ``<run>/promotion`` (the funnel's
promotions, told apart by ``rung``). Their ``of_trial`` is a trial number of the run's study.
Runs stored before this layout (study attribute ``format`` < 2) hold those kinds in the run's
study itself, and keep doing so when resumed; readers read both. A reader gets the run's trials
first, then the stage studies' (`opsearch.study.run_trials`); trial numbers are per study, so a
number names a search trial only: key trials by number among `search_trials` alone."""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Sequence

ACC_PREFIX = "acc/"
LOST = "failed:worker_lost"  # the verdict of a trial whose worker stopped answering
STAGE_ATTR_PREFIX = "rerank:"  # study attribute of a re-ranking stage's task
STAGE_KINDS = ("rerank", "promotion")  # kinds stored in a stage study beside the run's
SEARCH_KINDS = ("candidate", "baseline")
STAGE_STUDIES_FORMAT = 2  # the study format (attribute "format", opsearch.study/N) from which on


def stage_study_name(run_study: str, kind: str) -> str:
    """The study beside run `run_study` that holds its trials of `kind` (rerank, promotion)."""
    return f"{run_study}/{kind}"


def stage_study_of(name: str, names: Iterable[str]) -> tuple[str, str] | None:
    """(run study, kind) when study `name` is a stage study of a study among `names`; else None."""
    run_study, _, kind = name.rpartition("/")
    return (run_study, kind) if kind in STAGE_KINDS and run_study in set(names) else None


def uses_stage_studies(study_attrs: dict[str, Any]) -> bool:
    """Whether a run writes its rerank items and promotions into stage studies (a run created by
    this version) or into its own study (a run created before: it stays as it was)."""
    fmt = str(study_attrs.get("format") or "")
    try:
        return int(fmt.rpartition("/")[2]) >= STAGE_STUDIES_FORMAT
    except ValueError:
        return False


def kind(trial: Any) -> str:
    return str(trial.user_attrs.get("kind", "candidate"))


def search_trials(trials: Iterable[Any]) -> list[Any]:
    """The search's own trials (candidates and baselines): re-ranking items (``kind = "rerank"``,
    opsearch/rerank.py) never enter the leaderboard, the Pareto front or the statistics."""
    return [t for t in trials if kind(t) in SEARCH_KINDS]


def in_order(trials: Iterable[Any]) -> list[Any]:
    """The run's study's trials by number, then each stage study's (rerank, promotion) by number."""
    return sorted(trials, key=lambda t: (STAGE_KINDS.index(kind(t)) + 1 if kind(t) in STAGE_KINDS
                                         else 0, t.number))


def by_number(trials: Iterable[Any]) -> dict[int, Any]:
    """The search's trials by number (a stage study's trials have numbers of their own)."""
    return {t.number: t for t in search_trials(trials)}


def verdict(trial: Any) -> str:
    """The trial's verdict; trials without one (still running, or lost) by their state."""
    v = trial.user_attrs.get("verdict")
    if isinstance(v, str) and v:
        return v
    return trial.state.name.lower()


def category(trial: Any) -> str:
    """evaluated | duplicate | rejected | failed | running | ... (the verdict before its colon)."""
    return verdict(trial).split(":", 1)[0]


def archs_of(trials: Sequence[Any], study_attrs: dict | None = None) -> list[str]:
    """Architectures in objective order: the study attr ``archs``, else the ``acc/*`` attrs seen."""
    archs = (study_attrs or {}).get("archs")
    if isinstance(archs, (list, tuple)) and archs:
        return [str(a) for a in archs]
    seen: list[str] = []
    for t in trials:
        for key in t.user_attrs:
            if key.startswith(ACC_PREFIX) and key[len(ACC_PREFIX):] not in seen:
                seen.append(key[len(ACC_PREFIX):])
    return seen


def accuracies(trial: Any, archs: Sequence[str]) -> tuple[float, ...] | None:
    """One accuracy per architecture (trial values first, then ``acc/<arch>`` attrs); None when
    the trial has none (rejected, failed, running)."""
    if kind(trial) != "baseline" and category(trial) not in ("evaluated", "duplicate"):
        return None
    values = getattr(trial, "values", None)
    if values is not None and len(values) == len(archs) and trial.state.name == "COMPLETE":
        return tuple(float(v) for v in values)
    accs = []
    for arch in archs:
        v = trial.user_attrs.get(ACC_PREFIX + arch)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return None
        accs.append(float(v))
    return tuple(accs) if accs else None


def name_of(trial: Any) -> str:
    """A baseline's layer name, else the candidate's formula."""
    if kind(trial) == "baseline":
        return str(trial.user_attrs.get("layer") or trial.user_attrs.get("formula") or "?")
    return str(trial.user_attrs.get("formula") or "?")


def search_mean(trial: Any, archs: Sequence[str]) -> float | None:
    accs = accuracies(trial, archs)
    if not accs or any(not math.isfinite(a) for a in accs):
        return None
    return float(sum(accs) / len(accs))


def stage_tasks(study_attrs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every stage's task from the study's user attributes."""
    out = {}
    for key, text in study_attrs.items():
        if key.startswith(STAGE_ATTR_PREFIX) and isinstance(text, str):
            try:
                task = json.loads(text)
            except ValueError:
                continue
            if isinstance(task, dict):
                out[key[len(STAGE_ATTR_PREFIX):]] = task
    return out
