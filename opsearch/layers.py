"""Layers by name, graph or file: the entry point users and the proxy architectures call.

`build("evonorm_s0", 64)` compiles a known layer (a graph in `registry.layers`), a LayerGraph, a
plain graph or a graph JSON file with the same compiler every candidate goes through.
`norm_act(...)` makes the `factory(num_channels, act)` the proxy architectures take: slots with
no activation (the last norm of a residual block, a projection shortcut) get the layer's
no-activation companion, as the EvoNorm reference code does.
A layer option `surround` (opsearch/surround.py) puts a module around a graph: "batchnorm" keeps
the network's BatchNorm before the candidate (the Swish-paper setup of an activation search).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from torch import nn

from opsearch import graph as _graph
from opsearch import registry
from opsearch import surround as _surround
from opsearch.compile import DEFAULT_EPS, DEFAULT_GROUPS, DEFAULT_MOMENTUM, compile_graph
from opsearch.errors import InvalidCandidate, UserError
from opsearch.graph import LayerGraph, PlainGraph

OPTIONS = ("eps", "groups", "momentum", "surround")
NO_ACT_MODES = ("affine", "bn", "same")
MAX_GRAPH_FILE_BYTES = 1 << 20

# known layer -> the known layer used where the architecture wants no activation
_NO_ACT: dict[str, str] = {}
# known layer -> its surround (opsearch/surround.py); absent: none
_SURROUND: dict[str, str] = {}


def declare_no_act(name: str, companion: str) -> None:
    """Declare the no-activation companion of a known layer (e.g. bn_relu -> bn)."""
    _NO_ACT[name] = companion


def no_act_companion(name: str) -> str | None:
    registry.layers.load_builtins()
    return _NO_ACT.get(name)


def built_like_candidates(name: str, config: Any) -> bool:
    """Whether the known layer `name` has a run's surround (`config`'s): only then can a
    candidate's graph be the same layer (the equivalence's key) or a start for evolution.
    UserError for an unknown name."""
    return surround_of(name) == _surround.of_config(config)


def declare_surround(name: str, surround: str) -> None:
    """Declare that a known layer is its graph inside `surround` (e.g. bn_then_relu: ReLU after
    BatchNorm). A known layer is a whole layer: it keeps its own surround in any run."""
    _SURROUND[name] = _surround.check(surround)


def surround_of(layer: Any, default: str | None = None) -> str:
    """The surround `layer` is built with: a known layer's own (none unless declared), for
    anything else (a graph, a graph file) `default`, the run's choice for its candidates."""
    if isinstance(layer, str) and layer in registry.layers:
        return _SURROUND.get(layer, _surround.NONE)
    return _surround.check(default)


class Surrounded(nn.Module):
    """A surround's module (``norm``: BatchNorm2d) then the compiled graph (``layer``, with the
    v0, v1, weight, bias every compiled layer has); see opsearch/surround.py."""

    def __init__(self, norm: nn.Module, layer: nn.Module):
        super().__init__()
        self.norm = norm
        self.layer = layer

    def forward(self, x):
        return self.layer(self.norm(x))

    @property
    def graph(self) -> PlainGraph:
        return self.layer.graph

    @property
    def formula(self) -> str:
        return self.layer.formula

    @property
    def num_channels(self) -> int:
        return self.layer.num_channels


def surround_module(surround: str, num_channels: int, options: dict) -> nn.Module | None:
    """What `surround` puts before the graph, alone (None for none): also what a surrounded
    layer puts where the architecture wants no activation."""
    if _surround.check(surround) == _surround.NONE:
        return None
    return nn.BatchNorm2d(num_channels, eps=options["eps"], momentum=options["momentum"])


def _compile(plain: PlainGraph, num_channels: int, surround: str, options: dict) -> nn.Module:
    layer = compile_graph(plain, num_channels, **options)
    before = surround_module(surround, num_channels, options)
    return layer if before is None else Surrounded(before, layer)


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
    """Plain graph of a known layer name, a graph JSON path, a formula as tables print it
    (``tanh(x) / std_b(x)``, `opsearch.formula_parser`), a LayerGraph or a plain graph."""
    if isinstance(name_or_graph, os.PathLike):
        return _load_plain(name_or_graph)
    if isinstance(name_or_graph, str):
        text = name_or_graph
        if text in registry.layers:
            entry = registry.layers.get(text)
            if callable(entry) and not isinstance(entry, LayerGraph):
                entry = entry()
            return _graph.as_plain(entry)
        if text.endswith(".json") or os.path.isfile(text):
            return _load_plain(text)
        return _formula_or_error(text)
    return _graph.as_plain(name_or_graph)


