"""The primitive op table and the safe forms documented in opsearch/ops.py, checked through compiled one-op layers."""
from __future__ import annotations

import math

import pytest
import torch

from opsearch import ops
from opsearch.compile import compile_graph

EPS = 1e-5


def test_table_has_exactly_the_designed_ops():
    elementwise = {"add", "mul", "div", "max", "neg", "sigmoid", "tanh", "exp", "log", "abs", "square", "sqrt"}
    aggregates = {f"{s}_{a}" for s in ("mean", "std", "rms") for a in "bilg"}
    assert set(ops.OPS) == elementwise | aggregates
    assert {n for n, o in ops.OPS.items() if o.arity == 2} == {"add", "mul", "div", "max"}
    assert {n for n, o in ops.OPS.items() if o.commutative} == {"add", "mul", "max"}
    assert {n for n, o in ops.OPS.items() if o.batch_dependent} == {"mean_b", "std_b", "rms_b"}


def test_op_names_filters():
    assert not any(n.endswith("_b") for n in ops.op_names(batch_independent=True))
    assert "std_i" in ops.op_names(batch_independent=True)
    assert set(ops.op_names(elementwise_only=True)) == {n for n, o in ops.OPS.items() if o.elementwise}
    assert len(ops.op_names()) == 24


@pytest.mark.parametrize("groups, channels, expected", [
    (32, 64, 32), (32, 48, 24), (32, 20, 20), (32, 7, 7), (4, 6, 3), (32, 3, 3), (32, 33, 11), (1, 5, 1)])
def test_group_count_rule(groups, channels, expected):
    assert ops.resolve_groups(groups, channels) == expected
    layer = compile_graph((("std_g", (0,)),), channels, groups=groups)
    assert layer.groups == expected


def _one_op(op: str, a: torch.Tensor, b: torch.Tensor | None = None, **options) -> torch.Tensor:
    """Evaluate a single op through a compiled layer: x = a (b goes in through v0)."""
    c = a.shape[1]
    if b is None:
        layer = compile_graph(((op, (0,)),), c, **options)
    else:
        layer = compile_graph(((op, (0, 2)),), c, **options)
        with torch.no_grad():
            layer.v0.copy_(b)
    layer = layer.double()
    with torch.no_grad():
        return layer(a)


def test_div_guard_pushes_small_denominators_to_signed_eps():
    x = torch.ones(1, 6, 1, 1, dtype=torch.float64)
    b = torch.tensor([0.0, -0.0, 1e-7, -1e-7, 2.0, -3.0], dtype=torch.float64)
    y = _one_op("div", x, b).flatten()
    expected = torch.tensor([1 / EPS, 1 / EPS, 1 / EPS, -1 / EPS, 0.5, -1 / 3], dtype=torch.float64)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=0)


def test_signed_log_and_sqrt():
    a = torch.tensor([-4.0, -1e-9, 0.0, 1e-9, 2.5, 100.0], dtype=torch.float64).view(1, 6, 1, 1)
    sign = torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    mag = a.flatten().abs()
    torch.testing.assert_close(_one_op("log", a).flatten(), sign * torch.log(mag + EPS))
    torch.testing.assert_close(_one_op("sqrt", a).flatten(), sign * torch.sqrt(mag + EPS))


def test_eps_is_configurable():
    a = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    assert _one_op("sqrt", a, eps=1e-2).item() == pytest.approx(0.1)
    assert _one_op("std_i", a, eps=1e-2).item() == pytest.approx(0.1)


@pytest.mark.parametrize("name, fn", [
    ("neg", torch.neg), ("sigmoid", torch.sigmoid), ("tanh", torch.tanh), ("exp", torch.exp),
    ("abs", torch.abs), ("square", torch.square)])
def test_plain_unary_ops(name, fn):
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(_one_op(name, a), fn(a))


def test_binary_ops_broadcast_per_channel():
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    b = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    bb = b.view(1, 3, 1, 1)
    torch.testing.assert_close(_one_op("add", a, b), a + bb)
    torch.testing.assert_close(_one_op("mul", a, b), a * bb)
    torch.testing.assert_close(_one_op("max", a, b), torch.maximum(a, bb))
    torch.testing.assert_close(_one_op("div", a, b), a / bb)


