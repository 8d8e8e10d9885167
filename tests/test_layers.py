"""Known layers against their formulas written out independently, and the layers API."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from opsearch import graph, layers, registry
from opsearch.errors import InvalidCandidate, UserError

EPS = 1e-5
C = 8
GROUPS = 4
MOMENTUM = 0.1


# ------------------------------------------------------------------ independent formulas


def _v(p: torch.Tensor) -> torch.Tensor:
    return p.view(1, -1, 1, 1)


def _var(x, dims):
    return x.var(dims, unbiased=False, keepdim=True)


def _group_var(x, groups):
    n, c, h, w = x.shape
    return x.reshape(n, groups, -1).var(2, unbiased=False).repeat_interleave(c // groups, 1).view(n, c, 1, 1)


def _group_mean(x, groups):
    n, c, h, w = x.shape
    return x.reshape(n, groups, -1).mean(2).repeat_interleave(c // groups, 1).view(n, c, 1, 1)


class Formula:
    """A known layer's formula with its own running statistics (PyTorch momentum convention)."""

    def __init__(self, name: str):
        self.name = name
        self.running_mean = torch.zeros(C, dtype=torch.float64)
        self.running_var = torch.ones(C, dtype=torch.float64)

    def batch_moments(self, x, training):
        if training:
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            self.running_mean = (1 - MOMENTUM) * self.running_mean + MOMENTUM * mean
            self.running_var = (1 - MOMENTUM) * self.running_var + MOMENTUM * var
            return _v(mean), _v(var)
        return _v(self.running_mean), _v(self.running_var)

    def __call__(self, x, p, training):
        v0, v1, w, b = _v(p["v0"]), _v(p["v1"]), _v(p["weight"]), _v(p["bias"])
        name = self.name
        if name == "evonorm_b0":
            _, var_b = self.batch_moments(x, training)
            y = x / torch.maximum(torch.sqrt(var_b + EPS), v0 * x + torch.sqrt(_var(x, (2, 3)) + EPS))
        elif name.startswith("evonorm_s0"):
            var = {"evonorm_s0": lambda: _group_var(x, GROUPS), "evonorm_s0_i": lambda: _var(x, (2, 3)),
                   "evonorm_s0_l": lambda: _var(x, (1, 2, 3))}[name]()
            y = x * torch.sigmoid(v0 * x) / torch.sqrt(var + EPS)
        elif name in ("bn_relu", "bn", "gn_relu", "gn", "ln_relu", "ln", "in_relu", "in"):
            base = name.split("_")[0]
            if base == "bn":
                mean, var = self.batch_moments(x, training)
            elif base == "gn":
                mean, var = _group_mean(x, GROUPS), _group_var(x, GROUPS)
            else:
                dims = (1, 2, 3) if base == "ln" else (2, 3)
                mean, var = x.mean(dims, keepdim=True), _var(x, dims)
            y = (x - mean) / torch.sqrt(var + EPS) * v0 + v1
            if name.endswith("_relu"):
                y = torch.relu(y)
        elif name == "relu_only":
            y = torch.relu(x)
        elif name == "silu_only":
            y = x * torch.sigmoid(x)
        elif name == "swish_only":
            y = x * torch.sigmoid(v0 * x)
        elif name == "identity":
            y = x
        else:
            raise KeyError(name)
        return y * w + b


REQUIRED = ["bn_relu", "gn_relu", "ln_relu", "bn", "evonorm_b0", "evonorm_s0", "relu_only", "identity"]


def test_required_known_layers_exist():
    assert set(REQUIRED) <= set(layers.known_layers())
    assert layers.known_layers() == registry.layers.names()
    for name in layers.known_layers():
        assert isinstance(registry.layers.get(name), graph.LayerGraph)


@pytest.mark.parametrize("batch", [6, 64])  # 64: >= 4096 elements, the helpers' custom autograd paths
@pytest.mark.parametrize("name", sorted(registry.layers.names()))
def test_known_layer_equals_its_formula_in_training_and_eval(name, batch):
    torch.manual_seed(0)
    layer = layers.build(name, C, groups=GROUPS).double()
    norm = nn.Identity()
    if isinstance(layer, layers.Surrounded):  # BatchNorm2d, then the graph: test the graph
        norm, layer = layer.norm, layer.layer  # (the BatchNorm: tests/test_surround.py)
        name = next(n for n in ("relu_only", "silu_only", "swish_only")
                    if layers.resolve(n) == layers.resolve(name))
    with torch.no_grad():  # non-trivial parameters, so every term matters
        layer.v0.copy_(torch.rand(C) + 0.5)
        layer.v1.copy_(torch.randn(C) * 0.3)
        layer.weight.copy_(torch.rand(C) + 0.5)
        layer.bias.copy_(torch.randn(C) * 0.3)
    formula = Formula(name)
    p = dict(layer.named_parameters())
    for step in range(4):  # training steps update the running statistics
        with torch.no_grad():
            x = norm(torch.randn(batch, C, 5, 4, dtype=torch.float64) * 2 + 0.7)
            torch.testing.assert_close(layer(x), formula(x, p, training=True), rtol=1e-5, atol=1e-12)
    layer.eval()
    for _ in range(2):
        x = torch.randn(batch - 1, C, 5, 4, dtype=torch.float64) * 2 + 0.7
        with torch.no_grad():
            torch.testing.assert_close(layer(x), formula(x, p, training=False), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in sorted(registry.layers.names()) if graph.uses_batch(registry.layers.get(n))])
