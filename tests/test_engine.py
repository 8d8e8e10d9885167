"""End-to-end searches on a tiny proxy: every algorithm, resume, determinism, user plugins."""
from __future__ import annotations

import json
import textwrap

import pytest
from optuna.trial import TrialState

from opsearch.config import SearchConfig
from opsearch.engine import Setup, Worker, run_search
from opsearch.study import open_run

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
    return open_run(config.storage, config.name).get_trials()


def candidates(config):
    return [t for t in trials(config) if t.user_attrs.get("kind") == "candidate"]


def check_contract(config: SearchConfig) -> None:
    """Every trial finished with a verdict and the contract attributes."""
    for t in trials(config):
        assert t.state.is_finished(), (t.number, t.state)
        attrs = t.user_attrs
        verdict = attrs["verdict"]
        assert verdict == "evaluated" or verdict.split(":")[0] in ("rejected", "duplicate", "failed")
        assert "formula" in attrs and "graph" in attrs and attrs["elapsed_s"] >= 0
        json.loads(attrs["graph"])
        if t.state == TrialState.COMPLETE:
            assert t.values == [attrs[f"acc/{a}"] for a in config.archs]
        if verdict == "evaluated":
            assert t.state == TrialState.COMPLETE
        elif verdict.startswith("rejected:"):
            assert t.state == TrialState.PRUNED
        elif verdict.startswith("duplicate:"):
            earlier = int(verdict.split(":")[1])
            assert earlier < t.number


@pytest.mark.parametrize("algorithm", ["regularized_evolution", "pareto_evolution", "random",
                                       "nsga2", "pyglove:regularized_evolution"])
def test_each_algorithm_runs_a_small_search(tmp_path, algorithm):
    options = {"population_size": 4, "tournament_size": 2} if "evolution" in algorithm else {}
    if algorithm == "nsga2":
        options = {"population_size": 4}
    if algorithm.startswith("pyglove:"):
        options = {"population_size": 4, "tournament_size": 2}
    config = tiny(tmp_path, algorithm=algorithm, algorithm_options=options, baselines=[])
    run_search(config)
    assert len(candidates(config)) == config.budget
    check_contract(config)


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
    from opsearch import engine

    config = tiny(tmp_path, budget=4, baselines=[], filters=["validity"])
    calls = {"n": 0}
    original = engine.Worker._train

    def flaky(self, candidate):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated crash inside training")
        return original(self, candidate)

    monkeypatch.setattr(engine.Worker, "_train", flaky)
    run_search(config)
    verdicts = [t.user_attrs["verdict"] for t in candidates(config)]
    assert len(verdicts) == 4
    assert "failed:RuntimeError" in verdicts
    failed = [t for t in candidates(config) if t.user_attrs["verdict"] == "failed:RuntimeError"][0]
    assert failed.state == TrialState.FAIL and "simulated crash" in failed.user_attrs["reason"]


def test_a_slow_candidate_times_out(tmp_path, monkeypatch):
    import time as time_mod

    from opsearch import engine

    config = tiny(tmp_path, budget=2, baselines=[], filters=["validity"], timeout_s=0.5)
    monkeypatch.setattr(engine.Worker, "_train", lambda self, c: time_mod.sleep(5))
    run_search(config)
    verdicts = {t.user_attrs["verdict"] for t in candidates(config)}
    assert verdicts <= {"failed:timeout", "rejected:validity"}
    assert "failed:timeout" in verdicts
    assert all(t.user_attrs["elapsed_s"] < 3 for t in candidates(config))


@pytest.mark.parametrize("seed_with_baselines, expected", [(True, 4), (False, 2)])
def test_baselines_seed_the_algorithm(tmp_path, seed_with_baselines, expected):
    # both fit a 5-node space: relu_only = max(x, 0), evonorm_s0 = x * sigmoid(v0*x) / std_g(x)
    config = tiny(tmp_path, budget=2, baselines=["relu_only", "evonorm_s0"],
                  space_options={"num_nodes": 5}, seed_with_baselines=seed_with_baselines)
    run_search(config)
    assert Worker(Setup.from_config(config)).recover() == expected
