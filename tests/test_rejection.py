"""Rejection filters and the pipeline: each filter rejects a graph made to fail it and passes the
known good layers; functional-equivalence dedup finds re-spelled graphs and only those."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from opsearch import cli, layers
from opsearch.errors import InvalidCandidate, UserError
from opsearch.evaluation import Evaluator
from opsearch.rejection import (Candidate, EquivalenceCache, Filter, FilterContext, RejectionPipeline,
                                Verdict)

GOOD = ("evonorm_b0", "evonorm_s0", "bn_relu")
X, ZERO, V0, V1 = 0, 1, 2, 3


def plain(name):
    return layers.resolve(name)


def run_filter(name, graph, context=None, **options):
    pipeline = RejectionPipeline.from_spec([name], {name: options} if options else None)
    return pipeline.run(Candidate(graph), context or FilterContext())


# -------------------------------------------------------------------------------------------
# the pipeline


class Fixed(Filter):
    def __init__(self, name, cost, passed=True, sleep=0.0, raises=False):
        super().__init__()
        self.name, self.cost, self.passed, self.sleep, self.raises = name, cost, passed, sleep, raises
        self.calls = 0

    def check(self, candidate, context):
        self.calls += 1
        time.sleep(self.sleep)
        if self.raises:
            raise InvalidCandidate("cannot compile")
        return self.accept() if self.passed else self.reject("no good", value=1.5)


def test_pipeline_runs_cheapest_first_and_stops_at_the_first_rejection():
    slow_fail = Fixed("b", cost=1.0, passed=False, sleep=0.01)
    never = Fixed("c", cost=5.0)
    cheap = Fixed("a", cost=0.1)
    outcome = RejectionPipeline([never, slow_fail, cheap]).run(Candidate(plain("bn_relu")), FilterContext())
    assert [v.filter for v in outcome.verdicts] == ["a", "b"]
    assert never.calls == 0
    assert outcome.status == "rejected:b" and outcome.reason == "no good" and not outcome.passed
    assert outcome.filter_seconds["b"] >= 0.01
    attrs = outcome.user_attrs()
    assert attrs["reason"] == "no good" and attrs["metric/b/value"] == 1.5 and "filter_s/a" in attrs
    json.dumps(attrs)  # storable as Optuna user attrs


def test_invalid_candidate_inside_a_filter_is_a_rejection():
    outcome = RejectionPipeline([Fixed("x", 1, raises=True)]).run(Candidate(plain("bn_relu")), FilterContext())
    assert outcome.status == "rejected:x" and outcome.reason == "cannot compile"


def test_default_spec_names_and_unknown_filters():
    assert RejectionPipeline.from_spec(None).names == ["validity", "numerics", "equivalence", "stability",
                                                         "quality"]
    # the user's order does not matter: cheapest first
    assert RejectionPipeline.from_spec("quality,validity").names == ["validity", "quality"]
    assert RejectionPipeline.from_spec("none").names == []
    with pytest.raises(UserError, match="did you mean 'numerics'"):
        RejectionPipeline.from_spec("validity,numeric")
    with pytest.raises(UserError, match="unknown option"):
        RejectionPipeline.from_spec("stability", {"stability": {"treshold": 1}})
    with pytest.raises(UserError, match="unknown rejection filter"):
        RejectionPipeline.from_spec("validity", {"bogus": {"x": 1}})
    stab = RejectionPipeline.from_spec("stability", {"stability": {"threshold": 1e6}}).filters[0]
    assert stab.threshold == 1e6


def test_unknown_filter_on_the_command_line_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPSEARCH_RUNS_DIR", str(tmp_path))
    assert cli.main(["search", "--filters", "validity,bogus", "--budget", "1", "--name", "t"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bogus" in err and "Traceback" not in err


# -------------------------------------------------------------------------------------------
# validity and numerics


@pytest.mark.parametrize("name", GOOD)
def test_cheap_filters_pass_good_layers(name):
    outcome = RejectionPipeline.from_spec("validity,numerics,equivalence").run(
        Candidate(plain(name)), FilterContext())
    assert outcome.status == "passed", outcome.reason


def test_validity_rejects_output_without_x():
    outcome = run_filter("validity", (("mul", (ZERO, X)), ("sigmoid", (V0, V0)), ("add", (4, 5))))
    assert outcome.status == "rejected:validity" and "x" in outcome.reason


@pytest.mark.parametrize("graph, reason", [
    ((("exp", (X, X)), ("exp", (4, 4)), ("exp", (5, 5)), ("exp", (6, 6))), "non-finite"),
    ((("mean_b", (X, X)),), "does not depend on the input in eval mode"),
    ((("mean_l", (X, X)), ("neg", (4, 4)), ("add", (X, 5)), ("mean_l", (6, 6))), "does not depend"),
])
def test_numerics_rejects(graph, reason):
    outcome = run_filter("numerics", graph, reject_statistics=False)  # each check on its own
    assert outcome.status == "rejected:numerics" and reason in outcome.reason


def test_numerics_keeps_a_layer_that_is_only_zero_at_initialisation():
    assert run_filter("numerics", (("mul", (X, V1)),)).status == "passed"  # x * v1, v1 = 0 at init


# -------------------------------------------------------------------------------------------
# equivalence


def _with_dead_nodes(p):
    """Insert unused nodes before the last node; indices of later nodes shift."""
    dead = (("exp", (X, V0)), ("tanh", (V1, X)))
    out = []
    for op, ins in p:
        out.append((op, tuple(j + len(dead) if j >= 4 else j for j in ins)))
    return tuple(dead) + tuple(out)


def _swap_commutative(p):
    return tuple((op, tuple(reversed(ins)) if op in ("add", "mul", "max") else ins) for op, ins in p)


def _dedup_context(*names_and_graphs):
    context = FilterContext()
    for number, g in enumerate(names_and_graphs):
        c = Candidate(plain(g) if isinstance(g, str) else g)
        outcome = RejectionPipeline.from_spec("equivalence").run(c, context)
        assert outcome.passed, f"{g} equals an earlier graph"
        context.equivalence.record(c, number, "evaluated", (0.5 + number / 100, 0.4))
    return context


def test_dead_nodes_and_operand_order_are_duplicates():
    context = _dedup_context(*GOOD)
    for number, name in enumerate(GOOD):
        for variant in (_with_dead_nodes(plain(name)), _swap_commutative(plain(name))):
            outcome = run_filter("equivalence", variant, context)
            assert outcome.status == f"duplicate:{number}"
            assert outcome.objectives == (0.5 + number / 100, 0.4)


def test_same_function_by_a_different_graph_is_a_duplicate_of_its_outputs():
    a = (("add", (X, V0)), ("add", (4, V1)), ("std_g", (5, 5)), ("div", (5, 6)))  # ((x+v0)+v1)/std
    b = (("add", (V0, V1)), ("add", (X, 4)), ("std_g", (5, 5)), ("div", (5, 6)))  # (x+(v0+v1))/std
    c = (("max", (X, X)), ("add", (4, V0)), ("add", (5, V1)), ("std_g", (6, 6)), ("div", (6, 7)))
    context = _dedup_context(a)
    for g in (b, c):
        outcome = run_filter("equivalence", g, context)
        assert outcome.status == "duplicate:0" and "(outputs)" in outcome.reason


def test_different_functions_are_not_duplicates():
    # equal at initialisation (v0 = 1, v1 = 0) but not as functions of the parameters; group vs
    # instance vs layer statistics; batch vs batch-free; the known layers
    graphs = [((("mul", (X, V0)),)), ((("max", (X, X)),)), ((("add", (X, V1)),)),
              ((("std_g", (X, X)), ("div", (X, 4)))), ((("std_i", (X, X)), ("div", (X, 4)))),
              ((("std_l", (X, X)), ("div", (X, 4)))), ((("std_b", (X, X)), ("div", (X, 4)))),
              ((("rms_g", (X, X)), ("div", (X, 4)))),
              "bn_relu", "gn_relu", "ln_relu", "evonorm_b0", "evonorm_s0", "bn", "relu_only"]
    _dedup_context(*graphs)  # asserts each one passes


def test_equivalence_cache_rebuilds_from_stored_trials():
    context = FilterContext()
    c = Candidate(plain("evonorm_s0"))
    outcome = RejectionPipeline.from_spec("validity,equivalence").run(c, context)
    stored = json.loads(json.dumps({**outcome.user_attrs(c), "verdict": "evaluated"}))
    rejected = Candidate((("exp", (X, X)),))
    RejectionPipeline.from_spec("equivalence").run(rejected, context)
    stored_rejected = json.loads(json.dumps({**RejectionPipeline.from_spec("equivalence").run(
        rejected, FilterContext()).user_attrs(rejected), "verdict": "rejected:stability"}))
    trials = [SimpleNamespace(number=7, values=[0.9, 0.8], user_attrs=stored),
              SimpleNamespace(number=8, values=None, user_attrs=stored_rejected),
              SimpleNamespace(number=9, values=None, user_attrs={"verdict": "rejected:numerics", "hash": "x"})]
    cache = EquivalenceCache.from_trials(trials)
    assert len(cache) == 2
    new = FilterContext(equivalence=cache)
    # re-spelled: the fingerprint path (the hash of a swapped graph is the same, so drop it)
    respelled = _swap_commutative(_with_dead_nodes(plain("evonorm_s0")))
    dup = RejectionPipeline.from_spec("equivalence", {"equivalence": {"use_hash": False}}).run(
        Candidate(respelled), new)
    assert dup.status == "duplicate:7" and dup.objectives == (0.9, 0.8)
    again = run_filter("equivalence", (("exp", (X, X)),), new)
    assert again.status == "rejected:equivalence" and "rejected:stability" in again.reason


# -------------------------------------------------------------------------------------------
# stability


@pytest.mark.slow
@pytest.mark.parametrize("name", GOOD)
def test_stability_passes_good_layers(name):
    outcome = run_filter("stability", plain(name))
    assert outcome.status == "passed", outcome.reason
    assert outcome.verdicts[0].metrics["grad_norm"] < 1e6  # far below the 1e8 threshold


@pytest.mark.slow
def test_stability_rejects_an_exploding_layer():
    outcome = run_filter("stability", (("exp", (X, X)),))  # finite on probes, explodes when pushed
    assert outcome.status == "rejected:stability" and "gradient norm" in outcome.reason


# -------------------------------------------------------------------------------------------
# quality


class FakeSession:
    def __init__(self, accuracies):
        self.accuracies, self.steps = accuracies, []

    def train_until(self, step, progress=None):
        self.steps.append(step)
        return dict(self.accuracies)


class FakeEvaluator(Evaluator):
    """Accuracies by formula: the filter's decision logic without training."""

    def __init__(self, table, archs=("resnet", "mobilenetv2")):
        super().__init__({"archs": archs})
        self.table, self.sessions = table, []

    def start(self, layer):
        from opsearch import graph
        session = FakeSession(self.table[graph.formula(layer)])
        self.sessions.append(session)
        return session


