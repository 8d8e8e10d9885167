"""`pyglove:<name>`: run a PyGlove DNAGenerator behind the opsearch Algorithm interface.

Registered names: pyglove:regularized_evolution, pyglove:hill_climb, pyglove:nsga2
(pg.evolution) and pyglove:random (pg.geno.Random). pg.evolution.neat is left out: its
proportional selection divides by the sum of rewards and crashes when they sum to 0. Others can be added with
`register_pyglove_generator(name, factory, options)`, e.g. from a `--plugin` file.

Useful as a reference implementation and a baseline, not as the fast path: every genome must
become a `pg.DNA` and pyglove's propose/feedback cost milliseconds each, so a candidate costs
tens of milliseconds and `recover` grows to minutes over a long history (BENCHMARKS.md, "Engine
overhead").

- Rewards: multi-objective generators (pyglove:nsga2) get the K-tuple; the others get the
  objectives scalarised by option `scalarization` (mean by default).
- Rejected/failed candidates are not fed back by default (`rejected_reward` none), like
  pyglove's own pending proposals; set `rejected_reward` (e.g. 0) to feed a fixed reward.
- Genomes the generator did not propose itself (another worker's, or the history in `recover`)
  become fresh DNAs with reconstructed evolution metadata (not an initial-population member,
  generation = its history position), which pyglove's feedback/recover require.
- Determinism: the generator is seeded (mutators too), so the same seed and feedback sequence
  give the same proposals; unlike the built-in algorithms, pyglove's RNG state is not restored
  by `recover`, so proposals after a recovery differ from a live run's (still seeded).
"""
from __future__ import annotations

import random
from collections import defaultdict, deque
from typing import Any, Callable, ClassVar

import pyglove as pg

from opsearch.algorithm import SCALARIZATION_OPTION, Algorithm, Objectives, Option, scalarize
from opsearch.errors import UserError
from opsearch.registry import register_algorithm
from opsearch.space import Genome

_COMMON_OPTIONS: dict[str, Option] = {
    "scalarization": SCALARIZATION_OPTION,
    "rejected_reward": Option(None, "reward fed back for rejected/failed candidates (none: not fed back)",
                              float, allow_none=True),
}


class PygloveAlgorithm(Algorithm):
    """Base of the generated `pyglove:<name>` classes; `factory(seed, **options)` builds the generator."""

    factory: ClassVar[Callable[..., pg.geno.DNAGenerator]]
    generator_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, space, num_objectives: int, seed: int = 0, **options: Any):
        super().__init__(space, num_objectives, seed, **options)
        if space.num_genes == 0:
            raise UserError(f"algorithm {self.name!r} needs a search space with at least one decision")
        kwargs = {k: self.options[k] for k in self.generator_options}
        try:
            self.generator = type(self).factory(self.seed, **kwargs)
            self.generator.setup(space.dna_spec)
        except (TypeError, ValueError) as e:
            raise UserError(f"algorithm {self.name!r}: {e}") from e
        self._multi = bool(getattr(self.generator, "multi_objective", False))
        self._proposed: dict[Genome, deque] = defaultdict(deque)
        self._is_evolution = isinstance(self.generator, pg.evolution.Evolution)

    def _propose(self, rng: random.Random) -> Genome:
        dna = self.generator.propose()
        genome = tuple(dna.to_numbers())
        self._proposed[genome].append(dna)
        return genome

    def _reward(self, objectives: Objectives | None):
        if objectives is None:
            value = self.options["rejected_reward"]
            if value is None:
                return None
            objectives = (value,) * self.num_objectives
        if self._multi:
            return tuple(objectives)
        return scalarize(objectives, self.options["scalarization"])

    def _dna_for(self, genome: Genome, position: int) -> pg.DNA:
        queue = self._proposed.get(genome)
        if queue:
            dna = queue.popleft()
            if not queue:
                del self._proposed[genome]
            return dna
        dna = self.space.to_dna(genome)
        if self._is_evolution:
            dna.set_metadata("initial_population", False)
            dna.set_metadata("generation_id", position)
            dna.set_metadata("proposal_id", position)
        return dna

    def _feedback(self, genome: Genome, objectives: Objectives | None) -> None:
        reward = self._reward(objectives)
        dna = self._dna_for(genome, self.generator.num_proposals + 1)
        if reward is not None:
            self.generator.feedback(dna, reward)

    def recover(self, history) -> None:
        """pyglove's own `generator.recover` on the history (slow: one DNA per item)."""
        items = []
        for genome, objectives, *_ in history:
            genome = self.space.check_genome(genome)
            objectives = self.checked_objectives(objectives)
            self.num_feedbacks += 1
            self._pending = 0
            self.num_rejected += objectives is None
            position = self.generator.num_proposals + len(items) + 1
            items.append((self._dna_for(genome, position), self._reward(objectives)))
        self.generator.recover(items)


def register_pyglove_generator(name: str, factory: Callable[..., pg.geno.DNAGenerator],
                               options: dict[str, Option] | None = None, doc: str = "") -> type[Algorithm]:
    """Register `pyglove:<name>` for `factory(seed, **options)` returning a DNAGenerator."""
    options = dict(options or {})
    cls = type(
        "Pyglove_" + name.replace("-", "_"),
        (PygloveAlgorithm,),
        {
            "factory": staticmethod(factory),
            "generator_options": tuple(options),
            "OPTIONS": {**options, **_COMMON_OPTIONS},
            "__doc__": doc or f"PyGlove DNAGenerator {name!r} through the opsearch interface.",
            "__module__": __name__,
        },
    )
    register_algorithm(f"pyglove:{name}")(cls)
    return cls


def _uniform(seed: int):
    return pg.evolution.mutators.Uniform(seed=seed)


register_pyglove_generator(
    "regularized_evolution",
    lambda seed, population_size, tournament_size: pg.evolution.regularized_evolution(
        mutator=_uniform(seed), population_size=population_size, tournament_size=tournament_size, seed=seed),
    {"population_size": Option(100, "aging population size (pyglove's default)", int, minimum=2),
     "tournament_size": Option(10, "tournament size (pyglove's default)", int, minimum=1)},
    "pg.evolution.regularized_evolution with a seeded uniform mutator.")
register_pyglove_generator(
    "hill_climb",
    lambda seed, batch_size, init_population_size: pg.evolution.hill_climb(
        mutator=_uniform(seed), batch_size=batch_size, init_population_size=init_population_size, seed=seed),
    {"batch_size": Option(1, "children proposed per step", int, minimum=1),
     "init_population_size": Option(1, "random candidates before climbing", int, minimum=1)},
    "pg.evolution.hill_climb with a seeded uniform mutator.")
register_pyglove_generator(
    "nsga2",
    lambda seed, population_size: pg.evolution.nsga2(
        mutator=_uniform(seed), population_size=population_size, seed=seed),
    {"population_size": Option(100, "population size (pyglove's default)", int, minimum=2)},
    "pg.evolution.nsga2 (multi-objective) with a seeded uniform mutator.")
register_pyglove_generator(
    "random",
    lambda seed: pg.geno.Random(seed=seed),
    {},
    "pg.geno.Random: uniform random DNA.")


__all__ = ["PygloveAlgorithm", "register_pyglove_generator"]
