"""Every worker's algorithm hears about every finished trial, whoever finished it.

Regression: a worker syncs with the study in several places (the periodic reap, before each
proposal); results of other workers picked up by the reap's sync were dropped, so with 2 workers
each algorithm saw only about half of the history (its population of seed layers stayed below
min_population and it proposed random graphs for the whole run).
"""
from __future__ import annotations

import random

from optuna.trial import TrialState

from opsearch.config import SearchConfig
from opsearch.engine import Outcome, Setup, Worker, enqueue_baselines


def _fake_worker(setup, run, seed: int) -> Worker:
    worker = Worker(setup, run=run)
    rng = random.Random(seed)

    def fake_process(record):
        values = [0.5 + 0.5 * rng.random() for _ in worker.archs]
        return Outcome(TrialState.COMPLETE, values, {
            "verdict": "evaluated", **{f"acc/{a}": v for a, v in zip(worker.archs, values)}})

    worker.process = fake_process
    return worker


def test_results_found_by_the_periodic_reap_reach_the_algorithm(tmp_path):
    config = SearchConfig(name="feedback", storage=f"sqlite:///{tmp_path}/study.db",
                          algorithm="regularized_evolution", budget=20, plots=False,
                          baselines=["bn_relu", "evonorm_b0", "evonorm_s0", "gn_relu"])
    setup = Setup.from_config(config)
    run_a = setup.open_run()
    enqueue_baselines(run_a, setup)
    a = _fake_worker(setup, run_a, 0)
    b = _fake_worker(setup, setup.open_run(), 1)  # its own connection and view, like a process
    a.recover()
    b.recover()
    assert a.run_loop(max_candidates=4) == 4  # A evaluates the four baselines
    assert len(a.algorithm.population) == 4
    b._maybe_reap(force=True)  # B's periodic sync and reap come first...
    b._new_candidate()         # ...then its next proposal
    assert len(b.algorithm.population) == 4
    assert b.algorithm.num_feedbacks == 4  # each finished trial fed back exactly once
    b._maybe_reap(force=True)
    b._new_candidate()
    assert b.algorithm.num_feedbacks == 4
