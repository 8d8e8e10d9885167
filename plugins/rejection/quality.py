"""`quality`: the paper's early-training test.

"We discard layers that achieve less than 20% CIFAR-10 validation accuracy after training for
100 steps." Here: staged evaluator sessions (`Evaluator.start(layer)`) train the candidate on
every architecture of the run to ``steps`` (default 100); the candidate is rejected if any
architecture's validation accuracy is below ``min_accuracy`` (default 0.2).

Cheaper than the letter of the test, same decisions: the architectures are trained one at a
time and the test stops at the first one below the bar (the others cannot change a rejection),
so a hopeless layer costs one architecture's 100 steps, not K of them. A candidate that passes
keeps its sessions on ``candidate.sessions`` (a `StagedSessions`, with the `EvalSession`
interface: ``train_until(step)``, ``result()``), so the full evaluation continues from step 100
instead of starting over; each architecture's session is seeded by its own name, so continuing
gives exactly what a straight run would (bit for bit when the evaluator flushes denormals as this
filter does while it trains, see `_probes.flush_denormals`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from opsearch.plugins.rejection import _probes
from opsearch.registry import register_filter
from opsearch.rejection import Candidate, Filter, FilterContext, Verdict


class StagedSessions:
    """One evaluator session per architecture, driven together like one `EvalSession`."""

    def __init__(self, sessions: dict[str, Any]):
        self.sessions = sessions  # arch -> EvalSession (one-architecture evaluator)

    def train_until(self, step: int, progress: Callable | None = None) -> dict[str, float]:
        accuracies: dict[str, float] = {}
        for arch, session in self.sessions.items():
            if progress is None:
                accuracies.update(session.train_until(step))
            else:
                accuracies.update(session.train_until(step, progress=progress))
        return accuracies

    def result(self):
        from opsearch.trainers.evaluator import EvalResult

        results = [s.result() for s in self.sessions.values()]
        per_arch = {a: r for res in results for a, r in res.per_arch.items()}
        return EvalResult(results[0].layer if results else "", {a: r.accuracy for a, r in per_arch.items()},
                          per_arch, sum(r.seconds for r in per_arch.values()))

    @property
    def seconds(self) -> float:
        return sum(getattr(s, "seconds", 0.0) for s in self.sessions.values())


def _per_arch_evaluators(context: FilterContext) -> dict[str, Any] | None:
    """One single-architecture Evaluator per architecture of the run (built once per context),
    or None when the context's evaluator is not a `trainers.evaluator.Evaluator`."""
    cached = context.extra.get("quality_evaluators")
    if cached is not None:
        return cached
    from opsearch.trainers.evaluator import Evaluator

    evaluator = context.get_evaluator()
    if not isinstance(evaluator, Evaluator):
        return None
    config = evaluator.config
    per_arch = {arch: Evaluator(dataclasses.replace(config, archs=(arch,))) for arch in config.archs}
    if len(per_arch) == 1:
        per_arch = {config.archs[0]: evaluator}
    context.extra["quality_evaluators"] = per_arch
    return per_arch


@register_filter("quality")
class QualityFilter(Filter):
    """Reject when any architecture is below min_accuracy after a short training."""

    name = "quality"
    cost = 3.0

    def __init__(self, steps: int = 100, min_accuracy: float = 0.2, early_exit: bool = True):
        super().__init__()
        from opsearch.errors import UserError

        if int(steps) < 1 or not 0.0 <= float(min_accuracy) <= 1.0:
            raise UserError(f"quality: steps must be >= 1 and min_accuracy in [0, 1], "
                            f"got {steps!r}, {min_accuracy!r}")
        self.steps = int(steps)
        self.min_accuracy = float(min_accuracy)
        self.early_exit = bool(early_exit)

    def check(self, candidate: Candidate, context: FilterContext) -> Verdict:
        with _probes.flush_denormals():  # see _probes.flush_denormals: 10x on bad candidates
            return self._check(candidate, context)

    def _check(self, candidate: Candidate, context: FilterContext) -> Verdict:
        evaluators = _per_arch_evaluators(context) if self.early_exit else None
        if evaluators is None:  # one session over every architecture
            session = context.get_evaluator().start(candidate.plain)
            accuracies = session.train_until(self.steps)
        else:
            sessions, accuracies = {}, {}
            session = StagedSessions(sessions)
            for arch, evaluator in evaluators.items():
                sessions[arch] = evaluator.start(candidate.plain)
                accuracies.update(sessions[arch].train_until(self.steps))
                if accuracies[arch] < self.min_accuracy:
                    break
        metrics = {f"acc/{arch}": round(acc, 4) for arch, acc in accuracies.items()}
        low = {a: acc for a, acc in accuracies.items() if acc < self.min_accuracy}
        if low:
            candidate.sessions = None  # nothing will continue it
            worst = min(low, key=low.get)
            return self.reject(f"{worst} validation accuracy {low[worst]:.3f} < {self.min_accuracy:g} "
                               f"after {self.steps} steps", **metrics)
        candidate.sessions = session
        return self.accept(**metrics)
