"""Search algorithms: valid proposals, determinism, exact recovery, selection, mutation, options."""
from __future__ import annotations

import random

import pyglove as pg
import pytest

from opsearch import graph, registry
from opsearch.algorithm import Algorithm, dominates, pareto_front
from opsearch.errors import UserError
from opsearch.graph import LayerGraph, Node
from opsearch.ops import OPS as OPS_TABLE
from opsearch.plugins.algorithms.generator import GraphGenerator
from opsearch.plugins.algorithms.mutation import GraphMutator
from opsearch.plugins.algorithms.pareto_evolution import ParetoEvolution
from opsearch.space import SearchSpace

OPS = ["add", "mul", "div", "max", "neg", "sigmoid", "std_i", "abs"]
BUILTIN = ["random", "regularized_evolution", "pareto_evolution", "nsga2"]
PYGLOVE = ["pyglove:regularized_evolution", "pyglove:hill_climb", "pyglove:nsga2", "pyglove:random"]
SMALL = {"regularized_evolution": {"population_size": 8, "tournament_size": 3},
         "pareto_evolution": {"population_size": 8, "tournament_size": 3},
         "nsga2": {"population_size": 6},
         "pyglove:regularized_evolution": {"population_size": 5, "tournament_size": 2},
         "pyglove:nsga2": {"population_size": 5}}
create_algorithm = registry.algorithms.create  # (name, space, K, seed, **options)


def layer_space(num_nodes: int = 6) -> SearchSpace:
    return SearchSpace(LayerGraph(nodes=[
        Node(op=pg.oneof(OPS), inputs=pg.manyof(2, list(range(4 + i)), distinct=False, sorted=False))
        for i in range(num_nodes)]), name="toy")


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return layer_space()


def toy_objectives(space: SearchSpace, genome) -> tuple[float, float] | None:
    """A real graph signal: live 'mul' nodes and live nodes; invalid graphs are rejected."""
    plain = space.decode(genome)
    if not graph.is_valid(plain):
        return None
    live = graph.live_nodes(plain)
    return float(sum(plain[k][0] == "mul" for k in live)), float(len(live))


def run(algorithm: Algorithm, steps: int, history=None):
    history = [] if history is None else history
    for _ in range(steps):
        genome = algorithm.propose()
        objectives = toy_objectives(algorithm.space, genome)
        algorithm.feedback(genome, objectives)
        history.append((genome, objectives))
    return history


def test_every_registered_algorithm_is_covered():
    assert set(registry.algorithms.names()) >= set(BUILTIN + PYGLOVE)


@pytest.mark.parametrize("name", BUILTIN + PYGLOVE)
def test_proposes_valid_genomes_and_is_deterministic(space, name):
    steps = 12 if name.startswith("pyglove") else 60  # pyglove proposes in ~10 ms each
    options = SMALL.get(name, {})
    a = create_algorithm(name, space, 2, 7, **options)
    b = create_algorithm(name, space, 2, 7, **options)
    history_a = run(a, steps)
    history_b = run(b, steps)
    assert all(space.is_valid(g) for g, _ in history_a)
    assert history_a == history_b
    c = create_algorithm(name, space, 2, 8, **options)
    assert run(c, steps) != history_a


@pytest.mark.parametrize("name", BUILTIN)
def test_recover_gives_the_same_next_proposals_as_live_feedback(space, name):
    # uniform genomes, so that the history holds rejections (the default generator's are valid)
    uniform = {"generator": "uniform"} if "generator" in registry.algorithms.get(name).OPTIONS else {}
    options = {**SMALL.get(name, {}), **uniform}
    live = create_algorithm(name, space, 2, 3, **options)
    history = run(live, 150)
    assert any(o is None for _, o in history) and any(o is not None for _, o in history)
    recovered = create_algorithm(name, space, 2, 3, **options)
    recovered.recover(history)
    assert run(recovered, 20) == run(live, 20)


