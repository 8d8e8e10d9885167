"""`validity`: the compiler's own checks, before any tensor is made."""
from __future__ import annotations

from opsearch.registry import register_filter
from opsearch.rejection import Candidate, Filter, FilterContext, Verdict


@register_filter("validity")
class ValidityFilter(Filter):
    """Reject graphs that cannot be a layer (unknown op, bad index, output ignores x, ...)."""

    cost = 0.0001
    default = True
    from_graph_alone = True

    def check(self, candidate: Candidate, context: FilterContext) -> Verdict:
        from opsearch import graph

        graph.validate(candidate.plain)  # raises InvalidCandidate with the reason
        return self.accept(live_nodes=len(graph.live_nodes(candidate.plain)))