def test_eval_output_of_one_sample_does_not_depend_on_the_rest_of_the_batch(name):
    torch.manual_seed(1)
    layer = layers.build(name, C, groups=GROUPS)
    for _ in range(3):
        layer(torch.randn(8, C, 4, 4) * 3 + 1)
    layer.eval()
    x = torch.randn(8, C, 4, 4)
    other = torch.cat([x[:1], torch.randn(7, C, 4, 4) * 10 - 5])
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[:1], layer(other)[:1])
        torch.testing.assert_close(layer(x[:1]), layer(x)[:1])
    layer.train()
    with torch.no_grad():  # in training it does: the batch statistics differ
        assert not torch.allclose(layer(x)[:1], layer(other)[:1])


def test_batch_independent_known_layers_do_not_use_the_batch():
    for name in ["evonorm_s0", "gn_relu", "ln_relu", "relu_only", "identity"]:
        assert not graph.uses_batch(registry.layers.get(name))
    for name in ["evonorm_b0", "bn_relu", "bn"]:
        assert graph.uses_batch(registry.layers.get(name))


# ------------------------------------------------------------------ build / load


def test_build_accepts_names_graphs_plain_tuples_and_files(tmp_path):
    g = registry.layers.get("evonorm_s0")
    x = torch.randn(2, C, 3, 3)
    expected = layers.build("evonorm_s0", C)(x)
    torch.testing.assert_close(layers.build(g, C)(x), expected)
    torch.testing.assert_close(layers.build(g.as_tuple(), C)(x), expected)
    path = tmp_path / "s0.json"
    path.write_text(graph.to_json(g))
    torch.testing.assert_close(layers.build(str(path), C)(x), expected)
    torch.testing.assert_close(layers.build(path, C)(x), expected)
    assert layers.load(path).as_tuple() == g.as_tuple()
    assert layers.get_graph("evonorm_s0").as_tuple() == g.as_tuple()
    # a record holding the graph under "graph" (e.g. a trial's attributes) loads too
    path.write_text(json.dumps({"formula": "...", "graph": graph.to_json(g)}))
    assert layers.load(path).as_tuple() == g.as_tuple()


def test_build_options_reach_the_layer():
    layer = layers.build("gn_relu", 48, eps=1e-3, groups=32, momentum=0.3)
    assert (layer.eps, layer.groups, layer.momentum) == (1e-3, 24, 0.3)
    with pytest.raises(UserError, match="unknown layer option"):
        layers.build("gn_relu", 48, group=4)


@pytest.mark.parametrize("arg, error, fragment", [
    ("evonrm_b0", UserError, "did you mean 'evonorm_b0'"),
    ("missing/graph.json", UserError, "graph file not found"),
    ((("add", (2, 3)),), InvalidCandidate, "does not depend on x"),
    ((("pow", (0, 1)),), InvalidCandidate, "unknown op"),
])
def test_build_errors_are_clear(arg, error, fragment):
    with pytest.raises(error, match=fragment):
        layers.build(arg, 4)


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        layers.load(bad)
    bad.write_text(json.dumps({"schema": "something/else", "nodes": []}))
    with pytest.raises(UserError, match="schema"):
        layers.load(bad)
    bad.write_text(json.dumps({"schema": "opsearch.graph/1", "nodes": [{"op": "add", "inputs": [0, 99]}]}))
    with pytest.raises(UserError, match="out of range"):
        layers.load(bad)


# ------------------------------------------------------------------ norm_act factory


def _formula_of(module) -> str:
    return module.FORMULA


def test_norm_act_known_companions():
    assert _formula_of(layers.norm_act("bn_relu")(C, act=False)) == graph.formula(registry.layers.get("bn"))
    assert _formula_of(layers.norm_act("gn_relu")(C, act=False)) == graph.formula(registry.layers.get("gn"))
    assert _formula_of(layers.norm_act("ln_relu")(C, act=False)) == graph.formula(registry.layers.get("ln"))
    for name in ("evonorm_b0", "evonorm_s0", "relu_only"):
        assert _formula_of(layers.norm_act(name)(C, act=False)) == "x"  # x + 0: the affine alone
    assert _formula_of(layers.norm_act("evonorm_b0")(C, act=True)) == "x / max(std_b(x), v0*x + std_i(x))"
    # the companion wins over no_act for known layers
    assert _formula_of(layers.norm_act("bn_relu", no_act="same")(C, act=False)) == graph.formula(
        registry.layers.get("bn"))


def test_norm_act_candidate_no_act_modes():
    cand = (("tanh", (0,)), ("mul", (4, 2)))
    assert _formula_of(layers.norm_act(cand)(C, act=False)) == "x"  # x + 0, folded
    assert _formula_of(layers.norm_act(cand, no_act="bn")(C, act=False)) == graph.formula(registry.layers.get("bn"))
    assert _formula_of(layers.norm_act(cand, no_act="same")(C, act=False)) == "tanh(x)*v0"
    assert _formula_of(layers.norm_act(cand)(C)) == "tanh(x)*v0"
    with pytest.raises(UserError, match="no_act must be one of"):
        layers.norm_act(cand, no_act="relu")
    with pytest.raises(InvalidCandidate):
        layers.norm_act((("add", (2, 3)),))


def test_norm_act_factory_is_picklable_and_builds_fresh_layers():
    factory = layers.norm_act("evonorm_s0", groups=4)
    clone = pickle.loads(pickle.dumps(factory))
    a, b = clone(C), clone(C)
    assert a.groups == 4 and a.v0 is not b.v0
    assert "evonorm_s0" in repr(factory)
