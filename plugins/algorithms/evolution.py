"""Aging evolution over a fixed-size population: the shared core of the evolutionary plugins.

The population holds the last `population_size` trained candidates (oldest removed first, Real
et al.'s regularized / aging evolution). Once it holds `min_population` members, a tournament of
`tournament_size` distinct members is sampled, a parent is selected from it (`select_parent`,
which subclasses define) and the graph-aware mutator makes the child (mutation.py).

Before that, the search has little or nothing trained to climb from: in a user's own space, one
random graph in hundreds survives the filters. Proposals are then new graphs from the generator
(generator.py: valid, small first) and, with `rejected=graded` (default), for a share
`start_mutation` of them, mutations of the winner of a tournament over the trained members and
the best *near misses*: rejected candidates carry a grade (how far they got through the filters,
numerics < stability < quality, and how near they came to passing the one that stopped them),
and rank below every trained member. So the search climbs from a layer that nearly trained
instead of waiting for luck. Once the population is ready, rejections enter nothing, as in the
paper, where rejected layers are discarded (`rejected=skip`: never, also at the start;
`rejected=worst`: they enter with -inf objectives and only age out good members).

Once tournaments run, selection climbs from the first layers that trained, which in a space of
many shallow optima is the first basin found (from scratch, evolution spent its trainings on
near copies of an instance normalizer while random search found batch normalizers). So each
trained result starts, with probability `immigrants`, a streak of new graphs from the generator
that lasts until the next trained result (with one worker, an immigrant): random search's
exploration, one trained immigrant per streak. The chance is drawn per trained result, not per
proposal: a streak costs what random search pays per trained layer (about a thousand cheap
rejections from scratch), while a mutant of a trained layer trains about one time in ten, so a per-proposal chance (rounds 2-4) started a
streak after every five mutants and left mutation about 1% of the proposals; evolution was then
random search in all but name (round 4: the best layers of a run were mutated 0-3 times). By
default 0.2 from scratch and 0 when the engine feeds the known layers first
(`from_known_layers`): there a budget that counts candidates (the quick start's 60) went to the
streak's rejected graphs instead of to mutants of the known layers. With `immigrants_adapt`
(off by default) the rate follows the immigrants' payoff (`_credit_immigrant`): once the
population holds a family of good layers, immigrants rarely beat it and the CPU goes back to its
mutants. Round 10 (12 seeds, paired by seed against the fixed rate, load-adjusted) found no
difference: 6 seeds faster, 6 slower, ratio of medians 0.99; it also showed the rule's failure
mode: a population stuck in a family of square roots, whose median no immigrant beat, drove the
rate to its floor and stayed there for the whole run (seed 5, where the fixed rate reached the
target). New graphs (immigrants and
the start) skip graphs already fed back (the generator's `seen`): from scratch, nearly half of
the proposals were otherwise the same twenty one-node graphs again.

Mutation edits a live node in place or grows and shrinks the graph (insert a node on a live
edge, delete one; mutation.py): from scratch the first layers that train are small (`x /
std_b(x)`), and the better ones are those plus a node (`max(x / std_b(x), 0)`), which no single
in-place edit reaches; `self` inserts a value combined with a function of itself (`u / std_b(u)`), a
normalizer of any layer in one step. `mutate_insert = mutate_delete = mutate_self = 0` restores the
paper's three kinds.

`min_population` defaults to `tournament_size`, not `population_size`: waiting for a full
population of random survivors would spend hundreds of proposals before any evolution, and
members fed back first (the engine's seed layers, with `seed_with_baselines`) would sit idle.
With `avoid_duplicates` (default) the canonical hashes of every candidate fed back are
remembered and mutation retries children that would repeat one. A candidate the equivalence
filter found to repeat an earlier trial's function (`duplicates=skip`, default) neither enters
nor ages the population: a copy would only crowd out other members with a clone of a function
already there. So a merge changes the search's course: round 11's seed 2 left the trials of the
run without the narrow band at the one layer that band merged, and took a course that missed the
target. `duplicates=trained` feeds a repeat back exactly as its training would have fed it (a
young copy, a trained result for the immigrant streaks): where the repeat would have scored what
the earlier trial scored (training is deterministic per seed; the pair of seed 2 did), the search
follows the trials it would follow with the repeat trained, and a stronger equivalence filter
only saves CPU. Not the default until a paired run of the seeds says so.
"""
from __future__ import annotations

import math
import random
from typing import Any, ClassVar

from opsearch.algorithm import Algorithm, Objectives, Option, scalarize
from opsearch.errors import UserError
from opsearch.plugins.algorithms.generator import GENERATOR_OPTIONS, GraphGenerator
from opsearch.plugins.algorithms.mutation import MUTATION_OPTIONS, GraphMutator
from opsearch.space import Genome

