"""`equivalence`: the same layer is not trained twice (AutoML-Zero's functional-equivalence cache).

Two candidates are the same layer when training cannot tell them apart: the same function of x
for every value their trainable vectors can reach from their initial values. Such a candidate
takes the earlier trial's objectives with verdict ``duplicate:<trial>`` and is not trained.
Layers that can differ after training are never merged (``x + v1 * x`` is not ``x``: v1 starts
at 0, but its gradient does not).

Three tests, cheapest first, against `FilterContext.equivalence` (an `EquivalenceCache`):
1. the canonical graph hash (`graph.canonical_hash`: dead nodes dropped, commutative inputs
   sorted): exact, no tensors;
2. a fingerprint of the outputs on fixed probes, with the parameters where training can take
   them (`_reach`): a vector whose gradient is identically zero stays at its initial value (so
   ``rms_i(std_l(v0))`` is the constant ``rms_i(rms_i(0))`` it is during training), live ones
   move along their own gradients. Outputs are taken at the initial values, at the reached
   values in training mode, and in eval mode with another batch's running statistics
   (momentum 1: the state after a long run, not the first steps' transient), and once more in
   training mode with every live v0 entry taken across 0 (the reached values negated, `_crossed`:
   whether the random move crosses 0 would otherwise be chance per seed); several shapes (odd
   channels; 64 channels, so that group statistics differ from instance ones). Each
   output y gives [log rms(y), mean(y/rms), 6 random projections of y/rms / sqrt(n)]: relative
   to the output's scale, so one absolute tolerance (1e-4) matches functions equal up to float
   noise. Computed in float64. With ``absorb_affine`` (off by default) the outputs are the graph's,
   before the final per-channel affine (weight 1, bias 0 at every parameter state), in units
   fixed at init (per channel: minus the mean, over the std of the initial output on the first
   probe), and a second probe batch is seen in every state: ``g / sigmoid(0)``, ``g + 0.5`` and
   ``2 g + 1`` are ``g`` with another start of the final affine, which absorbs them (an
   evolution from scratch spent a third of its trainings on such copies); a scale or shift that
   depends on the batch, on a live vector or is negative is never absorbed. Off by default: a
   large constant changes training (``x / 0`` is ``x / sqrt(eps)``, 316 x, and trains
   differently from ``x``; the property test found it), so it is one layer only by function;
3. the same fingerprint with the safety eps taken to ``limit_eps`` (1e-12): functions that
   differ only by eps-sized terms (``max(x, sqrt(0))`` and ``max(x, 0)``: sqrt(0) is
   sqrt(eps) = 0.003) match there; they are merged when their fingerprints at the run's eps are
   also within ``limit_atol`` (0.02), so a function that eps changes visibly is never merged.
   Training cannot separate such pairs: on the proxies they score exactly alike.

4. the band rule: layers equal only while v0 keeps away from 0 (``max(0, v0)``, ``|v0|`` and
   ``v0``; ``sqrt(x * |v0|)`` repeated ``sqrt(v0 * x)``'s scores exactly in round 6) differ
   where the reach takes v0 (any bound on it is unsound: training did take v0 from 1 across 0,
   ``benchmarks/equivalence_replay.py``). So the training decides instead: each evaluation keeps
   the [min, max] of every v0 entry over every step (``v0_range``), and a third fingerprint
   (``equiv_fp_band``, only for a layer whose v0 training moves) probes where training can take
   the parameters while v0 stays in ``v0_band`` (the reach with v0 folded back into the band
   after each move, so two layers equal there see the same gradients), with every live v0 entry
   then drawn log-uniformly inside the band
   (default [0.005, 10]) and once with all of them at the band's floor, where eps-sized terms are
   visible (``rms_b(v0)`` is 18% above v0 at 0.005). A second, narrow band ([0.1, 10],
   ``equiv_fp_band@0.1``) catches terms that are eps-sized only while v0 is not tiny
   (``max(sqrt(eps) / mean(v0), v0)`` is v0 above about 0.06; round 9 trained two such layers
   twice) and still sees ``rms_b(v0)`` (5e-4 above v0 at 0.1, five times the tolerance). A
   candidate whose fingerprint on a band matches an evaluated trial whose training kept v0
   inside that band is that trial's duplicate: the two
   losses agree on an open set that holds the earlier trial's whole trajectory, so their
   gradients do too, and from the same start the later one would take the same steps. A trial
   whose v0 left the band (or whose range is unknown) is never matched this way.

The fingerprints are stored as trial attributes (``equiv_fp``, ``equiv_fp_limit``,
``equiv_fp_band``, ``equiv_hash``) so that a resumed or parallel run rebuilds the cache from the study
(`EquivalenceCache.from_trials`). Fingerprints of an older rule have another length and are
never compared with these (the cache groups rows by length); such trials still match by hash.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from opsearch.compile import is_v0
from opsearch.plugins.rejection import _probes, _reach
from opsearch.registry import register_filter
from opsearch.rejection import CacheEntry, Candidate, Filter, FilterContext, Verdict, fingerprint_hash

DEFAULT_SHAPES = ((6, 8, 4, 4), (3, 7, 5, 3), (2, 64, 3, 3))
NUM_PROJECTIONS = 6
BLOCK_SIZE = 2 + NUM_PROJECTIONS  # values per output: log rms, mean, the projections (_block)
OUTPUTS = ("init", "reached", "eval", "crossed")  # a plain fingerprint's outputs per probe shape, in order (_outputs)
LIMIT_EPS = 1e-12
LIMIT_ATOL = 0.02


@register_filter("equivalence")
class EquivalenceFilter(Filter):
    """Duplicates of earlier trials reuse their objectives instead of training."""

    cost = 0.02
    default = True
    from_graph_alone = True

    def __init__(self, shapes: Sequence[Sequence[int]] = DEFAULT_SHAPES, use_hash: bool = True,
                 limit_eps: float | None = LIMIT_EPS, limit_atol: float = LIMIT_ATOL,
                 absorb_affine: bool = False, band: bool = True):
        super().__init__()
        self.band = bool(band)
        self.absorb_affine = bool(absorb_affine)
        self.shapes = [tuple(int(v) for v in s) for s in shapes]
        self.use_hash = bool(use_hash)
        if limit_eps is not None and not 0.0 < float(limit_eps) < 1e-5:
            raise ValueError(f"limit_eps must be in (0, 1e-5) or none, got {limit_eps!r}")
        self.limit_eps = None if limit_eps is None else float(limit_eps)
        self.limit_atol = float(limit_atol)

    def check(self, candidate: Candidate, context: FilterContext) -> Verdict:
        cache = context.equivalence
        h = candidate.canonical_hash
        if self.use_hash:
            entry = cache.lookup_hash(h)
            if entry is not None:
                return _same_as(self, entry, "graph")
        self.describe_known(candidate, context)
        entry, how = cache.match(candidate.equiv_fp, candidate.equiv_fp_limit, self.limit_atol,
                                 candidate.equiv_fp_bands)
        if entry is not None:
            what = "outputs up to the final affine" if self.absorb_affine else "outputs"
            if how.startswith("band:"):
                lo, hi = cache.v0_bands[int(how.split(":")[1])]
                how = f"{what} with v0 in [{lo:g}, {hi:g}], where trial {entry.trial}'s training kept it"
            else:
                how = {"exact": what, "limit": f"{what} as eps -> 0"}[how]
            return _same_as(self, entry, how)
        return self.accept()

    def closeness(self, verdict: Verdict) -> None:
        """A repeat of a rejected function: nothing new about the candidate."""
        return None

    def describe_known(self, candidate: Candidate, context: FilterContext) -> None:
        """A layer's hash and fingerprints, computed with this filter's probes."""
        candidate.canonical_hash  # computed and kept on the candidate
        bands = context.equivalence.v0_bands if self.band else ()
        candidate.equiv_fp, candidate.equiv_fp_bands = fingerprints(candidate, self.shapes, context.seed,
                                                                    absorb_affine=self.absorb_affine,
                                                                    v0_bands=bands)
        candidate.equiv_hash = fingerprint_hash(candidate.equiv_fp)
        candidate.equiv_fp_limit = (None if self.limit_eps is None else
                                    fingerprint(candidate, self.shapes, context.seed, eps=self.limit_eps,
                                                absorb_affine=self.absorb_affine))


def _same_as(flt: Filter, entry: CacheEntry, how: str) -> Verdict:
    if entry.objectives is not None:
        return Verdict(False, flt.name, f"same function as trial {entry.trial} ({how})",
                       {"same_as": entry.trial}, duplicate_of=entry.trial, objectives=entry.objectives)
    return flt.reject(f"same function as trial {entry.trial} ({how}), which was {entry.verdict}",
                      same_as=entry.trial)


def fingerprint(candidate: Candidate, shapes: Sequence[tuple[int, int, int, int]], seed: int,
                eps: float | None = None, absorb_affine: bool = False) -> np.ndarray:
    """The output fingerprint described in the module docstring (float64 vector); ``eps``
    overrides the run's safety eps (the limit fingerprint)."""
    return fingerprints(candidate, shapes, seed, eps, absorb_affine)[0]


