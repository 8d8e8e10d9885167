"""Lineage: which finished trial a proposal's parent is, and what that parent measured early.

An evolution plugin says which genome it mutated (`Algorithm.parent`); the engine stores the
parent's trial number with the child (`parent` attribute) and can hand the parent's early
accuracies (the quality filter's, after its short training) to the child's filters. The quality
filter's ``parent_margin`` uses them: a mutant that learns clearly slower than the parent it was
made from is stopped at the quality filter's step instead of trained in full (round 15 of the
discovery benchmark: most such children end below their parent). Built from the finished trials
every worker feeds back, so a resumed or second worker has the same index.
"""
from __future__ import annotations

from typing import Any, Sequence

QUALITY_PREFIX = "metric/quality/acc/"


def early_accuracies(user_attrs: dict[str, Any]) -> dict[str, float]:
    """A trial's accuracies per architecture after the quality filter's short training, as the
    pipeline stores them (``metric/quality/acc/<arch>``); empty when it stored none."""
    return {k[len(QUALITY_PREFIX):]: float(v) for k, v in user_attrs.items()
            if k.startswith(QUALITY_PREFIX) and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Lineage:
    """Finished candidates by genome (the first trial of each), and the early accuracies of the
    trained ones."""

    def __init__(self) -> None:
        self._trial_of: dict[tuple[int, ...], int] = {}
        self._early: dict[int, dict[str, float]] = {}

    def add(self, number: int, genome: Sequence[int] | None, user_attrs: dict[str, Any]) -> None:
        """Index one finished candidate trial (other kinds and genome-less trials are ignored)."""
        if genome is None or user_attrs.get("kind", "candidate") != "candidate":
            return
        self._trial_of.setdefault(tuple(genome), number)
        if user_attrs.get("verdict") == "evaluated":
            early = early_accuracies(user_attrs)
            if early:
                self._early.setdefault(number, early)

    def trial_of(self, genome: Sequence[int] | None) -> int | None:
        """The trial number of a finished candidate with this genome; None if there is none."""
        return None if genome is None else self._trial_of.get(tuple(genome))

    def early_accuracies(self, number: int | None) -> dict[str, float] | None:
        """The quality filter's accuracies of a trained trial, per architecture; None otherwise."""
        return None if number is None else self._early.get(number)
