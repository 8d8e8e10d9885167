"""Graph -> PyTorch: generate straight-line source for a layer's forward and exec it.

Why generated source: an interpreter looping over nodes costs Python time per op and hides the
computation from readers; generated code runs exactly the torch calls a person would write, is
what `opsearch export` hands out (standalone, `import torch` only), and is what `compile_graph`
executes, so the two cannot drift apart.

Before emitting, a small static pass over the pruned graph
  * folds the constant zero (x + 0 -> x, a * 0 -> 0, ...) with `graph.fold_zero`, the one fold
    that validation, the formula and the canonical hash use too, so they agree on what the layer
    computes; and writes max(a, 0) as relu(a);
  * merges duplicate nodes (same op on the same inputs, commutative inputs in any order);
  * tracks the sign of every value (>= 0, >= sqrt(eps), ...) so that a division by a value that
    is provably |b| >= sqrt(eps) >= eps (std_*, rms_*, max with one, ...) skips the safe-division
    guard, and sqrt/log of a provably non-negative value skips the sign handling;
  * computes the mean and the variance of one input over one axis in one pass helper
    (`_moments`, a two-pass autograd Function much faster than torch.var on CPU); max uses a
    cheap-backward `_max`.
The facts are symbolic in eps, valid for any 0 < eps <= 0.25 (checked by the constructor).

Every name in the generated code comes from the op table, the fixed helper functions or
integers from a validated graph, so no graph can inject code.
"""
from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from opsearch import graph as _graph
from opsearch.errors import UserError
from opsearch.graph import NUM_INITIAL, GraphLike, PlainGraph
from opsearch.ops import AXES, OPS, PREC_ADD, PREC_ATOM, PREC_MUL, STATS, Op

DEFAULT_EPS = 1e-5
DEFAULT_GROUPS = 32
DEFAULT_MOMENTUM = 0.1
MAX_EPS = 0.25  # sqrt(eps) >= 2 * eps: the range facts below rely on it


def is_v0(parameter_name: str) -> bool:
    """Whether a compiled layer's parameter is v0, the trainable vector that starts at 1 (also
    inside a wrapper: ``layer.v0``); the equivalence's band rule follows where training takes it."""
    return parameter_name.rsplit(".", 1)[-1] == "v0"

# Helper functions of the generated source (the op table's safe forms and group reshapes).
HELPERS = '''
class _Moments(torch.autograd.Function):
    """(biased variance, mean) of `a` over `dims` (kept): a two-pass forward and a one-op backward.

    About 4x faster on CPU than torch.var / torch.var_mean (Welford), forward+backward; the
    backward uses only differentiable ops on saved tensors, so double backward works.
    """

    @staticmethod
    def forward(ctx, a, dims):
        mean = a.mean(dims, keepdim=True)
        centred = a - mean
        var = (centred * centred).mean(dims, keepdim=True)
        ctx.save_for_backward(a, mean)
        return var, mean

    @staticmethod
    def backward(ctx, grad_var, grad_mean):
        a, mean = ctx.saved_tensors
        n = a.numel() // max(mean.numel(), 1)
        return torch.addcmul(grad_mean / n, a - mean, grad_var * (2.0 / n)), None


def _moments(a, dims):
    """(biased variance, mean) over dims: the two-pass Function for large CPU tensors, else
    torch.var_mean (one fused kernel on GPUs; less Python overhead on tiny tensors)."""
    if a.is_cpu and a.numel() >= 4096:
        return _Moments.apply(a, dims)
    return torch.var_mean(a, dim=dims, correction=0, keepdim=True)


class _Max(torch.autograd.Function):
    """torch.maximum with a cheap backward (ties send the gradient to the first operand)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a >= b)
        ctx.shapes = (a.shape, b.shape)
        return torch.maximum(a, b)

    @staticmethod
    def backward(ctx, grad):
        first, = ctx.saved_tensors
        grad_a = grad * first
        grad_b = grad - grad_a
        return grad_a.sum_to_size(ctx.shapes[0]), grad_b.sum_to_size(ctx.shapes[1])


def _max(a, b):
    if max(a.numel(), b.numel()) >= 4096:
        return _Max.apply(a, b)
    return torch.maximum(a, b)  # tiny tensors: the Python Function would cost more than it saves


def _update(momentum, *pairs):
    """running <- (1 - momentum) * running + momentum * batch value, for each (running, value)."""
    with torch.no_grad():
        for running, batch_value in pairs:
            running.lerp_(batch_value.reshape(-1).to(running.dtype), momentum)


def _safe_den(b, eps):
    """b with |b| < eps pushed to sign(b) * eps, sign(0) = +1 (the denominator of a safe div)."""
    return torch.where(b < 0, b.clamp(max=-eps), b.clamp(min=eps))


def _signed_sqrt(a, eps):
    """sign(a) * sqrt(|a| + eps), sign(0) = +1."""
    m = torch.sqrt(torch.abs(a) + eps)
    return torch.where(a < 0, -m, m)


def _signed_log(a, eps):
    """sign(a) * ln(|a| + eps), sign(0) = +1."""
    m = torch.log(torch.abs(a) + eps)
    return torch.where(a < 0, -m, m)


def _groups_of(a, groups):
    """(N, C, H, W) -> (N, groups, C / groups, H, W) for statistics over channel groups."""
    n, c, h, w = a.shape
    return a.reshape(n, groups, c // groups, h, w)


def _ungroup(s, channels):
    """A per-group statistic (N, G, 1, 1, 1) -> per channel (N, C, 1, 1)."""
    n, g = s.shape[0], s.shape[1]
    return s.expand(n, g, channels // g, 1, 1).reshape(n, channels, 1, 1)


def _resolve_groups(groups, channels):
    """min(groups, C), lowered until it divides C (the EvoNorm reference rule)."""
    g = min(int(groups), int(channels))
    if g < 1:
        raise ValueError(f"groups and num_channels must be >= 1, got {groups} and {channels}")
    while channels % g:
        g -= 1
    return g
'''

