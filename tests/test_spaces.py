"""Built-in search spaces: registered, shaped as the README ("Your own search space, algorithm or filter") says, materialise to LayerGraphs
that contain the paper's layers."""
from __future__ import annotations

import pyglove as pg
import pytest

from opsearch import graph, registry
from opsearch.graph import LayerGraph
from opsearch.ops import OPS, op_names
from opsearch.search_spaces.evonorm import DEFAULT_NUM_NODES


def _decisions(space) -> list:
    """[op hyper-value, inputs hyper-value] per node."""
    return [h for node in space.nodes for h in (node.sym_getattr("op"), node.sym_getattr("inputs"))]


def test_spaces_are_registered():
    assert {"evonorm", "activation", "evonorm_ratio"} <= set(registry.search_spaces.names())


@pytest.mark.parametrize("batch_independent", [False, True])
def test_evonorm_space_shape(batch_independent):
    space = registry.search_spaces.get("evonorm")(batch_independent=batch_independent)
    assert isinstance(space, LayerGraph) and len(space.nodes) == DEFAULT_NUM_NODES
    decisions = _decisions(space)
    assert len(decisions) == 2 * DEFAULT_NUM_NODES
    for i in range(DEFAULT_NUM_NODES):
        op, inputs = decisions[2 * i], decisions[2 * i + 1]
        assert list(op.candidates) == op_names(batch_independent=batch_independent)
        assert inputs.num_choices == 2 and not inputs.choices_distinct and not inputs.choices_sorted
        assert list(inputs.candidates) == list(range(4 + i))
    ops = set(decisions[0].candidates)
    assert any(OPS[o].batch_dependent for o in ops) != batch_independent


def test_num_nodes_option():
    space = registry.search_spaces.get("evonorm")(num_nodes=3)
    assert len(space.nodes) == 3
    with pytest.raises(ValueError):
        registry.search_spaces.get("evonorm")(num_nodes=0)


def test_activation_space_is_element_wise():
    space = registry.search_spaces.get("activation")()
    decisions = _decisions(space)
    assert set(decisions[0].candidates) == set(op_names(elementwise_only=True))
    assert not any(OPS[o].kind == "aggregate" for o in decisions[0].candidates)
    fixed = registry.search_spaces.get("activation")(trainable=False, num_nodes=3)
    inputs = _decisions(fixed)[5]
    assert list(inputs.candidates) == [0, 1, 4, 5]  # x, zero and earlier nodes


@pytest.mark.parametrize("name", ["evonorm", "activation"])
def test_materialisations_are_layer_graphs(name):
    space = registry.search_spaces.get(name)()
    for g in pg.random_sample(space, num_examples=4, seed=3):
        assert isinstance(g, LayerGraph)
        plain = g.as_tuple()
        try:
            graph.validate(plain)
        except ValueError as e:  # InvalidCandidate is a ValueError
            assert type(e).__name__ == "InvalidCandidate"


def _pad_to(plain: tuple, num_nodes: int) -> tuple:
    """Prefix dead nodes so that `plain` ends at node num_nodes - 1, renumbering references."""
    extra = num_nodes - len(plain)
    dead = tuple(("abs", (0, 0)) for _ in range(extra))
    return dead + tuple((op, tuple(j + extra if j >= 4 else j for j in inputs)) for op, inputs in plain)


@pytest.mark.parametrize("layer", ["evonorm_b0", "evonorm_s0", "bn_relu"])
def test_the_paper_layers_are_in_the_evonorm_space(layer):
    space = registry.search_spaces.get("evonorm")()
    target = _pad_to(graph.prune(registry.layers.get(layer)), DEFAULT_NUM_NODES)
    ops = op_names()
    numbers = []
    for op, inputs in target:
        pair = inputs if len(inputs) == 2 else (inputs[0], inputs[0])
        numbers += [ops.index(op), *pair]  # input candidate k is value index k
    dna = pg.DNA.from_numbers(numbers, pg.dna_spec(space))
    found = pg.materialize(space, dna)
    assert graph.canonical_hash(found) == graph.canonical_hash(registry.layers.get(layer))
    if layer == "evonorm_s0":
        assert graph.formula(found) == "x*sigmoid(v0*x) / std_g(x)"


def test_ratio_space_fixes_the_output_to_a_division():
    space = registry.search_spaces.get("evonorm_ratio")(num_nodes=4)
    assert len(space.nodes) == 5 and space.nodes[-1].op == "div"
    assert list(space.nodes[-1].sym_getattr("inputs").candidates) == list(range(8))
    for g in pg.random_sample(space, num_examples=3, seed=1):
        assert isinstance(g, LayerGraph) and g.as_tuple()[-1][0] == "div"
