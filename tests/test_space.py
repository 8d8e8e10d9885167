"""SearchSpace: the flat genome view must agree with pyglove exactly, and be fast."""
from __future__ import annotations

import random

import pyglove as pg
import pytest

from opsearch import registry
from opsearch.errors import UserError
from opsearch.graph import LayerGraph, Node
from opsearch.space import SearchSpace

OPS = ["add", "mul", "div", "max", "neg", "sigmoid", "std_b", "std_i", "mean_g"]


def evonorm_like(num_nodes: int = 5, ops=OPS) -> LayerGraph:
    return LayerGraph(nodes=[
        Node(op=pg.oneof(ops), inputs=pg.manyof(2, list(range(4 + i)), distinct=False, sorted=False))
        for i in range(num_nodes)])


def mixed_shapes() -> LayerGraph:
    """Constant ops, constant inputs, per-input oneofs, a oneof over input lists, a sorted distinct manyof."""
    return LayerGraph(nodes=[
        Node(op=pg.oneof(["add", "mul"]), inputs=pg.manyof(2, [0, 1, 2, 3], distinct=True, sorted=True)),
        Node(op="max", inputs=[0, pg.oneof([1, 4])]),
        Node(op=pg.oneof(["sigmoid", "neg", "abs"]), inputs=pg.oneof([[4, 5], [5, 0]])),
        Node(op="mul", inputs=pg.manyof(2, [0, 5, 6], distinct=True, sorted=False)),
    ])


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace(evonorm_like(), name="test")


def test_genes_follow_pyglove_decision_points(space):
    # one gene per oneof, one per manyof pick; sizes = number of candidates
    assert space.num_genes == 15
    assert space.gene_sizes[:6] == (9, 4, 4, 9, 5, 5)
    assert space.node_of_gene == tuple(k for k in range(5) for _ in range(3))
    assert space.gene_field[:3] == ("op", "inputs", "inputs")
    assert space.input_position[:3] == (None, 0, 1)
    assert space.genes_of_node[2] == (6, 7, 8)
    assert space.has_fast_decode and space.is_layer_graph and space.num_nodes == 5


@pytest.mark.parametrize("hyper", [evonorm_like, mixed_shapes], ids=["evonorm_like", "mixed"])
def test_decode_equals_pyglove_materialize(hyper):
    hv = hyper()
    s = SearchSpace(hv)
    assert s.has_fast_decode
    rng = random.Random(0)
    for _ in range(12):
        genome = s.random_genome(rng)
        assert s.is_valid(genome)
        dna = s.to_dna(genome)
        assert dna == pg.DNA.from_numbers(list(genome), s.dna_spec)
        assert s.decode(genome) == pg.materialize(hv, dna).as_tuple()
        assert s.from_dna(dna) == genome


def test_constrained_manyof_sampling_and_mutation_keep_constraints():
    s = SearchSpace(mixed_shapes())
    distinct_sorted = s.groups[1]
    assert distinct_sorted.distinct and distinct_sorted.sorted
    rng = random.Random(1)
    for _ in range(200):
        genome = s.random_genome(rng)
        picks = genome[distinct_sorted.start:distinct_sorted.start + 2]
        assert picks[0] < picks[1]
        for gene in range(s.num_genes):
            genes = list(genome)
            changed = s.resample_gene(genes, gene, rng)
            assert s.is_valid(genes)
            assert changed == (tuple(genes) != genome)
        genes = list(genome)
        s.redraw_genes(genes, range(s.num_genes), rng)
        assert s.is_valid(genes)
    # clamped into range, distinct picks de-duplicated, sorted picks sorted
    assert s.repair([5, 3, 3, 0, 0, 2, 2, 2]) == (1, 0, 3, 0, 0, 1, 2, 0)
    assert not s.is_valid((0, 3, 1, 0, 0, 0, 1, 2))  # unsorted picks
    assert not s.is_valid((0, 1, 3, 0, 0, 0, 1, 1))  # repeated distinct picks