# where a proposal comes from (its `origin`, with ":<mutation kind>" for the two kinds of mutant)
ORIGIN_SOURCES = ("start-new", "start-mutant", "mutant", "immigrant")
AUTO_IMMIGRANTS = 0.2  # the default immigrant rate of a search from scratch
IMMIGRANT_RATE_BOUNDS = (0.02, 0.5)  # where immigrants_adapt keeps the rate (a positive start)
GRADE_OFFSET = 100.0  # a near miss's objectives: grade - GRADE_OFFSET, below any trained score

POPULATION_OPTIONS: dict[str, Option] = {
    "population_size": Option(20, "candidates kept in the aging population (random until full)", int, minimum=2),
    "tournament_size": Option(5, "population members sampled per tournament", int, minimum=1),
    "min_population": Option(None, "members needed before tournaments start (default: "
                             "tournament_size; population_size for an all-random start)", int,
                             minimum=1, allow_none=True),
    "rejected": Option("graded", "rejected/failed candidates: graded (until the population holds "
                       "min_population trained members, the best near misses are parents too), "
                       "skip (never in the population) or worst (enter with -inf objectives)", str,
                       choices=("graded", "skip", "worst")),
    "start_mutation": Option(0.5, "rejected=graded: share of the proposals before min_population that "
                             "mutate a near miss rather than draw a new graph", float,
                             minimum=0.0, maximum=1.0),
    "immigrants": Option(None, "once tournaments run: chance that a trained result starts a streak of "
                         "new graphs from the generator that lasts until the next trained result (random "
                         f"search's exploration inside evolution; default: {AUTO_IMMIGRANTS} from scratch, "
                         "0 when the search is fed the known layers)", float,
                         minimum=0.0, maximum=1.0, allow_none=True),
    "immigrants_adapt": Option(False, "the immigrant rate follows its payoff: doubled (up to "
                               f"{IMMIGRANT_RATE_BOUNDS[1]}) after a trained immigrant that scores at least the "
                               "population's median, halved (down to "
                               f"{IMMIGRANT_RATE_BOUNDS[0]}) after one below it (round 10: no faster than the "
                               "fixed rate, paired by seed; off by default)", bool),
    "duplicates": Option("skip", "candidates that repeat an earlier trial's function: skip (they "
                         "neither enter nor age the population), add (a copy of the earlier "
                         "member enters) or trained (fed back exactly as their training would have "
                         "been: a copy enters and it counts as a trained result for the immigrant "
                         "streaks, so a merge saves CPU without changing the search's course)",
                         str, choices=("skip", "add", "trained")),
}