# --------------------------------------------------------------------------------------------
# Static facts per value


@dataclass
class _Value:
    """What the compiler knows about one value of the (pruned) graph."""

    zero: bool = False  # the constant 0 (never materialised unless an op needs a tensor)
    alias: int | None = None  # identical to another value (x + 0, duplicate node)
    # dims that are full-size (else 1): N, C, H*W
    n: bool = False
    c: bool = False
    hw: bool = False
    # sign facts, symbolic in eps: lo 1 = ">= 0", 2 = ">= sqrt(eps)"; hi 1 = "<= 0", 2 = "<= -sqrt(eps)"
    lo: int = 0
    hi: int = 0
    big: bool = False  # |value| >= sqrt(eps)
    # an element-wise expression over `args`, or an aggregate of args[0]
    template: str = ""
    prec: int = PREC_ATOM
    args: tuple[int, ...] = ()
    agg: Op | None = None


def _facts_initial() -> list[_Value]:
    return [
        _Value(n=True, c=True, hw=True),  # x
        _Value(zero=True, lo=1, hi=1),  # zero
        _Value(c=True),  # v0
        _Value(c=True),  # v1
    ]


def _shape_union(vals: list[_Value], args) -> dict:
    return dict(n=any(vals[j].n for j in args), c=any(vals[j].c for j in args), hw=any(vals[j].hw for j in args))


def _analyse(plain: PlainGraph) -> list[_Value]:
    """Facts, folding and the chosen code template for every value of a pruned graph."""
    vals = _facts_initial()
    seen: dict[tuple, int] = {}
    folded = _graph.fold_zero(plain)  # the constant zero, as validation and the formula see it

    def rep(j: int) -> int:
        while vals[j].alias is not None:
            j = vals[j].alias
        return j

    for k, (op, inputs) in enumerate(plain):
        index = NUM_INITIAL + k
        spec = OPS[op]
        if folded[index] == _graph.ZERO:
            vals.append(_Value(zero=True, lo=1, hi=1))
            continue
        if folded[index] != index:  # a + 0
            vals.append(_Value(alias=rep(folded[index])))
            continue
        read = tuple(rep(j) for j in inputs[:spec.arity])
        key = (op, tuple(sorted(read)) if spec.commutative else read)
        if key in seen:  # duplicate node: reuse the first
            vals.append(_Value(alias=seen[key]))
            continue
        seen[key] = index
        vals.append(_fold_or_facts(op, spec, read, vals))
        if vals[-1].alias is not None:
            vals[-1] = _Value(alias=rep(vals[-1].alias))
    return vals


