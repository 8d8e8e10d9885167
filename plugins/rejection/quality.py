"""`quality`: the paper's early-training test.

"We discard layers that achieve less than 20% CIFAR-10 validation accuracy after training for
100 steps." Here: staged evaluator sessions (`Evaluator.start(layer)`, opsearch/evaluation.py)
train the candidate on every architecture of the run to ``steps`` (default 100); the candidate
is rejected if any architecture's validation accuracy is below ``min_accuracy`` (default 0.2).

Cheaper than the letter of the test, same decisions: when the evaluator can score one
architecture alone (`Evaluator.only`), the architectures are trained one at a time and the test
stops at the first one below the bar (the others cannot change a rejection), so a hopeless
layer costs one architecture's 100 steps, not K of them. A candidate that passes hands its
sessions back through its verdict (``Verdict.warm_start``, a `StagedSessions`), so the full
evaluation resumes from step 100 instead of starting over; each architecture's session is
seeded by its own name, so resuming gives exactly what a straight run would (bit for bit when
the evaluation flushes denormals as this filter does while it trains, see opsearch/denormals.py).
"""
from __future__ import annotations

from typing import Any, Callable

from opsearch.denormals import flush_denormals
from opsearch.evaluation import Evaluation
from opsearch.registry import register_filter
from opsearch.rejection import Candidate, Filter, FilterContext, Verdict


class StagedSessions:
    """One evaluator session per architecture, driven together like one session."""

    def __init__(self, sessions: dict[str, Any]):
        self.sessions = sessions  # arch -> session of a one-architecture evaluator

    def train_until(self, step: int, progress: Callable | None = None) -> dict[str, float]:
        accuracies: dict[str, float] = {}
        for arch, session in self.sessions.items():
            if progress is None:
                accuracies.update(session.train_until(step))
            else:
                accuracies.update(session.train_until(step, progress=progress))
        return accuracies

    def result(self) -> Evaluation:
        return Evaluation.merge(s.result() for s in self.sessions.values())

    @property
    def seconds(self) -> float:
        return sum(getattr(s, "seconds", 0.0) for s in self.sessions.values())


def _per_arch_evaluators(context: FilterContext) -> dict[str, Any] | None:
    """One single-architecture evaluator per architecture of the run (built once per context),
    or None when the context's evaluator cannot score one architecture alone."""
    cached = context.extra.get("quality_evaluators")
    if cached is not None:
        return cached
    evaluator = context.get_evaluator()
    archs = evaluator.archs
    if len(archs) == 1:
        per_arch = {archs[0]: evaluator}
    else:
        per_arch = {arch: evaluator.only(arch) for arch in archs}
        if any(e is None for e in per_arch.values()):
            return None
    context.extra["quality_evaluators"] = per_arch
    return per_arch


@register_filter("quality")
class QualityFilter(Filter):
    """Reject when any architecture is below min_accuracy after a short training."""

    cost = 3.0
    default = True

    def __init__(self, steps: int = 100, min_accuracy: float = 0.2, early_exit: bool = True,
                 parent_margin: float | None = None):
        super().__init__()
        from opsearch.errors import UserError

        if int(steps) < 1 or not 0.0 <= float(min_accuracy) <= 1.0:
            raise UserError(f"quality: steps must be >= 1 and min_accuracy in [0, 1], "
                            f"got {steps!r}, {min_accuracy!r}")
        margin = None
        if parent_margin is not None and not isinstance(parent_margin, bool):
            try:
                margin = float(parent_margin)
            except (TypeError, ValueError):
                pass
        if parent_margin is not None and (margin is None or not 0.0 <= margin <= 1.0):
            raise UserError(f"quality: parent_margin must be a number in [0, 1] or unset, "
                            f"got {parent_margin!r}")
        self.steps = int(steps)
        self.min_accuracy = float(min_accuracy)
        self.early_exit = bool(early_exit)
        self.parent_margin = margin

    def check(self, candidate: Candidate, context: FilterContext) -> Verdict:
        with flush_denormals():  # 10x on bad candidates
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
            worst = min(low, key=low.get)
            num_archs = len(evaluators) if evaluators is not None else len(accuracies)
            return self.reject(f"{worst} validation accuracy {low[worst]:.3f} < {self.min_accuracy:g} "
                               f"after {self.steps} steps", num_archs=num_archs, **metrics)
        slower = self._slower_than_parent(candidate, accuracies)
        if slower is not None:
            return self.reject(slower, **metrics)
        verdict = self.accept(**metrics)
        verdict.warm_start = session  # the evaluation resumes it
        return verdict

    def _slower_than_parent(self, candidate: Candidate, accuracies: dict[str, float]) -> str | None:
        """With ``parent_margin``: why a mutant that learns clearly slower than its trained parent
        is stopped here (its mean accuracy after `steps` below the parent's at the same step minus
        the margin), else None. The parent's accuracies were measured by this filter with the
        same steps and seeds, so the two are the same measurement."""
        parent = candidate.parent_early
        if self.parent_margin is None or not parent or set(parent) != set(accuracies):
            return None
        mine = sum(accuracies.values()) / len(accuracies)
        theirs = sum(parent.values()) / len(parent)
        if mine >= theirs - self.parent_margin:
            return None
        return (f"mean validation accuracy {mine:.3f} after {self.steps} steps < its parent's "
                f"(trial {candidate.parent}) {theirs:.3f} - {self.parent_margin:g}")

    def closeness(self, verdict: Verdict) -> float:
        """Architectures passed plus the failing one's accuracy against the bar, over K."""
        accs = [v for k, v in verdict.metrics.items() if k.startswith("acc/")]
        if not accs or self.min_accuracy <= 0:
            return 0.0
        num_archs = max(int(verdict.metrics.get("num_archs", len(accs))), len(accs))
        return sum(min(a / self.min_accuracy, 1.0) for a in accs) / num_archs
