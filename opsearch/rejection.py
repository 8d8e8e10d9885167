"""Rejection: cheap tests that stop useless candidates before they cost a full training run.

Most random graphs in the paper's space are useless (NaN, constant, unstable, or untrainable), and
many are the same function written differently. A `RejectionPipeline` runs registered filters
(`opsearch.registry.register_filter`) on a `Candidate`, cheapest first, and stops at the first one
that does not pass. Each filter returns a `Verdict` (passed, filter, reason, metrics, seconds).

The equivalence filter may end the pipeline with a *duplicate* verdict: the candidate computes the
same function as an earlier trial, so it reuses that trial's objectives instead of training
(AutoML-Zero's functional-equivalence cache, `EquivalenceCache`).

How the engine uses this module::

    pipeline = RejectionPipeline.from_spec("validity,numerics,equivalence,stability,quality",
                                           options={"stability": {"threshold": 1e8}})
    context = FilterContext(eval_config=config, equivalence=EquivalenceCache.from_trials(trials))
    candidate = Candidate(plain_graph, layer_options={"eps": 1e-5})
    outcome = pipeline.run(candidate, context)
    attrs = outcome.user_attrs(candidate)               # filter_s/<f>, reason, hash, equiv_*
    if outcome.status == "passed":                      # evaluate, resuming what the quality
        evaluator = context.get_evaluator()             # filter trained (its verdict hands
        result = (evaluator.resume(outcome.warm_start)  # the session back)
                  if outcome.warm_start is not None else evaluator.evaluate(candidate.plain))
        context.equivalence.record(candidate, trial.number, "evaluated", objectives)
    elif outcome.status.startswith("duplicate:"):       # objectives = outcome.objectives
        ...
    else:                                               # "rejected:<filter>"
        context.equivalence.record(candidate, trial.number, outcome.status)

Workers that share a study feed each other's finished trials with `EquivalenceCache.add_trial`.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from opsearch import registry
from opsearch.config import DEFAULT_EVALUATOR, SearchConfig
from opsearch.errors import InvalidCandidate, UserError



def default_filters() -> list[str]:
    """The pipeline when a config names no filters: every registered filter that declares itself
    ``default`` (the built-ins: validity, numerics, equivalence, stability, quality), cheapest
    first, so a plugin can join the default pipeline without the core knowing its name."""
    return [name for _, name in sorted((cls.cost, name) for name, cls in registry.rejection_filters.items()
                                       if getattr(cls, "default", False))]


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------

@dataclass
class Verdict:
    """One filter's decision on one candidate.

    ``duplicate_of`` / ``objectives`` are set only by the equivalence filter when the candidate
    computes the same function as an earlier trial: the pipeline stops and the candidate takes
    that trial's objectives (verdict ``duplicate:<trial>``) without training. ``warm_start`` is
    what a passing filter hands to the evaluation that follows (the quality filter's staged
    session, which `Evaluator.resume` finishes instead of starting over).
    """

    passed: bool
    filter: str
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    duplicate_of: int | None = None
    objectives: tuple[float, ...] | None = None
    warm_start: Any = None

    @property
    def label(self) -> str:
        """The trial's `verdict` attribute this decision leads to (when it stops the pipeline)."""
        if self.duplicate_of is not None:
            return f"duplicate:{self.duplicate_of}"
        return "passed" if self.passed else f"rejected:{self.filter}"


