"""Forward+backward speed of compiled layers vs the same formulas hand-written in eager PyTorch.

    python benchmarks/layer_speed.py                  # CPU, (32,64,16,16) and (64,128,32,32)
    python benchmarks/layer_speed.py --device cuda    # GPU

For each shape it times, interleaved (one step of every variant per round, median over rounds):
the compiled known layers `evonorm_b0`, `evonorm_s0`, `bn_relu` (opsearch.layers.build); the same
formulas written by hand as ordinary nn.Modules in plain eager PyTorch (torch.var/var_mean,
torch.maximum; batch statistics, running-estimate update, per-channel affine: the same
computation, checked equal before timing); the hand-written modules again with the compiler's
`_moments`/`_max` helpers swapped in (isolates the generated code's own overhead); and
nn.BatchNorm2d+ReLU as the native baseline.  A step is ``y = layer(x); y.backward(grad)`` in
training mode with ``x.requires_grad`` (as inside a network).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from torch import nn

from opsearch import layers
from opsearch.compile import helper_namespace

_HELPERS = helper_namespace()


def _var(x, dims, fused: bool):
    if fused:
        return _HELPERS["_moments"](x, dims)[0]
    return torch.var(x, dim=dims, correction=0, keepdim=True)


def _var_mean(x, dims, fused: bool):
    if fused:
        return _HELPERS["_moments"](x, dims)
    return torch.var_mean(x, dim=dims, correction=0, keepdim=True)


def _maximum(a, b, fused: bool):
    return _HELPERS["_max"](a, b) if fused else torch.maximum(a, b)


def _affine_params(layer: nn.Module, c: int) -> None:
    layer.v0 = nn.Parameter(torch.ones(c))
    layer.weight = nn.Parameter(torch.ones(c))
    layer.bias = nn.Parameter(torch.zeros(c))


class HandEvoNormB0(nn.Module):
    """x / max(sqrt(var_b(x) + eps), v0*x + sqrt(var_i(x) + eps)) * weight + bias."""

    def __init__(self, c: int, eps: float = 1e-5, momentum: float = 0.1, fused: bool = False):
        super().__init__()
        _affine_params(self, c)
        self.register_buffer("running_var", torch.ones(c))
        self.eps, self.momentum, self.fused = eps, momentum, fused

    def forward(self, x):
        if self.training:
            var = _var(x, (0, 2, 3), self.fused)
            with torch.no_grad():
                self.running_var.lerp_(var.reshape(-1), self.momentum)
        else:
            var = self.running_var.view(1, -1, 1, 1)
        inst_std = torch.sqrt(_var(x, (2, 3), self.fused) + self.eps)
        den = _maximum(torch.sqrt(var + self.eps), self.v0.view(1, -1, 1, 1) * x + inst_std, self.fused)
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x / den, self.weight.view(1, -1, 1, 1))


class HandEvoNormS0(nn.Module):
    """x * sigmoid(v0*x) / sqrt(var_g(x) + eps) * weight + bias."""

    def __init__(self, c: int, eps: float = 1e-5, groups: int = 32, fused: bool = False):
        super().__init__()
        _affine_params(self, c)
        self.eps, self.fused = eps, fused
        self.groups = min(groups, c)
        while c % self.groups:
            self.groups -= 1

    def forward(self, x):
        n, c, h, w = x.shape
        g = self.groups
        var = _var(x.reshape(n, g, c // g, h, w), (2, 3, 4), self.fused)
        std = torch.sqrt(var + self.eps).expand(n, g, c // g, 1, 1).reshape(n, c, 1, 1)
        y = x * torch.sigmoid(self.v0.view(1, -1, 1, 1) * x) / std
        return torch.addcmul(self.bias.view(1, -1, 1, 1), y, self.weight.view(1, -1, 1, 1))


class HandBNReLU(nn.Module):
    """max((x - mean_b(x)) / sqrt(var_b(x) + eps) * v0 + v1, 0) * weight + bias."""

    def __init__(self, c: int, eps: float = 1e-5, momentum: float = 0.1, fused: bool = False):
        super().__init__()
        _affine_params(self, c)
        self.v1 = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.eps, self.momentum, self.fused = eps, momentum, fused

    def forward(self, x):
        if self.training:
            var, mean = _var_mean(x, (0, 2, 3), self.fused)
            with torch.no_grad():
                self.running_var.lerp_(var.reshape(-1), self.momentum)
                self.running_mean.lerp_(mean.reshape(-1), self.momentum)
        else:
            var, mean = self.running_var.view(1, -1, 1, 1), self.running_mean.view(1, -1, 1, 1)
        y = torch.relu((x - mean) / torch.sqrt(var + self.eps) * self.v0.view(1, -1, 1, 1)
                       + self.v1.view(1, -1, 1, 1))
        return torch.addcmul(self.bias.view(1, -1, 1, 1), y, self.weight.view(1, -1, 1, 1))


HAND = {"evonorm_b0": HandEvoNormB0, "evonorm_s0": HandEvoNormS0, "bn_relu": HandBNReLU}


def _check_same(name: str, compiled: nn.Module, hand: nn.Module, x: torch.Tensor) -> float:
    """Max relative difference of outputs (train, then eval after the step) between the two."""
    compiled, hand = copy.deepcopy(compiled), copy.deepcopy(hand)  # leave the timed modules fresh
    worst = 0.0
    for mode in (True, False):
        compiled.train(mode)
        hand.train(mode)
        with torch.no_grad():
            a, b = compiled(x), hand(x)
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item())
    if worst > 1e-5:
        raise SystemExit(f"{name}: compiled and hand-written layers disagree (max rel diff {worst:.2e})")
    return worst


def _time_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, inner: int, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        layer(x).backward(grad)
    sync()
    return (time.perf_counter() - t0) / inner


def run(shapes, names, device: str, rounds: int, warmup: int) -> list[dict]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for shape in shapes:
        n, c, h, w = shape
        torch.manual_seed(0)
        x = torch.randn(*shape, device=device, requires_grad=True)
        grad = torch.randn(*shape, device=device)
        variants: dict[str, nn.Module] = {}
        for name in names:
            variants[f"{name}/compiled"] = layers.build(name, c).to(device)
            variants[f"{name}/hand"] = HAND[name](c).to(device)
            variants[f"{name}/hand_fused"] = HAND[name](c, fused=True).to(device)
            _check_same(name, variants[f"{name}/compiled"], variants[f"{name}/hand"], x)
            _check_same(name, variants[f"{name}/compiled"], variants[f"{name}/hand_fused"], x)
        variants["BatchNorm2d+ReLU"] = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()).to(device)
        inner = max(1, int(2e6 // (n * c * h * w)))  # ~2M elements of work per timed sample
        for layer in variants.values():
            for _ in range(warmup):
                _time_step(layer, x, grad, 1, sync)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(rounds):
            order = list(variants.items())
            if r % 2:
                order.reverse()  # no variant always runs right after the same neighbour
            for key, layer in order:
                times[key].append(_time_step(layer, x, grad, inner, sync))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        for name in names:
            rows.append({"shape": shape, "layer": name, "compiled_ms": med[f"{name}/compiled"],
                         "hand_ms": med[f"{name}/hand"], "hand_fused_ms": med[f"{name}/hand_fused"],
                         "bn_relu_native_ms": med["BatchNorm2d+ReLU"]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", default="32,64,16,16;64,128,32,32",
                   help="semicolon-separated N,C,H,W shapes")
    p.add_argument("--layers", default="evonorm_b0,evonorm_s0,bn_relu")
    p.add_argument("--rounds", type=int, default=None, help="default: 25 on CPU, 200 on GPU (cheap there, and noisier)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave default)")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 25 if args.device == "cpu" else 200
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    names = [s for s in args.layers.split(",") if s]
    unknown = [s for s in names if s not in HAND]
    if unknown:
        p.error(f"no hand-written reference for {unknown}; choose from {sorted(HAND)}")
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"{args.rounds} interleaved rounds, median forward+backward per step (training mode)")
    rows = run(shapes, names, args.device, args.rounds, args.warmup)
    print("hand: the formula in plain eager PyTorch (torch.var / torch.var_mean, torch.maximum);")
    print("hand+helpers: the same, written with the compiler's _moments/_max helpers (measures the")
    print("generated code's own overhead)")
    print(f"{'shape':<14} {'layer':<11} {'compiled':>9} {'hand':>8} {'ratio':>6} {'hand+helpers':>13} {'ratio':>6} "
          f"{'BN2d+ReLU':>10}   (ms per forward+backward)")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{shape:<14} {r['layer']:<11} {r['compiled_ms']:>9.3f} {r['hand_ms']:>8.3f} "
              f"{r['compiled_ms'] / r['hand_ms']:>6.3f} {r['hand_fused_ms']:>13.3f} "
              f"{r['compiled_ms'] / r['hand_fused_ms']:>6.3f} {r['bn_relu_native_ms']:>10.3f}")
    worst = max(r["compiled_ms"] / r["hand_ms"] for r in rows)
    worst_fused = max(r["compiled_ms"] / r["hand_fused_ms"] for r in rows)
    print(f"worst compiled/hand: {worst:.3f}, compiled/hand+helpers: {worst_fused:.3f} (target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
