"""The compiler: random graphs of the evonorm space against an independent reference
interpreter and against the exported standalone source; gradients; bad input; export."""
from __future__ import annotations

import ast
import copy
import pickle
import random

import pytest
import torch

from opsearch import graph
from opsearch.compile import compile_graph, export_source, forward_source
from opsearch.errors import InvalidCandidate, UserError
from opsearch.ops import OPS, op_names, resolve_groups

EPS = 1e-5
SHAPE = (3, 8, 3, 2)
GROUPS = 4


def random_plain(rng: random.Random, num_nodes: int = 10, ops: list[str] | None = None) -> tuple:
    """A graph drawn like the evonorm space: each node an op and two earlier values."""
    ops = ops or op_names()
    return tuple((rng.choice(ops), (rng.randrange(4 + i), rng.randrange(4 + i))) for i in range(num_nodes))


# ------------------------------------------------------------------ an independent reference


class Reference:
    """Evaluates a graph node by node, straight from the op table in opsearch/ops.py (slow and obvious)."""

    def __init__(self, plain: tuple, c: int, momentum: float = 0.1):
        self.plain, self.c, self.momentum = plain, c, momentum
        self.running: dict[int, torch.Tensor] = {}

    def stat(self, a: torch.Tensor, stat: str, axis: str) -> torch.Tensor:
        a = a.expand(*self.shape)  # every value is broadcast against x
        n, c, h, w = a.shape
        if axis == "g":
            g = resolve_groups(GROUPS, c)
            flat = a.reshape(n, g, -1)
            r = {"mean": flat.mean(2), "std": torch.sqrt(flat.var(2, unbiased=False) + EPS),
                 "rms": torch.sqrt((flat ** 2).mean(2) + EPS)}[stat]
            return r.repeat_interleave(c // g, dim=1).view(n, c, 1, 1)
        dims = {"b": (0, 2, 3), "i": (2, 3), "l": (1, 2, 3)}[axis]
        if stat == "mean":
            return a.mean(dims, keepdim=True)
        if stat == "std":
            return torch.sqrt(a.var(dims, unbiased=False, keepdim=True) + EPS)
        return torch.sqrt((a ** 2).mean(dims, keepdim=True) + EPS)

    def batch_stat(self, k: int, a: torch.Tensor, stat: str, training: bool) -> torch.Tensor:
        a = a.expand(*self.shape)
        init = 0.0 if stat == "mean" else 1.0
        run = self.running.setdefault(k, torch.full((self.c,), init, dtype=a.dtype))
        if training:
            dims = (0, 2, 3)
            moment = {"mean": a.mean(dims), "std": a.var(dims, unbiased=False), "rms": (a ** 2).mean(dims)}[stat]
            self.running[k] = (1 - self.momentum) * run + self.momentum * moment.detach()
        else:
            moment = run
        moment = moment.view(1, -1, 1, 1)
        return moment if stat == "mean" else torch.sqrt(moment + EPS)

    def __call__(self, x, v0, v1, weight, bias, training: bool) -> torch.Tensor:
        self.shape = x.shape
        vals = [x, torch.zeros((), dtype=x.dtype), v0.view(1, -1, 1, 1), v1.view(1, -1, 1, 1)]
        for k, (op, inputs) in enumerate(self.plain):
            a = vals[inputs[0]]
            b = vals[inputs[1]] if len(inputs) > 1 else None
            sign = lambda t: torch.where(t < 0, -1.0, 1.0).to(t.dtype)  # noqa: E731  sign(0) = +1
            if op in ("add", "mul", "max"):
                r = {"add": a + b, "mul": a * b, "max": torch.maximum(a, b)}[op]
            elif op == "div":
                r = a / torch.where(b.abs() < EPS, sign(b) * EPS, b)
            elif op == "log":
                r = sign(a) * torch.log(a.abs() + EPS)
            elif op == "sqrt":
                r = sign(a) * torch.sqrt(a.abs() + EPS)
            elif op in ("neg", "sigmoid", "tanh", "exp", "abs", "square"):
                r = getattr(torch, op)(a)
            else:
                stat, axis = op.split("_")
                r = self.batch_stat(k, a, stat, training) if axis == "b" else self.stat(a, stat, axis)
            vals.append(r)
        return (vals[-1] * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)).expand(*x.shape)


def _exec_export(plain: tuple, **options):
    namespace = {"__name__": "exported_layer"}
    exec(compile(export_source(plain, class_name="Exported", **options), "<export>", "exec"), namespace)
    return namespace["Exported"]