def test_quality_rejects_below_min_accuracy_on_any_architecture_and_keeps_the_session():
    from opsearch import graph
    table = {graph.formula(plain(n)): {"resnet": 0.9, "mobilenetv2": 0.8} for n in GOOD}
    bad = (("tanh", (X, X)),)
    table[graph.formula(bad)] = {"resnet": 0.9, "mobilenetv2": 0.15}
    context = FilterContext(evaluator=FakeEvaluator(table))
    for name in GOOD:
        c = Candidate(plain(name))
        outcome = RejectionPipeline.from_spec("quality").run(c, context)
        assert outcome.status == "passed"
        assert outcome.warm_start is context.evaluator.sessions[-1] and outcome.warm_start.steps == [100]
    c = Candidate(bad)
    outcome = RejectionPipeline.from_spec("quality", {"quality": {"steps": 50}}).run(c, context)
    assert outcome.status == "rejected:quality" and "mobilenetv2" in outcome.reason
    assert outcome.warm_start is None and context.evaluator.sessions[-1].steps == [50]


def test_quality_stops_at_the_first_architecture_below_the_bar():
    from opsearch import graph
    bad, good = (("tanh", (X, X)),), plain("evonorm_s0")
    first = FakeEvaluator({graph.formula(bad): {"resnet": 0.1}, graph.formula(good): {"resnet": 0.5}})
    second = FakeEvaluator({graph.formula(bad): {"mobilenetv2": 0.9}, graph.formula(good): {"mobilenetv2": 0.6}})
    context = FilterContext(extra={"quality_evaluators": {"resnet": first, "mobilenetv2": second}})
    c = Candidate(bad)
    assert RejectionPipeline.from_spec("quality").run(c, context).status == "rejected:quality"
    assert len(first.sessions) == 1 and second.sessions == []  # never trained on the second
    c = Candidate(good)
    outcome = RejectionPipeline.from_spec("quality").run(c, context)
    assert outcome.status == "passed"
    assert outcome.verdicts[0].metrics == {"acc/resnet": 0.5, "acc/mobilenetv2": 0.6}
    assert outcome.warm_start.train_until(300) == {"resnet": 0.5, "mobilenetv2": 0.6}
    assert first.sessions[-1].steps == [100, 300] and second.sessions[-1].steps == [100, 300]


