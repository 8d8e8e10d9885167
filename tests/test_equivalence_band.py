"""The band rule: layers equal only while v0 stays away from 0 are one layer when the earlier
one's training kept v0 there (plugins/rejection/equivalence.py, rule 4).

``sqrt(x * max(0, v0))`` and ``sqrt(x * v0)`` are one function while v0 > 0, and training on the
proxies can take v0 across 0 (round 6 replay: ``max(v0, 0) * sqrt(x)`` and ``v0 * sqrt(x)``
trained apart on EfficientNet). So no bound on where training takes v0 is assumed: the earlier
layer's training records the range its v0 entries took (``v0_range``), and the later layer is
merged only when that range lies in the band on which the two are equal.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from opsearch import graph, layers
from opsearch.graph import GraphBuilder
from opsearch.plugins.rejection import _probes
from opsearch.plugins.rejection.equivalence import EquivalenceFilter
from opsearch.rejection import V0_BAND, EquivalenceCache, FilterContext
from opsearch.rejection import Candidate
from opsearch.space import SearchSpace
from opsearch.search_spaces.evonorm import evonorm

SPACE = SearchSpace(evonorm(num_nodes=4), name="evonorm4")
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
X, ZERO, V0, V1 = 0, 1, 2, 3
IN_BAND = [0.3, 2.7]  # a training that kept v0 well inside the band


def g(fn) -> tuple:
    b = GraphBuilder()
    fn(b)
    return b.plain()


def verdict(first, second, v0_range):
    """The equivalence filter's verdict on `second` after `first` was trained (trial 0) and
    its training took v0 over `v0_range`."""
    flt = EquivalenceFilter(use_hash=False)
    context = FilterContext(seed=0)
    a = Candidate(first)
    assert flt.check(a, context).passed
    context.equivalence.record(a, 0, "evaluated", (0.9,), v0_range=v0_range)
    return flt.check(Candidate(second), context)


SQRT_V0 = g(lambda b: b.sqrt(b.mul(b.x, b.v0)))
EQUAL_WHILE_V0_POSITIVE = {
    "max(0, v0)": g(lambda b: b.sqrt(b.mul(b.x, b.max(b.zero, b.v0)))),
    "|v0|": g(lambda b: b.sqrt(b.mul(b.x, b.abs(b.v0)))),
    "max(v1, v0)": g(lambda b: b.sqrt(b.mul(b.x, b.max(b.v1, b.v0)))),   # v1 frozen at 0 there
    "max(sqrt(0), v0)": g(lambda b: b.sqrt(b.mul(b.x, b.max(b.sqrt(b.zero), b.v0)))),  # 0.003 < floor
}


@pytest.mark.parametrize("name", EQUAL_WHILE_V0_POSITIVE)
def test_a_layer_equal_on_the_band_is_merged_when_the_earlier_training_kept_v0_there(name):
    v = verdict(SQRT_V0, EQUAL_WHILE_V0_POSITIVE[name], IN_BAND)
    assert v.duplicate_of == 0, v.reason
    assert "where trial 0's training kept it" in v.reason


@pytest.mark.parametrize("v0_range", [
    [-0.1, 1.2],                      # v0 crossed 0: max(0, v0) and v0 trained apart
    [V0_BAND[0] / 2, 1.5],            # below the band's floor
    [0.5, V0_BAND[1] * 2],            # above its ceiling
    None,                             # unknown (a study recorded before the rule, a lost stage)
    [math.nan, math.nan],             # a non-finite v0
])
@pytest.mark.parametrize("name", ["max(0, v0)", "|v0|"])
def test_no_merge_unless_the_earlier_training_kept_v0_in_the_band(name, v0_range):
    v = verdict(SQRT_V0, EQUAL_WHILE_V0_POSITIVE[name], v0_range)
    assert v.passed, v.reason


@pytest.mark.parametrize("second", [
    g(lambda b: b.sqrt(b.mul(b.x, b.rms_b(b.v0)))),                      # sqrt(v0^2 + eps): eps-sized
    g(lambda b: b.sqrt(b.mul(b.x, b.max(b.sigmoid(b.zero), b.v0)))),     # differs for v0 < 0.5
    g(lambda b: b.sqrt(b.mul(b.x, b.square(b.v0)))),                     # differs off v0 = 1
    g(lambda b: b.sqrt(b.mul(b.x, b.add(b.v0, b.v1)))),                  # v1 is live
    g(lambda b: b.sqrt(b.x)),                                            # no v0
])
def test_layers_that_differ_inside_the_band_are_not_merged(second):
    v = verdict(SQRT_V0, second, IN_BAND)
    assert v.passed, v.reason


# max(sqrt(eps) / mean(v0), v0): v0 while every entry is above about 0.06 (round 9 trained two
# such layers again, their v0 kept in [0.58, 1.59] and [0.77, 1.65]), not near the wide band's floor
EPS_OVER_MEAN = g(lambda b: b.sqrt(b.mul(b.x, b.max(b.div(b.std_g(b.mean_l(b.v0)), b.mean_l(b.v0)), b.v0))))


def test_a_layer_equal_on_the_narrow_band_is_merged_when_the_training_kept_v0_there():
    v = verdict(SQRT_V0, EPS_OVER_MEAN, [0.58, 1.59])
    assert v.duplicate_of == 0, v.reason
    assert "v0 in [0.1, 10]" in v.reason


@pytest.mark.parametrize("v0_range", [[0.02, 1.5], [-0.1, 1.2], None])
def test_no_narrow_band_merge_when_the_training_took_v0_below_its_floor(v0_range):
    """[0.02, 1.5] lies in the wide band, where the two differ (sqrt(eps) / 0.02 > 0.02)."""
    v = verdict(SQRT_V0, EPS_OVER_MEAN, v0_range)
    assert v.passed, v.reason


def test_the_narrow_band_sees_eps_sized_terms():
    """At the narrow band's floor rms(v0) is 5e-4 above v0: still five times the tolerance."""
    rms = g(lambda b: b.sqrt(b.mul(b.x, b.rms_b(b.v0))))
    assert verdict(SQRT_V0, rms, [0.58, 1.59]).passed


