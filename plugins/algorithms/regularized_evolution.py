"""`regularized_evolution`: aging evolution with best-of-tournament selection (Real et al. 2019).

K objectives are scalarised (option `scalarization`: mean by default, or min / max / first) to
rank the tournament; ties go to the member sampled first. See evolution.py for the population,
the initial random phase and the handling of rejected candidates.
"""
from __future__ import annotations

import random
from typing import ClassVar

from opsearch.algorithm import SCALARIZATION_OPTION, Objectives, Option, scalarize
from opsearch.plugins.algorithms.evolution import AgingEvolution
from opsearch.registry import register_algorithm
from opsearch.space import Genome


@register_algorithm("regularized_evolution")
class RegularizedEvolution(AgingEvolution):
    """Aging evolution; parent = best of the tournament by the scalarised objectives."""

    OPTIONS: ClassVar[dict[str, Option]] = {**AgingEvolution.OPTIONS, "scalarization": SCALARIZATION_OPTION}

    def select_parent(self, tournament: list[tuple[Genome, Objectives]], rng: random.Random) -> Genome:
        how = self.options["scalarization"]
        best = max(range(len(tournament)), key=lambda i: scalarize(tournament[i][1], how))
        return tournament[best][0]