def _fold_or_facts(op: str, spec: Op, read: tuple[int, ...], vals: list[_Value]) -> _Value:
    a = vals[read[0]]
    b = vals[read[1]] if spec.arity == 2 else None
    zeros = [vals[j].zero for j in read]
    # values that are always 0 or equal to an operand were folded by `graph.fold_zero`; what is
    # left of the zero here is a cheaper code template
    if op == "max" and any(zeros):
        j = read[1] if zeros[0] else read[0]
        v = vals[j]
        lo = max(v.lo, 1)
        return _Value(template="torch.relu({0})", args=(j,), lo=lo, hi=min(v.hi, 1), big=lo == 2,
                      **_shape_union(vals, (j,)))
    if op == "div" and b.zero:  # the guard turns 0 into +eps
        return _Value(template="{0} / eps", prec=PREC_MUL, args=(read[0],), lo=a.lo and 1, hi=a.hi and 1,
                      **_shape_union(vals, (read[0],)))
    if spec.axis is not None:
        return _aggregate_facts(spec, read[0], vals)
    return _elementwise_facts(op, spec, read, vals)


def _elementwise_facts(op: str, spec: Op, read: tuple[int, ...], vals: list[_Value]) -> _Value:
    a = vals[read[0]]
    b = vals[read[1]] if spec.arity == 2 else None
    shape = _shape_union(vals, read)
    template, prec = spec.code, spec.code_prec
    lo = hi = 0
    big = False
    if op == "add":
        if b.template == "-{0}" or a.template == "-{0}":  # a + (-b) -> a - b (exact in IEEE)
            keep, negated = (read[0], b) if b.template == "-{0}" else (read[1], a)
            template, prec, read = "{0} - {1}", PREC_ADD, (keep, negated.args[0])
        if a.lo and b.lo:
            lo = max(a.lo, b.lo)
        if a.hi and b.hi:
            hi = max(a.hi, b.hi)
    elif op == "mul":
        if (a.lo and b.lo) or (a.hi and b.hi):
            lo = 1
        if (a.lo and b.hi) or (a.hi and b.lo):
            hi = 1
    elif op == "div":
        den_pos = b.lo >= 1  # guarded denominator > 0
        den_neg = b.hi == 2
        if (a.lo and den_pos) or (a.hi and den_neg):
            lo = 1
        if (a.hi and den_pos) or (a.lo and den_neg):
            hi = 1
        if b.big:
            template = spec.fast_code
        elif b.lo >= 1:
            template = "{0} / {1}.clamp(min=eps)"
    elif op == "max":
        lo = max(a.lo, b.lo)
        hi = min(a.hi, b.hi)
    elif op == "neg":
        lo, hi, big = a.hi, a.lo, a.big
    elif op in ("sigmoid", "exp"):
        lo = 1
    elif op == "tanh":
        lo, hi = min(a.lo, 1), min(a.hi, 1)
    elif op == "abs":
        lo = 2 if a.big else 1
    elif op == "square":
        lo = 1
    elif op == "sqrt":
        big = True
        if a.lo >= 1:
            lo = 2
        elif a.hi == 2:
            hi = 2
    if spec.fast_when == "nonneg" and a.lo >= 1:
        template = spec.fast_code
    big = big or lo == 2 or hi == 2
    if template in ("{0} / {1}", "{0} / {1}.clamp(min=eps)"):
        prec = PREC_MUL
    return _Value(template=template, prec=prec, args=read, lo=lo, hi=hi, big=big, **shape)


def _aggregate_facts(spec: Op, j: int, vals: list[_Value]) -> _Value:
    a = vals[j]
    if spec.stat == "mean":
        lo, hi = a.lo, a.hi
        if spec.batch_dependent:  # eval uses a running mean initialised to 0
            lo, hi = min(lo, 1), min(hi, 1)
    else:
        lo, hi = 2, 0
    axis = spec.axis
    if axis == "g" and not a.c:  # constant across channels: a group statistic is the instance one
        axis = "i"
    shape = {"b": dict(n=False, c=True, hw=False), "i": dict(n=a.n, c=a.c, hw=False),
             "l": dict(n=a.n, c=False, hw=False), "g": dict(n=a.n, c=True, hw=False)}[axis]
    agg = OPS[f"{spec.stat}_{axis}"]
    return _Value(agg=agg, args=(j,), lo=lo, hi=hi, big=lo == 2 or hi == 2, **shape)