@pytest.mark.parametrize("name", PYGLOVE)
def test_pyglove_adapter_recovers_and_keeps_proposing(space, name):
    live = create_algorithm(name, space, 2, 3, **SMALL.get(name, {}))
    history = run(live, 12)
    recovered = create_algorithm(name, space, 2, 3, **SMALL.get(name, {}))
    recovered.recover(history)
    assert recovered.num_feedbacks == 12
    assert all(space.is_valid(g) for g, _ in run(recovered, 5))


@pytest.mark.parametrize("name", ["regularized_evolution", "pareto_evolution", "nsga2"])
def test_recover_a_long_history_then_keep_proposing(space, name):
    """Correctness only; the speed (10,000 trials) is measured by benchmarks/hot_paths.py."""
    rng = random.Random(0)
    history = [(space.random_genome(rng), (rng.random(), rng.random()) if rng.random() < 0.6 else None)
               for _ in range(2_000)]
    algorithm = create_algorithm(name, space, 2, 0)
    algorithm.recover(history)
    assert algorithm.num_feedbacks == len(history)
    for _ in range(10):
        genome = algorithm.propose()
        assert space.is_valid(genome)
        algorithm.feedback(genome, (0.5, 0.5))


@pytest.mark.parametrize("name", ["regularized_evolution", "pareto_evolution", "nsga2"])
def test_evolution_beats_random_search_on_a_toy_objective(space, name):
    def best_mul(algorithm_name, seed):
        a = create_algorithm(algorithm_name, space, 2, seed, **SMALL.get(algorithm_name, {}))
        return max((o[0] for _, o in run(a, 300) if o is not None), default=0.0)

    evolved = sorted(best_mul(name, seed) for seed in range(3))
    randomly = sorted(best_mul("random", seed) for seed in range(3))
    assert evolved[1] > randomly[1]


# ---------------------------------------------------------------------- selection


def test_pareto_front_and_domination():
    assert dominates((1, 2), (1, 1)) and not dominates((1, 1), (1, 1)) and not dominates((2, 0), (0, 2))
    points = [(1, 1), (2, 0), (0, 2), (0.5, 0.5), (2, 0), (1, 0.5)]
    assert pareto_front(points) == [0, 1, 2, 4]
    assert pareto_front([(3.0,), (1.0,), (3.0,)]) == [0, 2]


def test_pareto_evolution_draws_parents_from_the_tournament_front(space):
    algorithm = ParetoEvolution(space, 2, seed=0, population_size=4, tournament_size=4)
    genomes = [space.random_genome(random.Random(i)) for i in range(4)]
    tournament = list(zip(genomes, [(1.0, 1.0), (2.0, 0.0), (0.5, 0.5), (0.0, 2.0)]))
    rng = random.Random(0)
    picked = {algorithm.select_parent(tournament, rng) for _ in range(200)}
    assert picked == {genomes[0], genomes[1], genomes[3]}


def test_regularized_evolution_scalarization_and_rejected_policy(space):
    genomes = [space.random_genome(random.Random(i)) for i in range(2)]
    tournament = list(zip(genomes, [(0.9, 0.0), (0.4, 0.4)]))
    by_mean = create_algorithm("regularized_evolution", space, 2, population_size=2, tournament_size=2)
    by_min = create_algorithm("regularized_evolution", space, 2, population_size=2, tournament_size=2,
                              scalarization="min")
    assert by_mean.select_parent(tournament, random.Random(0)) == genomes[0]
    assert by_min.select_parent(tournament, random.Random(0)) == genomes[1]
    skip = create_algorithm("regularized_evolution", space, 1, population_size=2, tournament_size=1)
    worst = create_algorithm("regularized_evolution", space, 1, population_size=2, tournament_size=1,
                             rejected="worst")
    for algorithm in (skip, worst):
        algorithm.feedback(genomes[0], None)
    assert skip.population == [] and worst.population == [(genomes[0], (float("-inf"),))]


def test_aging_population_drops_the_oldest(space):
    algorithm = create_algorithm("regularized_evolution", space, 1, population_size=3, tournament_size=2)
    genomes = [space.random_genome(random.Random(i)) for i in range(5)]
    for i, genome in enumerate(genomes):
        algorithm.feedback(genome, (float(i),))
    assert [g for g, _ in algorithm.members()] == genomes[2:]


