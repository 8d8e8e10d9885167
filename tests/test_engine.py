"""End-to-end searches on a tiny proxy: every algorithm, resume, determinism, user plugins."""
from __future__ import annotations

import textwrap

import pytest
from optuna.trial import TrialState

from opsearch.config import SearchConfig
from opsearch.engine import Setup, Worker
from opsearch.local_run import run_search
from opsearch.study import open_run, run_trials

import contract

pytestmark = pytest.mark.slow

CHEAP_FILTERS = ["validity", "numerics", "equivalence"]


def tiny(tmp_path, **overrides) -> SearchConfig:
    """A search that costs well under a second per evaluated candidate."""
    values = dict(
        name="t", space="evonorm", space_options={"num_nodes": 4}, algorithm="regularized_evolution",
        algorithm_options={}, budget=8, dataset="synthetic", archs=["resnet", "mobilenetv2"],
        filters=list(CHEAP_FILTERS), baselines=["bn_relu"],
        evaluator={"steps": 3, "batch_size": 16, "val_batch_size": 128, "warmup_steps": 1,
                   "arch_options": {"width": 4, "depth": 1}},
        storage=f"sqlite:///{tmp_path}/study.db", plots=False, seed=3,
        rerank={"enabled": False})  # the stage has its own tests (test_rerank.py)
    values.update(overrides)
    return SearchConfig.from_dict(values)


def trials(config: SearchConfig):
    return run_trials(open_run(config.storage, config.name))


def candidates(config):
    return [t for t in trials(config) if t.user_attrs.get("kind") == "candidate"]


def space_plugin(tmp_path, name: str, body: str):
    """A plugin file registering the search space `name`, whose function body is `body`."""
    plugin = tmp_path / f"{name}.py"
    plugin.write_text(textwrap.dedent(f"""
        import pyglove as pg
        from opsearch import search_space, LayerGraph, Node

        @search_space("{name}")
        def {name}():
    """) + textwrap.dedent(body).replace("\n", "\n    ", body.count("\n")).rstrip() + "\n")
    return plugin


def check_contract(config: SearchConfig, **expect):
    """The stored contract and the outcome that matters (tests/contract.py): at least one
    candidate evaluated, accuracies in [0, 1], no failure the test did not cause."""
    return contract.check_contract(trials(config), config.archs, config.filters, **expect)


@pytest.mark.parametrize("algorithm", ["regularized_evolution", "pareto_evolution", "random",
                                       "nsga2", "pyglove:regularized_evolution"])
def test_each_algorithm_runs_a_small_search(tmp_path, algorithm):
    options = {"population_size": 4, "tournament_size": 2} if "evolution" in algorithm else {}
    if algorithm == "nsga2":
        options = {"population_size": 4}
    if algorithm.startswith("pyglove:"):
        options = {"population_size": 4, "tournament_size": 2}
    # uniform proposals (nsga2, pyglove) train about one in ten of this space's graphs
    budget = 8 if algorithm in ("regularized_evolution", "pareto_evolution", "random") else 20
    config = tiny(tmp_path, algorithm=algorithm, algorithm_options=options, baselines=[], budget=budget)
    run_search(config)
    assert len(candidates(config)) == config.budget
    check_contract(config)
    # where the algorithm knows a proposal's origin, the trial stores it (benchmarks/origins.py)
    origins = [t.user_attrs.get("origin") for t in candidates(config)]
    if algorithm == "random":
        assert origins == ["new"] * config.budget
    elif algorithm in ("regularized_evolution", "pareto_evolution"):
        from opsearch.plugins.algorithms.evolution import ORIGIN_SOURCES
        from opsearch.plugins.algorithms.mutation import MUTATION_KINDS

        sources, kinds = set(ORIGIN_SOURCES), {*MUTATION_KINDS, "none"}
        assert all(o.partition(":")[0] in sources for o in origins), origins
        assert all(o.partition(":")[2] in kinds for o in origins if o.partition(":")[0].endswith("mutant"))
        assert origins[0] == "start-new"  # nothing to mutate yet
    else:
        assert origins == [None] * config.budget


