"""What a worker does with each kind of trial: one small handler per kind.

The worker (engine.Worker) owns the loop: which trial is next, its heartbeat and time limit, the
record, the feedback to the algorithm. A handler owns one kind's evaluation and returns the
`Outcome` to store: a candidate goes through the rejection pipeline and trains; a baseline
trains a known layer and stores its equivalence keys; a promotion (opsearch/funnel.py) trains a
candidate again to a higher rung; a re-ranking item (opsearch/rerank.py) trains one layer with
one seed on the stage's held-out task. Handlers share their worker's resources (the setup, the
filter context and its evaluator, evaluators for other configs), so each is a few lines and can
be driven alone with a worker built on a study.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from optuna.trial import TrialState

from opsearch import faults
from opsearch.errors import InvalidCandidate, UserError
from opsearch.study import TrialRecord


@dataclass
class Outcome:
    """A trial's result, as it will be stored."""

    state: TrialState
    values: list[float] | None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return self.attrs.get("verdict", "")


class TrialHandler:
    """Evaluates the trials of one `kind` with its worker's resources."""

    kind: ClassVar[str] = ""

    def __init__(self, worker):  # engine.Worker: its setup, context, run and evaluators
        self.worker = worker

    def evaluate(self, record: TrialRecord) -> Outcome:
        raise NotImplementedError

    def acc_attrs(self, values: list[float]) -> dict[str, float]:
        return {f"acc/{a}": float(v) for a, v in zip(self.worker.archs, values)}

    def evaluated(self, result, **attrs: Any) -> Outcome:
        """An evaluator's result as the outcome of a trial: the K accuracies as its values."""
        values = [float(result.accuracies[a]) for a in self.worker.archs]
        return Outcome(TrialState.COMPLETE, values, {"verdict": "evaluated", **self.acc_attrs(values),
                                                     **result.trial_attrs(), **attrs})

    def rung_evaluator(self, rung: int):
        """The evaluator that trains to a funnel rung's steps."""
        worker = self.worker
        if rung == 1:  # the candidates' own evaluator already trains to rung 1
            return worker.context.get_evaluator()
        return worker.derived_evaluator(("rung", rung), lambda: worker.setup.funnel.eval_config(
            worker.eval_config, rung, worker.config.evaluator_plugin))


class CandidateHandler(TrialHandler):
    """The rejection pipeline, then full training of a survivor (resuming the quality filter's)."""

    kind = "candidate"

    def evaluate(self, record: TrialRecord) -> Outcome:
        from opsearch.rejection import Candidate

        worker = self.worker
        genome = record.genome
        candidate = Candidate(worker.setup.space.decode(genome), genome=genome)
        parent = record.user_attrs.get("parent")
        if isinstance(parent, int) and not isinstance(parent, bool):
            candidate.parent = parent
            candidate.parent_early = worker.lineage.early_accuracies(parent)
        outcome = worker.setup.pipeline.run(candidate, worker.context)
        attrs = outcome.user_attrs(candidate)
        status = outcome.status
        if status.startswith("rejected:"):
            attrs["verdict"] = status
            return Outcome(TrialState.PRUNED, None, attrs)
        if status.startswith("duplicate:"):
            values = [float(v) for v in outcome.objectives]
            attrs["verdict"] = status
            attrs.update(self.acc_attrs(values))
            return Outcome(TrialState.COMPLETE, values, attrs)
        result = self.train(candidate, outcome.warm_start)
        attrs.update(result)
        if worker.setup.funnel is not None:
            attrs.update({"rung": 1, "rung_steps": worker.setup.funnel.steps[1]})
        return Outcome(TrialState.COMPLETE, [result[f"acc/{a}"] for a in worker.archs], attrs)

    def train(self, candidate, warm_start=None) -> dict[str, Any]:
        """Full evaluation on the K architectures, resuming what a filter (quality) handed back."""
        faults.point("train", key=None if candidate.genome is None else str(list(candidate.genome)))
        evaluator = self.worker.context.get_evaluator()
        result = evaluator.resume(warm_start) if warm_start is not None else evaluator.evaluate(candidate.plain)
        attrs: dict[str, Any] = {"verdict": "evaluated"}
        attrs.update(self.acc_attrs([float(result.accuracies[a]) for a in self.worker.archs]))
        attrs.update(result.trial_attrs())
        return attrs


