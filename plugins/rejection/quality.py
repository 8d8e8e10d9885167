"""`quality`: the paper's early-training test.

"We discard layers that achieve less than 20% CIFAR-10 validation accuracy after training for
100 steps." Here: a staged evaluator session (`Evaluator.start(layer)`) trains the candidate on
every architecture of the run to ``steps`` (default 100) and rejects it if any architecture's
validation accuracy is below ``min_accuracy`` (default 0.2). The session is left on the
candidate (``candidate.sessions``) so that the full evaluation continues from step 100 instead
of starting over; continuing gives exactly what a straight run would.
"""
from __future__ import annotations

from opsearch.registry import register_filter
from opsearch.rejection import Candidate, Filter, FilterContext, Verdict


@register_filter("quality")
class QualityFilter(Filter):
    """Reject when any architecture is below min_accuracy after a short training."""

    name = "quality"
    cost = 3.0

    def __init__(self, steps: int = 100, min_accuracy: float = 0.2):
        super().__init__()
        from opsearch.errors import UserError

        if int(steps) < 1 or not 0.0 <= float(min_accuracy) <= 1.0:
            raise UserError(f"quality: steps must be >= 1 and min_accuracy in [0, 1], "
                            f"got {steps!r}, {min_accuracy!r}")
        self.steps = int(steps)
        self.min_accuracy = float(min_accuracy)

    def check(self, candidate: Candidate, context: FilterContext) -> Verdict:
        evaluator = context.get_evaluator()
        session = evaluator.start(candidate.plain)
        accuracies = session.train_until(self.steps)
        candidate.sessions = session
        metrics = {f"acc/{arch}": round(acc, 4) for arch, acc in accuracies.items()}
        low = {a: acc for a, acc in accuracies.items() if acc < self.min_accuracy}
        if low:
            candidate.sessions = None  # nothing will continue it
            worst = min(low, key=low.get)
            return self.reject(f"{worst} validation accuracy {low[worst]:.3f} < {self.min_accuracy:g} "
                               f"after {self.steps} steps", **metrics)
        return self.accept(**metrics)