def fingerprints(candidate: Candidate, shapes: Sequence[tuple[int, int, int, int]], seed: int,
                 eps: float | None = None, absorb_affine: bool = False,
                 v0_bands: Sequence[tuple[float, float]] = ()) -> tuple[np.ndarray, list[np.ndarray]]:
    """The plain fingerprint and, when training moves v0, one band fingerprint per band of
    ``v0_bands`` (rule 4: reached inside the band, the live v0 entries then drawn inside it and
    all at its floor); no band fingerprints otherwise."""
    # momentum 1: eval mode reads the last batch's statistics, the state after a long run, not
    # the first steps' transient (rms_b(0) and rms_i(0) are one constant once trained)
    overrides = {"momentum": 1.0} if eps is None else {"momentum": 1.0, "eps": eps}
    outputs_of = _affine_free_outputs if absorb_affine else _outputs
    blocks, probed = [], []
    for index, shape in enumerate(shapes):
        n, c, h, w = shape
        gen = _probes.generator(seed, 31, index)
        probes = [_probes.probe_input(shape, gen, torch.float64) for _ in range(2)]
        projections = torch.randn((NUM_PROJECTIONS, n * c * h * w), generator=gen, dtype=torch.float64)
        gradient_probes = [_probes.probe_input(shape, _probes.generator(seed, 47, index, k), torch.float64)
                           for k in range(_reach.GRADIENT_PROBES)]
        reached = _reach.reach(candidate.build(c, **overrides).double(), gradient_probes, seed, index)
        layer = candidate.build(c, **overrides).double()
        blocks += [_block(y, projections) for y in outputs_of(layer, probes, reached, _crossed(reached))]
        probed.append((index, c, probes, projections, gradient_probes, reached))
    # the band fingerprint over every shape, or none (v0 can be live at some shapes only: a
    # fingerprint of some shapes would have another length and never match)
    if not v0_bands or not any(_moves_v0(item[-1]) for item in probed):
        return np.concatenate(blocks), []
    per_band = []
    for v0_band in v0_bands:
        band_blocks = []
        for index, c, probes, projections, gradient_probes, _ in probed:
            in_band = _reach.reach(candidate.build(c, **overrides).double(), gradient_probes, seed, index, v0_band)
            for state in _band_states(in_band, v0_band, _probes.generator(seed, 53, index)):
                layer = candidate.build(c, **overrides).double()
                band_blocks += [_block(y, projections) for y in outputs_of(layer, probes, state)[1:]]
        per_band.append(np.concatenate(band_blocks))
    return np.concatenate(blocks), per_band