def test_resume_continues_to_the_budget(tmp_path):
    config = tiny(tmp_path, budget=5)
    run_search(config)
    first = trials(config)
    assert len([t for t in first if t.user_attrs["kind"] == "candidate"]) == 5
    assert [t for t in first if t.user_attrs["kind"] == "baseline"][0].user_attrs["layer"] == "bn_relu"
    bigger = tiny(tmp_path, budget=9)
    run_search(bigger)
    after = trials(bigger)
    assert len([t for t in after if t.user_attrs["kind"] == "candidate"]) == 9
    # nothing already finished was touched, baselines are not evaluated again
    for before in first:
        assert after[before.number].user_attrs == before.user_attrs
    assert sum(t.user_attrs["kind"] == "baseline" for t in after) == 1
    # the same budget again does nothing
    run_search(bigger)
    assert len(trials(bigger)) == len(after)
    check_contract(bigger)
    # a worker recovers the whole history: the algorithm and the equivalence cache
    worker = Worker(Setup.from_config(bigger))
    finished = [t for t in after if t.user_attrs["kind"] == "candidate"]
    assert worker.recover() >= len(finished)
    for t in after:
        if t.user_attrs["verdict"] == "evaluated":
            assert worker.context.equivalence.lookup_hash(t.user_attrs["hash"]).trial == t.number


def test_interrupted_worker_resumes_where_it_stopped(tmp_path):
    config = tiny(tmp_path, budget=7, baselines=[])
    setup = Setup.from_config(config)
    Worker(setup).run_loop(max_candidates=3)  # then the process "dies"
    assert len(candidates(config)) == 3
    run_search(config)
    numbers = [t.number for t in trials(config)]
    assert numbers == list(range(7))
    check_contract(config)


def test_same_seed_same_results_on_one_worker(tmp_path):
    a = tiny(tmp_path / "a", budget=7)
    b = tiny(tmp_path / "b", budget=7)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_search(a)
    run_search(b)
    strip = lambda ts: [(t.user_attrs["genome"] if "genome" in t.user_attrs else t.user_attrs["layer"],
                         t.user_attrs["verdict"], t.values) for t in ts]
    assert strip(trials(a)) == strip(trials(b))
    check_contract(a)


def test_user_search_space_from_plugin_file(tmp_path):
    plugin = tmp_path / "my_space.py"
    plugin.write_text(textwrap.dedent("""
        import pyglove as pg
        from opsearch import search_space, LayerGraph, Node

        @search_space("tiny_swish")
        def tiny_swish():
            # x * sigmoid(<something>): only the gate's input is searched
            return LayerGraph(nodes=[
                Node(op=pg.oneof(["mul", "add", "max"]), inputs=[0, pg.oneof([0, 2, 3])]),
                Node(op="sigmoid", inputs=[4, 4]),
                Node(op="mul", inputs=[0, 5]),
            ])
    """))
    config = tiny(tmp_path, space="tiny_swish", space_options={}, plugins=[str(plugin)], budget=4,
                  algorithm="random", baselines=[])
    run_search(config)
    cs = candidates(config)
    assert len(cs) == 4
    assert all("sigmoid" in t.user_attrs["formula"] for t in cs)
    check_contract(config)


