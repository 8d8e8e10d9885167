"""The EvoNorm paper's search space: every node picks a primitive op and two of the values
before it (x, zero, v0, v1 and earlier nodes); the output is the last node.

Default 10 nodes: enough for EvoNorm-B0 (6 nodes), EvoNorm-S0 (5) and BN-ReLU (8) with room for
the dead and redundant nodes evolution carries around.  `batch_independent=True` drops the
batch aggregates (the paper's S family: layers that work at any batch size).
"""
from __future__ import annotations

import pyglove as pg

from opsearch.graph import NUM_INITIAL, LayerGraph, Node
from opsearch.ops import op_names
from opsearch.registry import search_space

DEFAULT_NUM_NODES = 10


def graph_space(ops: list[str], num_nodes: int, initial: list[int] | None = None) -> LayerGraph:
    """LayerGraph hyper-value: node i = pg.oneof(ops) over two of (initial values + nodes < i)."""
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    initial = list(range(NUM_INITIAL)) if initial is None else list(initial)
    return LayerGraph(nodes=[
        Node(op=pg.oneof(ops),
             inputs=pg.manyof(2, initial + list(range(NUM_INITIAL, NUM_INITIAL + i)), distinct=False, sorted=False))
        for i in range(num_nodes)
    ])


@search_space("evonorm")
def evonorm(num_nodes: int = DEFAULT_NUM_NODES, batch_independent: bool = False) -> LayerGraph:
    """All primitive ops (minus the batch aggregates when batch_independent)."""
    return graph_space(op_names(batch_independent=batch_independent), num_nodes)


@search_space("evonorm_ratio")
def evonorm_ratio(num_nodes: int = 8, batch_independent: bool = False) -> LayerGraph:
    """The evonorm space with the output fixed to a ratio: free nodes, then div(a, b) of two of them.

    Both discovered EvoNorms have this shape (B0: x / max(...), S0: x*sigmoid(v0*x) / std_g(x)),
    so this prior spends the budget on what goes above and below the line.
    """
    free = graph_space(op_names(batch_independent=batch_independent), num_nodes)
    last = Node(op="div", inputs=pg.manyof(2, list(range(NUM_INITIAL + num_nodes)), distinct=False, sorted=False))
    return LayerGraph(nodes=list(free.nodes) + [last])