def test_the_cache_rebuilt_from_stored_trials_keeps_the_band_rule():
    """A resumed or parallel worker reads `equiv_fp_band` and `v0_range` from the study."""
    from opsearch.rejection import PipelineOutcome

    flt = EquivalenceFilter(use_hash=False)
    context = FilterContext(seed=0)
    a = Candidate(SQRT_V0)
    assert flt.check(a, context).passed
    attrs = {**PipelineOutcome([]).user_attrs(a), "verdict": "evaluated"}
    assert "equiv_fp_band" in attrs

    class Stored:
        number, values = 7, (0.9,)
        user_attrs = {**attrs, "v0_range": IN_BAND}

    class Unknown(Stored):
        user_attrs = attrs  # no v0_range

    for trial, merged in ((Stored, True), (Unknown, False)):
        context = FilterContext(seed=0, equivalence=EquivalenceCache.from_trials([trial]))
        v = flt.check(Candidate(EQUAL_WHILE_V0_POSITIVE["|v0|"]), context)
        assert (v.duplicate_of == 7) is merged, v.reason
    # the narrow band's fingerprint is stored too, under its own attribute
    assert "equiv_fp_band@0.1" in attrs
    context = FilterContext(seed=0, equivalence=EquivalenceCache.from_trials([Stored]))
    assert flt.check(Candidate(EPS_OVER_MEAN), context).duplicate_of == 7


# -------------------------------------------------------------------------------------------
# where the range comes from: every optimizer step of the evaluation


def test_the_range_covers_every_step_not_only_the_last():
    from opsearch.trainers.lit import ProxyModule

    layer = layers.build(SQRT_V0, 4)
    module = ProxyModule(torch.nn.Sequential(layer), [layer], total_steps=3, lr=0.1, num_val=1)
    assert module.tracked_v0_range() == [1.0, 1.0]
    for values in ([0.8, 1.0, 1.1, 1.2], [0.2, 1.0, 1.0, 3.0], [0.9, 1.0, 1.0, 1.0]):
        with torch.no_grad():
            layer.v0.copy_(torch.tensor(values))
        module.step += 1
        module._track_v0()
    assert module.tracked_v0_range() == pytest.approx([0.2, 3.0])
    state = module.get_extra_state()
    again = ProxyModule(torch.nn.Sequential(layers.build(SQRT_V0, 4)), [], total_steps=3, lr=0.1, num_val=1)
    again.set_extra_state(state)  # a stage fitted in another process
    assert again.tracked_v0_range() == pytest.approx([0.2, 3.0])
    module.step += 1  # a step the range did not see (a lost stage): unknown, never "kept"
    assert module.tracked_v0_range() is None
    module.step -= 1
    with torch.no_grad():
        layer.v0[0] = math.nan
    module.step += 1
    module._track_v0()  # seen, but not finite: unknown
    assert module.v0_range_steps == module.step and module.tracked_v0_range() is None


@pytest.mark.slow
def test_an_evaluation_stores_the_range_its_v0_took():
    from opsearch.trainers.evaluator import EvalConfig, Evaluator

    config = EvalConfig(dataset="synthetic", archs=("resnet",), steps=20, warmup_steps=3, batch_size=32,
                        lr=0.5, accelerator="cpu", arch_options={"width": 8, "depth": 1})
    evaluator = Evaluator(config)
    lo, hi = evaluator.evaluate(SQRT_V0).trial_attrs()["v0_range"]
    assert lo <= 1.0 <= hi and lo < hi  # v0 is live: training moved it
    assert evaluator.evaluate(g(lambda b: b.sqrt(b.x))).trial_attrs()["v0_range"] == [1.0, 1.0]


# -------------------------------------------------------------------------------------------
# properties: a merge on the band is a layer that trains the same; pairs that train apart are
# never merged, whatever range the first one's training took