def test_a_failing_candidate_becomes_a_verdict(tmp_path, monkeypatch):
    from opsearch.trial_handlers import CandidateHandler

    config = tiny(tmp_path, budget=8, baselines=[], filters=["validity"])
    calls = {"n": 0}
    original = CandidateHandler.train

    def flaky(self, candidate, warm_start=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated crash inside training")
        return original(self, candidate, warm_start)

    monkeypatch.setattr(CandidateHandler, "train", flaky)
    run_search(config)
    verdicts = [t.user_attrs["verdict"] for t in candidates(config)]
    assert len(verdicts) == 8
    assert verdicts.count("failed:RuntimeError") == 1
    failed = [t for t in candidates(config) if t.user_attrs["verdict"] == "failed:RuntimeError"][0]
    assert failed.state == TrialState.FAIL and "simulated crash" in failed.user_attrs["reason"]
    check_contract(config, allowed_failures={"failed:RuntimeError"})  # the others trained


def test_a_slow_candidate_times_out(tmp_path, monkeypatch):
    import time as time_mod

    from opsearch.trial_handlers import CandidateHandler

    config = tiny(tmp_path, budget=2, baselines=[], filters=["validity"], timeout_s=0.5)
    monkeypatch.setattr(CandidateHandler, "train", lambda self, c, warm_start=None: time_mod.sleep(5))
    run_search(config)
    verdicts = {t.user_attrs["verdict"] for t in candidates(config)}
    assert verdicts <= {"failed:timeout", "rejected:validity"}
    assert "failed:timeout" in verdicts
    assert all(t.user_attrs["elapsed_s"] < 4.5 for t in candidates(config))  # the limit, not the 5 s
    check_contract(config, min_evaluated=0, allowed_failures={"failed:timeout"})


@pytest.mark.parametrize("seed_with_baselines, expected", [(True, 4), (False, 2)])
def test_baselines_seed_the_algorithm(tmp_path, seed_with_baselines, expected):
    # both fit a 5-node space: relu_only = max(x, 0), evonorm_s0 = x * sigmoid(v0*x) / std_g(x)
    config = tiny(tmp_path, budget=2, baselines=["relu_only", "evonorm_s0"],
                  space_options={"num_nodes": 5}, seed_with_baselines=seed_with_baselines)
    run_search(config)
    assert Worker(Setup.from_config(config)).recover() == expected
    check_contract(config, min_evaluated=0)  # 2 candidates: the filters may reject both


def test_a_rediscovered_known_layer_is_a_duplicate_of_its_baseline(tmp_path):
    """BN-ReLU written two other ways (an exact copy, and (x - mean)/std as x/std - mean/std,
    which only the output fingerprint can match) is `duplicate:<the bn_relu baseline trial>`."""
    plugin = space_plugin(tmp_path, "bn_relu_rewritten", """
            # 4: mean_b(x)  5: std_b(x)  6: x / std  7: mean / std  8: -(mean / std)
            # 9: x - mean   10: (x - mean) / std, or x / std - mean / std (chosen)
            return LayerGraph(nodes=[
                Node(op="mean_b", inputs=[0, 0]), Node(op="std_b", inputs=[0, 0]),
                Node(op="div", inputs=[0, 5]), Node(op="div", inputs=[4, 5]),
                Node(op="neg", inputs=[7, 7]), Node(op="add", inputs=[0, 4]),
                Node(op="neg", inputs=[4, 4]), Node(op="add", inputs=[0, 10]),
                Node(op=pg.oneof(["div", "add"]), inputs=pg.oneof([[11, 5], [6, 8]])),
                Node(op="mul", inputs=[12, 2]), Node(op="add", inputs=[13, 3]),
                Node(op="max", inputs=[14, 1]),
            ])
    """)
    config = tiny(tmp_path, space="bn_relu_rewritten", space_options={}, plugins=[str(plugin)],
                  budget=6, algorithm="random", algorithm_options={"generator": "uniform"},
                  baselines=["bn_relu"])
    run_search(config)
    baseline = [t for t in trials(config) if t.user_attrs["kind"] == "baseline"][0]
    assert baseline.user_attrs["verdict"] == "evaluated"
    from opsearch import graph, layers
    expected = {"div(11,5)": "(x - mean_b(x)) / std_b(x)", "add(6,8)": "x / std_b(x) - mean_b(x) / std_b(x)"}
    seen = set()
    for t in candidates(config):
        plain = graph.from_json(t.user_attrs["graph"]).as_tuple()
        op, inputs = plain[8]
        key = f"{op}({','.join(map(str, inputs))})"
        if key in expected:  # the other genomes are not BN-ReLU: they must not match it
            seen.add(key)
            assert t.user_attrs["verdict"] == f"duplicate:{baseline.number}", t.user_attrs
            assert t.values == baseline.values
    assert seen == set(expected), f"the random search proposed only {seen} of BN-ReLU's forms"
    # a worker that recovers from the study has the baseline in its cache, by hash and outputs
    assert "equiv_fp" in baseline.user_attrs
    worker = Worker(Setup.from_config(config))
    worker.recover()
    bn_hash = graph.canonical_hash(layers.resolve("bn_relu"))
    assert worker.context.equivalence.lookup_hash(bn_hash).trial == baseline.number
    from opsearch.rejection import fingerprint_from_json
    fp = fingerprint_from_json(baseline.user_attrs["equiv_fp"])
    assert worker.context.equivalence.match(fp)[0].trial == baseline.number
    check_contract(config)


def test_layers_equal_while_v0_stays_positive_are_trained_once(tmp_path):
    """``f(x*v0)``, ``f(x*max(0, v0))`` and ``f(x*|v0|)`` are one layer while v0 > 0; the first
    one trained stores the range its v0 took (``v0_range``), inside the band on this short
    training, so the others are `duplicate:<it>` through the band rule and are not trained."""
    plugin = space_plugin(tmp_path, "v0_clipped", """
            # 4: max(0, v0)  5: |v0|  6: x * (v0, max(0, v0) or |v0|)  7: sqrt or tanh of it
            return LayerGraph(nodes=[
                Node(op="max", inputs=[1, 2]), Node(op="abs", inputs=[2, 2]),
                Node(op="mul", inputs=pg.oneof([[0, 2], [0, 4], [0, 5]])),
                Node(op=pg.oneof(["sqrt", "tanh"]), inputs=[6, 6]),
            ])
    """)
    config = tiny(tmp_path, space="v0_clipped", space_options={}, plugins=[str(plugin)], budget=6,
                  algorithm="random", algorithm_options={"generator": "uniform"}, baselines=[])
    run_search(config)
    groups: dict[str, list] = {}
    for t in candidates(config):
        groups.setdefault(t.user_attrs["formula"].split("(")[0], []).append(t)
    assert set(groups) == {"sqrt", "tanh"}, groups
    band_merges = 0
    for group in groups.values():
        [first] = [t for t in group if t.user_attrs["verdict"] == "evaluated"]
        lo, hi = first.user_attrs["v0_range"]
        assert 0.005 <= lo <= 1.0 <= hi <= 10.0
        for t in group:
            if t is not first:
                assert t.user_attrs["verdict"] == f"duplicate:{first.number}", t.user_attrs
                assert t.values == first.values
                band_merges += "training kept it" in t.user_attrs.get("reason", "")
    assert band_merges >= 2, "no candidate was merged by the band rule"
    check_contract(config)


def test_mutants_store_their_parent_and_slow_learners_stop_at_the_quality_step(tmp_path):
    """Every mutant stores the trial it was mutated from (`parent`: the same trial the origins
    replay finds, independently); with the quality filter's `parent_margin`, a trained mutant
    learned at least as fast as its trained parent (minus the margin) by the quality step, and
    every mutant the rule stopped learned slower."""
    from benchmark_modules import benchmark_module

    margin = 0.0
    config = tiny(tmp_path, budget=40, baselines=[], seed_with_baselines=False,
                  filters=[*CHEAP_FILTERS, "quality"],
                  filter_options={"quality": {"steps": 2, "min_accuracy": 0.0, "parent_margin": margin}},
                  algorithm_options={"population_size": 4, "tournament_size": 2, "immigrants": 0.0})
    run_search(config)
    done = {t.number: t for t in trials(config)}

    def early(t):
        accs = [v for k, v in t.user_attrs.items() if k.startswith("metric/quality/acc/")]
        return sum(accs) / len(accs) if len(accs) == len(config.archs) else None

    with benchmark_module("origins") as origins:
        rows, mismatches = origins.replay(open_run(config.storage, config.name))
    assert mismatches == 0
    replayed = {r["number"]: r["parent"] for r in rows if r["parent"] is not None}
    stored = {n: t.user_attrs["parent"] for n, t in done.items() if "parent" in t.user_attrs}
    assert replayed and {n: stored.get(n) for n in replayed} == replayed
    assert all(not done[n].user_attrs["origin"].startswith(("start-new", "immigrant")) for n in stored)
    stopped = [t for t in done.values() if "its parent's" in str(t.user_attrs.get("reason", ""))]
    checked = 0
    for n, p in stored.items():
        child, parent = done[n], done[p]
        if parent.user_attrs.get("verdict") != "evaluated" or early(child) is None:
            continue
        checked += 1
        if child.user_attrs["verdict"] == "evaluated":
            assert early(child) >= early(parent) - margin - 1e-4  # stored rounded to 4 places
        else:
            assert child in stopped and early(child) < early(parent) - margin + 1e-4
    assert checked and stopped, (checked, len(stopped))
    assert all(t.user_attrs["verdict"] == "rejected:quality" and "parent" in t.user_attrs for t in stopped)