def output_part(fp: np.ndarray, num_shapes: int, output: str) -> np.ndarray:
    """One output's values in a plain fingerprint of `num_shapes` probe shapes, a row per shape:
    "init" is the layer with every trainable vector at its initial value, "reached" where
    training can take them, "eval" in eval mode. Lets a reader ask "one function at the start?"
    without knowing the layout."""
    if fp.size != num_shapes * len(OUTPUTS) * BLOCK_SIZE:
        raise ValueError(f"a fingerprint of {fp.size} values is not a plain one of {num_shapes} shapes")
    return fp.reshape(num_shapes, len(OUTPUTS), BLOCK_SIZE)[:, OUTPUTS.index(output), :]


def _crossed(reached: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reached values with every live v0 entry (one that moved from its start, 1) negated.

    Training can take v0 from 1 across 0 (round 6: ``max(v0, 0) * sqrt(x)`` and ``v0 * sqrt(x)``
    trained apart), but whether the reach's random move takes an entry there is chance: at one
    seed ``x / v0`` and ``x / rms_b(v0)`` never saw a negative v0 and were merged as eps-sized
    apart, at others they were told apart. Probing every layer once with its live v0 entries
    across 0 makes the verdict every seed's; layers equal only while v0 > 0 are then merged by the
    band rule alone, which asks the earlier training where its v0 went. Frozen entries stay 1,
    and a vector that moves channel-constant stays so."""
    return {name: torch.where(value != 1.0, -value, value) if is_v0(name) else value
            for name, value in reached.items()}


def _moves_v0(reached: dict[str, torch.Tensor]) -> bool:
    """Whether training moves v0 at all: without a live v0 the band rule has nothing to add (a
    layer equal to another on the band but not near v0's start cannot exist: the start is inside
    the band), so its fingerprint is not computed."""
    return any(bool((value != 1.0).any()) for name, value in reached.items() if is_v0(name))


def _band_states(reached: dict[str, torch.Tensor], band: tuple[float, float],
                 gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """The parameters reached inside the band with every live v0 entry (one that moved from its
    start, 1) drawn log-uniformly in ``band``, and with all of them at the band's floor. Frozen
    entries stay 1: training never moves them."""
    lo, hi = float(band[0]), float(band[1])
    drawn, floor = dict(reached), dict(reached)
    for name, value in reached.items():
        if not is_v0(name):
            continue
        live = value != 1.0
        u = torch.rand(value.shape, generator=gen, dtype=value.dtype)
        inside = torch.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))
        drawn[name] = torch.where(live, inside, value)
        floor[name] = torch.where(live, torch.full_like(value, lo), value)
    return [drawn, floor]


@torch.no_grad()
def _outputs(layer: torch.nn.Module, probes: list[torch.Tensor], reached: dict[str, torch.Tensor],
             crossed: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The layer's outputs as they are: at init, at the reached values, in eval mode, and (with
    ``crossed``) at those values in training mode."""
    layer.train()
    y_init = layer(probes[0])
    _load(layer, reached)
    y_train = layer(probes[0])
    layer(probes[1])
    layer.eval()
    out = [y_init, y_train, layer(probes[0])]
    if crossed is not None:
        layer.train()
        _load(layer, crossed)
        out.append(layer(probes[0]))
    return out


@torch.no_grad()
def _affine_free_outputs(layer: torch.nn.Module, probes: list[torch.Tensor], reached: dict[str, torch.Tensor],
                         crossed: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The graph's outputs before the final affine, in units fixed at init: per channel, minus
    the mean and over the std of the initial output on the first probe. Two graphs whose outputs
    differ by a positive per-channel scale and a shift that training cannot change (``2 * g``,
    ``g + 1``, ``g / sigmoid(0)``) give the same values; a factor that depends on the batch
    (``x / std_b(x)`` against ``x``) or on a live vector (``x + v1 * x``) does not, because the
    same constants must hold on a second batch and at the reached parameter values."""
    layer.train()
    _load(layer, {name: _identity_affine(name, p) for name, p in layer.named_parameters()
                  if name in FINAL_AFFINE})
    y_init = [layer(probe) for probe in probes]
    _load(layer, {**reached, **{name: _identity_affine(name, reached[name]) for name in reached
                                if name in FINAL_AFFINE}})
    y_train = [layer(probe) for probe in probes]  # eval mode then reads probes[1]'s statistics
    layer.eval()
    y_eval = layer(probes[0])
    y_crossed = []
    if crossed is not None:
        layer.train()
        _load(layer, {**crossed, **{name: _identity_affine(name, crossed[name]) for name in crossed
                                    if name in FINAL_AFFINE}})
        y_crossed = [layer(probe) for probe in probes]
    reference = y_init[0]
    shift = reference.mean(dim=(0, 2, 3), keepdim=True)
    spread = reference.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    floor = 1e-9 * float(reference.abs().max().nan_to_num(0.0, 0.0, 0.0)) + 1e-30
    spread = torch.nan_to_num(spread, nan=floor).clamp_min(floor)
    shift = torch.nan_to_num(shift, nan=0.0)
    return [(y - shift) / spread for y in (*y_init, *y_train, y_eval, *y_crossed)]


# the compiled layer's final per-channel affine (also inside a surround: ``layer.weight``)
FINAL_AFFINE = frozenset({"weight", "bias", "layer.weight", "layer.bias"})


def _identity_affine(name: str, value: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(value) if name.endswith("weight") else torch.zeros_like(value)


def _load(layer: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    for name, p in layer.named_parameters():
        if name in values:
            p.copy_(values[name])


def _block(y: torch.Tensor, projections: torch.Tensor) -> np.ndarray:
    flat = y.detach().reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(flat).all()):  # no numerics filter before us: keep it comparable
        flat = torch.nan_to_num(flat, nan=0.0, posinf=1e300, neginf=-1e300)
    rms = float(torch.sqrt(torch.mean(flat * flat))) + 1e-300
    z = flat / rms
    values = [np.log(rms), float(z.mean())]
    values += (projections @ z / np.sqrt(flat.numel())).tolist()
    return np.asarray(values, dtype=np.float64)