def trained(plain, steps: int = 5, lr: float = 0.05) -> tuple[torch.Tensor, list[float]]:
    """The layer's output on a probe after a few SGD steps towards a fixed target (float64), and
    the [min, max] its v0 took over those steps."""
    torch.manual_seed(0)
    layer = layers.build(plain, 8).double()
    x = _probes.probe_input((8, 8, 3, 3), _probes.generator(5, 1), torch.float64)
    target = torch.randn(x.shape, generator=_probes.generator(5, 2), dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    lo = hi = 1.0
    for _ in range(steps):
        opt.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        opt.step()
        lo, hi = min(lo, float(layer.v0.detach().min())), max(hi, float(layer.v0.detach().max()))
    with torch.no_grad():
        return layer(_probes.probe_input((8, 8, 3, 3), _probes.generator(5, 3), torch.float64)), [lo, hi]


def finite(plain) -> bool:
    try:
        y, _ = trained(plain, steps=0)
    except Exception:
        return False
    return bool(torch.isfinite(y).all()) and float(y.abs().max()) < 1e6


def with_v0_through(plain: tuple, op: str) -> tuple:
    """`plain` with every read of v0 going through `op(0, v0)`/`op(v0, v0)` first (a new node 0)."""
    shift = lambda i: V0_NEW if i == V0 else (i + 1 if i >= graph.NUM_INITIAL else i)  # noqa: E731
    first = ("max", (ZERO, V0)) if op == "max" else (op, (V0, V0))
    return (first,) + tuple((name, tuple(shift(i) for i in inputs)) for name, inputs in plain)


V0_NEW = graph.NUM_INITIAL


@SETTINGS
@given(seed=st.integers(0, 10**6), op=st.sampled_from(["max", "abs"]))
def test_property_v0_through_a_positive_clip_is_merged_and_trains_the_same(seed, op):
    """A random layer that reads v0, and the same with v0 read through max(0, v0) or |v0|: one
    layer on the band. After a short training that kept v0 in the band, merged, and their
    trained outputs are the same."""
    rng = random.Random(seed)
    while not (graph.is_valid(plain := SPACE.decode(SPACE.random_genome(rng)))
               and V0 in graph.used_values(plain := graph.prune(plain))):
        pass
    second = with_v0_through(plain, op)
    assume(finite(plain) and finite(second))
    ya, v0_range = trained(plain)
    yb, _ = trained(second)
    assume(bool(torch.isfinite(ya).all()) and EquivalenceCache().kept_in_band(v0_range))
    v = verdict(plain, second, v0_range)
    assert torch.allclose(ya, yb, rtol=1e-6, atol=1e-9), graph.formula(second)  # (the premise)
    assert v.duplicate_of == 0, (graph.formula(plain), graph.formula(second), v.reason)


@SETTINGS
@given(a=st.integers(0, 10**6), b=st.integers(0, 10**6), mutate=st.booleans())
def test_property_layers_that_train_apart_are_not_merged_on_the_band(a, b, mutate):
    """Two graphs whose outputs differ by more than 5% of their scale after 5 SGD steps are never
    one layer, with the first one's own v0 range recorded (the band rule active)."""
    from opsearch.plugins.algorithms.mutation import GraphMutator

    genome = SPACE.random_genome(random.Random(a))
    other = (GraphMutator(SPACE, avoid_duplicates=False).mutate(genome, random.Random(b)) if mutate
             else SPACE.random_genome(random.Random(b)))
    first, second = graph.prune(SPACE.decode(genome)), graph.prune(SPACE.decode(other))
    assume(finite(first) and finite(second))
    (ya, v0_range), (yb, _) = trained(first), trained(second)
    assume(bool(torch.isfinite(ya).all() and torch.isfinite(yb).all()))
    scale = float(torch.sqrt((ya ** 2).mean() + (yb ** 2).mean())) + 1e-12
    assume(float((ya - yb).abs().max()) / scale > 0.05)
    v = verdict(first, second, v0_range)
    assert v.passed, (graph.formula(first), graph.formula(second), v.reason)


def test_the_band_fingerprint_covers_every_probe_shape_or_none():
    """v0 can be live at one probe shape and frozen at another (``max(v0, std_b(x))``: where the
    batch spread exceeds 1 in every channel, v0 gets no gradient; round 6, trial 2254): its band
    fingerprint still has every shape's blocks, so it is comparable with any other."""
    from opsearch.plugins.rejection.equivalence import DEFAULT_SHAPES, fingerprints

    partly_live = g(lambda b: b.add(b.std_g(b.max(b.v0, b.std_b(b.x))),
                                    b.div(b.x, b.mul(b.rms_b(b.x), b.sqrt(b.rms_l(b.x))))))
    widths = set()
    for plain in (SQRT_V0, partly_live):
        _, bands = fingerprints(Candidate(plain, layer_options={"eps": 1e-5}), DEFAULT_SHAPES, 0, v0_bands=(V0_BAND,))
        widths.add(bands[0].shape if bands else None)
    assert widths == {fingerprints(Candidate(SQRT_V0), DEFAULT_SHAPES, 0, v0_bands=(V0_BAND,))[1][0].shape}
    assert fingerprints(Candidate(g(lambda b: b.sqrt(b.x))), DEFAULT_SHAPES, 0, v0_bands=(V0_BAND,))[1] == []