def _reference_stat(a: torch.Tensor, stat: str, axis: str, groups: int) -> torch.Tensor:
    n, c, h, w = a.shape
    if axis == "g":
        g = ops.resolve_groups(groups, c)
        flat = a.reshape(n, g, c // g * h * w)
        per_group = {"mean": flat.mean(2), "std": torch.sqrt(flat.var(2, unbiased=False) + EPS),
                     "rms": torch.sqrt((flat * flat).mean(2) + EPS)}[stat]
        return per_group.repeat_interleave(c // g, dim=1).view(n, c, 1, 1).expand_as(a)
    dims = {"b": (0, 2, 3), "i": (2, 3), "l": (1, 2, 3)}[axis]
    if stat == "mean":
        r = a.mean(dims, keepdim=True)
    elif stat == "std":
        r = torch.sqrt(a.var(dims, unbiased=False, keepdim=True) + EPS)
    else:
        r = torch.sqrt((a * a).mean(dims, keepdim=True) + EPS)
    return r.expand_as(a)


@pytest.mark.parametrize("stat", ["mean", "std", "rms"])
@pytest.mark.parametrize("axis", ["b", "i", "l", "g"])
@pytest.mark.parametrize("channels", [6, 8])
def test_aggregates_reduce_the_right_axes_and_broadcast_back(stat, axis, channels):
    torch.manual_seed(0)
    a = torch.randn(3, channels, 4, 5, dtype=torch.float64) * 2 + 0.5
    layer = compile_graph(((f"{stat}_{axis}", (0,)),), channels, groups=4).double()
    with torch.no_grad():
        y = layer(a)  # training mode: batch statistics
    assert y.shape == a.shape
    torch.testing.assert_close(y, _reference_stat(a, stat, axis, 4))


def test_batch_aggregate_running_estimates_follow_the_pytorch_momentum_convention():
    torch.manual_seed(0)
    layer = compile_graph((("mean_b", (0,)), ("std_b", (0,)), ("rms_b", (0,)), ("add", (4, 5)), ("add", (7, 6))),
                          3, momentum=0.25).double()
    names = sorted(name for name, _ in layer.named_buffers())
    assert names == ["running_mean_0", "running_sq_2", "running_var_1"]
    assert layer.running_mean_0.tolist() == [0.0] * 3 and layer.running_var_1.tolist() == [1.0] * 3
    assert layer.running_sq_2.tolist() == [1.0] * 3
    mean, var, sq = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for _ in range(3):
        a = torch.randn(4, 3, 2, 2, dtype=torch.float64) * 3 + 1
        layer(a)
        mean = 0.75 * mean + 0.25 * a.mean((0, 2, 3))
        var = 0.75 * var + 0.25 * a.var((0, 2, 3), unbiased=False)  # biased, as the EvoNorm reference
        sq = 0.75 * sq + 0.25 * (a * a).mean((0, 2, 3))
    torch.testing.assert_close(layer.running_mean_0, mean)
    torch.testing.assert_close(layer.running_var_1, var)
    torch.testing.assert_close(layer.running_sq_2, sq)
    layer.eval()
    a = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    expected = (mean + torch.sqrt(var + EPS) + torch.sqrt(sq + EPS)).view(1, 3, 1, 1).expand_as(a)
    with torch.no_grad():
        torch.testing.assert_close(layer(a), expected)
    torch.testing.assert_close(layer.running_mean_0, mean)  # eval does not update


def test_aggregate_of_a_per_channel_value_matches_the_broadcast_definition():
    # std_g(v0): v0 broadcast over (N, H, W); its group statistic spans channels within a group.
    layer = compile_graph((("std_g", (2,)), ("mul", (0, 4))), 4, groups=2).double()
    with torch.no_grad():
        layer.v0.copy_(torch.tensor([1.0, 3.0, -2.0, 2.0]))
        y = layer(torch.ones(2, 4, 3, 3, dtype=torch.float64))
    expected = torch.tensor([math.sqrt(1 + EPS)] * 2 + [math.sqrt(4 + EPS)] * 2, dtype=torch.float64)
    torch.testing.assert_close(y[0, :, 0, 0], expected)