class RangedSession(FakeSession):
    """A one-architecture session whose result carries the v0 range its training took."""

    def __init__(self, accuracies, v0_range):
        super().__init__(accuracies)
        self.v0_range = v0_range

    def result(self):
        from opsearch.evaluation import Evaluation
        attrs = {f"train_s/{a}": 1.0 for a in self.accuracies}
        if self.v0_range is not None:
            attrs["v0_range"] = self.v0_range
        return Evaluation(dict(self.accuracies), attrs)


class RangedEvaluator(FakeEvaluator):
    def __init__(self, arch, accuracy, v0_range):
        super().__init__({}, archs=(arch,))
        self.arch, self.accuracy, self.v0_range = arch, accuracy, v0_range

    def start(self, layer):
        session = RangedSession({self.arch: self.accuracy}, self.v0_range)
        self.sessions.append(session)
        return session


@pytest.mark.parametrize("ranges, merged", [
    # round 9 stored only the last architecture's range: [0.77, 1.33] where resnet took v0 to 1.65
    (([0.77, 1.65], [0.80, 1.10], [0.79, 1.33]), [0.77, 1.65]),
    (([0.77, 1.65], None, [0.79, 1.33]), None),  # one architecture's range unknown: unknown
])
def test_the_staged_evaluation_keeps_the_range_over_every_architecture(ranges, merged):
    """The quality filter trains one session per architecture; the evaluation it hands on must
    report the [min, max] of v0 over all of them, as a straight evaluation does, or the band
    rule would merge a layer whose earlier training left the band on another architecture."""
    archs = ("resnet", "mobilenetv2", "efficientnet")
    evaluators = {a: RangedEvaluator(a, 0.9, r) for a, r in zip(archs, ranges)}
    context = FilterContext(extra={"quality_evaluators": evaluators})
    outcome = RejectionPipeline.from_spec("quality").run(Candidate(plain("evonorm_s0")), context)
    assert outcome.status == "passed"
    attrs = outcome.warm_start.result().trial_attrs()
    assert attrs.get("v0_range") == merged
    assert {k for k in attrs if k.startswith("train_s/")} == {f"train_s/{a}" for a in archs}