# ---------------------------------------------------------------------- mutation


EDITS_ONLY = {"mutate_insert": 0.0, "mutate_delete": 0.0, "mutate_self": 0.0}  # mutants differ in one node's genes


def _only(kind):
    weights = {k: 0.0 for k in ("mutate_op", "mutate_input", "mutate_node", "mutate_insert", "mutate_delete",
                                "mutate_self")}
    return {**weights, f"mutate_{kind}": 1.0}


def test_mutation_only_touches_what_the_output_reads(space):
    mutator = GraphMutator(space, **EDITS_ONLY)
    rng = random.Random(0)
    functional_changes = 0
    for _ in range(300):
        parent = space.random_genome(rng)
        plain = space.decode(parent)
        live = graph.live_nodes(plain)
        child = mutator.mutate(parent, rng)
        changed = [g for g in range(space.num_genes) if child[g] != parent[g]]
        assert changed, "a mutation must change the genome"
        for gene in changed:
            node = space.node_of_gene[gene]
            assert node in live
            position = space.input_position[gene]
            op_kept = space.decode(child)[node][0] == plain[node][0]
            if position is not None and op_kept:  # an input change alone: the op must read it
                assert position < OPS_TABLE[plain[node][0]].arity
        functional_changes += graph.canonical_hash(space.decode(child)) != graph.canonical_hash(plain)
    assert functional_changes >= 290  # retries avoid commutative swaps and other no-ops


def test_mutation_kinds_follow_their_weights(space):
    rng = random.Random(1)
    op_only, input_only = GraphMutator(space, **_only("op")), GraphMutator(space, **_only("input"))
    for _ in range(100):
        parent = space.random_genome(rng)
        for mutator, field in ((op_only, "op"), (input_only, "inputs")):
            child = mutator.mutate(parent, rng)
            assert {space.gene_field[g] for g in range(space.num_genes) if child[g] != parent[g]} == {field}


def _live_size(space, genome):
    return len(graph.prune(space.decode(genome)))


def test_insert_adds_one_live_node_and_delete_removes_at_least_one(space):
    grow, shrink = GraphMutator(space, **_only("insert")), GraphMutator(space, **_only("delete"))
    rng = random.Random(3)
    grown = shrunk = 0
    for _ in range(200):
        parent = GraphGenerator(space).random_genome(rng)
        size = _live_size(space, parent)
        child = grow.mutate(parent, rng)
        if child != parent:
            assert graph.is_valid(space.decode(child))
            assert _live_size(space, child) == size + 1
            grown += 1
        child = shrink.mutate(parent, rng)
        if child != parent:
            assert graph.is_valid(space.decode(child))
            assert _live_size(space, child) < size
            shrunk += 1
    assert grown >= 190 and shrunk >= 100  # generated graphs are small: there is room to grow


def test_one_insertion_turns_a_normalizer_into_a_normalizer_with_relu_and_one_deletion_back():
    """The step edits in place could not take from scratch: x / std_b(x) -> max(x / std_b(x), 0)."""
    space = SearchSpace.from_name("evonorm")
    b = graph.GraphBuilder()
    b.div(b.x, b.std_b(b.x))
    parent = space.encode(b.plain())
    b.max(len(b.nodes) + graph.NUM_INITIAL - 1, b.zero)
    target = graph.canonical_hash(b.plain())
    grow = GraphMutator(space, avoid_duplicates=False, **_only("insert"))
    rng = random.Random(0)
    children = [grow.mutate(parent, rng) for _ in range(3000)]
    found = [c for c in children if graph.canonical_hash(space.decode(c)) == target]
    assert found
    shrink = GraphMutator(space, avoid_duplicates=False, **_only("delete"))
    back = {graph.canonical_hash(space.decode(shrink.mutate(found[0], rng))) for _ in range(50)}
    assert graph.canonical_hash(space.decode(parent)) in back


