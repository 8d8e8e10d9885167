"""Graph IR: validation, liveness, pruning, canonical hash, formula, JSON schema."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opsearch import graph
from opsearch.errors import InvalidCandidate
from opsearch.graph import GraphBuilder, LayerGraph, Node
from opsearch.ops import OPS, op_names

B0 = (("std_b", (0,)), ("mul", (2, 0)), ("std_i", (0,)), ("add", (5, 6)), ("max", (4, 7)), ("div", (0, 8)))


def random_plain(rng: random.Random, num_nodes: int = 10, ops: list[str] | None = None) -> tuple:
    """A graph drawn like the evonorm space does: each node an op and two earlier values."""
    ops = ops or op_names()
    return tuple((rng.choice(ops), (rng.randrange(4 + i), rng.randrange(4 + i))) for i in range(num_nodes))


plain_graphs = st.integers(0, 2**32 - 1).map(lambda seed: random_plain(random.Random(seed), random.Random(seed).randint(1, 12)))


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("bad, fragment", [
    ((), "empty graph"),
    ((("foo", (0, 1)),), "unknown op 'foo'"),
    ((("std_x", (0,)),), "did you mean"),
    ((("add", (0, 4)),), "input index 4 out of range"),
    ((("add", (0, 1)), ("mul", (5, 0))), "input index 5 out of range"),  # refers to itself
    ((("add", (0, -1)),), "input index -1 out of range"),
    ((("add", (0,)),), "needs 2 input(s)"),
    ((("add", (0, 1.5)),), "not an integer"),
    ((("add", (0, True)),), "not an integer"),
    ((("add", (2, 3)),), "output does not depend on x"),
    ((("mul", (0, 1)),), "output does not depend on x"),  # x * 0 is the constant 0
    ((("div", (1, 0)), ("add", (4, 2))), "output does not depend on x"),  # 0 / x + v0
    ((("exp", (1, 0)), ("std_b", (4, 0))), "output does not depend on x"),  # unary ignores input 1
    ((("sigmoid", (0, 0)), ("add", (0, 0))), None),  # dead nodes are fine
    (("not a pair",), "expected an (op, inputs) pair"),
])
def test_validate_rejects_bad_graphs_with_a_clear_reason(bad, fragment):
    if fragment is None:
        graph.validate(bad)
        return
    with pytest.raises(InvalidCandidate, match=__import__("re").escape(fragment)):
        graph.validate(bad)


def test_identity_is_valid_and_unary_ops_may_carry_an_ignored_input():
    graph.validate((("add", (0, 1)),))
    graph.validate((("sigmoid", (0, 3)),))
    assert graph.is_valid(B0)
    assert not graph.is_valid((("add", (1, 1)),))


def test_accepts_layer_graph_and_plain_alike():
    lg = LayerGraph.from_tuple(B0)
    assert lg.as_tuple() == B0
    assert graph.canonical_hash(lg) == graph.canonical_hash(B0)
    assert graph.formula(lg) == graph.formula(B0)
    assert graph.as_plain([["add", [0, 1]]]) == (("add", (0, 1)),)
    assert graph.as_plain(LayerGraph(nodes=[Node(op="abs", inputs=[0, 0])])) == (("abs", (0, 0)),)


# ------------------------------------------------------------------ liveness and pruning


def test_live_nodes_follow_only_read_inputs():
    g = (("std_b", (0,)), ("tanh", (0, 4)), ("exp", (0, 1)), ("neg", (6, 5)))
    # neg reads node 2 only; node 1 (tanh) is read by nobody; node 0 only by the dead tanh
    assert graph.live_nodes(g) == frozenset({2, 3})
    assert graph.prune(g) == (("exp", (0,)), ("neg", (4,)))
    assert not graph.uses_batch(g)
    assert graph.uses_batch(B0)


def test_used_values_fold_the_zero():
    g = (("mul", (2, 1)), ("add", (0, 4)), ("mul", (5, 3)))  # (v0*0 + x) * v1
    assert graph.used_values(g) == frozenset({0, 3, 5, 6})
    assert graph.live_nodes(g) == frozenset({0, 1, 2})  # structural liveness keeps v0*0


@settings(max_examples=400, deadline=None)
@given(plain_graphs)
def test_prune_keeps_meaning_and_is_idempotent(g):
    pruned = graph.prune(g)
    assert len(pruned) == len(graph.live_nodes(g))
    assert graph.prune(pruned) == pruned
    assert graph.canonical_hash(pruned) == graph.canonical_hash(g)
    assert graph.formula(pruned) == graph.formula(g)
    assert graph.is_valid(pruned) == graph.is_valid(g)
    assert graph.uses_batch(pruned) == graph.uses_batch(g)
    for op, inputs in pruned:
        assert len(inputs) == OPS[op].arity


# ------------------------------------------------------------------ canonical hash


def _swap_commutative(g: tuple, rng: random.Random) -> tuple:
    return tuple((op, (inputs[1], inputs[0]) if OPS[op].commutative and rng.random() < 0.5 else inputs)
                 for op, inputs in g)


def _insert_dead_node(g: tuple, rng: random.Random) -> tuple:
    """Insert a node at a random position that nothing reads, renumbering later references."""
    pos = rng.randrange(len(g))  # never after the output
    dead = (rng.choice(op_names()), (rng.randrange(4 + pos), rng.randrange(4 + pos)))
    shifted = tuple((op, tuple(j + 1 if j >= 4 + pos else j for j in inputs)) for op, inputs in g[pos:])
    return g[:pos] + (dead,) + shifted


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_hash_is_invariant_to_dead_nodes_and_commutative_order(seed):
    rng = random.Random(seed)
    g = random_plain(rng, rng.randint(1, 12))
    h = graph.canonical_hash(g)
    assert graph.canonical_hash(_swap_commutative(g, rng)) == h
    assert graph.canonical_hash(_insert_dead_node(g, rng)) == h


# ops whose value at 0 (all inputs 0) is exactly 0; exp, sigmoid, std, rms, sqrt, log are not
_ZERO_OF_ZERO = {"add", "max", "neg", "abs", "square", "tanh", "mean_b", "mean_i", "mean_l", "mean_g"}


def _tree(g: tuple) -> str:
    """The expression tree after folding the constant zero (written independently of graph.py)."""
    texts = ["x", "0", "v0", "v1"]
    for op, inputs in g:
        args = [texts[j] for j in inputs[:OPS[op].arity]]
        if (op == "mul" and "0" in args) or (op == "div" and args[0] == "0") \
                or (op in _ZERO_OF_ZERO and all(a == "0" for a in args)):
            texts.append("0")
        elif op == "add" and "0" in args:
            texts.append(args[1] if args[0] == "0" else args[0])
        else:
            texts.append(f"{op}({','.join(sorted(args) if OPS[op].commutative else args)})")
    return texts[-1]


def test_hash_separates_different_graphs():
    assert graph.canonical_hash((("div", (0, 2)),)) != graph.canonical_hash((("div", (2, 0)),))
    assert graph.canonical_hash((("add", (0, 2)),)) != graph.canonical_hash((("mul", (0, 2)),))
    assert graph.canonical_hash((("std_b", (0,)),)) != graph.canonical_hash((("std_i", (0,)),))
    # over random graphs, equal hashes <=> equal expression trees (commutative inputs sorted,
    # constant zero folded)
    rng = random.Random(1)
    pairs = {(graph.canonical_hash(g), _tree(g)) for g in (random_plain(rng) for _ in range(1000))}
    assert len({h for h, _ in pairs}) == len({t for _, t in pairs}) == len(pairs) > 500
    # unary ops ignore their second input, so it does not change the hash
    assert graph.canonical_hash((("exp", (0, 1)),)) == graph.canonical_hash((("exp", (0, 3)),))


# ------------------------------------------------------------------ formula


def test_formulas_read_like_the_paper():
    assert graph.formula(B0) == "x / max(std_b(x), v0*x + std_i(x))"
    b = GraphBuilder()
    b.div(b.mul(b.x, b.sigmoid(b.mul(b.v0, b.x))), b.std_g(b.x))
    assert graph.formula(b.plain()) == "x*sigmoid(v0*x) / std_g(x)"
    b = GraphBuilder()
    b.max(b.add(b.mul(b.div(b.add(b.x, b.neg(b.mean_b(b.x))), b.std_b(b.x)), b.v0), b.v1), b.zero)
    assert graph.formula(b.plain()) == "max((x - mean_b(x)) / std_b(x) * v0 + v1, 0)"


def test_formula_and_hash_fold_constant_zero_subexpressions():
    b = GraphBuilder()  # BN-ReLU whose mean was replaced by mean_b(0), which is 0
    b.max(b.add(b.mul(b.div(b.add(b.x, b.neg(b.mean_b(b.zero))), b.std_b(b.x)), b.v0), b.v1), b.zero)
    assert graph.formula(b.plain()) == "max(x / std_b(x) * v0 + v1, 0)"
    direct = GraphBuilder()
    direct.max(direct.add(direct.mul(direct.div(direct.x, direct.std_b(direct.x)), direct.v0), direct.v1),
               direct.zero)
    assert graph.canonical_hash(b.plain()) == graph.canonical_hash(direct.plain())
    assert graph.formula((("add", (0, 1)),)) == "x"  # x + 0
    assert graph.formula((("mul", (2, 1)), ("abs", (4,)), ("add", (5, 0)), ("tanh", (6,)))) == "tanh(x)"
    assert graph.canonical_hash((("add", (0, 1)),)) != graph.canonical_hash((("abs", (0,)),))
    # 0 is not preserved by these: they stay as written
    for op, text in (("exp", "exp(0)"), ("sigmoid", "sigmoid(0)"), ("std_b", "std_b(0)"),
                     ("sqrt", "sqrt(0)"), ("rms_i", "rms_i(0)"), ("log", "log(0)")):
        assert text in graph.formula(((op, (1,)), ("mul", (0, 4))))
    assert graph.formula((("div", (0, 1)),)) == "x / 0"  # the guarded division by 0 is x / eps


# zero-valued expressions written as nodes appended to a graph: (nodes, index of their value)
def _zero_expression(rng: random.Random, start: int) -> tuple[tuple, int]:
    kind = rng.randrange(5)
    any_value = rng.randrange(start)
    if kind == 0:
        return (("mean_b", (1, 1)),), start
    if kind == 1:
        return (("mul", (any_value, 1)),), start
    if kind == 2:
        return (("abs", (1, 0)), ("neg", (start, 0))), start + 1
    if kind == 3:
        return (("div", (1, any_value)),), start
    return (("square", (1, 1)), ("mean_g", (start, 0)), ("max", (start + 1, 1))), start + 2


def _with_zero_added(g: tuple, rng: random.Random) -> tuple:
    """g with one input reference j replaced by j + (an expression that is always 0)."""
    pos = rng.randrange(len(g))
    op, inputs = g[pos]
    slot = rng.randrange(OPS[op].arity)
    start = 4 + pos
    zero_nodes, z = _zero_expression(rng, start)
    plus = (("add", (inputs[slot], z)) if rng.random() < 0.5 else ("add", (z, inputs[slot])),)
    added = zero_nodes + plus
    shift = len(added)
    moved = tuple((o, tuple(j + shift if j >= start else j for j in ins)) for o, ins in g[pos:])
    first_op, first_inputs = moved[0]
    first_inputs = list(first_inputs)
    first_inputs[slot] = start + shift - 1
    return g[:pos] + added + ((first_op, tuple(first_inputs)),) + moved[1:]


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_adding_a_constant_zero_changes_neither_formula_nor_hash(seed):
    rng = random.Random(seed)
    g = random_plain(rng, rng.randint(1, 10))
    h = _with_zero_added(g, rng)
    assert graph.canonical_hash(h) == graph.canonical_hash(g)
    assert graph.formula(h) == graph.formula(g)
    assert graph.is_valid(h) == graph.is_valid(g)


def test_formula_parenthesises_by_precedence():
    assert graph.formula((("add", (0, 2)), ("mul", (4, 3)))) == "(x + v0) * v1"
    assert graph.formula((("mul", (0, 2)), ("div", (3, 4)))) == "v1 / (x*v0)"
    assert graph.formula((("neg", (0,)), ("mul", (2, 4)))) == "v0 * (-x)"
    assert graph.formula((("add", (0, 2)), ("neg", (4,)), ("add", (3, 5)))) == "v1 - (x + v0)"
    assert graph.formula((("abs", (0,)), ("square", (4,)))) == "square(|x|)"


def test_long_formulas_name_shared_values():
    g = (("add", (0, 2)),) + tuple(("mul", (4 + i, 4 + i)) for i in range(12))
    text = graph.formula(g)
    assert len(text) < 1000 and "; " in text and text.startswith("t4 = x + v0")


# ------------------------------------------------------------------ JSON schema


def test_json_round_trip():
    d = graph.to_dict(B0)
    assert d["schema"] == "opsearch.graph/1"
    assert d["nodes"][0] == {"op": "std_b", "inputs": [0]}
    assert graph.from_dict(d).as_tuple() == B0
    assert graph.from_json(graph.to_json(B0)).as_tuple() == B0
    assert isinstance(graph.from_dict(d), LayerGraph)


@pytest.mark.parametrize("bad, error, fragment", [
    ([], ValueError, "must be an object"),
    ({"nodes": []}, ValueError, "schema"),
    ({"schema": "opsearch.graph/2", "nodes": []}, ValueError, "schema"),
    ({"schema": "opsearch.graph/1"}, ValueError, "'nodes'"),
    ({"schema": "opsearch.graph/1", "nodes": [{"op": "add"}]}, ValueError, "keys 'op' and 'inputs'"),
    ({"schema": "opsearch.graph/1", "nodes": [{"op": "add", "inputs": [0, True]}]}, ValueError, "integers"),
    ({"schema": "opsearch.graph/1", "nodes": [{"op": 3, "inputs": [0, 1]}]}, ValueError, "must be a string"),
    ({"schema": "opsearch.graph/1", "nodes": [{"op": "add", "inputs": [0, 1], "py/object": "os.system"}]},
     ValueError, "keys"),
    ({"schema": "opsearch.graph/1", "nodes": [{"op": "add", "inputs": [0, 1]}] * 300}, ValueError, "limit"),
    ({"schema": "opsearch.graph/1", "nodes": [{"op": "pow", "inputs": [0, 1]}]}, InvalidCandidate, "unknown op"),
    ({"schema": "opsearch.graph/1", "nodes": [{"op": "add", "inputs": [0, 9]}]}, InvalidCandidate, "out of range"),
    ({"schema": "opsearch.graph/1", "nodes": []}, InvalidCandidate, "empty graph"),
])
def test_from_dict_rejects_malformed_input(bad, error, fragment):
    with pytest.raises(error, match=fragment):
        graph.from_dict(bad)


def test_from_dict_loads_a_graph_whose_output_ignores_x():
    # stored rejected candidates must load; validate() is the place that rejects them
    g = graph.from_dict({"schema": "opsearch.graph/1", "nodes": [{"op": "add", "inputs": [2, 3]}]})
    with pytest.raises(InvalidCandidate):
        graph.validate(g)


def test_from_json_rejects_non_json():
    with pytest.raises(ValueError, match="not valid JSON"):
        graph.from_json("{nope")
    assert json.loads(graph.to_json(B0))["nodes"][-1] == {"op": "div", "inputs": [0, 8]}


def test_builder_and_describe():
    b = GraphBuilder()
    assert b.exp(b.x) == 4
    with pytest.raises(InvalidCandidate):
        b.op("nope", 0)
    with pytest.raises(AttributeError):
        b.nope  # noqa: B018
    text = graph.describe((("tanh", (0,)), ("exp", (0, 1))))
    assert "n0 = tanh(x)   # dead" in text and "n1 = exp(x)" in text