@pytest.mark.slow
def test_quality_with_real_training_passes_good_layers_and_continues_the_session():
    from opsearch.trainers.evaluator import EvalConfig
    config = EvalConfig(dataset="synthetic", archs=("resnet",), steps=40, warmup_steps=3, batch_size=32,
                        lr=0.05, accelerator="cpu", arch_options={"width": 8, "depth": 1})
    context = FilterContext(eval_config=config)
    # 4 classes: chance is 0.25; the good layers reach 0.45-0.55 after 30 steps on this proxy
    pipeline = RejectionPipeline.from_spec("quality", {"quality": {"steps": 30, "min_accuracy": 0.35}})
    for name in GOOD:
        good = Candidate(plain(name))
        outcome = pipeline.run(good, context)
        assert outcome.status == "passed", outcome.reason
    evaluator = context.get_evaluator()
    full = evaluator.resume(outcome.warm_start)  # continues from step 30
    straight = evaluator.evaluate(plain(GOOD[-1]))
    assert full.accuracies == pytest.approx(straight.accuracies)
    assert set(full.trial_attrs()) == set(straight.trial_attrs()) == {"train_s/resnet", "v0_range"}
    # v0's range is kept over both stages: the same as the straight run's
    assert full.trial_attrs()["v0_range"] == straight.trial_attrs()["v0_range"]
    bad = Candidate((("std_l", (X, X)), ("sigmoid", (4, 4))))  # one number per sample
    assert pipeline.run(bad, context).status == "rejected:quality"