def test_self_insertion_adds_a_value_combined_with_a_function_of_itself(space):
    """`u -> c` becomes `u -> op(u, f(u)) -> c`: two new live nodes, the unary one reads u only."""
    grow = GraphMutator(space, **_only("self"))
    rng = random.Random(5)
    grown = 0
    for _ in range(200):
        parent = GraphGenerator(space).random_genome(rng)
        child = grow.mutate(parent, rng)
        if child == parent:
            continue
        grown += 1
        before, after = graph.prune(space.decode(parent)), graph.prune(space.decode(child))
        assert graph.is_valid(space.decode(child)) and len(after) == len(before) + 2
        pairs = [(j, node) for j, node in enumerate(after) if OPS_TABLE[node[0]].arity == 2
                 and any(v >= graph.NUM_INITIAL and OPS_TABLE[after[v - graph.NUM_INITIAL][0]].arity == 1
                         and after[v - graph.NUM_INITIAL][1] == (w,) for v in node[1] for w in node[1] if w != v)]
        assert pairs, (before, after)
    assert grown >= 150


def _formula_graph(build):
    b = graph.GraphBuilder()
    build(b)
    return b.plain()


def test_one_self_insertion_normalizes_an_elementwise_layer_where_one_plain_insertion_cannot():
    """From `sqrt(x)`, the first kind of layer that trains from scratch, to a normalizer of it in one
    step: `sqrt(x) / std_b(sqrt(x))` (output edge) and `sqrt(x / std_b(x))` (input edge)."""
    space = SearchSpace.from_name("evonorm")
    parent = space.encode(_formula_graph(lambda b: b.sqrt(b.x)))

    def sqrt_then_norm(b):
        s = b.sqrt(b.x)
        b.div(s, b.std_b(s))

    def norm_then_sqrt(b):
        b.sqrt(b.div(b.x, b.std_b(b.x)))

    targets = {graph.canonical_hash(_formula_graph(f)) for f in (sqrt_then_norm, norm_then_sqrt)}
    rng = random.Random(0)
    for kind, reached in (("self", True), ("insert", False)):
        mutator = GraphMutator(space, avoid_duplicates=False, **_only(kind))
        hashes = {graph.canonical_hash(space.decode(mutator.mutate(parent, rng))) for _ in range(3000)}
        assert (targets <= hashes) is reached, kind


def test_a_space_that_cannot_encode_gets_no_size_mutations():
    constrained = SearchSpace(graph.LayerGraph(nodes=[
        graph.Node(op=pg.oneof(["add", "mul"]), inputs=pg.manyof(2, [0, 1, 2, 3], distinct=True)),
        graph.Node(op=pg.oneof(["add", "mul"]), inputs=pg.manyof(2, [0, 1, 2, 3, 4], distinct=True)),
    ]))
    assert not constrained.can_encode
    assert GraphMutator(constrained).size_weights == (0.0, 0.0, 0.0)
    with pytest.raises(UserError, match="cannot rebuild"):
        GraphMutator(constrained, **_only("insert"))


def test_mutation_of_a_plain_space_changes_one_gene():
    flat = SearchSpace(pg.Dict(a=pg.oneof([1, 2, 3]), b=pg.oneof(["x", "y"])))
    mutator = GraphMutator(flat)
    rng = random.Random(0)
    for _ in range(50):
        parent = flat.random_genome(rng)
        child = mutator.mutate(parent, rng)
        assert sum(x != y for x, y in zip(parent, child)) == 1


# ---------------------------------------------------------------------- options and errors


def test_unknown_option_lists_the_accepted_ones(space):
    with pytest.raises(UserError, match=r"unknown option 'populaton_size' \(did you mean 'population_size'\?\); known: .*population_size"):
        create_algorithm("regularized_evolution", space, 2, populaton_size=10)
    with pytest.raises(UserError, match="known: avoid_duplicates, generator, init_nodes"):
        create_algorithm("random", space, 2, population_size=10)


