"""Known normalization-activation layers, written in the IR and compiled like every candidate.

Writing the baselines as graphs (not hand-written modules) means a search compares candidates
with baselines built by the same compiler, with the same parameters and the same final affine
`y * weight + bias`.  Each layer may declare a no-activation companion for the architecture
slots that want none (see `opsearch.layers.norm_act`; the EvoNorm reference uses the affine alone there).
"""
from __future__ import annotations

from opsearch.graph import GraphBuilder, LayerGraph
from opsearch.layers import declare_no_act, declare_surround
from opsearch.registry import register_layer


def _normalize(b: GraphBuilder, axis: str) -> int:
    """(x - mean(x)) / std(x) * v0 + v1 over one axis."""
    centred = b.add(b.x, b.neg(b.op(f"mean_{axis}", b.x)))
    return b.add(b.mul(b.div(centred, b.op(f"std_{axis}", b.x)), b.v0), b.v1)


def _norm(axis: str, relu: bool) -> LayerGraph:
    b = GraphBuilder()
    y = _normalize(b, axis)
    if relu:
        b.max(y, b.zero)
    return b.build()


def _evonorm_b0() -> LayerGraph:
    b = GraphBuilder()  # x / max(std_b(x), v0*x + std_i(x))
    b.div(b.x, b.max(b.std_b(b.x), b.add(b.mul(b.v0, b.x), b.std_i(b.x))))
    return b.build()


def _evonorm_s0(axis: str = "g") -> LayerGraph:
    b = GraphBuilder()  # x * sigmoid(v0*x) / std_g(x)
    b.div(b.mul(b.x, b.sigmoid(b.mul(b.v0, b.x))), b.op(f"std_{axis}", b.x))
    return b.build()


def _relu_only() -> LayerGraph:
    b = GraphBuilder()
    b.max(b.x, b.zero)
    return b.build()


def _identity() -> LayerGraph:
    b = GraphBuilder()  # x + 0: the compiler folds it to x, so this is the affine alone
    b.add(b.x, b.zero)
    return b.build()


def _silu_only() -> LayerGraph:
    b = GraphBuilder()  # x * sigmoid(x)
    b.mul(b.x, b.sigmoid(b.x))
    return b.build()


def _swish_only() -> LayerGraph:
    b = GraphBuilder()  # x * sigmoid(v0*x), Swish with a trainable per-channel beta
    b.mul(b.x, b.sigmoid(b.mul(b.v0, b.x)))
    return b.build()


KNOWN = {
    "bn_relu": (_norm("b", relu=True), "bn"),
    "bn": (_norm("b", relu=False), "bn"),
    "gn_relu": (_norm("g", relu=True), "gn"),
    "gn": (_norm("g", relu=False), "gn"),
    "ln_relu": (_norm("l", relu=True), "ln"),
    "ln": (_norm("l", relu=False), "ln"),
    "in_relu": (_norm("i", relu=True), "in"),
    "in": (_norm("i", relu=False), "in"),
    "evonorm_b0": (_evonorm_b0(), "identity"),
    "evonorm_s0": (_evonorm_s0("g"), "identity"),
    "evonorm_s0_i": (_evonorm_s0("i"), "identity"),  # instance-std variant of S0
    "evonorm_s0_l": (_evonorm_s0("l"), "identity"),  # layer-std variant of S0
    "relu_only": (_relu_only(), "identity"),
    "silu_only": (_silu_only(), "identity"),
    "swish_only": (_swish_only(), "identity"),
    "identity": (_identity(), "identity"),
}

for _name, (_layer_graph, _companion) in KNOWN.items():
    register_layer(_name)(_layer_graph)
    declare_no_act(_name, _companion)

# The references of an activation search (the `activation` space, surround "batchnorm"): the
# activation alone inside BatchNorm, built exactly as that space's candidates are (BatchNorm2d ->
# f -> affine; BatchNorm alone where the architecture wants no activation).
SURROUNDED = {
    "bn_then_relu": (_relu_only(), "batchnorm"),
    "bn_then_swish": (_swish_only(), "batchnorm"),
    "bn_then_silu": (_silu_only(), "batchnorm"),
}

for _name, (_layer_graph, _surround) in SURROUNDED.items():
    register_layer(_name)(_layer_graph)
    declare_surround(_name, _surround)