# --------------------------------------------------------------------------------------------
# Code generation


def _resolve(vals: list[_Value], j: int) -> int:
    while vals[j].alias is not None:
        j = vals[j].alias
    return j


def _effective_live(vals: list[_Value], out: int) -> list[int]:
    """Values (>= NUM_INITIAL) the output reaches through the folded graph, in order."""
    live: set[int] = set()
    stack = [out]
    while stack:
        j = _resolve(vals, stack.pop())
        if j in live:
            continue
        live.add(j)
        stack.extend(vals[j].args)
    return sorted(j for j in live if j >= NUM_INITIAL)


def _wrap(code: str, prec: float, template: str, pos: int, own_prec: int) -> str:
    """Parenthesise an operand unless its place in the template cannot change its meaning."""
    if prec >= PREC_ATOM:
        return code
    mark = "{%d}" % pos
    i = template.index(mark)
    before, after = template[:i], template[i + len(mark):]
    if (before.endswith("(") or before.endswith(", ")) and (after.startswith(")") or after.startswith(",")):
        return code  # a whole call argument
    if before == "" and prec >= own_prec:
        return code  # left operand of an operator that binds no tighter than it
    return f"({code})"


@dataclass
class _Emitter:
    vals: list[_Value]
    live: list[int]
    lines: list[str] = field(default_factory=list)
    code: dict[int, tuple[str, float]] = field(default_factory=dict)
    buffers: list[tuple[str, float]] = field(default_factory=list)  # (name, initial value)
    uses_zero_tensor: bool = False

    def operand(self, j: int) -> tuple[str, float]:
        j = _resolve(self.vals, j)
        if self.vals[j].zero:
            self.uses_zero_tensor = True
            return "_zero", PREC_ATOM
        return self.code[j]

    def atom(self, j: int) -> str:
        code, prec = self.operand(j)
        return code if prec >= PREC_ATOM else f"({code})"


_INITIAL_CODE = {0: ("x", PREC_ATOM), 2: ("v0", PREC_ATOM), 3: ("v1", PREC_ATOM)}


def _generate_forward(plain: PlainGraph) -> tuple[list[str], list[tuple[str, float]], str]:
    """(forward body lines, running buffers, formula) for a pruned, validated graph."""
    vals = _analyse(plain)
    out = _resolve(vals, len(vals) - 1)
    live = _effective_live(vals, out)
    uses: dict[int, int] = {}
    for j in live:
        for a in vals[j].args:
            a = _resolve(vals, a)
            uses[a] = uses.get(a, 0) + 1
    # which (input, axis) pairs need both mean and std: one var_mean serves both
    moments: dict[tuple[int, str], set[str]] = {}
    for j in live:
        if vals[j].agg is not None:
            moments.setdefault((_resolve(vals, vals[j].args[0]), vals[j].agg.axis), set()).add(vals[j].agg.stat)
    em = _Emitter(vals, live)
    em.code.update(_INITIAL_CODE)
    shared: dict[tuple[int, str], tuple[str, str]] = {}  # (input, axis) -> (var name, mean name)
    grouped: dict[int, str] = {}
    for j in live:
        v = vals[j]
        if v.zero:  # a folded constant zero: operands read it as `_zero`, nothing to emit
            continue
        if v.agg is not None:
            _emit_aggregate(em, j, v, moments, shared, grouped)
            continue
        args = [em.operand(a) for a in v.args]
        text = v.template.format(*(_wrap(c, p, v.template, i, v.prec) for i, (c, p) in enumerate(args)))
        if uses.get(j, 0) > 1 or j == out:
            em.lines.append(f"t{j} = {text}")
            em.code[j] = (f"t{j}", PREC_ATOM)
        else:
            em.code[j] = (text, v.prec)
    body: list[str] = []
    if em.uses_zero_tensor:
        body.append("_zero = x.new_zeros((1, 1, 1, 1))")
    body += em.lines
    out_code, out_prec = em.code[out]
    affine = f"torch.addcmul(self.bias.view(1, -1, 1, 1), {out_code}, self.weight.view(1, -1, 1, 1))"
    o = vals[out]
    if o.n and o.c and o.hw:
        body.append(f"return {affine}")
    else:  # e.g. an output that is a statistic: give it the input's shape
        body.append(f"return {affine}.expand(x.shape).contiguous()")
    return body, em.buffers, _graph.formula(plain)