def test_non_layer_graph_space_uses_pyglove_fallback():
    hv = pg.Dict(width=pg.oneof([8, 16, 32]), acts=pg.manyof(2, ["relu", "gelu", "silu"]))
    s = SearchSpace(hv)
    assert not s.is_layer_graph and not s.has_fast_decode
    assert s.node_of_gene == (None, None, None)
    assert s.decode((2, 1, 0)) == pg.Dict(width=32, acts=["gelu", "relu"])


def test_layer_spaces_take_the_fast_path(space):
    """Correctness only; the speed is measured by benchmarks/hot_paths.py."""
    assert space.has_fast_decode
    rng = random.Random(0)
    genome = space.random_genome(rng)  # (decode == materialize: test_decode_equals_pyglove_materialize)
    assert space.decode(genome) == space.materialize(genome).as_tuple()


@pytest.mark.parametrize("hyper, message", [
    (lambda: pg.Dict(a=pg.floatv(0.0, 1.0)), "float decisions"),
    (lambda: pg.oneof([pg.Dict(x=pg.oneof([1, 2])), 3]), "conditional"),
    (lambda: 42, "not a pyglove symbolic value"),
])
def test_unsupported_spaces_raise_user_error(hyper, message):
    with pytest.raises(UserError, match=message):
        SearchSpace(hyper())


def test_genome_checks_and_json(space):
    genome = space.random_genome(random.Random(3))
    assert space.genome_from_json(space.genome_to_json(genome)) == genome
    with pytest.raises(UserError, match="does not fit"):
        space.check_genome(genome[:-1])
    with pytest.raises(UserError, match="does not fit"):
        space.check_genome((99,) + genome[1:])
    with pytest.raises(UserError, match="not JSON"):
        space.genome_from_json("[1, 2")


@pytest.fixture
def registered():
    """Register throw-away search spaces; removed afterwards so `opsearch list` stays clean."""
    names = []

    def add(name, fn):
        registry.search_spaces.add(name, fn, replace=True)
        names.append(name)

    yield add
    for name in names:
        registry.search_spaces.unregister(name)


def test_from_name_builds_registered_spaces(registered):
    registered("_test_small", lambda num_nodes=3: evonorm_like(num_nodes))
    s = SearchSpace.from_name("_test_small", num_nodes=2)
    assert s.name == "_test_small" and s.num_nodes == 2 and s.has_fast_decode


def test_from_name_rejects_bad_spaces_and_options(registered):
    registered("_test_small", lambda num_nodes=3: evonorm_like(num_nodes))
    registered("_test_int", lambda: 7)
    registered("_test_dict", lambda: pg.Dict(a=pg.oneof([1, 2])))
    with pytest.raises(UserError, match="unknown option .width.; known: num_nodes"):
        SearchSpace.from_name("_test_small", width=3)
    with pytest.raises(UserError, match="not a pyglove symbolic value"):
        SearchSpace.from_name("_test_int")
    with pytest.raises(UserError, match="not a LayerGraph"):
        SearchSpace.from_name("_test_dict")
    with pytest.raises(UserError, match="unknown search space"):
        SearchSpace.from_name("_test_no_such_space")


def test_builtin_evonorm_space_decodes_like_pyglove():
    s = SearchSpace.from_name("evonorm", num_nodes=4)
    rng = random.Random(5)
    for _ in range(5):
        genome = s.random_genome(rng)
        assert s.decode(genome) == s.materialize(genome).as_tuple()


def test_encode_writes_known_layers_in_the_space():
    """encode(graph) decodes to the same function (canonical hash); None where it cannot."""
    from opsearch import graph as graph_mod
    from opsearch import layers

    space = SearchSpace.from_name("evonorm")
    for name in ("bn_relu", "evonorm_b0", "evonorm_s0", "gn_relu", "identity"):
        g = layers.get_graph(name)
        genome = space.encode(g)
        assert genome is not None, name
        assert graph_mod.canonical_hash(space.decode(genome)) == graph_mod.canonical_hash(g)
    no_batch = SearchSpace.from_name("evonorm", batch_independent=True)
    assert no_batch.encode(layers.get_graph("evonorm_b0")) is None  # needs std_b
    small = SearchSpace.from_name("evonorm", num_nodes=2)
    assert small.encode(layers.get_graph("bn_relu")) is None  # too many nodes
