"""`nsga2`: Optuna's NSGAIISampler through ask-and-tell, one categorical parameter per gene.

Each gene is a categorical parameter ``g<i>`` with choices ``range(size)`` (one pyglove decision
point each; a manyof gives one parameter per pick). Independently drawn picks of a
distinct/sorted manyof are repaired (de-duplicated, sorted) before proposing, so the objective
Optuna optimises is f(repair(params)). Rejected/failed candidates never join a population
(NSGA-II ranks COMPLETE trials only). Optuna 5 defaults multi-objective studies to TPE; here the
sampler is always NSGAIISampler.

Why not one Optuna study holding every trial: NSGAIISampler scans all trials on every ask
(generation lookup, parent cache), so a proposal's cost grows with the history, and re-adding
every trial on recovery deep-copies every distribution (BENCHMARKS.md, "Engine overhead"). So
the generation bookkeeping that Optuna keeps in trial/study system attributes is mirrored here
in Python, with Optuna's own rules (BaseGASampler: a trial's generation is the latest one until
`population_size` of its trials completed; NSGA-II parents of generation g = Optuna's elite
selection over the population of g-1 plus the parents of g-1, in trial order), and Optuna only
*samples children*: for each generation a small throw-away in-memory study holds that
generation's parents, and each proposal calls the sampler's two sampling steps directly (child
generation, then the random sampler for the genes the child lacks), which draws exactly what
`study.ask` on that study would (see `_sample`; `study.ask` itself adds per-trial bookkeeping that
costs more than the sampling). Each proposal then costs O(genes), recovery is linear
and cheap, and recover-then-propose equals live feedback
(proposals draw from RNGs reseeded from (seed, history length)). The crossover, mutation,
child generation and elite selection are Optuna's code. One deliberate difference from a plain
Optuna study: there, the first child of each generation sees the parents in elite order and the
others in trial order; here all see trial order.

This relies on Optuna internals that are stable across 3.x-5.x (the generation/parent-cache keys
of BaseGASampler; the storage calls go through opsearch.study); tests pin the behaviour.
"""
from __future__ import annotations

import datetime
import logging
import random
import warnings
from collections import defaultdict, deque
from typing import Any, ClassVar

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.samplers import NSGAIISampler
from optuna.trial import FrozenTrial, TrialState, create_trial

from opsearch.algorithm import Algorithm, Objectives, Option
from opsearch.errors import UserError
from opsearch.registry import register_algorithm
from opsearch.space import Genome
from opsearch.study import set_study_system_attr, trial_id

try:  # the elite selection Optuna's NSGAIISampler uses by default
    from optuna.samplers.nsgaii._elite_population_selection_strategy import (
        NSGAIIElitePopulationSelectionStrategy,
    )
except ImportError:  # pragma: no cover - older/newer Optuna layouts
    NSGAIIElitePopulationSelectionStrategy = None

_GENERATION_KEY = NSGAIISampler._get_generation_key()
_PARENT_KEY_PREFIX = NSGAIISampler._get_parent_cache_key_prefix()
_EPOCH = datetime.datetime(2020, 1, 1)