def test_options_are_coerced_and_validated(space):
    a = create_algorithm("regularized_evolution", space, 2, population_size="12", tournament_size=4.0,
                         live_only="false")
    assert a.options["population_size"] == 12 and a.options["tournament_size"] == 4
    assert a.options["live_only"] is False
    nsga = create_algorithm("nsga2", space, 2, mutation_prob="none", crossover_prob="0.5")
    assert nsga.options["mutation_prob"] is None and nsga.options["crossover_prob"] == 0.5
    for bad in ({"population_size": "ten"}, {"population_size": 1}, {"scalarization": "median"},
                {"population_size": 4, "tournament_size": 5}, {"mutate_op": -1.0}):
        with pytest.raises(UserError):
            create_algorithm("regularized_evolution", space, 2, **bad)
    assert registry.algorithms.options("nsga2")["population_size"] == 20


def test_feedback_rejects_foreign_genomes_and_wrong_objective_counts(space):
    a = create_algorithm("regularized_evolution", space, 2)
    with pytest.raises(UserError, match="does not fit"):
        a.feedback((0, 1, 2), (1.0, 1.0))
    with pytest.raises(UserError, match="expects 2 objective"):
        a.feedback(a.propose(), (1.0,))
    genome = a.propose()
    a.feedback(genome, (float("nan"), 1.0))  # unrankable: counts as a rejection
    assert a.num_rejected == 1 and a.population == []


def test_nsga2_fast_sampling_proposes_what_optuna_study_ask_would():
    """nsga2 calls NSGAIISampler's sampling steps directly; Optuna's own study.ask on the same
    generation study, with the same RNG seeds, must give the same parameters, through several
    generations, rejections included, and with a single-choice gene (sampled independently)."""
    space = SearchSpace(LayerGraph(nodes=[
        Node(op=pg.oneof(OPS), inputs=pg.manyof(2, list(range(4 + i)), distinct=False, sorted=False))
        for i in range(4)] + [Node(op=pg.oneof(["mul"]), inputs=[0, 7])]), name="toy1")
    assert 1 in space.gene_sizes
    fast = create_algorithm("nsga2", space, 2, 5, population_size=6)
    slow = create_algorithm("nsga2", space, 2, 5, population_size=6)
    compared = 0
    for step in range(200):
        rng_fast = random.Random(f"check:{step}")
        rng_slow = random.Random(f"check:{step}")
        study, sampler = fast._study_for_generation()
        sampler._rng.rng.seed(rng_fast.getrandbits(32))
        sampler._random_sampler._rng.rng.seed(rng_fast.getrandbits(32))
        assert fast._sample(study, sampler) == slow._ask_via_study(rng_slow)
        compared += 1
        genome = fast.propose()
        assert slow.propose() == genome
        objectives = toy_objectives(space, genome)
        fast.feedback(genome, objectives)
        slow.feedback(genome, objectives)
    assert fast.generation >= 3 and compared == 200


# ---------------------------------------------------------------------- the generator


def test_generator_proposes_valid_graphs_small_first():
    from opsearch.plugins.algorithms.generator import GraphGenerator, live_size

    space = layer_space(8)
    rng = random.Random(0)
    uniform = [space.random_genome(rng) for _ in range(300)]
    generated = [GraphGenerator(space, init_nodes=3).random_genome(rng) for _ in range(300)]
    sizes = [live_size(space, g) for g in generated]
    assert all(s is not None for s in sizes)  # every one depends on x
    assert sum(live_size(space, g) is None for g in uniform) > 60  # where uniform draws do not
    assert max(sizes) <= 3 and set(sizes) == {1, 2, 3}  # ramped: every size up to init_nodes


def test_duplicates_neither_enter_nor_age_the_population(space):
    evo = create_algorithm("regularized_evolution", space, 2, 0, population_size=4, tournament_size=2)
    members = []
    rng = random.Random(1)
    while len(members) < 4:
        g = space.random_genome(rng)
        if toy_objectives(space, g) is not None:
            evo.feedback(g, toy_objectives(space, g))
            members.append(g)
    before = evo.members()
    evo.feedback(members[0], toy_objectives(space, members[0]), duplicate=True)
    assert evo.members() == before
    added = create_algorithm("regularized_evolution", space, 2, 0, population_size=4, tournament_size=2,
                             duplicates="add")
    for g in members:
        added.feedback(g, toy_objectives(space, g))
    added.feedback(members[0], toy_objectives(space, members[0]), duplicate=True)
    assert [g for g, _ in added.members()] == members[1:] + members[:1]