def _emit_aggregate(em: _Emitter, j: int, v: _Value, moments, shared, grouped) -> None:
    agg = v.agg
    a = _resolve(em.vals, v.args[0])
    stat, axis = agg.stat, agg.axis
    needs = moments[(a, axis)]
    both = stat in ("mean", "std") and {"mean", "std"} <= needs
    node = j - NUM_INITIAL
    if axis == "g":
        if a not in grouped:
            grouped[a] = f"_g{a}"
            em.lines.append(f"_g{a} = _groups_of({em.operand(a)[0]}, groups)")
        src, dims = grouped[a], "(2, 3, 4)"
    else:
        src, dims = em.atom(a), str(AXES[axis][0])
    if axis != "b":
        wrap = (lambda s: f"_ungroup({s}, C)") if axis == "g" else (lambda s: s)
        if both:
            if (a, axis) not in shared:
                shared[(a, axis)] = (f"_v{j}", f"_m{j}")
                em.lines.append(f"_v{j}, _m{j} = _moments({src}, {dims})")
            var, mean = shared[(a, axis)]
            text = wrap(mean) if stat == "mean" else wrap(f"torch.sqrt({var} + eps)")
        elif stat == "mean":
            text = wrap(f"{src}.mean(dim={dims}, keepdim=True)")
        elif stat == "std":
            text = wrap(f"torch.sqrt(_moments({src}, {dims})[0] + eps)")
        else:
            text = wrap(f"torch.sqrt(torch.square({src}).mean(dim={dims}, keepdim=True) + eps)")
        em.lines.append(f"t{j} = {text}")
        em.code[j] = (f"t{j}", PREC_ATOM)
        return
    # batch aggregate: batch statistic + running-estimate update in training, the estimate in eval
    moment, init = STATS[stat]
    expand = "" if em.vals[a].c else ".expand(1, C, 1, 1)"
    if both and (a, axis) in shared:
        var, mean = shared[(a, axis)]
        em.code[j] = (mean, PREC_ATOM) if stat == "mean" else _sqrt_line(em, j, var)
        return
    buf = f"running_{moment}_{node}"
    em.buffers.append((buf, init))
    if both:
        partner = next(k for k in _live_aggs(em, a, axis) if k != j)
        pbuf = f"running_{'var' if stat == 'mean' else 'mean'}_{partner - NUM_INITIAL}"
        em.buffers.append((pbuf, STATS['std' if stat == 'mean' else 'mean'][1]))
        var, mean = f"_v{j}", f"_m{j}"
        shared[(a, axis)] = (var, mean)
        vbuf, mbuf = (pbuf, buf) if stat == "mean" else (buf, pbuf)
        em.lines += [
            "if self.training:",
            f"    {var}, {mean} = _moments({src}, {dims})",
            f"    _update(momentum, (self.{vbuf}, {var}), (self.{mbuf}, {mean}))",
        ]
        if expand:
            em.lines.append(f"    {var}, {mean} = {var}{expand}, {mean}{expand}")
        em.lines += [
            "else:",
            f"    {var} = self.{vbuf}.view(1, -1, 1, 1)",
            f"    {mean} = self.{mbuf}.view(1, -1, 1, 1)",
        ]
        em.code[j] = (mean, PREC_ATOM) if stat == "mean" else _sqrt_line(em, j, var)
        return
    s = f"_s{j}"
    batch_stat = {
        "mean": f"{src}.mean(dim={dims}, keepdim=True)",
        "std": f"_moments({src}, {dims})[0]",
        "rms": f"torch.square({src}).mean(dim={dims}, keepdim=True)",
    }[stat]
    em.lines += [
        "if self.training:",
        f"    {s} = {batch_stat}",
        f"    _update(momentum, (self.{buf}, {s}))",
    ]
    if expand:
        em.lines.append(f"    {s} = {s}{expand}")
    em.lines += ["else:", f"    {s} = self.{buf}.view(1, -1, 1, 1)"]
    em.code[j] = (s, PREC_ATOM) if stat == "mean" else _sqrt_line(em, j, s)


def _live_aggs(em: _Emitter, a: int, axis: str) -> list[int]:
    return [k for k in em.live if (v := em.vals[k]).agg is not None and v.agg.axis == axis
            and _resolve(em.vals, v.args[0]) == a and v.agg.stat in ("mean", "std")]