class BaselineHandler(TrialHandler):
    """A known layer, trained like a candidate (at the funnel's baseline rung when there is one),
    stored with its equivalence keys so that a candidate that rediscovers it is a duplicate."""

    kind = "baseline"

    def evaluate(self, record: TrialRecord) -> Outcome:
        funnel = self.worker.setup.funnel
        evaluator = (self.worker.context.get_evaluator() if funnel is None
                     else self.rung_evaluator(funnel.baseline_rung))
        outcome = self.evaluated(evaluator.evaluate(record.user_attrs["layer"]))
        if funnel is not None:
            outcome.attrs.update({"rung": funnel.baseline_rung,
                                  "rung_steps": funnel.steps[funnel.baseline_rung]})
        outcome.attrs.update(self.known_layer_keys(record))
        return outcome

    def known_layer_keys(self, record: TrialRecord) -> dict[str, Any]:
        """The baseline's equivalence keys (hash, output fingerprint with the equivalence
        filter's probes), stored with it so that every worker's cache, recovered ones too, has it."""
        from opsearch import layers
        from opsearch.rejection import Candidate

        worker = self.worker
        if not built_like_candidates(worker.config, record):  # no candidate can be it
            return {}
        try:
            candidate = Candidate(layers.resolve(record.user_attrs["layer"]))
            return worker.setup.pipeline.known_layer_attrs(candidate, worker.context)
        except (InvalidCandidate, ValueError, RuntimeError):  # still a fine baseline
            return {}


class PromotionHandler(TrialHandler):
    """A candidate trained from scratch to its new rung's steps (the flat evaluation's seed)."""

    kind = "promotion"

    def evaluate(self, record: TrialRecord) -> Outcome:
        funnel = self.worker.setup.funnel
        rung = int(record.user_attrs["rung"])
        if funnel is None or not 1 <= rung <= funnel.top:
            raise ValueError(f"promotion to rung {rung}, but this search's funnel has "
                             f"{'none' if funnel is None else funnel.top}")
        faults.point("promotion")
        result = self.rung_evaluator(rung).evaluate(stored_layer(record.user_attrs))
        return self.evaluated(result, rung_steps=funnel.steps[rung])


class RerankHandler(TrialHandler):
    """One (layer, seed) of a re-ranking stage, trained on the stage's held-out task."""

    kind = "rerank"

    def evaluate(self, record: TrialRecord) -> Outcome:
        from opsearch import rerank

        worker = self.worker
        attrs = record.user_attrs
        stage, seed = str(attrs["stage"]), int(attrs["seed"])
        evaluator = worker.derived_evaluator(("rerank", stage, seed), lambda: rerank.task_eval_config(
            rerank.stage_task(worker.run, stage), seed, worker.eval_config, worker.config.evaluator_plugin))
        faults.point("rerank")
        return self.evaluated(evaluator.evaluate(stored_layer(attrs)))


HANDLERS: dict[str, type[TrialHandler]] = {
    h.kind: h for h in (CandidateHandler, BaselineHandler, PromotionHandler, RerankHandler)}


def stored_layer(attrs: dict[str, Any]):
    """The layer a WAITING trial names: a known layer, or its graph (our schema, never pickle)."""
    if attrs.get("layer"):
        return attrs["layer"]
    from opsearch import graph as graph_mod

    return graph_mod.from_dict(json.loads(attrs["graph"]))


def built_like_candidates(config, record: TrialRecord) -> bool:
    """Whether a baseline's known layer has this run's surround (opsearch/surround.py): a graph
    shared with a candidate is the same layer, or a start for evolution, only then."""
    from opsearch import layers

    try:
        return layers.built_like_candidates(record.user_attrs.get("layer"), config)
    except UserError:
        return False