def test_duplicates_trained_leave_the_search_where_training_the_repeat_would(space):
    """duplicates=trained: a merged repeat must teach the algorithm exactly what training it would
    have (members, immigrant streak, every later proposal), so that a merge only saves CPU."""
    def run(seed: int, duplicate: bool, mode: str) -> list:
        evo = create_algorithm("regularized_evolution", space, 1, seed, population_size=6,
                               tournament_size=2, immigrants=0.5, duplicates=mode)
        rng = random.Random(seed)
        trained, trace = [], []
        for step in range(60):
            if step % 4 == 3 and trained:  # a repeat of an earlier trained layer comes back
                g, objectives = rng.choice(trained)
                evo.feedback(g, objectives, duplicate=duplicate)
                continue
            g = evo.propose()
            trace.append(g)
            objectives = toy_objectives(space, g)
            evo.feedback(g, None if objectives is None else objectives[:1])
            if objectives is not None:
                trained.append((g, objectives[:1]))
        return trace + [g for g, _ in evo.members()]

    for seed in range(4):
        as_trained = run(seed, False, "trained")
        assert run(seed, True, "trained") == as_trained
    assert any(run(seed, True, "skip") != run(seed, False, "skip") for seed in range(4))


def _is_mutation(space, child, members) -> bool:
    """Whether `child` differs from some member in the genes of exactly one node."""
    return any(len({space.node_of_gene[i] for i, (a, b) in enumerate(zip(m, child)) if a != b}) == 1
               for m, _ in members)


def _small_evolution(space, members, **options):
    """A 4-member regularized evolution (tournaments of 2) fed `members`, each trained at 0.5."""
    evo = create_algorithm("regularized_evolution", space, 2, 0, population_size=4, tournament_size=2,
                           **EDITS_ONLY, **options)
    for g in members:
        evo.feedback(g, (0.5, 0.5))
    return evo


def test_immigrants_explore_until_one_of_them_trains(space):
    """Once tournaments run, a streak of new graphs lasts while they are rejected and ends when
    one is trained; with immigrants=0 every proposal is a mutation."""
    rng = random.Random(7)
    members = [space.random_genome(rng) for _ in range(4)]
    plain = _small_evolution(space, members, immigrants=0.0)
    assert all(_is_mutation(space, plain.propose(), plain.members()) for _ in range(20))

    evo = _small_evolution(space, members, immigrants=0.3, immigrants_adapt=False)
    kinds = []
    rejected_immigrants = 0
    for _ in range(60):
        child = evo.propose()
        immigrant = not _is_mutation(space, child, evo.members())
        kinds.append("I" if immigrant else "M")
        if immigrant and rejected_immigrants < 3:
            rejected_immigrants += 1
            evo.feedback(child, None)  # rejected: the streak goes on
        else:
            evo.feedback(child, (0.4, 0.4))  # trained: a trained immigrant ends the streak
    text = "".join(kinds)
    assert "IIII" in text, text  # three rejected immigrants, then the one that trained
    first = text.index("I")
    assert text[first:first + 4] == "IIII", text
    assert "M" in text[first + 4:], text  # mutations again after the streak
    assert 0.05 < text.count("I") / len(text) < 0.8, text


def test_an_immigrant_streak_starts_per_trained_result_not_per_proposal(space):
    """From scratch a mutant trains about one time in ten and a new graph one time in hundreds.
    Streaks drawn per proposal (rounds 2-4) left mutation a sliver of the search; drawn per
    trained result, most proposals stay mutations of the population."""
    rng = random.Random(5)
    members = [space.random_genome(rng) for _ in range(4)]
    evo = _small_evolution(space, members, immigrants=0.2, immigrants_adapt=False)
    mutants = immigrants = streaks = trained = 0
    previous = "M"
    for _ in range(600):
        child = evo.propose()
        kind = "M" if _is_mutation(space, child, evo.members()) else "I"
        streaks += kind == "I" and previous == "M"
        previous = kind
        if kind == "M":
            mutants += 1
            train = mutants % 10 == 0
        else:
            immigrants += 1
            train = immigrants % 20 == 0
        trained += train
        evo.feedback(child, (0.4, 0.4) if train else None)
    assert streaks >= 1
    assert streaks <= 0.5 * trained, (streaks, trained)  # 0.2 per trained result, not per proposal
    assert immigrants / 600 < 0.5, immigrants  # per proposal, about 0.8 of them were immigrants