@dataclass
class PipelineOutcome:
    """What the pipeline decided: every verdict in order and the final status."""

    verdicts: list[Verdict]
    grade: float | None = None  # a rejection's grade (see `RejectionPipeline.run`)

    @property
    def last(self) -> Verdict | None:
        return self.verdicts[-1] if self.verdicts else None

    @property
    def passed(self) -> bool:
        """True when every filter passed: the candidate goes on to full training."""
        return all(v.passed for v in self.verdicts)

    @property
    def status(self) -> str:
        """``passed``, ``rejected:<filter>`` or ``duplicate:<trial>``."""
        for v in self.verdicts:
            if not v.passed:
                return v.label
        return "passed"

    @property
    def duplicate_of(self) -> int | None:
        return self.last.duplicate_of if self.last else None

    @property
    def objectives(self) -> tuple[float, ...] | None:
        """A duplicate's objectives (those of the trial it equals); None otherwise."""
        return self.last.objectives if self.last else None

    @property
    def reason(self) -> str:
        return "" if self.passed else self.last.reason

    @property
    def warm_start(self) -> Any:
        """What the last filter that trained the candidate hands on (None unless it passed)."""
        if not self.passed:
            return None
        return next((v.warm_start for v in reversed(self.verdicts) if v.warm_start is not None), None)

    @property
    def seconds(self) -> float:
        return sum(v.seconds for v in self.verdicts)

    @property
    def filter_seconds(self) -> dict[str, float]:
        return {v.filter: v.seconds for v in self.verdicts}

    def user_attrs(self, candidate: "Candidate | None" = None) -> dict[str, Any]:
        """Trial user attributes to store (team contract): ``filter_s/<f>``, ``reason``, and, when
        the candidate went through the equivalence filter, ``hash``, ``equiv_hash``, ``equiv_fp``,
        ``equiv_fp_limit``, ``equiv_fp_band`` and ``equiv_fp_band@<floor>`` (one per band of
        `V0_BANDS`; so that `EquivalenceCache.from_trials` can rebuild the cache from the study)."""
        attrs: dict[str, Any] = {f"filter_s/{k}": round(s, 6) for k, s in self.filter_seconds.items()}
        if not self.passed:
            attrs["reason"] = self.reason
            if self.grade is not None and self.duplicate_of is None:
                attrs["grade"] = round(self.grade, 6)
        for v in self.verdicts:
            for key, value in v.metrics.items():
                if isinstance(value, float) and not math.isfinite(value):
                    value = str(value)  # JSON (and so Optuna attrs) has no NaN/Inf
                if isinstance(value, (int, float, str, bool)):
                    attrs[f"metric/{v.filter}/{key}"] = value
        if candidate is not None:
            if candidate._canonical_hash is not None:
                attrs["hash"] = candidate._canonical_hash
            if candidate.equiv_hash is not None:
                attrs["equiv_hash"] = candidate.equiv_hash
                attrs["equiv_fp"] = fingerprint_to_json(candidate.equiv_fp)
            if candidate.equiv_fp_limit is not None:
                attrs["equiv_fp_limit"] = fingerprint_to_json(candidate.equiv_fp_limit)
            for index, fp_band in enumerate(candidate.equiv_fp_bands):
                if fp_band is not None:
                    attrs[band_attr(index)] = fingerprint_to_json(fp_band)
        return attrs


# --------------------------------------------------------------------------------------------
# Candidate and context
# --------------------------------------------------------------------------------------------

