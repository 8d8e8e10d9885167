"""`random`: random graphs with no selection; the baseline every search is measured against.

Proposals come from the same generator the evolutionary algorithms start from
(generator.py: valid graphs, small first; `generator=uniform` for uniform genomes), so that a
comparison gives both sides the same starting knowledge and isolates what selection buys.
"""
from __future__ import annotations

import random
from typing import Any, ClassVar

from opsearch.algorithm import Algorithm, Option
from opsearch.plugins.algorithms.generator import GENERATOR_OPTIONS, GraphGenerator
from opsearch.registry import register_algorithm
from opsearch.space import Genome


@register_algorithm("random")
class RandomSearch(Algorithm):
    """Each proposal is a fresh draw of the generator (feedback is ignored)."""

    OPTIONS: ClassVar[dict[str, Option]] = dict(GENERATOR_OPTIONS)

    def __init__(self, space, num_objectives: int, seed: int = 0, **options: Any):
        super().__init__(space, num_objectives, seed, **options)
        self.generator = GraphGenerator.from_options(space, self.options)

    def _propose(self, rng: random.Random) -> Genome:
        return self.generator.random_genome(rng)
