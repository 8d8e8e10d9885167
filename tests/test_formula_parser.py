"""Reading a layer back from its formula: the printer's inverse, and one-line errors otherwise."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from opsearch import graph, layers
from opsearch.errors import InvalidCandidate, UserError
from opsearch.formula_parser import FormulaError, parse_formula, parse_formula_plain
from opsearch.ops import op_names
from plugins.rejection import _probes


def random_plain(rng: random.Random, num_nodes: int) -> tuple:
    """A graph drawn like the evonorm space does: each node an op and two earlier values."""
    ops = op_names()
    return tuple((rng.choice(ops), (rng.randrange(4 + i), rng.randrange(4 + i))) for i in range(num_nodes))


plain_graphs = st.integers(0, 2**32 - 1).map(
    lambda seed: random_plain(random.Random(seed), random.Random(seed ^ 0x5EED).randint(1, 14)))


@settings(max_examples=300, deadline=None)
@given(plain_graphs)
def test_a_formula_reads_back_as_a_graph_that_prints_the_same(g):
    text = graph.formula(g)
    assert graph.formula(parse_formula_plain(text)) == text


@settings(max_examples=60, deadline=None)
@given(plain_graphs)
def test_a_formula_reads_back_as_the_same_function(g):
    """Same outputs on the same probe, trainable vectors at their initial values and perturbed."""
    assume(graph.is_valid(g))
    parsed = parse_formula_plain(graph.formula(g))
    x = _probes.probe_input((4, 8, 3, 3), _probes.generator(1, 2), torch.float64)
    outputs = []
    for plain in (g, parsed):
        torch.manual_seed(0)
        layer = layers.build(plain, 8).double()
        with torch.no_grad():
            for p in layer.parameters():  # the same perturbed values for both graphs
                p.add_(torch.linspace(-0.3, 0.4, p.numel(), dtype=p.dtype).reshape(p.shape))
            outputs.append(layer(x))
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("name", layers.known_layers())
def test_every_known_layer_reads_back_as_itself(name):
    plain = layers.resolve(name)
    assert graph.canonical_hash(parse_formula_plain(graph.formula(plain))) == graph.canonical_hash(plain)


def test_long_formulas_with_named_shared_values_read_back():
    g = (("add", (0, 2)),) + tuple(("mul", (4 + i, 4 + i)) for i in range(12))
    text = graph.formula(g)
    assert "; " in text
    assert graph.canonical_hash(parse_formula_plain(text)) == graph.canonical_hash(g)


@pytest.mark.parametrize("text, nodes", [
    ("x / max(std_b(x), v0*x + std_i(x))", (("std_b", (0,)), ("mul", (2, 0)), ("std_i", (0,)),
                                            ("add", (5, 6)), ("max", (4, 7)), ("div", (0, 8)))),
    ("x - v1", (("neg", (3,)), ("add", (0, 4)))),
    ("-x*v0", (("neg", (0,)), ("mul", (4, 2)))),  # a unary minus binds to the operand after it
    ("|x| / square(x)", (("abs", (0,)), ("square", (0,)), ("div", (4, 5)))),
    ("x / rms_i(x) + x / rms_i(x)", (("rms_i", (0,)), ("div", (0, 4)), ("add", (5, 5)))),  # one node each
    ("x", (("add", (0, 1)),)),  # the output is a node: x + 0
    ("v1", (("add", (3, 1)),)),  # the last initial value too (a graph that folds to v1 prints so)
    ("0", (("add", (1, 1)),)),
    ("x - v0 - v1", (("neg", (2,)), ("add", (0, 4)), ("neg", (3,)), ("add", (5, 6)))),  # left-assoc
])
def test_formulas_parse_to_the_graph_they_mean(text, nodes):
    assert parse_formula_plain(text) == nodes
    assert isinstance(parse_formula(text), graph.LayerGraph)


@pytest.mark.parametrize("text, fragment", [
    ("", "empty text"),
    ("x / foo(x)", "unknown op 'foo' at column 5"),
    ("x +", "unexpected end"),
    ("2*x", "the only number a layer has is 0"),
    ("x / (x", "unexpected end"),
    ("max(x)", "max takes 2 argument(s), got 1"),
    ("tanh(x, x)", "tanh takes 1 argument(s), got 2"),
    ("y * x", "unknown name 'y'"),
    ("x $ x", "unexpected '$' at column 3"),
    ("x x", "unexpected 'x' at column 3"),
    ("x = x; x", "'x' is not a free name"),
])
def test_a_text_that_is_no_formula_says_where_in_one_line(text, fragment):
    with pytest.raises(FormulaError) as e:
        parse_formula_plain(text)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_layers_take_a_formula_where_they_take_a_name_or_a_file(tmp_path):
    assert layers.resolve("tanh(x) / std_b(x)") == (("tanh", (0,)), ("std_b", (0,)), ("div", (4, 5)))
    module = layers.build("x / rms_b(x)", 4)
    assert module(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)
    with pytest.raises(UserError, match="unknown layer 'bn_reluu'.*known: .*bn_relu"):
        layers.resolve("bn_reluu")  # a name-like text stays a name's error
    with pytest.raises(UserError, match="graph file not found"):
        layers.resolve(str(tmp_path / "runs" / "best"))  # a path-like text stays a file's error
    with pytest.raises(UserError, match="not a known layer, a graph file or a layer formula: .*column"):
        layers.resolve("x / (x + ")
    with pytest.raises(InvalidCandidate, match="output does not depend on x"):
        layers.build("v0 + v1", 4)
