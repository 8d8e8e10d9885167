"""benchmarks/origins.py: the replay of an evolution run labels every candidate with the source
that proposed it (start-new, start-mutant, mutant, immigrant) and proposes each recorded genome
again."""
from __future__ import annotations

import json
import random
from unittest import mock

import pytest
from benchmark_modules import benchmark_module
from optuna.trial import TrialState
from studies import add_finished

from opsearch import registry
from opsearch.space import SearchSpace
from opsearch.study import Run
from opsearch.study.storage import open_run

ARCHS = ["resnet", "mobilenetv2"]
CONFIG = {"space": "evonorm", "space_options": {"num_nodes": 4}, "algorithm": "regularized_evolution",
          "algorithm_options": {"population_size": 4, "tournament_size": 2, "immigrants": 0.5},
          "archs": ARCHS, "seed": 3, "seed_with_baselines": False}


@pytest.fixture(scope="module")
def origins():
    with benchmark_module("origins") as module:
        yield module


def simulated_run(url: str, candidates: int = 160) -> list[str]:
    """A one-worker search written as the engine writes it (a baseline first, then candidates:
    trained, duplicates of an earlier trained one, or rejected with a grade), driven by the
    algorithm itself; the source of each proposal as seen from outside (which proposer it called,
    whether the population was ready)."""
    run = Run.create_or_open(url, "sim", {"space": "evonorm", "space_options": CONFIG["space_options"],
                                          "archs": ARCHS, "config": json.dumps(CONFIG)}, [])
    add_finished(run, {"kind": "baseline", "layer": "bn_relu", "verdict": "evaluated", "genome": None,
                       "elapsed_s": 2.0}, TrialState.COMPLETE, [0.9, 0.9])
    space = SearchSpace.from_name("evonorm", num_nodes=4)
    algorithm = registry.algorithms.create("regularized_evolution", space, len(ARCHS), CONFIG["seed"],
                                           **CONFIG["algorithm_options"])
    outcomes, trained, sources = random.Random(0), [], []
    for i in range(candidates):
        ready = len(algorithm.population) >= algorithm.min_population
        with mock.patch.object(algorithm.generator, "random_genome",
                               wraps=algorithm.generator.random_genome) as new:
            genome = algorithm.propose()
        sources.append(("immigrant" if new.called else "mutant") if ready
                       else ("start-new" if new.called else "start-mutant"))
        attrs = {"kind": "candidate", "genome": json.dumps(list(genome)), "formula": f"c{i}", "elapsed_s": 1.0}
        draw = outcomes.random()
        if draw < 0.25 or (draw < 0.3 and not trained):
            values = [round(outcomes.uniform(0.5, 0.95), 3) for _ in ARCHS]
            trained.append(values)
            add_finished(run, {**attrs, "verdict": "evaluated"}, TrialState.COMPLETE, values)
            algorithm.feedback(genome, values)
        elif draw < 0.3:
            values = outcomes.choice(trained)
            add_finished(run, {**attrs, "verdict": "duplicate:1"}, TrialState.COMPLETE, values)
            algorithm.feedback(genome, values, duplicate=True)
        else:
            grade = round(outcomes.uniform(0.0, 3.0), 2)
            add_finished(run, {**attrs, "verdict": "rejected:stability", "grade": grade}, TrialState.PRUNED, None)
            algorithm.feedback(genome, None, grade=grade)
    return sources


def test_the_replay_proposes_every_recorded_genome_and_names_its_source(origins, tmp_path):
    url = f"sqlite:///{tmp_path}/run.db"
    expected = simulated_run(url)
    assert set(expected) == set(origins.SOURCES)  # the case covers every source
    rows, mismatches = origins.replay(open_run(url))
    assert mismatches == 0
    assert [r["source"] for r in rows] == expected
    assert [r["formula"] for r in rows] == [f"c{i}" for i in range(len(expected))]  # baseline not fed


def test_the_summary_stops_at_the_first_candidate_at_the_target(origins):
    rows = [{"number": 1, "source": "start-new", "verdict": "rejected", "values": None, "formula": "a"},
            {"number": 2, "source": "start-mutant", "verdict": "evaluated", "values": (0.8, 0.8), "formula": "b"},
            {"number": 3, "source": "mutant", "verdict": "evaluated", "values": (0.9, 0.88), "formula": "c"},
            {"number": 4, "source": "immigrant", "verdict": "evaluated", "values": (0.95, 0.95), "formula": "d"}]
    s = origins.summarize(rows, [0.5, 10.0, 12.0, 9.0], target=0.89)
    assert s["hit"] == {"number": 3, "source": "mutant", "score": pytest.approx(0.89), "formula": "c"}
    assert s["cpu"] == {"start-new": 0.5, "start-mutant": 10.0, "mutant": 12.0}  # the hit's own cost counts
    assert s["trained"] == {"start-mutant": 1, "mutant": 1}
    assert origins.summarize(rows, [1.0] * 4, target=None)["hit"] is None  # no bn_relu: whole run


def test_a_run_fed_the_known_layers_is_refused_in_one_line(origins, tmp_path):
    from opsearch.errors import UserError
    url = f"sqlite:///{tmp_path}/known.db"
    Run.create_or_open(url, "k", {"space": "evonorm", "space_options": {}, "archs": ARCHS,
                                  "config": json.dumps({**CONFIG, "seed_with_baselines": True})}, [])
    with pytest.raises(UserError, match="from scratch"):
        origins.replay(open_run(url))
