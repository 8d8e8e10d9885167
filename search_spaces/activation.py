"""Activation-function search in the Swish paper's style: element-wise ops only, no statistics.

A candidate is a scalar function f(x) applied per element (then the layer's per-channel affine);
v0 and v1 act as trainable per-channel constants (Swish's beta is v0 in x * sigmoid(v0*x)).
As in the Swish search, the network keeps its normalization: the space declares the surround
"batchnorm", so a candidate compiles to BatchNorm2d -> f -> affine (opsearch/surround.py); an
element-wise function as the whole layer would leave the deep proxies untrainable. Its fair
references are the known layers built the same way: bn_then_relu, bn_then_swish.
`trainable=False` leaves only x and the constant zero as leaves, for fixed functions such as
x * sigmoid(x).  Default 4 nodes: Swish needs 3.
"""
from __future__ import annotations

from opsearch.graph import LayerGraph
from opsearch.ops import op_names
from opsearch.registry import search_space
from opsearch.search_spaces.evonorm import graph_space

DEFAULT_NUM_NODES = 4


@search_space("activation", surround="batchnorm")
def activation(num_nodes: int = DEFAULT_NUM_NODES, trainable: bool = True) -> LayerGraph:
    """Element-wise ops only (Swish-style activation search); trainable=False drops v0, v1."""
    initial = [0, 1, 2, 3] if trainable else [0, 1]
    return graph_space(op_names(elementwise_only=True), num_nodes, initial=initial)