class Candidate:
    """A graph under test, with what the filters compute about it, computed once, lazily.

    ``plain`` is the plain graph tuple; the canonical hash and the formula are computed on
    first use. Filters leave results here for later filters and for the stored attributes:
    ``equiv_hash`` / ``equiv_fp`` (equivalence).
    """

    def __init__(self, graph: Any, *, genome: Sequence[int] | None = None,
                 layer_options: Mapping[str, Any] | None = None):
        from opsearch import graph as graph_mod

        self.plain = graph_mod.as_plain(graph) if not isinstance(graph, tuple) else graph
        self.genome = tuple(genome) if genome is not None else None
        self.layer_options: dict[str, Any] = dict(layer_options or {})
        self._canonical_hash: str | None = None
        self._formula: str | None = None
        self.equiv_hash: str | None = None
        self.equiv_fp: np.ndarray | None = None
        self.equiv_fp_limit: np.ndarray | None = None
        # band fingerprints, one per band of V0_BANDS (empty: v0 not live, or no band probed)
        self.equiv_fp_bands: list[np.ndarray | None] = []
        # the trained trial it was mutated from and that trial's early accuracies (the quality
        # filter's, per architecture), when the engine knows them (opsearch/lineage.py)
        self.parent: int | None = None
        self.parent_early: dict[str, float] | None = None

    @property
    def canonical_hash(self) -> str:
        if self._canonical_hash is None:
            from opsearch import graph as graph_mod
            self._canonical_hash = graph_mod.canonical_hash(self.plain)
        return self._canonical_hash

    @property
    def formula(self) -> str:
        if self._formula is None:
            from opsearch import graph as graph_mod
            self._formula = graph_mod.formula(self.plain)
        return self._formula

    def build(self, num_channels: int, **overrides: Any) -> Any:
        """A fresh compiled layer (its own parameters and running statistics); ``overrides``
        replace layer options (the equivalence filter's eps limit)."""
        from opsearch import layers
        options = {k: v for k, v in {**self.layer_options, **overrides}.items() if k in layers.OPTIONS}
        return layers.build(self.plain, num_channels, **options)

    def norm_act(self):
        """The `norm_act(num_channels, act)` factory the proxy architectures take."""
        from opsearch import layers
        return layers.norm_act(self.plain, **self.layer_options)

    def __repr__(self) -> str:
        return f"Candidate({self.plain!r})"


@dataclass
class FilterContext:
    """What filters share across candidates: the evaluation setup, the equivalence cache, a seed.

    ``eval_config`` is the config of the evaluator plugin ``evaluator_plugin`` (for the built-in
    ``lightning``, a `trainers.evaluator.EvalConfig`); the `evaluator` is built from it on first
    use (only the quality filter trains). ``seed`` fixes every probe so verdicts are reproducible.
    """

    eval_config: Any = None
    evaluator: Any = None
    equivalence: "EquivalenceCache" = field(default_factory=lambda: EquivalenceCache())
    seed: int = 0
    extra: dict = field(default_factory=dict)
    evaluator_plugin: str = DEFAULT_EVALUATOR

    def layer_options(self) -> dict[str, Any]:
        """The run's layer options (eps, groups, momentum, no_act) from the eval config."""
        if self.eval_config is None:
            return {}
        return registry.evaluators.get(self.evaluator_plugin).layer_options(self.eval_config)

    def get_evaluator(self):
        """The evaluator plugin built from ``eval_config`` (its default config when None)."""
        if self.evaluator is None:
            cls = registry.evaluators.get(self.evaluator_plugin)
            config = self.eval_config if self.eval_config is not None else cls.configure(SearchConfig())
            self.evaluator = cls(config)
        return self.evaluator


# --------------------------------------------------------------------------------------------
# Filters and the pipeline
# --------------------------------------------------------------------------------------------

class Filter:
    """Base class of rejection filters. Subclass, set ``cost``, implement `check`; the registry
    sets ``name`` to the name given to `register_filter`.

    ``cost`` is a rough order of the filter's price (seconds per candidate); the pipeline sorts
    filters by it, so a plugin filter slots in at the right place whatever order a user lists.
    Options are the constructor's keyword arguments (from ``[filter_options.<name>]`` in a
    config file), checked by the registry.
    """

    name: str = "filter"
    cost: float = 1.0
    default: bool = False  # in the pipeline when a config names no filters (`default_filters`)
    # a rejection that follows from the graph alone (and so is re-derived cheaply) is never kept
    # in the equivalence cache: caching it would only grow the cache
    from_graph_alone: bool = False

    def check(self, candidate: Candidate, context: FilterContext) -> Verdict:
        raise NotImplementedError

    def describe_known(self, candidate: Candidate, context: FilterContext) -> None:
        """Leave on `candidate` what this filter would remember about it, for a layer that
        skips the filters (a baseline), so that later candidates can match it. Default: nothing."""

    def closeness(self, verdict: Verdict) -> float | None:
        """How close a candidate this filter rejected came to passing, in [0, 1) (e.g. the
        quality filter's accuracy against its bar), from the verdict's metrics; None when the
        rejection says nothing about the candidate (a repeat of an earlier one). Default 0."""
        return 0.0

    def accept(self, **metrics: Any) -> Verdict:
        return Verdict(True, self.name, "", metrics)

    def reject(self, reason: str, **metrics: Any) -> Verdict:
        return Verdict(False, self.name, reason, metrics)