@register_algorithm("nsga2")
class NSGA2(Algorithm):
    """NSGA-II (Deb et al. 2002) as implemented by Optuna's NSGAIISampler."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        "population_size": Option(20, "individuals per NSGA-II generation (Optuna's default is 50)",
                                  int, minimum=2),
        "mutation_prob": Option(None, "probability of resampling each gene of a child "
                                "(none: 1 / number of genes)", float, minimum=0.0, maximum=1.0,
                                allow_none=True),
        "crossover_prob": Option(0.9, "probability that a child is a crossover of two parents",
                                 float, minimum=0.0, maximum=1.0),
        "swapping_prob": Option(0.5, "uniform crossover: probability of taking each gene from "
                                "the second parent", float, minimum=0.0, maximum=1.0),
    }

    def __init__(self, space, num_objectives: int, seed: int = 0, **options: Any):
        super().__init__(space, num_objectives, seed, **options)
        if space.num_genes == 0:
            raise UserError("algorithm 'nsga2' needs a search space with at least one decision")
        if NSGAIIElitePopulationSelectionStrategy is None:  # pragma: no cover
            raise UserError("algorithm 'nsga2' needs optuna >= 3.3 (NSGA-II elite selection strategy)")
        self.population_size: int = self.options["population_size"]
        self._elite = NSGAIIElitePopulationSelectionStrategy(population_size=self.population_size)
        self._names = tuple(f"g{i}" for i in range(space.num_genes))
        self._distributions = {name: CategoricalDistribution(tuple(range(size)))
                               for name, size in zip(self._names, space.gene_sizes)}
        # what NSGAIISampler.infer_relative_search_space returns once parents exist (Optuna's
        # IntersectionSearchSpace sorts by name as a string: g0, g1, g10, ...; the crossover
        # draws gene by gene in that order)
        self._relative_space = {name: d for name, d in sorted(self._distributions.items()) if not d.single()}
        # Optuna's generation state, mirrored: `generation` is the one the next trial gets.
        self.generation = 0
        self._population: list[FrozenTrial] = []   # completed trials of `generation`
        self._parents: list[FrozenTrial] = []      # parents of `generation` (trial order)
        self._number = 0                           # trial number of the next history item
        self._asked: dict[Genome, deque[int]] = defaultdict(deque)  # genome -> ask generations
        self._study: optuna.Study | None = None
        self._study_generation = -1

    # ------------------------------------------------------------------ interface

    def _propose(self, rng: random.Random) -> Genome:
        study, sampler = self._study_for_generation()
        # Optuna's draws become a function of (seed, history), not of earlier calls.
        sampler._rng.rng.seed(rng.getrandbits(32))
        sampler._random_sampler._rng.rng.seed(rng.getrandbits(32))
        params = self._sample(study, sampler)
        genome = self.space.repair([params[name] for name in self._names])
        self._asked[genome].append(self.generation)
        return genome

    def _sample(self, study: optuna.Study, sampler: NSGAIISampler) -> dict[str, Any]:
        """What `study.ask(distributions)` returns, without the trial machinery around it.

        study.ask runs NSGAIISampler.sample_relative (the child generation strategy on this
        generation's parents, none in generation 0) and then, gene by gene in name order,
        sample_independent (the random sampler) for every gene the child lacks (mutated genes,
        single-choice genes). Calling those two steps directly draws the same numbers from the
        same RNGs in the same order (tests compare both paths), at a fraction of the cost: no
        trial is added, no distribution deep-copied, no search space re-inferred.
        """
        params: dict[str, Any] = {}
        if self._parents:
            params = dict(sampler._child_generation_strategy(study, self._relative_space, self._parents))
        for name in self._names:
            if name not in params:
                params[name] = sampler._random_sampler.sample_independent(
                    study, None, name, self._distributions[name])
        return params

    def _ask_via_study(self, rng: random.Random) -> dict[str, Any]:
        """The reference path: Optuna's own study.ask on the generation's study (for tests)."""
        study, sampler = self._study_for_generation()
        sampler._rng.rng.seed(rng.getrandbits(32))
        sampler._random_sampler._rng.rng.seed(rng.getrandbits(32))
        with _quiet_optuna():
            study.add_trial(create_trial(state=TrialState.WAITING,
                                         system_attrs={_GENERATION_KEY: self.generation}))
            trial = study.ask(self._distributions)
        return dict(trial.params)

    def _feedback(self, genome: Genome, objectives: Objectives | None) -> None:
        queue = self._asked.get(genome)
        if queue:
            generation = queue.popleft()
            if not queue:
                del self._asked[genome]
        else:
            generation = self.generation
        number = self._number
        self._number += 1
        if objectives is None:
            return
        if generation != self.generation:
            # Completed after its generation closed (parallel workers): Optuna's parent cache
            # for the next generation is already fixed, so it no longer matters.
            return
        self._population.append(FrozenTrial(
            number=number, trial_id=number, state=TrialState.COMPLETE, value=None,
            values=list(objectives), datetime_start=_EPOCH, datetime_complete=_EPOCH,
            params=dict(zip(self._names, genome)), distributions=self._distributions,
            user_attrs={}, system_attrs={_GENERATION_KEY: generation}, intermediate_values={}))
        if len(self._population) >= self.population_size:
            # Optuna: the next trial starts generation g+1, whose parents are the elite of
            # population(g) + parents(g), both in trial order.
            self._parents = sorted(self._elite(self._study_directions, self._population + self._parents),
                                   key=lambda t: t.number)
            self._population = []
            self.generation += 1

    # ------------------------------------------------------------------ internals

    @property
    def _study_directions(self):
        return _Directions(self.num_objectives)

    def _study_for_generation(self) -> tuple[optuna.Study, NSGAIISampler]:
        """A fresh study holding the current generation's parents, parent cache preset."""
        if self._study is not None and self._study_generation == self.generation:
            return self._study, self._study.sampler
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-argument warning
            sampler = NSGAIISampler(
                population_size=self.population_size,
                mutation_prob=self.options["mutation_prob"],
                crossover_prob=self.options["crossover_prob"],
                swapping_prob=self.options["swapping_prob"],
                seed=self.seed,
                elite_population_selection_strategy=self._elite,
            )
        with _quiet_optuna():
            study = optuna.create_study(directions=["maximize"] * self.num_objectives, sampler=sampler,
                                        storage=optuna.storages.InMemoryStorage())
            study.add_trials(self._parents)
        if self.generation > 0:
            ids = [trial_id(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
            set_study_system_attr(study, _PARENT_KEY_PREFIX + str(self.generation), ids)
        self._study, self._study_generation = study, self.generation
        return study, sampler


class _Directions:
    """The one thing Optuna's elite selection reads from a study: its directions."""

    def __init__(self, k: int):
        self.directions = [optuna.study.StudyDirection.MAXIMIZE] * k


class _quiet_optuna:
    """Silence Optuna's INFO logs for these private studies, restoring the level after."""

    def __enter__(self):
        self._logger = logging.getLogger("optuna")
        self._level = self._logger.level
        if self._logger.getEffectiveLevel() < logging.WARNING:
            self._logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        return False