def _sqrt_line(em: _Emitter, j: int, var: str) -> tuple[str, float]:
    em.lines.append(f"t{j} = torch.sqrt({var} + eps)")
    return f"t{j}", PREC_ATOM


# --------------------------------------------------------------------------------------------
# Source and module


def _class_source(plain: PlainGraph, class_name: str, eps: float, groups: int, momentum: float) -> str:
    body, buffers, formula = _generate_forward(plain)
    graph_json = json.dumps(_graph.to_dict(plain), separators=(",", ":"))
    used = "\n".join(body)
    prelude = ["C = self.num_channels", "if x.dim() != 4 or x.shape[1] != C:", "    _bad_input(self, x)"]
    if "eps" in used:
        prelude.append("eps = self.eps")
    if "groups" in used:
        prelude.append("groups = self.groups")
    if "momentum" in used:
        prelude.append("momentum = self.momentum")
    for name in ("v0", "v1"):
        if any(_mentions(line, name) for line in body):
            prelude.append(f"{name} = self.{name}.view(1, -1, 1, 1)")
    init_buffers = [f"        self.register_buffer({name!r}, torch.full((num_channels,), {init!r}))"
                    for name, init in buffers]
    forward = "\n".join("        " + line for line in prelude + body)
    return f'''
class {class_name}(torch.nn.Module):
    """Normalization-activation layer: y = ({formula}) * weight + bias, per channel."""

    FORMULA = {formula!r}
    GRAPH = {graph_json!r}

    def __init__(self, num_channels, eps={eps!r}, groups={groups!r}, momentum={momentum!r}):
        super().__init__()
        if not 0 < eps <= {MAX_EPS!r}:
            raise ValueError(f"eps must be in (0, {MAX_EPS!r}], got {{eps}}")
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self.groups = _resolve_groups(groups, self.num_channels)
        self.momentum = float(momentum)
        self.v0 = torch.nn.Parameter(torch.ones(num_channels))
        self.v1 = torch.nn.Parameter(torch.zeros(num_channels))
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))
{chr(10).join(init_buffers)}

    def forward(self, x):
{forward}

    def extra_repr(self):
        return f"{{self.num_channels}}, eps={{self.eps}}, groups={{self.groups}}, momentum={{self.momentum}}, formula={{self.FORMULA!r}}"
'''


_CHECK_INPUT = '''
def _bad_input(layer, x):
    if x.dim() != 4:
        raise ValueError(f"{type(layer).__name__} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != layer.num_channels:
        raise ValueError(f"{type(layer).__name__} was built for {layer.num_channels} channels, "
                         f"got input of shape {tuple(x.shape)}")
'''


def _mentions(line: str, name: str) -> bool:
    import re
    return re.search(rf"(?<![\w.]){name}(?!\w)", line) is not None


