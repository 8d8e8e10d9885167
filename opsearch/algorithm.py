"""The search-algorithm interface every plugin implements (an Optuna-sampler-sized class).

An algorithm proposes genomes of a `SearchSpace` and learns from feedback: K objectives (all
maximised) or None for a candidate that was rejected or failed. Workers are stateless, so an
algorithm must be rebuilt from the study's history with `recover`, which must be cheap (10,000
items in well under a second for the built-in evolutionary ones) and must leave the algorithm in
the state that live feedback would have: proposals are a function of (seed, history), never of
how many times `propose` was called in some earlier process. To get that, each proposal draws
from a fresh RNG seeded by (seed, number of feedbacks so far, proposals since the last
feedback). Consequence for the engine: two workers that recover the same history with the same
seed propose the same genome; give each worker its own seed (e.g. seed + worker index).

Options come from the CLI / config file (strings or numbers) and are validated against the
class's `OPTIONS` table: an unknown option or a bad value is a UserError naming the accepted
ones.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

from opsearch.errors import UserError
from opsearch.pareto import dominates, pareto_front  # noqa: F401  (the algorithms' front)
from opsearch.space import Genome, SearchSpace

Objectives = tuple  # tuple[float, ...]


@dataclass(frozen=True)
class Option:
    """One documented, validated algorithm option."""

    default: Any
    help: str
    type: type = int
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    allow_none: bool = False

    def coerce(self, algorithm: str, name: str, value: Any) -> Any:
        def bad(why: str) -> UserError:
            return UserError(f"algorithm {algorithm!r} option {name}={value!r}: {why}")

        if value is None or (self.allow_none and isinstance(value, str) and value.lower() in ("none", "")):
            if self.allow_none:
                return None
            raise bad("a value is required")
        if self.type is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                out = value.lower() in ("true", "1", "yes", "on")
            elif isinstance(value, int) and value in (0, 1):
                out = bool(value)
            else:
                raise bad("expected true or false")
        elif self.type is int:
            if isinstance(value, bool):
                raise bad("expected an integer")
            try:
                out = int(value) if not isinstance(value, float) or value.is_integer() else None
            except (TypeError, ValueError):
                out = None
            if out is None:
                raise bad("expected an integer")
        elif self.type is float:
            if isinstance(value, bool):
                raise bad("expected a number")
            try:
                out = float(value)
            except (TypeError, ValueError):
                raise bad("expected a number") from None
            if math.isnan(out):
                raise bad("expected a number")
        else:
            out = str(value)
        if self.choices is not None and out not in self.choices:
            raise bad(f"expected one of {', '.join(map(str, self.choices))}")
        if self.minimum is not None and out < self.minimum:
            raise bad(f"must be >= {self.minimum}")
        if self.maximum is not None and out > self.maximum:
            raise bad(f"must be <= {self.maximum}")
        return out


class Algorithm:
    """Base class: subclasses define `name`, `OPTIONS`, `_propose(rng)` and `_feedback`."""

    name: ClassVar[str] = "algorithm"  # set by the registry to the name it is registered under
    OPTIONS: ClassVar[dict[str, Option]] = {}
    # Set by the engine: the search feeds the known layers back as its first members
    # (`seed_with_baselines`), so a plugin may explore less than it would from random graphs.
    from_known_layers: bool = False

    def __init__(self, space: SearchSpace, num_objectives: int, seed: int = 0, **options: Any):
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space must be a SearchSpace, got {type(space).__name__}")
        if isinstance(num_objectives, bool) or not isinstance(num_objectives, int) or num_objectives < 1:
            raise UserError(f"algorithm {self.name!r}: num_objectives must be a positive integer, "
                            f"got {num_objectives!r}")
        self.space = space
        self.num_objectives = num_objectives
        self.seed = int(seed)
        self.options = self.validate_options(options)
        self.num_feedbacks = 0
        self.num_rejected = 0
        self._pending = 0  # proposals since the last feedback
        # where the last proposal came from ("mutant:delete", "immigrant", ...), set by `_propose`
        # where the algorithm knows; the engine stores it as the trial's `origin` attribute
        self.origin: str | None = None
        # the genome the last proposal was made from (a mutant's parent), where the algorithm has
        # one: the engine stores its trial as the child's `parent` (opsearch/lineage.py)
        self.parent: Genome | None = None

    # ------------------------------------------------------------------ options

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """All options with defaults filled in; UserError for unknown names or bad values."""
        from opsearch.registry import check_option_names

        check_option_names(f"algorithm {cls.name!r}", options, cls.OPTIONS)
        out = {}
        for key, spec in cls.OPTIONS.items():
            out[key] = spec.coerce(cls.name, key, options[key]) if key in options else spec.default
        return out

    # ------------------------------------------------------------------ interface

    def propose(self) -> Genome:
        """The next genome to evaluate."""
        rng = random.Random(f"{self.seed}:{self.num_feedbacks}:{self._pending}")
        self._pending += 1
        self.origin = None
        self.parent = None
        return self._propose(rng)

    def feedback(self, genome: Sequence[int], objectives: Sequence[float] | None,
                 duplicate: bool = False, grade: float | None = None) -> None:
        """Result of one candidate: K objectives (maximised), or None if rejected/failed.

        A NaN objective counts as a rejection (it cannot be ranked). ``duplicate``: the candidate
        computed the same function as an earlier trial and carries that trial's objectives
        (`_feedback_duplicate` decides what that teaches the algorithm). ``grade``: for a
        rejection, how far it got through the filters (filters passed + closeness to passing the
        one that rejected it; higher is nearer to being trained), None when unknown.
        """
        genome = tuple(genome)
        if not self.space.is_valid(genome):
            self.space.check_genome(genome)  # raises with a clear message
        objectives = self.checked_objectives(objectives)
        self.num_feedbacks += 1
        self._pending = 0
        if objectives is None:
            self.num_rejected += 1
        if objectives is None:
            self._feedback_rejected(genome, grade)
        elif duplicate:
            self._feedback_duplicate(genome, objectives)
        else:
            self._feedback(genome, objectives)

    def checked_objectives(self, objectives: Sequence[float] | None) -> Objectives | None:
        """K floats, or None for a rejection (a NaN objective cannot be ranked: a rejection too);
        the wrong number of objectives is a UserError."""
        if objectives is None:
            return None
        objectives = tuple(float(v) for v in objectives)
        if len(objectives) != self.num_objectives:
            raise UserError(f"algorithm {self.name!r} expects {self.num_objectives} objective(s), "
                            f"got {len(objectives)}")
        return None if any(math.isnan(v) for v in objectives) else objectives

    def recover(self, history: Iterable[tuple]) -> None:
        """Replay finished trials in trial order (same state as live feedback): items are
        ``(genome, objectives)`` or ``(genome, objectives, duplicate, grade)``."""
        for item in history:
            self.feedback(*item)

    # ------------------------------------------------------------------ for subclasses

    def _propose(self, rng: random.Random) -> Genome:
        raise NotImplementedError

    def _feedback(self, genome: Genome, objectives: Objectives | None) -> None:
        """Default: the algorithm does not learn (e.g. random search)."""

    def _feedback_duplicate(self, genome: Genome, objectives: Objectives) -> None:
        """A candidate that repeated an earlier trial's function. Default: like any result."""
        self._feedback(genome, objectives)

    def _feedback_rejected(self, genome: Genome, grade: float | None) -> None:
        """A rejected or failed candidate with its grade. Default: ``_feedback(genome, None)``."""
        self._feedback(genome, None)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({self.space.name!r}, K={self.num_objectives}, seed={self.seed}, {opts})"


# ---------------------------------------------------------------------- shared helpers

SCALARIZATIONS = ("mean", "min", "max", "first")

SCALARIZATION_OPTION = Option(
    "mean", "how K objectives become one fitness: mean, min (worst architecture), max, or first",
    str, choices=SCALARIZATIONS)


def scalarize(objectives: Objectives, how: str) -> float:
    if how == "mean":
        return sum(objectives) / len(objectives)
    if how == "min":
        return min(objectives)
    if how == "max":
        return max(objectives)
    if how == "first":
        return objectives[0]
    raise ValueError(f"unknown scalarization {how!r}")


__all__ = ["Algorithm", "Option", "Objectives", "SCALARIZATIONS", "SCALARIZATION_OPTION", "scalarize",
           "dominates", "pareto_front"]