def parse_filter_list(spec: str | Iterable[str] | None) -> list[str]:
    """``"validity,numerics"`` -> names; None -> the default list; ``""``/``"none"`` -> no filter."""
    if spec is None:
        return default_filters()
    if isinstance(spec, str):
        if spec.strip().lower() in ("", "none"):
            return []
        names = [s.strip() for s in spec.split(",")]
    else:
        names = [str(s).strip() for s in spec]
    if any(not n for n in names):
        raise UserError(f"empty name in filter list {spec!r}")
    if len(set(names)) != len(names):
        raise UserError(f"filter listed twice in {spec!r}")
    return names


class RejectionPipeline:
    """Runs filters cheapest first; stops at the first rejection or duplicate."""

    def __init__(self, filters: Sequence[Filter]):
        self.filters = sorted(filters, key=lambda f: f.cost)  # stable: ties keep the user's order

    @classmethod
    def from_spec(cls, spec: str | Iterable[str] | None = None,
                  options: Mapping[str, Mapping[str, Any]] | None = None) -> "RejectionPipeline":
        """Filters by registry name with their options (``{"stability": {"threshold": 1e8}}``).

        An unknown filter name, or options for a filter not in the list, raise UserError."""
        names = parse_filter_list(spec)
        options = dict(options or {})
        unused = set(options) - set(names)
        if unused:
            known = registry.rejection_filters.names()
            bad = sorted(n for n in unused if n not in known)
            if bad:
                raise UserError(registry.rejection_filters.unknown_message(bad[0]))
        return cls([registry.rejection_filters.create(name, **dict(options.get(name) or {}))
                    for name in names])

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.filters]

    def run(self, candidate: Candidate, context: FilterContext) -> PipelineOutcome:
        """Filters cheapest first, up to the first that does not pass. A rejection gets a
        ``grade``: the number of filters passed plus the rejecting filter's `closeness`, so
        that a search with no trained layer yet can still tell a near miss (100-step accuracy
        0.18) from a hopeless graph (NaN), and climb (`grade` trial attribute)."""
        if not candidate.layer_options:
            candidate.layer_options = context.layer_options()
        verdicts: list[Verdict] = []
        grade = None
        for position, flt in enumerate(self.filters):
            start = time.perf_counter()
            try:
                verdict = flt.check(candidate, context)
            except InvalidCandidate as e:
                verdict = flt.reject(str(e))
            verdict.seconds = time.perf_counter() - start
            verdict.filter = flt.name
            verdicts.append(verdict)
            if not verdict.passed:
                if verdict.duplicate_of is None:
                    closeness = flt.closeness(verdict)
                    if closeness is not None:
                        grade = position + min(max(float(closeness), 0.0), 0.999)
                break
        return PipelineOutcome(verdicts, grade)

    def known_layer_attrs(self, candidate: Candidate, context: FilterContext) -> dict[str, Any]:
        """The attributes (``hash``, ``equiv_hash``, ``equiv_fp``) that put a layer evaluated
        without the filters, a baseline, into the equivalence cache the way a candidate gets
        there, so that a rediscovered known layer is a duplicate of its baseline trial."""
        if not candidate.layer_options:
            candidate.layer_options = context.layer_options()
        for flt in self.filters:
            flt.describe_known(candidate, context)
        return PipelineOutcome([]).user_attrs(candidate)


# --------------------------------------------------------------------------------------------
# Functional-equivalence cache
# --------------------------------------------------------------------------------------------

def fingerprint_to_json(fp: np.ndarray | None) -> str:
    """Compact JSON of a fingerprint, 7 significant digits (far below the match tolerance)."""
    if fp is None:
        return "null"
    return "[" + ",".join(f"{float(v):.7g}" for v in fp) + "]"