def _check_options(num_channels: int, eps: float, groups: int, momentum: float) -> None:
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise UserError(f"num_channels must be a positive integer, got {num_channels!r}")
    if not isinstance(eps, (int, float)) or not 0 < eps <= MAX_EPS:
        raise UserError(f"eps must be in (0, {MAX_EPS}], got {eps!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise UserError(f"groups must be a positive integer, got {groups!r}")
    if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
        raise UserError(f"momentum must be in [0, 1], got {momentum!r}")


def export_source(g: GraphLike, class_name: str = "SearchedLayer", *, eps: float = DEFAULT_EPS,
                  groups: int = DEFAULT_GROUPS, momentum: float = DEFAULT_MOMENTUM,
                  torch_compile: bool = False, surround: str = "none") -> str:
    """Standalone PyTorch source (imports only torch) of the layer `g`; raises InvalidCandidate.

    torch_compile=True: `class_name` runs its forward and backward through torch.compile, with
    the plain module (`<class_name>Plain`) as the fallback where the compiler cannot run (one
    warning), the same guard as `layers.build(..., compile=True)`.
    surround="batchnorm" (opsearch/surround.py): `class_name` is BatchNorm2d (``norm``) then the
    graph's class `<class_name>Core` (``layer``), the structure and state-dict keys of
    `layers.build(g, C, surround="batchnorm")`.
    """
    from opsearch import surround as _surround

    if not class_name.isidentifier():
        raise UserError(f"class name must be a Python identifier, got {class_name!r}")
    _check_options(1, eps, groups, momentum)
    surround = _surround.check(surround)
    plain = _validated_pruned(g)
    formula = _graph.formula(plain)
    around = "" if surround == _surround.NONE else f"surround: {surround} ({_surround.SURROUNDS[surround]})\n"
    header = (f'"""Normalization-activation layer generated by opsearch (standalone: needs only torch).\n\n'
              f'formula: y = ({formula}) * weight + bias\n{around}"""\n')
    core = class_name if surround == _surround.NONE else class_name + "Core"
    options = (float(eps), int(groups), float(momentum))
    if not torch_compile:
        source = header + "import torch\n\n" + HELPERS + _CHECK_INPUT + _class_source(plain, core, *options)
    else:
        from opsearch.torch_compile_guard import GUARD_SOURCE

        source = (header + "import torch\n\n" + HELPERS + _CHECK_INPUT + GUARD_SOURCE
                  + _class_source(plain, core + "Plain", *options)
                  + f"\n\n{core} = _with_torch_compile({core}Plain, {core!r})\n")
    if surround != _surround.NONE:
        source += _surround.export_class(surround, class_name, core, formula, eps=options[0],
                                         groups=options[1], momentum=options[2])
    return source


def _validated_pruned(g: GraphLike) -> PlainGraph:
    plain = _graph.as_plain(g)
    _graph.validate(plain)
    return _graph.prune(plain)


class CompiledLayer:
    """Mixin of every compiled layer class: the graph it came from, and pickling by rebuilding."""

    graph: PlainGraph
    FORMULA: str

    @property
    def formula(self) -> str:
        return self.FORMULA

    def __deepcopy__(self, memo):
        # what deepcopy does for any nn.Module (the class is shared, not rebuilt); needed because
        # __reduce_ex__ below is for pickling only
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    def __reduce_ex__(self, protocol):
        # the generated class cannot be pickled by reference: rebuild it from the graph
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        return _rebuild, (self.graph, self.num_channels, self.eps, self.groups, self.momentum, self.training, state)


def _rebuild(plain, num_channels, eps, groups, momentum, training, state):
    layer = compile_graph(plain, num_channels, eps=eps, groups=groups, momentum=momentum)
    layer.load_state_dict(state, assign=True)  # keeps the saved tensors' device and dtype
    layer.train(training)
    return layer


@functools.lru_cache(maxsize=1)
def helper_namespace() -> dict:
    """The helper functions of the generated source, executed once (shared by compiled classes)."""
    namespace: dict = {"torch": torch, "__name__": "opsearch.compiled"}
    exec(compile(HELPERS + _CHECK_INPUT, "<opsearch layer helpers>", "exec"), namespace)
    return namespace


@functools.lru_cache(maxsize=4096)
def _compiled_class(pruned: PlainGraph) -> type:
    source = _class_source(pruned, "GeneratedLayer", DEFAULT_EPS, DEFAULT_GROUPS, DEFAULT_MOMENTUM)
    namespace = dict(helper_namespace())
    exec(compile(source, "<opsearch generated layer>", "exec"), namespace)
    generated = namespace["GeneratedLayer"]
    return type("CompiledLayer", (generated, CompiledLayer),
                {"graph": pruned, "SOURCE": source, "__module__": "opsearch.compiled"})


def compile_graph(g: GraphLike, num_channels: int, *, eps: float = DEFAULT_EPS, groups: int = DEFAULT_GROUPS,
                  momentum: float = DEFAULT_MOMENTUM) -> nn.Module:
    """A fresh nn.Module computing `g` (then the per-channel affine) on (N, C, H, W) inputs.

    Parameters v0 (init 1), v1 (init 0), weight (1), bias (0), each (C,), exist whether or not the
    formula uses them; batch aggregates keep running estimates in buffers `running_<moment>_<node>`.
    Raises InvalidCandidate for a graph that cannot be a layer.
    """
    _check_options(num_channels, eps, groups, momentum)
    return _compiled_class(_validated_pruned(g))(num_channels, eps=eps, groups=groups, momentum=momentum)


def forward_source(g: GraphLike) -> str:
    """Only the generated forward body of `g` (for reading and debugging)."""
    body, _, _ = _generate_forward(_validated_pruned(g))
    return "\n".join(body)
