"""Layers by name, graph or file: the entry point users and the proxy architectures call.

`build("evonorm_s0", 64)` compiles a known layer (a graph in `registry.layers`), a LayerGraph, a
plain graph or a graph JSON file with the same compiler every candidate goes through.
`norm_act(...)` makes the `factory(num_channels, act)` the proxy architectures take: slots with
no activation (the last norm of a residual block, a projection shortcut) get the layer's
no-activation companion, as the EvoNorm reference code does.
"""
from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from opsearch import graph as _graph
from opsearch import registry
from opsearch.compile import DEFAULT_EPS, DEFAULT_GROUPS, DEFAULT_MOMENTUM, compile_graph
from opsearch.errors import InvalidCandidate, UserError
from opsearch.graph import LayerGraph, PlainGraph

OPTIONS = ("eps", "groups", "momentum")
NO_ACT_MODES = ("affine", "bn", "same")
MAX_GRAPH_FILE_BYTES = 1 << 20

# known layer -> the known layer used where the architecture wants no activation
_NO_ACT: dict[str, str] = {}


def declare_no_act(name: str, companion: str) -> None:
    """Declare the no-activation companion of a known layer (e.g. bn_relu -> bn)."""
    _NO_ACT[name] = companion


def no_act_companion(name: str) -> str | None:
    registry.layers.load_builtins()
    return _NO_ACT.get(name)


def known_layers() -> list[str]:
    """Names of the known layers (built-in and plugins), sorted."""
    return registry.layers.names()


def load(path: str | os.PathLike) -> LayerGraph:
    """Graph from a JSON file of our schema (`graph.to_dict`); a bad file raises UserError."""
    return LayerGraph.from_tuple(_load_plain(path))


def _load_plain(path: str | os.PathLike) -> PlainGraph:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"graph file not found: {path}")
    if os.path.getsize(path) > MAX_GRAPH_FILE_BYTES:
        raise UserError(f"graph file too large to be a graph: {path}")
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"graph file {path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "schema" not in data and isinstance(data.get("graph"), (dict, str)):
        data = data["graph"]  # a record that holds a graph (e.g. a trial's attributes)
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as e:
                raise UserError(f"graph file {path}: 'graph' is not valid JSON: {e}") from None
    try:
        return _graph.plain_from_dict(data)
    except (ValueError, InvalidCandidate) as e:
        raise UserError(f"graph file {path}: {e}") from None


def resolve(name_or_graph: Any) -> PlainGraph:
    """Plain graph of a known layer name, a graph JSON path, a LayerGraph or a plain graph."""
    if isinstance(name_or_graph, os.PathLike):
        return _load_plain(name_or_graph)
    if isinstance(name_or_graph, str):
        if name_or_graph in registry.layers:
            entry = registry.layers.get(name_or_graph)
            if callable(entry) and not isinstance(entry, LayerGraph):
                entry = entry()
            return _graph.as_plain(entry)
        if name_or_graph.endswith(".json") or os.path.sep in name_or_graph or os.path.isfile(name_or_graph):
            return _load_plain(name_or_graph)
        registry.layers.get(name_or_graph)  # raises UserError with the known names
    return _graph.as_plain(name_or_graph)


def get_graph(name_or_graph: Any) -> LayerGraph:
    """The LayerGraph of a known layer name, a graph file, a LayerGraph or a plain graph."""
    if isinstance(name_or_graph, LayerGraph):
        return name_or_graph
    return LayerGraph.from_tuple(resolve(name_or_graph))


def _check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UserError(f"unknown layer option(s) {', '.join(map(repr, unknown))}; known: {', '.join(OPTIONS)}")
    return {"eps": DEFAULT_EPS, "groups": DEFAULT_GROUPS, "momentum": DEFAULT_MOMENTUM, **options}


def build(name_or_graph: Any, num_channels: int, *, compile: bool = False, **options) -> nn.Module:
    """Compiled layer for C = num_channels; options: eps, groups, momentum.

    compile=True: forward and backward run through torch.compile (inductor), with the same
    parameters and state-dict keys; where the compiler cannot run, the plain forward, with one
    warning (see opsearch.torch_compile).
    Raises UserError for an unknown name or a bad file, InvalidCandidate for a graph that cannot
    be a layer.
    """
    layer = compile_graph(resolve(name_or_graph), num_channels, **_check_options(options))
    if compile:
        from opsearch.torch_compile import torch_compiled
        layer = torch_compiled(layer)
    return layer


class NormActFactory:
    """`factory(num_channels, act=True) -> nn.Module`, picklable (holds plain graphs only)."""

    def __init__(self, graph: PlainGraph, no_act_graph: PlainGraph, options: dict, name: str = ""):
        self.graph = graph
        self.no_act_graph = no_act_graph
        self.options = dict(options)
        self.name = name or _graph.formula(graph)

    def __call__(self, num_channels: int, act: bool = True) -> nn.Module:
        return compile_graph(self.graph if act else self.no_act_graph, num_channels, **self.options)

    @property
    def formula(self) -> str:
        return _graph.formula(self.graph)

    def __repr__(self) -> str:
        return f"NormActFactory({self.name!r}, no_act={_graph.formula(self.no_act_graph)!r})"


def is_factory(layer: Any) -> bool:
    """Whether `layer` is already a ``norm_act(num_channels, act)`` factory rather than something
    that names or holds a graph (a name, a path, a LayerGraph, a plain graph)."""
    return callable(layer) and not isinstance(layer, (str, os.PathLike, tuple, list, LayerGraph, nn.Module))


def as_factory(layer: Any, **options) -> Any:
    """`layer` as a norm_act factory: a factory as it is, anything else through `norm_act`."""
    return layer if is_factory(layer) else norm_act(layer, **options)


def norm_act(name_or_graph: Any, *, no_act: str = "affine", **options) -> NormActFactory:
    """The factory proxy architectures take.

    act=False slots use the known layer's declared companion (bn_relu -> bn, evonorm_* -> the
    per-channel affine alone, ...); any other graph uses `no_act`: "affine" (default; identity
    then the affine), "bn", or "same" (the candidate itself).
    """
    if no_act not in NO_ACT_MODES:
        raise UserError(f"no_act must be one of {', '.join(NO_ACT_MODES)}, got {no_act!r}")
    options = _check_options(options)
    plain = resolve(name_or_graph)
    _graph.validate(plain)
    companion = no_act_companion(name_or_graph) if isinstance(name_or_graph, str) else None
    if companion is not None:
        no_act_plain = resolve(companion)
    elif no_act == "same":
        no_act_plain = plain
    else:
        no_act_plain = resolve("identity" if no_act == "affine" else "bn")
    name = name_or_graph if isinstance(name_or_graph, str) else ""
    return NormActFactory(plain, no_act_plain, options, name=name)