class AgingEvolution(Algorithm):
    """Population bookkeeping + mutation; subclasses pick the parent from a tournament."""

    OPTIONS: ClassVar[dict[str, Option]] = {**POPULATION_OPTIONS, **MUTATION_OPTIONS, **GENERATOR_OPTIONS}

    def __init__(self, space, num_objectives: int, seed: int = 0, **options: Any):
        super().__init__(space, num_objectives, seed, **options)
        if self.options["tournament_size"] > self.options["population_size"]:
            raise UserError(f"algorithm {self.name!r}: tournament_size ({self.options['tournament_size']}) "
                            f"must be <= population_size ({self.options['population_size']})")
        self.population_size: int = self.options["population_size"]
        self.tournament_size: int = self.options["tournament_size"]
        self.min_population: int = min(self.population_size,
                                       self.options["min_population"] or self.tournament_size)
        self.mutator = GraphMutator.from_options(space, self.options)
        self.generator = GraphGenerator.from_options(space, self.options)
        # ring buffer of (genome, objectives); _oldest is the next slot to overwrite once full
        self.population: list[tuple[Genome, Objectives]] = []
        self._oldest = 0
        self._worst = (float("-inf"),) * num_objectives
        # rejected candidates with a grade, as members whose objectives rank below every trained
        # one (grade - GRADE_OFFSET); only used before the population is ready (a ring buffer)
        self.near_misses: list[tuple[Genome, Objectives]] = []
        self._oldest_miss = 0
        self._seen: set[str] = set()  # canonical hashes of every candidate fed back
        self._track_seen = self.options["avoid_duplicates"] and self.mutator.graph_aware
        self._streak = False  # proposing immigrants until the next trained result
        self._rate: float | None = None  # the immigrant rate now (immigrants_adapt); None: not set yet

    def _propose(self, rng: random.Random) -> Genome:
        if len(self.population) < self.min_population:
            pool = self.population + self.near_misses
            if (self.options["rejected"] != "graded" or len(pool) < self.tournament_size
                    or rng.random() >= self.options["start_mutation"]):
                self.origin = "start-new"
                return self.generator.random_genome(rng, self._seen)
            picks = rng.sample(range(len(pool)), self.tournament_size)
            parent = self.select_parent([pool[i] for i in picks], rng)
            return self._mutant(parent, rng, "start-mutant")
        if self._streak:
            self.origin = "immigrant"
            return self.generator.random_genome(rng, self._seen)
        picks = rng.sample(range(len(self.population)), min(self.tournament_size, len(self.population)))
        tournament = [self.population[i] for i in picks]
        parent = self.select_parent(tournament, rng)
        return self._mutant(parent, rng, "mutant")

    def _mutant(self, parent: Genome, rng: random.Random, source: str) -> Genome:
        """A child of `parent`; its origin says the source and the kind of mutation."""
        child = self.mutator.mutate(parent, rng, self._seen)
        self.origin = f"{source}:{self.mutator.last_kind or 'none'}"
        self.parent = tuple(parent)
        return child

    def immigrant_rate(self) -> float:
        """The rate now: the `immigrants` option (by default: explore from scratch, not around
        known layers), moved by the immigrants' payoff so far when `immigrants_adapt`."""
        if self._rate is not None:
            return self._rate
        rate = self.options["immigrants"]
        if rate is None:
            rate = 0.0 if self.from_known_layers else AUTO_IMMIGRANTS
        return rate

    def _credit_immigrant(self, objectives: Objectives) -> None:
        """A trained immigrant that ranks in the population's upper half (mean objective at least
        the median member's) doubles the rate; one below halves it. Rounds 6-8: once the
        population held normalizers, immigrant streaks took 20-40% of a slow run's CPU and their
        immigrants scored 0.64-0.97 against members at 0.95-0.97; while the population is stuck
        in a poor family, an immigrant that beats it is how the search leaves."""
        rate = self.immigrant_rate()
        if rate <= 0 or not self.options["immigrants_adapt"]:
            return
        means = sorted(m for _, o in self.population if math.isfinite(m := scalarize(o, "mean")))
        if not means:
            return
        median = means[(len(means) - 1) // 2]
        low, high = IMMIGRANT_RATE_BOUNDS
        rate = rate * 2 if scalarize(objectives, "mean") >= median else rate / 2
        self._rate = min(high, max(low, rate))

    def select_parent(self, tournament: list[tuple[Genome, Objectives]], rng: random.Random) -> Genome:
        raise NotImplementedError

    def _feedback_rejected(self, genome: Genome, grade: float | None) -> None:
        if self.options["rejected"] != "graded":
            self._feedback(genome, None)
            return
        self._remember(genome)
        if grade is None or len(self.population) >= self.min_population:
            return
        member = (genome, (float(grade) - GRADE_OFFSET,) * self.num_objectives)
        self._oldest_miss = _ring_push(self.near_misses, self._oldest_miss, member, self.population_size)

    def _feedback_duplicate(self, genome: Genome, objectives: Objectives) -> None:
        if self.options["duplicates"] == "trained":
            self._feedback(genome, objectives)
            return
        self._remember(genome)
        if self.options["duplicates"] == "add":
            self._oldest = _ring_push(self.population, self._oldest, (genome, objectives), self.population_size)

    def _feedback(self, genome: Genome, objectives: Objectives | None) -> None:
        self._remember(genome)
        if objectives is None:
            if self.options["rejected"] == "skip":
                return
            objectives = self._worst
        else:
            self._trained_result(objectives)
        self._oldest = _ring_push(self.population, self._oldest, (genome, objectives), self.population_size)

    def _trained_result(self, objectives: Objectives) -> None:
        """A trained result ends a streak of immigrants (it is the immigrant: its score moves the
        rate) and, once tournaments run, starts one with the rate's probability. Decided here
        from the seed and the feedback, not when proposing, so that `recover` (feedback only)
        rebuilds the same state. With several workers a mutant in flight may be the result that
        ends a streak (and is credited as the immigrant)."""
        if self._streak:
            self._credit_immigrant(objectives)
        self._streak = False
        if len(self.population) + 1 >= self.min_population:
            rng = random.Random(f"{self.seed}:immigrants:{self.num_feedbacks}")
            self._streak = rng.random() < self.immigrant_rate()

    def _remember(self, genome: Genome) -> None:
        """Keep the canonical hash of a genome fed back, so mutation avoids repeating it."""
        if self._track_seen and (key := self.mutator.hash_of(genome)) is not None:
            self._seen.add(key)

    def members(self) -> list[tuple[Genome, Objectives]]:
        """The population, oldest first."""
        return self.population[self._oldest:] + self.population[:self._oldest]


def _ring_push(ring: list, oldest: int, member, size: int) -> int:
    """Append `member` to an aging ring of `size`, or overwrite its oldest; the next oldest index."""
    if len(ring) < size:
        ring.append(member)
        return oldest
    ring[oldest] = member
    return (oldest + 1) % size
