"""`random`: random graphs with no selection; the baseline every search is measured against.

Proposals come from the same generator the evolutionary algorithms start from
(generator.py: valid graphs, small first; `generator=uniform` for uniform genomes), so that a
comparison gives both sides the same starting knowledge and isolates what selection buys.
With `avoid_duplicates` (default, as in evolution) it does not draw again a graph already fed
back (canonical hash): random search without replacement. Before, about 80% of a 30-minute run's
proposals repeated an earlier graph, mostly the twenty one-node layers, and their cheap
rejections took about 30% of its CPU (round 4): a cost a comparison would charge to random alone
once evolution skips them.
"""
from __future__ import annotations

import random
from typing import Any, ClassVar

from opsearch.algorithm import Algorithm, Objectives, Option
from opsearch.plugins.algorithms.generator import GENERATOR_OPTIONS, GraphGenerator, graph_hash
from opsearch.registry import register_algorithm
from opsearch.space import Genome


@register_algorithm("random")
class RandomSearch(Algorithm):
    """Each proposal is a fresh draw of the generator; feedback only marks graphs as seen."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        **GENERATOR_OPTIONS,
        "avoid_duplicates": Option(True, "do not draw again a graph already fed back (canonical hash)", bool),
    }

    def __init__(self, space, num_objectives: int, seed: int = 0, **options: Any):
        super().__init__(space, num_objectives, seed, **options)
        self.generator = GraphGenerator.from_options(space, self.options)
        self._track_seen = self.options["avoid_duplicates"] and self.generator.ramped
        self._seen: set[str] = set()  # canonical hashes of every candidate fed back

    def _propose(self, rng: random.Random) -> Genome:
        self.origin = "new"
        return self.generator.random_genome(rng, self._seen)

    def _feedback(self, genome: Genome, objectives: Objectives | None) -> None:
        if self._track_seen and (key := graph_hash(self.space, genome)) is not None:
            self._seen.add(key)