def test_verdict_labels():
    assert Verdict(True, "a").label == "passed"
    assert Verdict(False, "a").label == "rejected:a"
    assert Verdict(False, "equivalence", duplicate_of=3, objectives=(1.0,)).label == "duplicate:3"


@pytest.mark.parametrize("stat", ["std_i", "rms_g", "mean_l"])
def test_numerics_rejects_a_statistic_of_x_posing_as_a_layer(stat):
    """One value per sample and channel erases every spatial feature below the layer."""
    graph = ((stat, (X,)), ("tanh", (4,)))
    outcome = run_filter("numerics", graph)
    assert outcome.status == "rejected:numerics" and "statistic" in outcome.reason
    assert run_filter("numerics", graph, reject_statistics=False).passed
    assert run_filter("numerics", ((stat, (X,)), ("div", (X, 4)))).passed  # x / statistic: a layer


def test_a_rejection_is_graded_by_how_far_it_got():
    """Filters passed, plus how near the rejecting filter came to passing it."""

    class Near(Fixed):
        def closeness(self, verdict):
            return 0.25

    early = RejectionPipeline([Fixed("a", 1, passed=False), Fixed("b", 2)]).run(Candidate(plain("bn_relu")), FilterContext())
    late = RejectionPipeline([Fixed("a", 1), Near("b", 2, passed=False)]).run(Candidate(plain("bn_relu")), FilterContext())
    assert early.grade == 0.0 and late.grade == 1.25
    assert late.user_attrs()["grade"] == 1.25
    assert RejectionPipeline([Fixed("a", 1)]).run(Candidate(plain("bn_relu")), FilterContext()).grade is None
    from opsearch import registry
    quality = registry.rejection_filters.create("quality")
    low = Verdict(False, "quality", metrics={"acc/resnet": 0.25, "acc/mobilenetv2": 0.1, "num_archs": 3})
    assert quality.closeness(low) == pytest.approx((1.0 + 0.5) / 3)
    stability = registry.rejection_filters.create("stability")
    assert stability.closeness(Verdict(False, "stability", metrics={"grad_norm": 1e9})) == pytest.approx(0.5)
    assert stability.closeness(Verdict(False, "stability", metrics={"grad_norm": "inf"})) == 0.0


def test_a_plugin_filter_can_join_the_default_pipeline_by_its_cost():
    from opsearch import registry
    from opsearch.rejection import Filter, default_filters, parse_filter_list

    assert default_filters() == ["validity", "numerics", "equivalence", "stability", "quality"]

    @registry.register_filter("_t_default_joiner")
    class Joiner(Filter):
        cost = 0.05
        default = True

        def check(self, candidate, context):
            return self.accept()

    try:
        assert parse_filter_list(None) == ["validity", "numerics", "equivalence", "_t_default_joiner",
                                           "stability", "quality"]
    finally:
        registry.rejection_filters.unregister("_t_default_joiner")
    assert "_t_default_joiner" not in default_filters()


def test_rejections_from_the_graph_alone_are_not_cached():
    from opsearch.rejection import Candidate, EquivalenceCache

    cache = EquivalenceCache()
    graphs = [(("add", (0, 0)),), (("mul", (0, 0)),), (("max", (0, 0)),), (("div", (0, 0)),)]
    verdicts = ["rejected:validity", "rejected:numerics", "rejected:stability", "rejected:no_such_filter"]
    candidates = [Candidate(g) for g in graphs]
    for number, (candidate, verdict) in enumerate(zip(candidates, verdicts)):
        candidate.canonical_hash  # computed, as the equivalence filter would
        cache.record(candidate, number, verdict)
    found = [cache.lookup_hash(c.canonical_hash) for c in candidates]
    assert [f.verdict if f else None for f in found] == [None, None, "rejected:stability",
                                                          "rejected:no_such_filter"]
