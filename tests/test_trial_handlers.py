"""Each kind of trial has one handler (opsearch/trial_handlers.py), which can be driven alone
with a worker built on a study: here with the surrogate evaluator, so nothing trains."""
from __future__ import annotations

import pytest
from optuna.trial import TrialState
from test_evaluator_plugin import config, surrogate_module

from opsearch.engine import Setup, Worker, enqueue_baselines
from opsearch.study import TrialRecord
from opsearch.trial_handlers import (HANDLERS, BaselineHandler, CandidateHandler, PromotionHandler,
                                     RerankHandler)


def _worker(tmp_path, **overrides) -> Worker:
    surrogate_module()
    setup = Setup.from_config(config(tmp_path, **overrides))
    return Worker(setup, run=setup.open_run())


def test_every_kind_has_its_handler_and_an_unknown_kind_is_a_candidate(tmp_path):
    assert {k: h for k, h in HANDLERS.items()} == {
        "candidate": CandidateHandler, "baseline": BaselineHandler,
        "promotion": PromotionHandler, "rerank": RerankHandler}
    worker = _worker(tmp_path)
    assert type(worker.handler("baseline")) is BaselineHandler
    assert worker.handler("baseline") is worker.handler("baseline")  # built once
    assert type(worker.handler("something-new")) is CandidateHandler


def test_the_baseline_handler_alone_scores_the_known_layer_with_its_equivalence_keys(tmp_path):
    module = surrogate_module()
    worker = _worker(tmp_path, baselines=["bn_relu"])
    enqueue_baselines(worker.run, worker.setup)
    record = worker.run.pop_waiting(worker.identity)
    assert record.kind == "baseline"
    outcome = worker.handler(record.kind).evaluate(record)
    expected = module.SurrogateEvaluator(module.SurrogateEvaluator.configure(worker.config)).evaluate("bn_relu")
    assert outcome.state == TrialState.COMPLETE and outcome.verdict == "evaluated"
    assert outcome.values == pytest.approx([expected.accuracies[a] for a in worker.archs])
    assert outcome.attrs["acc/resnet"] == pytest.approx(expected.accuracies["resnet"])
    assert "hash" in outcome.attrs or any(k.startswith("fingerprint") for k in outcome.attrs), outcome.attrs


def test_the_candidate_handler_alone_gives_a_verdict(tmp_path):
    worker = _worker(tmp_path)
    worker.recover()
    record = worker._new_candidate()
    outcome = worker.handler(record.kind).evaluate(record)
    assert outcome.verdict == "evaluated" or outcome.verdict.startswith(("rejected:", "duplicate:"))
    assert (outcome.state == TrialState.PRUNED) == outcome.verdict.startswith("rejected:")


def test_a_promotion_without_a_funnel_is_refused_by_its_handler(tmp_path):
    worker = _worker(tmp_path)
    record = TrialRecord(number=7, trial_id=8, state=TrialState.RUNNING, values=None,
                         user_attrs={"kind": "promotion", "rung": 2, "of_trial": 3, "layer": "bn_relu"},
                         system_attrs={}, datetime_start=None)
    with pytest.raises(ValueError, match="funnel has none"):
        worker.handler(record.kind).evaluate(record)