def fingerprint_from_json(text: str) -> np.ndarray | None:
    try:
        values = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def fingerprint_hash(fp: np.ndarray) -> str:
    """A short hash of a fingerprint at 3 significant digits, for grouping in reports only.

    Matching never relies on it (rounding puts near-equal values on either side of a boundary);
    the cache compares fingerprints with a tolerance instead."""
    text = ",".join(f"{float(v):.3g}" for v in fp)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class StoredTrial(Protocol):
    """What the cache reads of a stored trial: an optuna FrozenTrial or a study.TrialRecord."""

    number: int
    values: Sequence[float] | None
    user_attrs: Mapping[str, Any]


# where a trained layer's v0 must have stayed for the band rule (plugins/rejection/equivalence.py):
# a wide band, and a narrow one on which eps-sized terms that depend on v0 stay below it
# (``max(sqrt(eps) / mean(v0), v0)`` is v0 for v0 > 0.06: round 9 trained two such pairs twice,
# their v0 in [0.58, 1.59] and [0.77, 1.65]), while ``rms(v0)`` stays 5e-4 above v0 at 0.1
V0_BANDS = ((0.005, 10.0), (0.1, 10.0))
V0_BAND = V0_BANDS[0]


def band_attr(index: int, bands: Sequence[tuple[float, float]] = V0_BANDS) -> str:
    """The trial attribute of the band fingerprint on ``bands[index]``: ``equiv_fp_band`` for
    the first (the contract of the first band rule), ``equiv_fp_band@<floor>`` for the others."""
    return "equiv_fp_band" if index == 0 else f"equiv_fp_band@{bands[index][0]:g}"


@dataclass
class CacheEntry:
    trial: int
    verdict: str  # "evaluated" or "rejected:<filter>"
    objectives: tuple[float, ...] | None = None


