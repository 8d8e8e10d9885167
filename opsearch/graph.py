"""The layer IR: a candidate normalization-activation layer as a small graph of primitive ops.

Values are indexed: the four initial values (x, zero, v0, v1) first, then one per node in order;
the graph's output is the last node. `Node` and `LayerGraph` are pyglove symbolic objects so that
hyper-values (pg.oneof, pg.manyof) can stand in any field of a search space.

The hot paths of the search work on the plain form, a tuple of (op, inputs) tuples, which is
hashable and far cheaper to build than the symbolic objects.  Every function here accepts a
LayerGraph or a plain graph.

A unary op reads only inputs[0]; the search spaces give every node two inputs, and the unused one
is ignored everywhere (liveness, hashing, pruning, compiling).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import operator
from typing import Any, Iterable

import pyglove as pg

from opsearch.errors import InvalidCandidate
from opsearch.ops import OPS, PREC_ADD, PREC_ATOM

INITIAL_VALUES = ("x", "zero", "v0", "v1")
NUM_INITIAL = len(INITIAL_VALUES)
X, ZERO, V0, V1 = range(NUM_INITIAL)

PlainGraph = tuple  # tuple[tuple[str, tuple[int, ...]], ...]

SCHEMA = "opsearch.graph/1"
MAX_NODES = 256  # JSON input limits: a graph file is small; anything bigger is not ours
MAX_INPUTS = 8


class Node(pg.Object):
    """One intermediate value: ``op`` applied to the values at indices ``inputs``."""

    op: str
    inputs: list[int]


class LayerGraph(pg.Object):
    """A list of nodes; value i < 4 is an initial value, value 4 + k is node k; output = last."""

    nodes: list[Node]

    def as_tuple(self) -> PlainGraph:
        return tuple((n.op, tuple(n.inputs)) for n in self.nodes)

    @classmethod
    def from_tuple(cls, plain) -> "LayerGraph":
        return cls(nodes=[Node(op=op, inputs=list(inputs)) for op, inputs in as_plain(plain)])


GraphLike = Any  # LayerGraph | PlainGraph | a sequence of (op, inputs) pairs


# --------------------------------------------------------------------------------------------
# Normalisation and structural checks


def as_plain(g: GraphLike) -> PlainGraph:
    """The plain form ``((op, (i, j, ...)), ...)`` of a LayerGraph or any (op, inputs) sequence."""
    if isinstance(g, LayerGraph):
        return g.as_tuple()
    if isinstance(g, (str, bytes)) or not isinstance(g, Iterable):
        raise InvalidCandidate(f"not a graph: expected a LayerGraph or a sequence of (op, inputs) pairs, "
                               f"got {type(g).__name__}")
    nodes = []
    for k, node in enumerate(g):
        if isinstance(node, Node):
            op, inputs = node.op, node.inputs
        else:
            try:
                op, inputs = node
                inputs = tuple(inputs)
            except (TypeError, ValueError):
                raise InvalidCandidate(f"node {k}: expected an (op, inputs) pair, got {node!r}") from None
        nodes.append((op, tuple(inputs)))
    return tuple(nodes)


def _read_inputs(op: str, inputs: tuple) -> tuple:
    """The inputs an op actually reads (a unary op ignores the extra ones)."""
    return inputs[:OPS[op].arity]


def _check_structure(plain: PlainGraph) -> None:
    """Raise InvalidCandidate for an empty graph, unknown op, missing input or bad index."""
    if not plain:
        raise InvalidCandidate("empty graph: a layer needs at least one node")
    for k, (op, inputs) in enumerate(plain):
        spec = OPS.get(op) if isinstance(op, str) else None
        if spec is None:
            close = difflib.get_close_matches(str(op), list(OPS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidCandidate(f"node {k}: unknown op {op!r}{hint}; known ops: {', '.join(OPS)}")
        if len(inputs) < spec.arity:
            raise InvalidCandidate(f"node {k} ({op}): needs {spec.arity} input(s), got {len(inputs)}")
        limit = NUM_INITIAL + k
        for j in inputs:
            if type(j) is not int:
                try:
                    if isinstance(j, bool):
                        raise TypeError
                    j = operator.index(j)  # numpy integers are fine
                except TypeError:
                    raise InvalidCandidate(f"node {k} ({op}): input index {j!r} is not an integer") from None
            if not 0 <= j < limit:
                raise InvalidCandidate(
                    f"node {k} ({op}): input index {j} out of range; node {k} may read values 0..{limit - 1} "
                    f"(x, zero, v0, v1 and the nodes before it)")


def _plain_checked(g: GraphLike) -> PlainGraph:
    plain = as_plain(g)
    _check_structure(plain)
    if any(type(j) is not int for _, inputs in plain for j in inputs):  # numpy ints -> int
        plain = tuple((op, tuple(int(j) for j in inputs)) for op, inputs in plain)
    return plain


# --------------------------------------------------------------------------------------------
# Value facts: which values are the constant zero, which depend on x

# zero -> zero: the op of an all-zero input is zero (mean of zeros, |0|, tanh 0, ...).
# Not here, because 0 is not preserved: exp 0 = 1, sigmoid 0 = 0.5, std/rms/sqrt 0 = sqrt(eps),
# log 0 = ln(eps).
_ZERO_IF_ALL_ZERO = {"add", "max", "neg", "abs", "square", "tanh"} | {n for n, o in OPS.items() if o.stat == "mean"}


def fold_zero(g: GraphLike) -> list[int]:
    """The constant-zero folding shared by validation, the formula, the canonical hash and the
    compiler: ``rep[j]`` is the value that value j always equals.

    ``ZERO`` (1) for a value that is always 0: a*0, 0/b (the guarded denominator is never 0),
    and unary ops and means of 0, sums and maxima of zeros (the batch mean of 0 is 0 in
    training and its running estimate stays 0 in eval); the other operand for a + 0 (and so
    a - mean_b(0)); j itself otherwise. Only exact identities of the compiled function: ops
    that turn 0 into another constant (exp, sigmoid, std, ...) are left alone.
    """
    return _fold_zero(_plain_checked(g))


def _fold_zero(plain: PlainGraph) -> list[int]:
    rep = list(range(NUM_INITIAL))
    for k, (op, inputs) in enumerate(plain):
        read = [rep[j] for j in _read_inputs(op, inputs)]
        zeros = [j == ZERO for j in read]
        if (op == "mul" and any(zeros)) or (op == "div" and zeros[0]) \
                or (op in _ZERO_IF_ALL_ZERO and all(zeros)):
            rep.append(ZERO)
        elif op == "add" and any(zeros):
            rep.append(read[1] if zeros[0] else read[0])
        else:
            rep.append(NUM_INITIAL + k)
    return rep


def _folded(plain: PlainGraph) -> tuple[PlainGraph, int]:
    """(graph with every input replaced by the value it always equals, cut after the output's
    representative; that representative). When the output folds to an initial value (x + 0),
    the graph is empty and the index names that value."""
    rep = _fold_zero(plain)
    out = rep[-1]
    nodes = tuple((op, tuple(rep[j] for j in _read_inputs(op, inputs)))
                  for op, inputs in plain[:max(out - NUM_INITIAL + 1, 0)])
    return nodes, out


def _value_facts(plain: PlainGraph) -> tuple[list[bool], list[bool]]:
    """(is_zero, depends_on_x) per value index, folding the constant zero (`fold_zero`).

    mul(a, zero) and div(zero, b) are zero whatever a and b are (the guarded denominator is never
    0), so a value reached only through them does not depend on x.  The compiler folds the same
    identities, so "depends on x" here is what the compiled layer computes.
    """
    rep = _fold_zero(plain)
    zero = [j == ZERO for j in rep]
    dep = [True, False, False, False]
    for k, (op, inputs) in enumerate(plain):
        j = NUM_INITIAL + k
        if rep[j] != j:
            dep.append(dep[rep[j]])
        else:
            dep.append(any(dep[rep[i]] for i in _read_inputs(op, inputs)))
    return zero, dep


def used_values(g: GraphLike) -> frozenset[int]:
    """Value indices (initial values included) the compiled layer actually reads.

    Like `live_nodes` but after folding the constant zero: the inputs of a value known to be 0
    (e.g. `a` in a*0) are not computed, and zero-valued values are left out.  `2 in used_values(g)`
    tells whether v0 gets a gradient.
    """
    plain = _plain_checked(g)
    zero, _ = _value_facts(plain)
    used: set[int] = set()
    stack = [NUM_INITIAL + len(plain) - 1]
    while stack:
        j = stack.pop()
        if j in used or zero[j]:  # constants are not computed from anything
            continue
        used.add(j)
        if j >= NUM_INITIAL:
            op, inputs = plain[j - NUM_INITIAL]
            stack.extend(_read_inputs(op, inputs))
    return frozenset(used)


def validate(g: GraphLike) -> None:
    """Raise InvalidCandidate (with the reason) unless `g` can be a layer."""
    plain = _plain_checked(g)
    zero, dep = _value_facts(plain)
    if not dep[-1]:
        what = "is the constant 0" if zero[-1] else "depends only on constants and v0, v1"
        raise InvalidCandidate(f"output does not depend on x: {_formula(plain, fold=False)} {what}")


def is_valid(g: GraphLike) -> bool:
    try:
        validate(g)
    except InvalidCandidate:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Liveness, pruning, hashing


def live_nodes(g: GraphLike) -> frozenset[int]:
    """Node positions (0-based into nodes) the output depends on, following the inputs read."""
    plain = _plain_checked(g)
    return frozenset(_live(plain))


def _live(plain: PlainGraph) -> set[int]:
    live: set[int] = set()
    stack = [len(plain) - 1]
    while stack:
        k = stack.pop()
        if k in live:
            continue
        live.add(k)
        op, inputs = plain[k]
        stack.extend(j - NUM_INITIAL for j in _read_inputs(op, inputs) if j >= NUM_INITIAL)
    return live


def prune(g: GraphLike) -> PlainGraph:
    """Plain graph without dead nodes, inputs renumbered; a unary op keeps only its read input."""
    plain = _plain_checked(g)
    live = sorted(_live(plain))
    new_index = {j: j for j in range(NUM_INITIAL)}
    out = []
    for pos, k in enumerate(live):
        op, inputs = plain[k]
        out.append((op, tuple(new_index[j] for j in _read_inputs(op, inputs))))
        new_index[NUM_INITIAL + k] = NUM_INITIAL + pos
    return tuple(out)


def canonical_hash(g: GraphLike) -> str:
    """Hex digest equal for graphs that differ only in dead nodes, node order, duplicated nodes,
    the order of a commutative op's inputs, or constant-zero subexpressions (`fold_zero`:
    ``x - mean_b(0)`` is ``x``): a structural identity after exact folding, not a functional one."""
    plain, out = _folded(_plain_checked(g))
    if out < NUM_INITIAL:  # the output is an initial value itself (x + 0)
        return hashlib.blake2b(f"value({INITIAL_VALUES[out]})".encode(), digest_size=12).hexdigest()
    keys = list(INITIAL_VALUES)
    for op, inputs in plain:
        child = [keys[j] for j in _read_inputs(op, inputs)]
        if OPS[op].commutative:
            child.sort()
        text = f"{op}({','.join(child)})"
        keys.append(hashlib.blake2b(text.encode(), digest_size=12).hexdigest())
    return keys[-1]


def uses_batch(g: GraphLike) -> bool:
    """Whether any live node is a batch aggregate (then the layer needs running statistics)."""
    plain = _plain_checked(g)
    return any(OPS[plain[k][0]].batch_dependent for k in _live(plain))


# --------------------------------------------------------------------------------------------
# Formula

_INITIAL_TEXT = ("x", "0", "v0", "v1")
_NEG_PREC = 1.5  # prints as "a*(-b)" but "-a + b"
_FORMULA_INLINE_LIMIT = 300


def formula(g: GraphLike) -> str:
    """A human-readable formula, e.g. ``x / max(std_b(x), v0*x + std_i(x))``.

    Constant-zero subexpressions are folded (`fold_zero`: ``(x - mean_b(0)) / std_b(x)`` reads
    ``x / std_b(x)``). Shared subexpressions are repeated inline; when that makes the text long,
    values used more than once are named instead (``t5 = ...; t7 = ...; x / t7``).
    """
    return _formula(_plain_checked(g))


def _formula(plain: PlainGraph, fold: bool = True) -> str:
    if fold:
        plain, out = _folded(plain)
        if out < NUM_INITIAL:
            return _INITIAL_TEXT[out]
    live = _live(plain)
    text = _formula_texts(plain, live, names=None)
    if len(text) <= _FORMULA_INLINE_LIMIT:
        return text
    uses: dict[int, int] = {}
    for k in live:
        op, inputs = plain[k]
        for j in _read_inputs(op, inputs):
            uses[j] = uses.get(j, 0) + 1
    shared = {j for j, n in uses.items() if n > 1 and j >= NUM_INITIAL}
    names: dict[int, str] = {}
    lines: list[str] = []
    final = _formula_texts(plain, live, names=names, shared=shared, lines=lines)
    return "; ".join(lines + [final])


def _formula_texts(plain: PlainGraph, live: set[int], names: dict[int, str] | None,
                   shared: set[int] = frozenset(), lines: list[str] | None = None) -> str:
    texts: list[tuple[str, float]] = [(t, PREC_ATOM) for t in _INITIAL_TEXT]

    def operand(j: int, prec: float, strict: bool) -> str:
        t, p = texts[j]
        return f"({t})" if (p < prec or (strict and p <= prec)) else t

    for k, (op, inputs) in enumerate(plain):
        if k not in live:
            texts.append(("?", PREC_ATOM))
            continue
        spec = OPS[op]
        read = _read_inputs(op, inputs)
        a_is_neg = plain[read[0] - NUM_INITIAL][0] == "neg" if read[0] >= NUM_INITIAL else False
        if op == "add" and read[1] >= NUM_INITIAL and plain[read[1] - NUM_INITIAL][0] == "neg":
            neg_arg = _read_inputs("neg", plain[read[1] - NUM_INITIAL][1])[0]
            t, p = f"{operand(read[0], PREC_ADD, False)} - {operand(neg_arg, PREC_ADD, True)}", PREC_ADD
        elif op == "add" and a_is_neg:
            neg_arg = _read_inputs("neg", plain[read[0] - NUM_INITIAL][1])[0]
            t, p = f"{operand(read[1], PREC_ADD, False)} - {operand(neg_arg, PREC_ADD, True)}", PREC_ADD
        elif op == "neg":
            t, p = f"-{operand(read[0], PREC_ATOM, False)}", _NEG_PREC
        elif spec.formula_prec == PREC_ATOM:
            t, p = spec.formula.format(*(texts[j][0] for j in read)), PREC_ATOM
        else:
            a = operand(read[0], spec.formula_prec, False)
            b = operand(read[1], spec.formula_prec, True)
            template = spec.formula
            if op == "mul" and not (texts[read[0]][1] == PREC_ATOM and texts[read[1]][1] == PREC_ATOM):
                template = "{0} * {1}"
            t, p = template.format(a, b), spec.formula_prec
        value = NUM_INITIAL + k
        if names is not None and value in shared:
            name = f"t{value}"
            names[value] = name
            lines.append(f"{name} = {t}")
            t, p = name, PREC_ATOM
        texts.append((t, p))
    return texts[-1][0]


# --------------------------------------------------------------------------------------------
# JSON form (our own schema; never pickle, never pg.from_json on stored data)


def to_dict(g: GraphLike) -> dict:
    plain = _plain_checked(g)
    return {"schema": SCHEMA, "nodes": [{"op": op, "inputs": list(inputs)} for op, inputs in plain]}


def from_dict(d: Any) -> LayerGraph:
    """LayerGraph from `to_dict` output; checks schema, types, ops, indices and size limits.

    The output-depends-on-x rule is not checked here (stored rejected candidates must load);
    call `validate` for that.
    """
    return LayerGraph.from_tuple(plain_from_dict(d))


def plain_from_dict(d: Any) -> PlainGraph:
    """Like `from_dict`, without building the (slower) symbolic LayerGraph."""
    if not isinstance(d, dict):
        raise ValueError(f"graph JSON must be an object, got {type(d).__name__}")
    schema = d.get("schema")
    if schema != SCHEMA:
        raise ValueError(f"graph JSON schema must be {SCHEMA!r}, got {schema!r}")
    nodes = d.get("nodes")
    if not isinstance(nodes, list):
        raise ValueError("graph JSON needs a list under 'nodes'")
    if len(nodes) > MAX_NODES:
        raise ValueError(f"graph JSON has {len(nodes)} nodes; the limit is {MAX_NODES}")
    plain = []
    for k, node in enumerate(nodes):
        if not isinstance(node, dict) or set(node) - {"op", "inputs"} or "op" not in node or "inputs" not in node:
            raise ValueError(f"graph JSON node {k} must be an object with keys 'op' and 'inputs', got {node!r}"[:300])
        op, inputs = node["op"], node["inputs"]
        if not isinstance(op, str):
            raise ValueError(f"graph JSON node {k}: 'op' must be a string, got {op!r}"[:300])
        if not isinstance(inputs, list) or len(inputs) > MAX_INPUTS or not all(
                isinstance(j, int) and not isinstance(j, bool) for j in inputs):
            raise ValueError(f"graph JSON node {k}: 'inputs' must be a list of at most {MAX_INPUTS} integers, "
                             f"got {inputs!r}"[:300])
        plain.append((op, tuple(inputs)))
    plain = tuple(plain)
    _check_structure(plain)
    return plain


def to_json(g: GraphLike) -> str:
    return json.dumps(to_dict(g), separators=(",", ":"))


def from_json(text: str | bytes) -> LayerGraph:
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"graph JSON is not valid JSON: {e}") from None
    return from_dict(d)


# --------------------------------------------------------------------------------------------
# Writing graphs by hand


class GraphBuilder:
    """Write a graph as code: each op call appends a node and returns its value index.

    >>> b = GraphBuilder()
    >>> b.div(b.x, b.max(b.std_b(b.x), b.add(b.mul(b.v0, b.x), b.std_i(b.x))))  # EvoNorm-B0
    9
    >>> b.plain()[-1]
    ('div', (0, 8))
    """

    x, zero, v0, v1 = X, ZERO, V0, V1

    def __init__(self) -> None:
        self.nodes: list[tuple[str, tuple[int, ...]]] = []

    def op(self, name: str, *inputs: int) -> int:
        if name not in OPS:
            raise InvalidCandidate(f"unknown op {name!r}; known ops: {', '.join(OPS)}")
        self.nodes.append((name, tuple(inputs)))
        return NUM_INITIAL + len(self.nodes) - 1

    def __getattr__(self, name: str):
        if name in OPS:
            return lambda *inputs: self.op(name, *inputs)
        raise AttributeError(name)

    def plain(self) -> PlainGraph:
        return tuple(self.nodes)

    def build(self) -> LayerGraph:
        return LayerGraph.from_tuple(self.nodes)


def describe(g: GraphLike) -> str:
    """Multi-line listing of a graph's nodes (dead ones marked), for `show` and error reports."""
    plain = _plain_checked(g)
    live = _live(plain)
    names = list(INITIAL_VALUES) + [f"n{k}" for k in range(len(plain))]
    rows = []
    for k, (op, inputs) in enumerate(plain):
        args = ", ".join(names[j] for j in _read_inputs(op, inputs))
        rows.append(f"n{k} = {op}({args}){'' if k in live else '   # dead'}")
    return "\n".join(rows)

