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


# --------------------------------------------------------------------------------------------
# torch.compile: nn.BatchNorm2d+ReLU vs the plain compiled IR vs the IR through torch.compile

# The best layer of the default search recorded in BENCHMARKS ("Default search"):
# x / max(std_b(x), v0*x + rms_b(v0*x)); values 0..3 are x, 0, v0, v1, then one per node.
FOUND_LAYER = (("std_b", (0,)), ("mul", (2, 0)), ("rms_b", (5,)), ("add", (5, 6)), ("max", (4, 7)),
               ("div", (0, 8)))


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux clear_refs 5); returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _fixed_mmap_threshold(limit: int = 64 * 1024) -> bool:
    """Make glibc serve every allocation >= `limit` by mmap and unmap it on free (no dynamic
    threshold), so that the process RSS follows live tensor memory; False where unavailable."""
    try:
        import ctypes

        M_MMAP_THRESHOLD = -3
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, limit))
    except (OSError, AttributeError):
        return False


def _peak_step_bytes(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Peak RSS above the level before one forward+backward (output and input gradient freed
    after, as in a network where the next layer consumes them)."""
    x.grad = None
    before = _reset_peak_rss()
    layer(x).backward(grad)
    peak = _status_kib("VmHWM") * 1024
    x.grad = None
    return max(0, peak - before)


def run_torch_compile(shapes, names, rounds: int, warmup: int) -> list[dict]:
    """Per shape: BN2d+ReLU, and per layer the IR module and the IR through torch.compile."""
    import torch._dynamo

    from opsearch import torch_compile

    rows = []
    for shape in shapes:
        n, c, h, w = shape
        torch._dynamo.reset()  # kernels for this shape (a network gets dynamic-shape kernels)
        torch.manual_seed(0)
        x = torch.randn(*shape, requires_grad=True)
        grad = torch.randn(*shape)
        variants: dict[str, nn.Module] = {"BatchNorm2d+ReLU": nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())}
        compile_s = {}
        for name in names:
            graph = FOUND_LAYER if name == "found" else name
            variants[f"{name}/ir"] = layers.build(graph, c)
            variants[f"{name}/torch.compile"] = layers.build(graph, c, compile=True)
            compile_s[name] = _check_compiled(name, variants[f"{name}/ir"],
                                              variants[f"{name}/torch.compile"], x, grad)
            if torch_compile.failure() is not None:
                raise SystemExit(f"torch.compile failed here: {torch_compile.failure()}")
        inner = max(1, int(2e6 // (n * c * h * w)))
        for layer in variants.values():
            for _ in range(warmup):
                _time_step(layer, x, grad, 1, lambda: None)
        times: dict[str, list[float]] = {k: [] for k in variants}
        peaks: dict[str, list[int]] = {k: [] for k in variants}
        for r in range(rounds):
            order = list(variants.items())
            if r % 2:
                order.reverse()
            for key, layer in order:
                times[key].append(_time_step(layer, x, grad, inner, lambda: None))
                if r < 3:
                    peaks[key].append(_peak_step_bytes(layer, x, grad))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        mem = {k: min(v) / 2**20 for k, v in peaks.items()}
        for name in names:
            rows.append({"shape": shape, "layer": name, "bn_ms": med["BatchNorm2d+ReLU"],
                         "bn_mib": mem["BatchNorm2d+ReLU"], "ir_ms": med[f"{name}/ir"],
                         "ir_mib": mem[f"{name}/ir"], "tc_ms": med[f"{name}/torch.compile"],
                         "tc_mib": mem[f"{name}/torch.compile"], "compile_s": compile_s[name]})
    return rows


def _check_compiled(name: str, plain: nn.Module, compiled: nn.Module, x, grad) -> float:
    """Forward, input gradient and running estimates equal (to float tolerance) before timing,
    on copies (the timed modules stay fresh); returns the seconds of the first compiled step
    (torch.compile compiles then; the copies share the compiled code with the original)."""
    a, b = copy.deepcopy(plain), copy.deepcopy(compiled)
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ya = a(xa)
    ya.backward(grad)
    t0 = time.perf_counter()
    yb = b(xb)
    yb.backward(grad)
    first = time.perf_counter() - t0
    for what, u, v in [("output", ya, yb), ("input gradient", xa.grad, xb.grad),
                       *[(f"buffer {k}", u, b.state_dict()[k]) for k, u in a.state_dict().items()]]:
        if not torch.allclose(u, v, rtol=1e-4, atol=1e-4):
            raise SystemExit(f"{name}: torch.compile disagrees with the plain layer on {what} "
                             f"(max abs diff {(u - v).abs().max().item():.2e})")
    return first


def print_torch_compile(rows: list[dict]) -> None:
    print("ms per forward+backward (median) and MiB of peak memory above the step's start "
          "(peak RSS, glibc mmap threshold fixed at 64 KiB; min of 3)")
    print("| shape | layer | BN2d+ReLU ms | IR ms | IR / BN | torch.compile ms | compiled / BN "
          "| BN MiB | IR MiB | IR / BN | compiled MiB | compiled / BN | first call s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        bn_mib = max(r["bn_mib"], 1e-9)
        print(f"| {shape} | {r['layer']} | {r['bn_ms']:.3f} | {r['ir_ms']:.3f} | {r['ir_ms'] / r['bn_ms']:.2f} "
              f"| {r['tc_ms']:.3f} | **{r['tc_ms'] / r['bn_ms']:.2f}** | {r['bn_mib']:.1f} | {r['ir_mib']:.1f} "
              f"| {r['ir_mib'] / bn_mib:.2f} | {r['tc_mib']:.1f} | **{r['tc_mib'] / bn_mib:.2f}** "
              f"| {r['compile_s']:.1f} |")
    worst_t = max(r["tc_ms"] / r["bn_ms"] for r in rows)
    worst_m = max(r["tc_mib"] / max(r["bn_mib"], 1e-9) for r in rows)
    print(f"worst torch.compile / BN2d+ReLU: time {worst_t:.2f} (target <= 1.5), "
          f"memory {worst_m:.2f} (target <= 2)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", default="32,64,16,16;64,128,32,32",
                   help="semicolon-separated N,C,H,W shapes")
    p.add_argument("--layers", default="evonorm_b0,evonorm_s0,bn_relu")
    p.add_argument("--rounds", type=int, default=None, help="default: 25 on CPU, 200 on GPU (cheap there, and noisier)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave default)")
    p.add_argument("--torch-compile", action="store_true",
                   help="instead: BatchNorm2d+ReLU vs the IR vs the IR through torch.compile, time "
                        "and peak memory (CPU), for --layers plus 'found' (a layer the search found)")
    args = p.parse_args(argv)
    if args.torch_compile:
        if args.device != "cpu":
            p.error("--torch-compile measures on CPU (peak memory from the process RSS)")
        if args.threads:
            torch.set_num_threads(args.threads)
        if not _fixed_mmap_threshold():
            print("warning: could not fix glibc's mmap threshold; memory figures are rough", file=sys.stderr)
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
        names = [s for s in args.layers.split(",") if s] + ["found"]
        rounds = args.rounds or 15
        print(f"torch {torch.__version__}, CPU, threads {torch.get_num_threads()}, {rounds} interleaved rounds")
        print_torch_compile(run_torch_compile(shapes, names, rounds, args.warmup))
        return 0
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