class EquivalenceCache:
    """Maps functions already seen to the trial that first had them.

    Three keys find an earlier equal function: the canonical graph hash (exact: same graph after
    dropping dead nodes and sorting commutative inputs); the output fingerprint (values that are
    relative by construction, see plugins/rejection/equivalence.py), compared with an absolute
    tolerance ``atol`` by one vectorised scan; and the fingerprint in the eps limit, which
    matches within ``atol`` when the plain fingerprints are also within the caller's looser
    tolerance. A tolerance, not rounding to a grid: rounding splits equal functions whose values
    straddle a grid boundary, however fine or coarse the grid.

    A fourth key, one per band of ``v0_bands``, holds only evaluated trials whose training kept
    every v0 entry inside that band (their ``v0_range``): their fingerprint with v0 anywhere in
    the band (the equivalence filter's ``equiv_fp_bands``). A later layer equal to one of them on
    the band trains exactly as it did, so it is that layer (``max(0, v0)`` and ``v0`` while
    v0 > 0.005).

    Only final outcomes are cached: evaluated trials (with objectives, so duplicates reuse them)
    and trials rejected by a filter after equivalence (stability, quality), so an equal function
    is not trained again to be rejected again. Failures are not cached (they may be transient).
    """

    def __init__(self, atol: float = 1e-4, v0_bands: Sequence[tuple[float, float]] = V0_BANDS):
        self.atol = atol
        self.v0_bands = tuple((float(lo), float(hi)) for lo, hi in v0_bands)
        self._by_hash: dict[str, CacheEntry] = {}
        # per (band, width): band fingerprints of the evaluated trials whose training kept v0 there
        self._band_rows: dict[tuple[int, int], tuple[np.ndarray, list[CacheEntry]]] = {}
        # fingerprints grouped by length (a run's probes fix it): row-growing matrices per group
        # (capacity doubles, so adding n entries costs O(n) copies) of the plain and the limit
        # fingerprints (NaN rows where a trial has no limit one), and the entries of their rows
        self._rows: dict[int, tuple[np.ndarray, np.ndarray, list[CacheEntry]]] = {}

    def __len__(self) -> int:
        return sum(len(entries) for _, _, entries in self._rows.values())

    @property
    def v0_band(self) -> tuple[float, float]:
        """The first (widest) band."""
        return self.v0_bands[0]

    def add(self, canonical_hash: str | None, fp: np.ndarray | None, entry: CacheEntry,
            fp_limit: np.ndarray | None = None, fp_band: Sequence[np.ndarray | None] = (),
            v0_range: Sequence[float] | None = None) -> None:
        """Remember a function; an earlier entry for the same function keeps precedence.
        ``fp_band``: the band fingerprints, one per band of ``v0_bands``; each enters only for an
        evaluated trial whose ``v0_range`` lies in its band."""
        if canonical_hash and canonical_hash not in self._by_hash:
            self._by_hash[canonical_hash] = entry
        for index, band_fp in enumerate(list(fp_band)[:len(self.v0_bands)]):
            if band_fp is None or entry.objectives is None or not self.kept_in_band(v0_range, index):
                continue
            band = np.asarray(band_fp, dtype=np.float64)
            key = (index, band.shape[0])
            matrix, band_entries = self._band_rows.get(key, (np.empty((16, band.shape[0])), []))
            if len(band_entries) == len(matrix):
                matrix = _grown(matrix)
            matrix[len(band_entries)] = band
            band_entries.append(entry)
            self._band_rows[key] = (matrix, band_entries)
        if fp is None:
            return
        fp = np.asarray(fp, dtype=np.float64)
        width = fp.shape[0]
        matrix, limits, entries = self._rows.get(width, (np.empty((16, width)), np.empty((16, width)), []))
        if len(entries) == len(matrix):
            matrix, limits = _grown(matrix), _grown(limits)
        matrix[len(entries)] = fp
        limit = None if fp_limit is None else np.asarray(fp_limit, dtype=np.float64)
        limits[len(entries)] = limit if limit is not None and limit.shape == fp.shape else np.nan
        entries.append(entry)
        self._rows[width] = (matrix, limits, entries)

    def kept_in_band(self, v0_range: Any, band: int = 0) -> bool:
        """Whether a training's [min, max] of v0 lies inside band ``band`` (unknown: no)."""
        try:
            lo, hi = (float(v) for v in v0_range)
        except (TypeError, ValueError):
            return False
        floor, ceiling = self.v0_bands[band]
        return floor <= lo <= hi <= ceiling

    def record(self, candidate: Candidate, trial: int, verdict: str,
               objectives: Sequence[float] | None = None, v0_range: Sequence[float] | None = None) -> None:
        """Remember a finished candidate (call after its trial got its final verdict);
        ``v0_range`` is its training's (the evaluation's ``v0_range`` attribute)."""
        if verdict == "evaluated" and objectives is not None:
            entry = CacheEntry(trial, verdict, tuple(float(o) for o in objectives))
        elif verdict.startswith("rejected:") and not _from_graph_alone(verdict):
            entry = CacheEntry(trial, verdict)
        else:
            return
        if candidate.equiv_fp is None and candidate._canonical_hash is None:
            return  # never went through the equivalence filter
        self.add(candidate._canonical_hash, candidate.equiv_fp, entry, candidate.equiv_fp_limit,
                 candidate.equiv_fp_bands, v0_range)

    def lookup_hash(self, canonical_hash: str) -> CacheEntry | None:
        return self._by_hash.get(canonical_hash)

    def match(self, fp: np.ndarray, fp_limit: np.ndarray | None = None,
              limit_atol: float | None = None, fp_band: Sequence[np.ndarray | None] = ()
              ) -> tuple[CacheEntry | None, str]:
        """The earliest cached function equal to ``fp`` and how: ``(entry, "exact")`` within
        ``atol``; ``(entry, "limit")`` when the limit fingerprints are within ``atol`` and the
        plain ones within ``limit_atol``; else ``(entry, "band:<i>")`` when the fingerprint on
        band ``v0_bands[i]`` (``fp_band``: one per band) is within
        ``atol`` of a trial's kept on that band; ``(None, "")`` otherwise."""
        entry, how = self._match_plain(np.asarray(fp, dtype=np.float64), fp_limit, limit_atol)
        if entry is not None:
            return entry, how
        for index, band_fp in enumerate(list(fp_band)[:len(self.v0_bands)]):
            if band_fp is None:
                continue
            band = np.asarray(band_fp, dtype=np.float64)
            rows = self._band_rows.get((index, band.shape[0]))
            if rows is not None:
                matrix, band_entries = rows
                found = np.flatnonzero(np.abs(matrix[:len(band_entries)] - band[None, :]).max(axis=1) <= self.atol)
                if len(found):
                    return band_entries[found[0]], f"band:{index}"
        return None, ""

    def _match_plain(self, fp: np.ndarray, fp_limit: np.ndarray | None,
                     limit_atol: float | None) -> tuple[CacheEntry | None, str]:
        rows = self._rows.get(fp.shape[0])
        if rows is None:
            return None, ""
        matrix, limits, entries = rows
        distance = np.abs(matrix[:len(entries)] - fp[None, :]).max(axis=1)
        exact = distance <= self.atol
        hits = exact
        if fp_limit is not None and limit_atol is not None:
            fp_limit = np.asarray(fp_limit, dtype=np.float64)
            if fp_limit.shape == fp.shape:
                near = np.abs(limits[:len(entries)] - fp_limit[None, :]) <= self.atol  # NaN: False
                hits = exact | (near.all(axis=1) & (distance <= limit_atol))
        found = np.flatnonzero(hits)
        if not len(found):
            return None, ""
        return entries[found[0]], "exact" if exact[found[0]] else "limit"

    def add_trial(self, trial: StoredTrial) -> bool:
        """Remember one finished trial by its ``hash``, ``equiv_fp``, ``equiv_fp_limit`` and
        (with ``v0_range``) band fingerprint attributes (`band_attr`), when its verdict is cacheable; returns
        whether it was added."""
        attrs = trial.user_attrs or {}
        verdict = attrs.get("verdict")
        if not isinstance(verdict, str):
            return False
        values = trial.values
        if verdict == "evaluated" and values:
            entry = CacheEntry(trial.number, verdict, tuple(float(v) for v in values))
        elif verdict.startswith("rejected:") and not _from_graph_alone(verdict):
            entry = CacheEntry(trial.number, verdict)
        else:
            return False
        fp = _stored_fingerprint(attrs, "equiv_fp")
        h = attrs.get("hash") if isinstance(attrs.get("hash"), str) and attrs.get("hash") else None
        if fp is None and h is None:
            return False
        bands = [_stored_fingerprint(attrs, band_attr(i, self.v0_bands)) for i in range(len(self.v0_bands))]
        self.add(h, fp, entry, _stored_fingerprint(attrs, "equiv_fp_limit"), bands, attrs.get("v0_range"))
        return True

    @classmethod
    def from_trials(cls, trials: Iterable[StoredTrial], atol: float = 1e-4) -> "EquivalenceCache":
        """Rebuild from stored trials in trial order (see `add_trial`)."""
        cache = cls(atol=atol)
        for t in sorted(trials, key=lambda t: t.number):
            cache.add_trial(t)
        return cache


def _grown(matrix: np.ndarray) -> np.ndarray:
    grown = np.empty((2 * len(matrix), matrix.shape[1]))
    grown[:len(matrix)] = matrix
    return grown


def _stored_fingerprint(attrs: Mapping[str, Any], key: str) -> np.ndarray | None:
    return fingerprint_from_json(attrs[key]) if isinstance(attrs.get(key), str) else None


def _from_graph_alone(verdict: str) -> bool:
    """Whether ``rejected:<filter>`` came from a filter whose rejections follow from the graph
    alone (`Filter.from_graph_alone`); a filter not registered here is cached (conservative)."""
    name = verdict.split(":", 1)[1]
    return name in registry.rejection_filters and bool(getattr(registry.rejection_filters.get(name), "from_graph_alone", False))
