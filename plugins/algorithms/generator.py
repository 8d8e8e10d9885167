"""Random graphs worth evaluating: valid, and small first.

A uniform random genome of the paper's space is mostly useless: 60% of them do not depend on x
(the validity filter rejects them; in a from-scratch search of 1,500 candidates, 906 were
invalid), and the rest are deep random compositions that rarely train. Genetic programming
starts from small programs and lets variation grow them ("ramped" initialisation); here a
generated graph has a live-node count drawn uniformly from 1..`init_nodes` and must pass
`graph.validate` (its output depends on x). It is found by drawing uniform genomes and keeping
the first that fits, so it works for any LayerGraph space a user writes (a space whose fixed
nodes make small graphs impossible gets the smallest valid one drawn); spaces that are not
LayerGraphs get uniform genomes.

Given `seen` (canonical hashes of graphs already evaluated), it skips them: there are only about
twenty one-node layers, and without it nearly half of a long search's new graphs were the same
ones again (each rejected again, cheaply, but a thousand times over).
"""
from __future__ import annotations

import random

from opsearch import graph
from opsearch.algorithm import Option
from opsearch.space import Genome, SearchSpace

GENERATOR_OPTIONS: dict[str, Option] = {
    "generator": Option("valid", "random graphs: valid (output depends on x, small first: live "
                        "nodes ramped 1..init_nodes) or uniform (any genome)", str,
                        choices=("valid", "uniform")),
    "init_nodes": Option(4, "largest live-node count of a generated graph (generator=valid)", int, minimum=1),
}

MAX_DRAWS = 400  # uniform draws per generated graph; ~1 in 15 fits at 1 live node in `evonorm`


class GraphGenerator:
    """`random_genome(rng)` per the module docstring."""

    def __init__(self, space: SearchSpace, generator: str = "valid", init_nodes: int = 4):
        self.space = space
        self.ramped = generator == "valid" and space.is_layer_graph
        self.init_nodes = int(init_nodes)

    @classmethod
    def from_options(cls, space: SearchSpace, options: dict) -> "GraphGenerator":
        return cls(space, **{k: options[k] for k in GENERATOR_OPTIONS})

    def random_genome(self, rng: random.Random, seen: set[str] | frozenset = frozenset()) -> Genome:
        """A new graph; one whose canonical hash is in `seen` only when MAX_DRAWS found no other."""
        if not self.ramped:
            return self.space.random_genome(rng)
        target = 1 + int(rng.random() * self.init_nodes)
        smallest, smallest_size, fallback = None, None, None
        for _ in range(MAX_DRAWS):
            genome = self.space.random_genome(rng)
            size = live_size(self.space, genome)
            if size is None:
                continue
            fits = size <= target
            if not fits and smallest_size is not None and size >= smallest_size:
                continue
            if seen and graph_hash(self.space, genome) in seen:
                fallback = fallback or genome
                continue
            if fits:
                return genome
            smallest, smallest_size = genome, size
        return smallest or fallback or self.space.random_genome(rng)


def live_size(space: SearchSpace, genome: Genome) -> int | None:
    """Live nodes of a genome's graph; None when the graph is not a valid layer."""
    try:
        plain = space.decode(genome)
        if not graph.is_valid(plain):
            return None
        return len(graph.live_nodes(plain))
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def graph_hash(space: SearchSpace, genome: Genome) -> str | None:
    """Canonical hash of a genome's graph; None when it cannot be hashed."""
    try:
        return graph.canonical_hash(space.decode(genome))
    except (ValueError, KeyError, IndexError, TypeError):
        return None


__all__ = ["GENERATOR_OPTIONS", "GraphGenerator", "graph_hash", "live_size"]
