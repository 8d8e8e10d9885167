"""`pareto_evolution`: the EvoNorm paper's multi-objective tournament (reconstructed).

Sample a tournament from the aging population, take its Pareto front over the K objectives
(one score per proxy architecture, all maximised), draw the parent uniformly from the front and
mutate it. Rewarding the front rather than a mean keeps layers that are best on *some*
architecture without letting one architecture dominate the search. With K = 1 this is
best-of-tournament with random tie-breaking.
"""
from __future__ import annotations

import random

from opsearch.algorithm import Objectives, pareto_front
from opsearch.plugins.algorithms.evolution import AgingEvolution
from opsearch.registry import register_algorithm
from opsearch.space import Genome


@register_algorithm("pareto_evolution")
class ParetoEvolution(AgingEvolution):
    """Aging evolution; parent drawn uniformly from the tournament's Pareto front."""


    def select_parent(self, tournament: list[tuple[Genome, Objectives]], rng: random.Random) -> Genome:
        front = pareto_front([objectives for _, objectives in tournament])
        return tournament[front[int(rng.random() * len(front))]][0]
