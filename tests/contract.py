"""The check every test of a search runs on its study: the stored contract (README "Stored results")
and the outcome that matters, candidates that were really trained.

A search whose training, filters, recording or recovery is broken must fail this check, not
pass it with every candidate `failed:*` or `rejected:*`."""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Sequence

from optuna.trial import TrialState

from opsearch import graph
from opsearch.study import LOST, LOST_TWICE


def check_contract(trials: Sequence[Any], archs: Sequence[str], filters: Iterable[str] | None = None,
                   *, min_evaluated: int = 1, allowed_failures: Iterable[str] = ()) -> dict[str, int]:
    """Assert the contract on every trial and at least `min_evaluated` evaluated candidates;
    returns the count of each verdict kind. `allowed_failures`: `failed:*` verdicts the test
    causes on purpose (e.g. failed:worker_lost after a SIGKILL); any other failure fails."""
    # numbers are per study: a rerank item's of_trial and a duplicate name a search trial
    by_number = {t.number: t for t in trials if t.user_attrs.get("kind") in ("candidate", "baseline")}
    filters = set(filters) if filters is not None else None
    allowed = set(allowed_failures)
    counts: dict[str, int] = {}
    for t in trials:
        assert t.state.is_finished(), (t.number, t.state)
        attrs = t.user_attrs
        kind, verdict = attrs.get("kind"), attrs.get("verdict")
        assert kind in ("candidate", "baseline", "rerank"), (t.number, kind)
        assert isinstance(verdict, str), (t.number, attrs)
        assert isinstance(attrs.get("formula"), str) and attrs["formula"], (t.number, attrs)
        graph.plain_from_dict(json.loads(attrs["graph"]))  # our schema
        if verdict not in (LOST, LOST_TWICE):  # its worker died before it could time the candidate
            assert isinstance(attrs.get("elapsed_s"), (int, float)) and attrs["elapsed_s"] >= 0, (t.number, attrs)
        category = verdict.split(":")[0]
        counts[f"{kind}:{category}"] = counts.get(f"{kind}:{category}", 0) + 1
        if kind == "baseline":
            assert verdict == "evaluated", (t.number, attrs.get("layer"), verdict, attrs.get("reason"))
        if kind == "rerank":  # a held-out evaluation of an earlier evaluated trial, one seed
            assert isinstance(attrs.get("stage"), str) and isinstance(attrs.get("seed"), int)
            of = by_number[attrs["of_trial"]]
            assert of.datetime_complete <= t.datetime_start and of.user_attrs.get("kind") in ("candidate", "baseline")
            assert of.user_attrs.get("verdict") == "evaluated", (t.number, of.number)
            assert attrs.get("graph") == of.user_attrs.get("graph") or attrs.get("layer")
        if verdict == "evaluated":
            assert t.state == TrialState.COMPLETE, (t.number, t.state)
            _check_accuracies(t, archs)
        elif category == "duplicate":
            earlier = by_number[int(verdict.split(":")[1])]
            assert earlier.number < t.number and earlier.user_attrs["verdict"] == "evaluated"
            assert t.state == TrialState.COMPLETE and t.values == earlier.values
            _check_accuracies(t, archs)
        elif category == "rejected":
            assert t.state == TrialState.PRUNED and t.values is None
            name = verdict.split(":", 1)[1]
            assert filters is None or name in filters, (t.number, verdict, filters)
            assert attrs.get("reason"), (t.number, attrs)
        elif category == "failed":
            assert verdict in allowed, (t.number, verdict, attrs.get("reason"), attrs.get("traceback"))
            assert t.state == TrialState.FAIL
        else:
            raise AssertionError(f"trial {t.number}: unknown verdict {verdict!r}")
    evaluated = counts.get("candidate:evaluated", 0)
    assert evaluated >= min_evaluated, f"{evaluated} candidates evaluated, expected >= {min_evaluated}: {counts}"
    return counts


def _check_accuracies(t: Any, archs: Sequence[str]) -> None:
    accs = [t.user_attrs.get(f"acc/{a}") for a in archs]
    assert all(isinstance(a, float) and math.isfinite(a) and 0.0 <= a <= 1.0 for a in accs), (t.number, accs)
    assert t.values == accs, (t.number, t.values, accs)
