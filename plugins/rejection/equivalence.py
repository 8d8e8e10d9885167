"""`equivalence`: functional-equivalence dedup (AutoML-Zero's cache).

Many graphs compute the same function (dead nodes, swapped operands, ``max(x, x)``, ...).
Training one again only repeats a result, so a candidate equal to an earlier trial takes that
trial's objectives with verdict ``duplicate:<trial>`` and is not trained.

Two tests, cheapest first, against `FilterContext.equivalence` (an `EquivalenceCache`):
1. the canonical graph hash (`graph.canonical_hash`: dead nodes dropped, commutative inputs
   sorted) — exact, no tensors;
2. a fingerprint of the outputs on fixed probes: several shapes (odd channels; 64 channels so
   that group statistics differ from instance statistics), with the parameters set to fixed
   random values (``x * v0`` and ``x`` are equal only while v0 = 1), in training mode, then in
   eval mode after two training passes have moved the running statistics. Each output y gives
   a block [log rms(y), mean(y/rms), 6 random projections of y/rms / sqrt(n)]: every value is
   relative to the output's scale, so one absolute tolerance (1e-4, `EquivalenceCache.atol`)
   matches functions equal up to float noise (~1e-7 relative) and separates functions whose
   outputs differ by more than ~1e-4 of their scale. Computed in float64, so the noise of the
   fingerprint itself does not matter.

The fingerprint and its short hash are stored as trial attributes (``equiv_fp``, ``equiv_hash``)
so that a resumed or parallel run rebuilds the cache from the study
(`EquivalenceCache.from_trials`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from opsearch.plugins.rejection import _probes
from opsearch.registry import register_filter
from opsearch.rejection import Candidate, CacheEntry, Filter, FilterContext, Verdict, fingerprint_hash

DEFAULT_SHAPES = ((6, 8, 4, 4), (3, 7, 5, 3), (2, 64, 3, 3))
NUM_PROJECTIONS = 6


@register_filter("equivalence")
class EquivalenceFilter(Filter):
    """Duplicates of earlier trials reuse their objectives instead of training."""

    cost = 0.02

    def __init__(self, shapes: Sequence[Sequence[int]] = DEFAULT_SHAPES, use_hash: bool = True):
        super().__init__()
        self.shapes = [tuple(int(v) for v in s) for s in shapes]
        self.use_hash = bool(use_hash)

    def check(self, candidate: Candidate, context: FilterContext) -> Verdict:
        cache = context.equivalence
        h = candidate.canonical_hash
        if self.use_hash:
            entry = cache.lookup_hash(h)
            if entry is not None:
                return _same_as(self, entry, "graph")
        fp = fingerprint(candidate, self.shapes, context.seed)
        candidate.equiv_fp = fp
        candidate.equiv_hash = fingerprint_hash(fp)
        entry = cache.match(fp)
        if entry is not None:
            return _same_as(self, entry, "outputs")
        return self.accept()


    def describe_known(self, candidate: Candidate, context: FilterContext) -> None:
        """A known layer's hash and fingerprint, computed with this filter's probes."""
        candidate.canonical_hash  # computed and kept on the candidate
        candidate.equiv_fp = fingerprint(candidate, self.shapes, context.seed)
        candidate.equiv_hash = fingerprint_hash(candidate.equiv_fp)


def _same_as(flt: Filter, entry: CacheEntry, how: str) -> Verdict:
    if entry.objectives is not None:
        return Verdict(False, flt.name, f"same function as trial {entry.trial} ({how})",
                       {"same_as": entry.trial}, duplicate_of=entry.trial, objectives=entry.objectives)
    return flt.reject(f"same function as trial {entry.trial} ({how}), which was {entry.verdict}",
                      same_as=entry.trial)


def fingerprint(candidate: Candidate, shapes: Sequence[tuple[int, int, int, int]], seed: int) -> np.ndarray:
    """The output fingerprint described in the module docstring (float64 vector)."""
    blocks = []
    for index, shape in enumerate(shapes):
        n, c, h, w = shape
        gen = _probes.generator(seed, 31, index)
        layer = candidate.build(c)
        _probes.randomize_parameters(layer, gen)
        probes = [_probes.probe_input(shape, gen) for _ in range(2)]
        projections = torch.randn((NUM_PROJECTIONS, n * c * h * w), generator=gen, dtype=torch.float64)
        layer.train()
        with torch.no_grad():
            y_train = layer(probes[0])
            layer(probes[1])
            layer.eval()
            y_eval = layer(probes[0])
        for y in (y_train, y_eval):
            blocks.append(_block(y, projections))
    return np.concatenate(blocks)


def _block(y: torch.Tensor, projections: torch.Tensor) -> np.ndarray:
    flat = y.detach().reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(flat).all()):  # no numerics filter before us: keep it comparable
        flat = torch.nan_to_num(flat, nan=0.0, posinf=1e300, neginf=-1e300)
    rms = float(torch.sqrt(torch.mean(flat * flat))) + 1e-300
    z = flat / rms
    values = [np.log(rms), float(z.mean())]
    values += (projections @ z / np.sqrt(flat.numel())).tolist()
    return np.asarray(values, dtype=np.float64)
