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
        attrs = {"kind": "candidate", "genome": json.dumps(list(genome)), "formula": f"c{i}", "elapsed_s": 1.0,
                 "origin": algorithm.origin}  # as the engine stores it
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


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """One simulated run for the module (the cases only read it): its URL and its sources."""
    url = f"sqlite:///{tmp_path_factory.mktemp('origins')}/run.db"
    return url, simulated_run(url)


def test_the_replay_proposes_every_recorded_genome_and_names_its_source(origins, simulated):
    url, expected = simulated
    assert set(expected) == set(origins.SOURCES)  # the case covers every source
    rows, mismatches = origins.replay(open_run(url))
    assert mismatches == 0
    assert [r["source"] for r in rows] == expected
    assert [r["formula"] for r in rows] == [f"c{i}" for i in range(len(expected))]  # baseline not fed
    # the stored origin (what the algorithm said when it proposed) is what the replay finds
    stored = {t.number: t.user_attrs.get("origin") for t in open_run(url).get_trials()}
    assert [r["origin"] for r in rows] == [stored[r["number"]] for r in rows]
    assert all(r["origin"].startswith(r["source"]) for r in rows)


def test_each_mutant_names_its_kind_and_parent(origins, simulated):
    """The kind agrees with what it did to the graph's live nodes (insert: one more, self: two
    more, delete: at least one fewer); the parent is an earlier trial, trained for a mutant of
    the population (its score is its mean), a near miss for a start mutant (no score)."""
    from opsearch.plugins.algorithms.mutation import _pruned

    url, _ = simulated
    rows, _ = origins.replay(open_run(url))
    space = SearchSpace.from_name("evonorm", num_nodes=4)
    by_number = {r["number"]: r for r in rows}
    genomes = {t.number: tuple(json.loads(t.user_attrs["genome"])) for t in open_run(url).get_trials()
               if t.user_attrs.get("genome")}
    size = {n: len(_pruned(space.decode(g))) for n, g in genomes.items()}
    kinds = set()
    for r in rows:
        if r["source"] not in ("mutant", "start-mutant"):
            assert r["mutation"] is r["parent"] is r["parent_score"] is None
            continue
        kinds.add(r["mutation"])
        parent = by_number[r["parent"]]
        assert parent["number"] < r["number"]
        grown = size[r["number"]] - size[parent["number"]]
        assert {"insert": grown == 1, "self": grown == 2, "delete": grown <= -1, "edit": True}[r["mutation"]]
        if r["source"] == "mutant":
            assert parent["verdict"] in ("evaluated", "duplicate")
            assert r["parent_score"] == pytest.approx(sum(parent["values"]) / len(parent["values"]))
        else:
            assert r["parent_score"] is None or parent["verdict"] != "rejected"
    assert kinds == set(origins.MUTATION_KINDS)


def test_the_summary_stops_at_the_first_candidate_at_the_target(origins):
    def row(number, source, verdict, values, mutation=None, parent_score=None):
        return {"number": number, "source": source, "verdict": verdict, "values": values, "formula": f"c{number}",
                "mutation": mutation, "parent_score": parent_score}

    rows = [row(1, "start-new", "rejected", None),
            row(2, "start-mutant", "evaluated", (0.8, 0.8), "insert"),
            row(3, "mutant", "rejected", None, "self", 0.8),
            row(4, "mutant", "evaluated", (0.7, 0.7), "edit", 0.8),
            row(5, "mutant", "evaluated", (0.9, 0.88), "edit", 0.8),
            row(6, "immigrant", "evaluated", (0.95, 0.95))]
    s = origins.summarize(rows, [0.5, 10.0, 0.2, 11.0, 12.0, 9.0], target=0.89)
    assert s["hit"] == {"number": 5, "source": "mutant", "mutation": "edit", "score": pytest.approx(0.89),
                        "formula": "c5"}
    assert s["cpu"] == {"start-new": 0.5, "start-mutant": 10.0, "mutant": 23.2}  # the hit's own cost counts
    assert s["trained"] == {"start-mutant": 1, "mutant": 2}
    # kinds: mutants of the population only; 'better' = trained and above the parent's score
    assert s["kinds"] == {"self": {"proposed": 1, "cpu": 0.2},
                          "edit": {"proposed": 2, "cpu": 23.0, "trained": 2, "better": 1, "hits": 1}}
    whole = origins.summarize(rows, [1.0] * 6, target=None)  # no bn_relu: the whole run
    assert whole["hit"] is None and whole["trained"] == {"start-mutant": 1, "mutant": 2, "immigrant": 1}


def test_a_run_fed_the_known_layers_is_refused_in_one_line(origins, tmp_path):
    from opsearch.errors import UserError
    url = f"sqlite:///{tmp_path}/known.db"
    Run.create_or_open(url, "k", {"space": "evonorm", "space_options": {}, "archs": ARCHS,
                                  "config": json.dumps({**CONFIG, "seed_with_baselines": True})}, [])
    with pytest.raises(UserError, match="from scratch"):
        origins.replay(open_run(url))


def test_the_parent_margin_table_counts_what_the_rule_would_have_stopped_before_the_target(origins):
    def row(number, verdict, values, early, parent_early, parent_score=0.8, seconds=10.0):
        return {"number": number, "verdict": verdict, "values": values, "early": early,
                "parent_early": parent_early, "parent_score": parent_score, "elapsed_s": seconds}

    run = [row(1, "evaluated", (0.8, 0.8), 0.70, None),          # no trained parent: not counted
           row(2, "evaluated", (0.7, 0.7), 0.60, 0.70),          # 0.10 slower, worse than its parent
           row(3, "rejected", None, None, 0.70),                 # not trained
           row(4, "evaluated", (0.85, 0.85), 0.67, 0.70, seconds=5.0),   # 0.03 slower, but better
           row(5, "evaluated", (0.95, 0.95), 0.72, 0.70, seconds=7.0),   # the target
           row(6, "evaluated", (0.5, 0.5), 0.10, 0.70)]          # after the target: not counted
    without_target = [row(1, "evaluated", (0.6, 0.6), 0.5, 0.7, seconds=3.0)]
    table = origins.parent_margin_table([(run, 0.9), (without_target, None)], [0.0, 0.05, 0.2])
    assert [(t["stopped"], t["targets_stopped"], t["better_stopped"], t["seconds_stopped"]) for t in table] \
        == [(3, 0, 1, 18.0), (2, 0, 0, 13.0), (0, 0, 0, 0.0)]
    assert {(t["children"], t["targets"], t["better"], t["seconds"]) for t in table} == {(4, 1, 2, 25.0)}