def _formula_or_error(text: str) -> PlainGraph:
    """A string that names no layer and no file: its formula's graph, or the error that says what
    the user most likely meant (a layer name, a file, a formula)."""
    from opsearch.formula_parser import FormulaError, parse_formula_plain

    try:
        return parse_formula_plain(text)
    except FormulaError as e:
        if re.fullmatch(r"[A-Za-z_][\w.-]*", text.strip()):
            registry.layers.get(text)  # a name: UserError with the known names
        if os.path.sep in text and "(" not in text:
            return _load_plain(text)  # a path: "graph file not found"
        raise UserError(f"not a known layer, a graph file or a layer formula: {e}") from None


def get_graph(name_or_graph: Any) -> LayerGraph:
    """The LayerGraph of a known layer name, a graph file, a LayerGraph or a plain graph."""
    if isinstance(name_or_graph, LayerGraph):
        return name_or_graph
    return LayerGraph.from_tuple(resolve(name_or_graph))


def _check_options(options: dict) -> tuple[dict, str | None]:
    """(compile options with their defaults, the surround option or None when not given)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UserError(f"unknown layer option(s) {', '.join(map(repr, unknown))}; known: {', '.join(OPTIONS)}")
    options = dict(options)
    surround = options.pop("surround", None)
    if surround is not None:
        _surround.check(surround)
    return {"eps": DEFAULT_EPS, "groups": DEFAULT_GROUPS, "momentum": DEFAULT_MOMENTUM, **options}, surround


def build(name_or_graph: Any, num_channels: int, *, compile: bool = False, **options) -> nn.Module:
    """Compiled layer for C = num_channels; options: eps, groups, momentum, surround.

    surround ("none", "batchnorm"; opsearch/surround.py) applies to a graph; a known layer's
    name keeps its own (`surround_of`): a surrounded layer is `Surrounded(norm, layer)`.
    compile=True: forward and backward run through torch.compile (inductor), with the same
    parameters and state-dict keys; where the compiler cannot run, the plain forward, with one
    warning (see opsearch.torch_compile).
    Raises UserError for an unknown name or a bad file, InvalidCandidate for a graph that cannot
    be a layer.
    """
    options, surround = _check_options(options)
    layer = compile_graph(resolve(name_or_graph), num_channels, **options)
    if compile:
        from opsearch.torch_compile import torch_compiled
        layer = torch_compiled(layer)
    before = surround_module(surround_of(name_or_graph, surround), num_channels, options)
    return layer if before is None else Surrounded(before, layer)


class NormActFactory:
    """`factory(num_channels, act=True) -> nn.Module`, picklable (holds plain graphs only).

    With a surround, act=True slots hold the surrounded graph and act=False slots the surround
    alone (`no_act_graph` None), or the surrounded `no_act_graph` when one is given."""

    def __init__(self, graph: PlainGraph, no_act_graph: PlainGraph | None, options: dict, name: str = "",
                 surround: str = _surround.NONE):
        self.graph = graph
        self.no_act_graph = no_act_graph
        self.options = dict(options)
        self.name = name or _graph.formula(graph)
        self.surround = _surround.check(surround)

    def __call__(self, num_channels: int, act: bool = True) -> nn.Module:
        if not act and self.no_act_graph is None:
            return surround_module(self.surround, num_channels, self.options)
        return _compile(self.graph if act else self.no_act_graph, num_channels, self.surround, self.options)

    @property
    def formula(self) -> str:
        return _graph.formula(self.graph)

    def __repr__(self) -> str:
        no_act = self.surround if self.no_act_graph is None else _graph.formula(self.no_act_graph)
        around = "" if self.surround == _surround.NONE else f", surround={self.surround!r}"
        return f"NormActFactory({self.name!r}, no_act={no_act!r}{around})"


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

    `surround` (option) surrounds a graph (a known layer keeps its own, `surround_of`). A
    surrounded layer's act=False slots hold the surround alone (BatchNorm where the network has
    no activation, as in the Swish paper), or with no_act="same" the surrounded candidate.
    """
    if no_act not in NO_ACT_MODES:
        raise UserError(f"no_act must be one of {', '.join(NO_ACT_MODES)}, got {no_act!r}")
    options, surround = _check_options(options)
    surround = surround_of(name_or_graph, surround)
    plain = resolve(name_or_graph)
    _graph.validate(plain)
    companion = no_act_companion(name_or_graph) if isinstance(name_or_graph, str) else None
    if companion is not None:
        no_act_plain = resolve(companion)
    elif no_act == "same":
        no_act_plain = plain
    elif surround != _surround.NONE:
        no_act_plain = None  # the surround alone
    else:
        no_act_plain = resolve("identity" if no_act == "affine" else "bn")
    name = name_or_graph if isinstance(name_or_graph, str) else ""
    return NormActFactory(plain, no_act_plain, options, name=name, surround=surround)