def test_new_graphs_skip_graphs_already_seen(space):
    """Given the hashes of graphs already evaluated, the generator proposes others: a long
    search otherwise drew the same one-node layers about a thousand times each."""
    evonorm = SearchSpace.from_name("evonorm")
    generator = GraphGenerator(evonorm, init_nodes=2)
    rng = random.Random(2)
    seen: set[str] = set()
    repeats = 0
    for _ in range(150):
        h = graph.canonical_hash(evonorm.decode(generator.random_genome(rng, seen)))
        repeats += h in seen
        seen.add(h)
    assert repeats == 0
    blind = [graph.canonical_hash(evonorm.decode(generator.random_genome(rng))) for _ in range(150)]
    assert len(set(blind)) < 120  # without `seen` the one-node layers come back


def test_random_search_does_not_draw_a_graph_again():
    """Random search without replacement: a graph fed back is not proposed again (round 4: 80% of
    a run's proposals repeated one, for about 30% of its CPU)."""
    evonorm = SearchSpace.from_name("evonorm")

    def repeats(**options) -> int:
        algo = create_algorithm("random", evonorm, 1, 0, init_nodes=2, **options)
        hashes = set()
        count = 0
        for _ in range(150):
            genome = algo.propose()
            h = graph.canonical_hash(evonorm.decode(genome))
            count += h in hashes
            hashes.add(h)
            algo.feedback(genome, None)
        return count

    assert repeats() == 0
    assert repeats(avoid_duplicates=False) > 20


def test_graded_start_climbs_from_the_best_near_miss(space):
    """Before any layer trains, proposals mutate the rejected candidate that got furthest."""
    rng = random.Random(4)
    rejected = []
    while len(rejected) < 4:
        g = space.random_genome(rng)
        if toy_objectives(space, g) is not None:
            rejected.append(g)
    grades = [0.1, 2.5, 1.0, 0.2]
    evo = create_algorithm("regularized_evolution", space, 2, 0, population_size=4, tournament_size=4,
                           start_mutation=1.0, **EDITS_ONLY)
    for g, grade in zip(rejected, grades):
        evo.feedback(g, None, grade=grade)
    for _ in range(5):
        child = evo.propose()
        changed = {space.node_of_gene[i] for i, (a, b) in enumerate(zip(rejected[1], child)) if a != b}
        assert len(changed) == 1, "a one-node mutation of the 2.5 near miss"
    skip = create_algorithm("regularized_evolution", space, 2, 0, population_size=4, tournament_size=4,
                            rejected="skip", **EDITS_ONLY)
    for g, grade in zip(rejected, grades):
        skip.feedback(g, None, grade=grade)
    children = [skip.propose() for _ in range(5)]
    assert not all(len({space.node_of_gene[i] for i, (a, b) in enumerate(zip(rejected[1], c)) if a != b}) == 1
                   for c in children)


def test_immigrants_default_explores_from_scratch_not_around_known_layers(space):
    """Unset, the immigrant rate is 0.2 from scratch and 0 when the engine feeds the known layers
    first (a budget that counts candidates would go to rejected random graphs); set, it is kept."""
    rng = random.Random(3)
    members = [space.random_genome(rng) for _ in range(4)]

    def immigrant_share(from_known_layers: bool, **options) -> float:
        evo = create_algorithm("regularized_evolution", space, 2, 0, population_size=4,
                               tournament_size=2, immigrants_adapt=False, **EDITS_ONLY, **options)
        evo.from_known_layers = from_known_layers
        for g in members:
            evo.feedback(g, (0.5, 0.5))
        kinds = []
        for _ in range(200):
            child = evo.propose()
            kinds.append(not _is_mutation(space, child, evo.members()))
            evo.feedback(child, (0.4, 0.4))  # every immigrant trains: a streak is one proposal
        return sum(kinds) / len(kinds)

    assert 0.1 < immigrant_share(False) < 0.3
    assert immigrant_share(True) == 0.0
    assert 0.1 < immigrant_share(True, immigrants=0.2) < 0.3
    assert immigrant_share(False, immigrants=0.0) == 0.0


