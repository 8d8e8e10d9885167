"""The layer IR: a candidate normalization-activation layer as a small graph of primitive ops.

Values are indexed: the four initial values (x, zero, v0, v1) first, then one per node in order;
the graph's output is the last node. `Node` and `LayerGraph` are pyglove symbolic objects so that
hyper-values (pg.oneof, pg.manyof) can stand in any field of a search space.

The hot paths of the search work on the plain form, a tuple of (op, inputs) tuples, which is
hashable and about 20x cheaper to build than the symbolic objects.
"""
from __future__ import annotations

import pyglove as pg

INITIAL_VALUES = ("x", "zero", "v0", "v1")
NUM_INITIAL = len(INITIAL_VALUES)

PlainGraph = tuple  # tuple[tuple[str, tuple[int, ...]], ...]


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
        return cls(nodes=[Node(op=op, inputs=list(inputs)) for op, inputs in plain])