def _randomise(layer: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_((torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
                    * torch.where(torch.rand(p.shape, generator=gen) < 0.3, -1.0, 1.0).to(p.dtype))


# ------------------------------------------------------------------ property tests


@pytest.mark.parametrize("shape, trials", [(SHAPE, 1200), ((8, 8, 8, 8), 200)])  # tiny / >= 4096 elements
def test_random_graphs_compile_or_raise_invalid_candidate_and_match_reference_and_export(shape, trials):
    """Thousands of evonorm-space graphs: compile or InvalidCandidate; compiled == reference
    interpreter (training, then eval after two steps); compiled == exported source exactly.
    The larger shape takes the helpers' custom autograd paths (_Moments, _Max)."""
    rng = random.Random(1234 + trials)
    gen = torch.Generator().manual_seed(0)
    compiled = invalid = compared = 0
    for trial in range(trials):
        plain = random_plain(rng, rng.randint(1, 10))
        try:
            layer = compile_graph(plain, SHAPE[1], groups=GROUPS)
        except InvalidCandidate:
            invalid += 1
            assert not graph.is_valid(plain)
            continue
        compiled += 1
        layer = layer.double()
        _randomise(layer, gen)
        exported = _exec_export(plain, groups=GROUPS)(SHAPE[1]).double()
        exported.load_state_dict(layer.state_dict())
        ref = Reference(plain, SHAPE[1])
        params = [layer.v0, layer.v1, layer.weight, layer.bias]
        for step, training in enumerate([True, True, False]):
            layer.train(training)
            exported.train(training)
            x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 1.5
            with torch.no_grad():
                y, y_exp, y_ref = layer(x), exported(x), ref(x, *params, training=training)
            assert y.shape == x.shape, plain
            torch.testing.assert_close(y, y_exp, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{plain}: compiled != exported: {m}")
            if torch.isfinite(y_ref).all() and y_ref.abs().max() < 1e6:
                compared += 1
                torch.testing.assert_close(
                    y, y_ref, rtol=1e-6, atol=1e-9,
                    msg=lambda m: f"{plain} ({graph.formula(plain)}), step {step}: compiled != reference: {m}")
    assert compiled > trials // 5 and invalid > trials // 80, (compiled, invalid)
    assert compared > 0.6 * 3 * compiled, (compared, compiled)


def test_random_graphs_never_raise_anything_but_invalid_candidate():
    rng = random.Random(99)
    x = torch.randn(2, 4, 2, 2)
    for _ in range(1500):
        plain = random_plain(rng, rng.randint(1, 10))
        try:
            layer = compile_graph(plain, 4, groups=2)
        except InvalidCandidate:
            continue
        layer(x)
        layer.eval()
        layer(x)


def test_gradients_reach_exactly_the_parameters_the_formula_uses():
    rng = random.Random(7)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    checked = {2: 0, 3: 0}
    for _ in range(5000):
        plain = random_plain(rng, rng.randint(1, 10))
        if not graph.is_valid(plain):
            continue
        layer = compile_graph(plain, 4, groups=2)
        layer(x).sum().backward()
        used = graph.used_values(plain)
        assert layer.weight.grad is not None and layer.bias.grad is not None
        for index, p in ((2, layer.v0), (3, layer.v1)):
            assert (p.grad is not None) == (index in used), (plain, index)
            checked[index] += index in used
        assert x.grad is not None
        x.grad = None
    assert min(checked.values()) > 100, checked


@pytest.mark.parametrize("name", ["evonorm_b0", "evonorm_s0", "bn_relu", "gn"])
def test_second_derivatives_are_correct(name):
    # the stability filter differentiates gradient norms: double backward must be right
    from torch.func import functional_call

    from opsearch import layers

    layer = layers.build(name, 4, groups=2).double()
    buffers = dict(layer.named_buffers())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    v0 = (torch.rand(4, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    v1 = torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_()

    def f(x, v0, v1):
        return functional_call(layer, {"v0": v0, "v1": v1, "weight": layer.weight, "bias": layer.bias, **buffers}, (x,))

    assert torch.autograd.gradcheck(f, (x, v0, v1))
    assert torch.autograd.gradgradcheck(f, (x, v0, v1))


# ------------------------------------------------------------------ code generation


def test_generated_forward_is_straight_line_and_skips_provably_needless_guards():
    b0 = (("std_b", (0,)), ("mul", (2, 0)), ("std_i", (0,)), ("add", (5, 6)), ("max", (4, 7)), ("div", (0, 8)))
    src = forward_source(b0)
    assert "for " not in src and "while " not in src
    assert "_safe_den" not in src  # the denominator is >= sqrt(eps)
    # division by a value that can be ~0 keeps the guard; by a non-negative one a one-sided clamp
    assert "_safe_den" in forward_source((("mean_i", (0,)), ("div", (0, 4))))
    assert ".clamp(min=eps)" in forward_source((("abs", (0,)), ("div", (0, 4))))
    assert "_signed_sqrt" not in forward_source((("square", (0,)), ("sqrt", (4,))))
    assert "_signed_sqrt" in forward_source((("sqrt", (0,)),))


def test_zero_folding_and_common_subexpressions():
    assert forward_source((("add", (0, 1)),)).splitlines()[-1] == (
        "return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))")
    assert "torch.relu(x)" in forward_source((("max", (1, 0)),))
    src = forward_source((("mul", (0, 2)), ("mul", (2, 0)), ("add", (4, 5))))  # v0*x + x*v0
    assert src.count("v0 * x") + src.count("x * v0") == 1
    src = forward_source((("mean_b", (0,)), ("std_b", (0,)), ("add", (4, 5)), ("add", (0, 6))))
    assert src.count("_moments(") == 1  # mean and variance of x in one pass


def test_sigmoid_of_the_constant_zero_is_materialised():
    layer = compile_graph((("sigmoid", (1,)), ("mul", (0, 4))), 2)
    x = torch.randn(2, 2, 2, 2)
    torch.testing.assert_close(layer(x), x * 0.5)


def test_an_output_that_is_a_statistic_gets_the_input_shape():
    layer = compile_graph((("mean_i", (0,)),), 3)
    x = torch.randn(2, 3, 4, 4)
    y = layer(x)
    assert y.shape == x.shape and y.is_contiguous()
    y += 1  # a following in-place op must work


def test_parameters_and_buffers_follow_the_contract():
    layer = compile_graph((("relu" if False else "max", (0, 1)),), 5)
    params = dict(layer.named_parameters())
    assert sorted(params) == ["bias", "v0", "v1", "weight"]
    assert all(p.shape == (5,) for p in params.values())
    assert layer.v0.tolist() == [1.0] * 5 and layer.v1.tolist() == [0.0] * 5
    assert layer.weight.tolist() == [1.0] * 5 and layer.bias.tolist() == [0.0] * 5
    assert list(layer.buffers()) == []
    other = compile_graph((("max", (0, 1)),), 5)
    assert type(other) is type(layer) and other.v0 is not layer.v0  # class cached, state not shared


def test_pickle_and_deepcopy_rebuild_the_layer_with_its_state():
    layer = compile_graph((("std_b", (0,)), ("div", (0, 4))), 3)
    layer(torch.randn(4, 3, 2, 2))
    with torch.no_grad():
        layer.v0.fill_(2.0)
    layer.eval()
    x = torch.randn(2, 3, 2, 2)
    layer = layer.double()
    x = x.double()
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert not clone.training and type(clone) is type(layer)
        assert all(t.dtype == torch.float64 for t in clone.state_dict().values())
        assert clone.v0.requires_grad
        torch.testing.assert_close(clone.running_var_0, layer.running_var_0)
        torch.testing.assert_close(clone(x), layer(x))
        assert clone.v0 is not layer.v0


def test_export_source_is_standalone():
    b0 = (("std_b", (0,)), ("mul", (2, 0)), ("std_i", (0,)), ("add", (5, 6)), ("max", (4, 7)), ("div", (0, 8)))
    source = export_source(b0, class_name="EvoNormB0", eps=1e-3, groups=8, momentum=0.2)
    tree = ast.parse(source)
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [(type(n).__name__, [a.name for a in n.names]) for n in imports] == [("Import", ["torch"])]
    assert not any(isinstance(n, ast.Name) and n.id.startswith("opsearch") for n in ast.walk(tree))
    namespace: dict = {}
    exec(compile(source, "<export>", "exec"), namespace)
    layer = namespace["EvoNormB0"](16)
    assert (layer.eps, layer.groups, layer.momentum) == (1e-3, 8, 0.2)
    assert "x / max(std_b(x), v0*x + std_i(x))" in source
    assert graph.from_json(namespace["EvoNormB0"].GRAPH).as_tuple() == b0


def test_export_rejects_bad_class_names_and_graphs():
    with pytest.raises(UserError):
        export_source((("add", (0, 1)),), class_name="not valid")
    with pytest.raises(InvalidCandidate, match="does not depend on x"):
        export_source((("add", (2, 3)),))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bad, fragment", [
    ((("pow", (0, 1)),), "unknown op 'pow'"),
    ((("add", (0, 7)),), "out of range"),
    ((("std_b", (2,)), ("mul", (4, 3))), "does not depend on x"),
    ((), "empty graph"),
])
def test_compile_rejects_graphs_that_cannot_be_layers(bad, fragment):
    with pytest.raises(InvalidCandidate, match=fragment):
        compile_graph(bad, 4)


@pytest.mark.parametrize("shape", [(4, 3, 3), (2, 4), (1, 4, 2, 2, 2)])
def test_non_4d_input_is_a_clear_value_error(shape):
    layer = compile_graph((("exp", (0,)),), 4)
    with pytest.raises(ValueError, match=r"expects a 4-D input \(N, C, H, W\), got shape"):
        layer(torch.randn(*shape))


def test_wrong_channel_count_is_a_clear_value_error():
    with pytest.raises(ValueError, match="built for 4 channels"):
        compile_graph((("exp", (0,)),), 4)(torch.randn(2, 3, 2, 2))


@pytest.mark.parametrize("options", [dict(eps=0.0), dict(eps=1.0), dict(groups=0), dict(momentum=2.0),
                                     dict(num_channels=0)])
def test_bad_options_are_user_errors(options):
    kwargs = {"num_channels": 4, **options}
    with pytest.raises(UserError):
        compile_graph((("exp", (0,)),), kwargs.pop("num_channels"), **kwargs)


def test_op_table_ops_all_compile():
    for name, op in OPS.items():
        plain = ((name, (0, 2)),) if op.arity == 2 else ((name, (0,)),)
        layer = compile_graph(plain, 4, groups=2)
        y = layer(torch.randn(2, 4, 2, 2))
        assert torch.isfinite(y).all(), name


@pytest.mark.parametrize("name", ["evonorm_b0", "bn_relu", "evonorm_s0"])
def test_low_precision_inputs_keep_float32_running_statistics(name):
    # under autocast (Lightning's "bf16-mixed") the layer sees bf16 activations
    from opsearch import layers

    layer = layers.build(name, 4, groups=2)
    x = torch.randn(3, 4, 2, 2).bfloat16().requires_grad_()
    layer(x).float().sum().backward()
    assert x.grad is not None and all(b.dtype == torch.float32 for b in layer.buffers())
    layer.eval()
    assert torch.isfinite(layer(x)).all()


def test_custom_autograd_helpers_have_correct_first_and_second_derivatives():
    from opsearch.compile import helper_namespace

    h = helper_namespace()
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(3, 4, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    for dims in [(0, 2, 3), (2, 3), (1, 2, 3)]:
        var, mean = h["_Moments"].apply(a, dims)
        ref_var, ref_mean = torch.var_mean(a, dim=dims, correction=0, keepdim=True)
        torch.testing.assert_close((var, mean), (ref_var, ref_mean))
        assert torch.autograd.gradcheck(lambda t: h["_Moments"].apply(t, dims), (a,))
        assert torch.autograd.gradgradcheck(lambda t: h["_Moments"].apply(t, dims), (a,))
    b = (torch.randn(1, 4, 1, 1, dtype=torch.float64, generator=gen) + 0.01).requires_grad_()
    assert torch.autograd.gradcheck(h["_Max"].apply, (b, a))
    assert torch.autograd.gradgradcheck(h["_Max"].apply, (b, a))
    torch.testing.assert_close(h["_Max"].apply(b, a), torch.maximum(b, a))


def test_folded_zero_used_twice_compiles():
    """Regression: abs(zero) feeds two nodes; the folded zero must not be emitted as `t4 = `."""
    import torch

    from opsearch.compile import compile_graph

    g = (("abs", (1,)), ("sqrt", (4,)), ("log", (4,)), ("max", (5, 0)), ("sigmoid", (7,)),
         ("add", (8, 6)))
    x = torch.randn(2, 4, 3, 3)
    y = compile_graph(g, 4)(x)
    eps = 1e-5
    expected = torch.sigmoid(torch.maximum(torch.full_like(x, eps ** 0.5), x)) + torch.log(
        torch.tensor(eps))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_adding_a_constant_zero_does_not_change_the_compiled_output():
    """Graphs that differ by a constant-zero subexpression compile to the same function (the
    folding is shared by the formula, the hash and the compiler, and the reference test above
    checks the folded compiled code against the unfolded graph)."""
    from test_graph import _with_zero_added

    rng = random.Random(7)
    checked = 0
    for _ in range(150):
        g = random_plain(rng, rng.randint(1, 8))
        if not graph.is_valid(g):
            continue
        h = _with_zero_added(g, rng)
        a, b = compile_graph(g, SHAPE[1], groups=GROUPS), compile_graph(h, SHAPE[1], groups=GROUPS)
        gen = torch.Generator().manual_seed(checked)
        _randomise(a, gen)
        b.load_state_dict(a.state_dict(), strict=False)
        x = torch.randn(*SHAPE, generator=gen)
        torch.testing.assert_close(b.train()(x), a.train()(x), equal_nan=True)
        checked += 1
    assert checked > 25