def _run_with_immigrants_scoring(space, members, immigrant_score: float, steps: int = 300, **options):
    """A small evolution whose members and mutants train at 0.5 and whose immigrants train at
    `immigrant_score`; returns the algorithm, the fed history and the share of immigrants in
    the second half of the proposals."""
    evo = _small_evolution(space, members, immigrants=0.2, **{"immigrants_adapt": True, **options})
    history = [(g, (0.5, 0.5)) for g in members]
    late = []
    for i in range(steps):
        child = evo.propose()
        immigrant = not _is_mutation(space, child, evo.members())
        objectives = (immigrant_score,) * 2 if immigrant else (0.5, 0.5)
        evo.feedback(child, objectives)
        history.append((child, objectives))
        if i >= steps // 2:
            late.append(immigrant)
    return evo, history, sum(late) / len(late)


def test_the_immigrant_rate_follows_the_immigrants_payoff(space):
    """Immigrants that train below the population's median halve the rate (down to 0.02): once
    the population holds a family of good layers, the CPU goes back to its mutants. Immigrants
    that beat it double the rate (up to 0.5): a population stuck in a poor family takes more of
    them. With immigrants_adapt=false (the default) the rate stays what was asked."""
    rng = random.Random(11)
    members = [space.random_genome(rng) for _ in range(4)]
    poor, poor_history, poor_share = _run_with_immigrants_scoring(space, members, 0.1)
    good, _, good_share = _run_with_immigrants_scoring(space, members, 0.9)
    fixed, _, fixed_share = _run_with_immigrants_scoring(space, members, 0.1, immigrants_adapt=False)
    assert create_algorithm("regularized_evolution", space, 2, 0).options["immigrants_adapt"] is False
    assert poor.immigrant_rate() == pytest.approx(0.02)
    assert good.immigrant_rate() == pytest.approx(0.5)
    assert fixed.immigrant_rate() == pytest.approx(0.2)
    assert poor_share < 0.06 < 0.12 < fixed_share < 0.3 < good_share, (poor_share, fixed_share, good_share)

    # recover (feedback only, as after a restart) rebuilds the same rate and the same next proposal
    again = create_algorithm("regularized_evolution", space, 2, 0, population_size=4, tournament_size=2,
                             immigrants=0.2, immigrants_adapt=True, **EDITS_ONLY)
    again.recover(poor_history)
    assert again.immigrant_rate() == poor.immigrant_rate()
    assert again.propose() == poor.propose()


def test_known_layers_get_no_immigrants_however_good_they_would_be(space):
    """The mode with known layers starts at rate 0 and stays there: adaptation only moves a
    positive rate."""
    rng = random.Random(12)
    members = [space.random_genome(rng) for _ in range(4)]
    evo = create_algorithm("regularized_evolution", space, 2, 0, population_size=4, tournament_size=2,
                           immigrants_adapt=True, **EDITS_ONLY)
    evo.from_known_layers = True
    for g in members:
        evo.feedback(g, (0.5, 0.5))
    for _ in range(100):
        child = evo.propose()
        assert _is_mutation(space, child, evo.members())
        evo.feedback(child, (0.9, 0.9))
    assert evo.immigrant_rate() == 0.0


def test_the_engine_tells_the_algorithm_whether_it_feeds_known_layers(tmp_path):
    from opsearch.config import SearchConfig
    from opsearch.engine import Setup

    for seeded in (True, False):
        cfg = SearchConfig(name="flag", storage=f"sqlite:///{tmp_path}/s.db", dataset="synthetic",
                           seed_with_baselines=seeded, rerank={"enabled": False})
        assert Setup.from_config(cfg).new_algorithm(0).from_known_layers is seeded
