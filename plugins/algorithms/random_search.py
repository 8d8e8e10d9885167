"""`random`: uniform random genomes; the baseline every search is measured against."""
from __future__ import annotations

import random

from opsearch.algorithm import Algorithm
from opsearch.registry import register_algorithm
from opsearch.space import Genome


@register_algorithm("random")
class RandomSearch(Algorithm):
    """Each proposal is a uniform draw over the flat genome (feedback is ignored)."""


    def _propose(self, rng: random.Random) -> Genome:
        return self.space.random_genome(rng)
