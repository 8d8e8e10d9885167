"""Lightning evaluator vs a plain PyTorch loop: same model, data, batches, optimizer, schedule.

    python benchmarks/evaluator_overhead.py [--layer bn_relu] [--steps 300] [--repeats 3] [--threads N]
                                            [--steps-per-call K]

For each architecture of the default proxy, trains the same network (same init seed) for the
same steps with (a) `Evaluator` (one Lightning Trainer per evaluation with its data module,
divergence and timing callbacks, manual optimization of K steps per training_step call,
validation in Lightning's validation loop) and (b) a hand-written loop doing exactly the same work; runs are interleaved and each
side's best of `repeats` is reported (the minimum is the least disturbed by other processes).
Both sides must reach the same accuracy (they do the same arithmetic), which the script checks.
Target: Lightning / plain <= 1.10.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from opsearch.trainers.data import BatchStream
from opsearch.trainers.evaluator import EvalConfig, Evaluator, _stable_seed, norm_act_factory
from opsearch.trainers.lit import learning_rate


def plain_run(evaluator: Evaluator, layer: str, arch: str) -> tuple[float, float]:
    """The evaluator's training, written out by hand. Returns (accuracy, seconds)."""
    c, data = evaluator.config, evaluator.data
    t0 = time.perf_counter()
    factory, _ = norm_act_factory(layer, c.layer_options)
    created = []

    def recording(channels, act):
        m = factory(channels, act)
        created.append(m)
        return m

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_stable_seed(c.seed, arch))
        model = evaluator.builders[arch](recording, data.num_classes, data.in_channels, **c.options_for(arch))
    fmt = torch.channels_last
    model.to(memory_format=fmt).train()
    no_decay = {id(p) for m in created for p in m.parameters()}
    decay, rest = [], []
    for p in model.parameters():
        (rest if id(p) in no_decay or p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": c.weight_decay},
                           {"params": rest, "weight_decay": 0.0}], lr=c.lr, momentum=c.momentum,
                          nesterov=c.nesterov)
    stream = BatchStream(data.x_train, data.y_train, c.batch_size, seed=c.seed, num_steps=c.steps)
    for step, (x, y) in enumerate(stream):
        x = x.contiguous(memory_format=fmt)
        lr = learning_rate(step, c.steps, c.lr, c.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x), y, label_smoothing=c.label_smoothing)
        if not bool(torch.isfinite(loss)):
            return 0.0, time.perf_counter() - t0
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data.y_val), c.val_batch_size):
            x = data.x_val[i:i + c.val_batch_size].contiguous(memory_format=fmt)
            correct += int((model(x).argmax(1) == data.y_val[i:i + c.val_batch_size]).sum())
    return correct / len(data.y_val), time.perf_counter() - t0


def lightning_run(evaluator: Evaluator, layer: str, arch: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    single = Evaluator.__new__(Evaluator)  # same evaluator, one architecture
    single.__dict__.update(evaluator.__dict__)
    single.config = EvalConfig.from_dict({**evaluator.config.to_dict(), "archs": [arch]})
    result = single.evaluate(layer)
    return result.accuracies[arch], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="bn_relu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps-per-call", dest="steps_per_call", type=int, default=None,
                        help="optimizer steps per Lightning training_step call (default: the config's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"accelerator": "cpu"}
    if args.steps:
        overrides["steps"] = args.steps
    if args.steps_per_call:
        overrides["steps_per_call"] = args.steps_per_call
    evaluator = Evaluator(EvalConfig(**overrides))
    c = evaluator.config
    print(f"layer {args.layer}, {c.steps} steps x batch {c.batch_size}, {evaluator.data.describe()}, "
          f"torch threads {torch.get_num_threads()}, {c.steps_per_call} steps per call, best of {args.repeats}")
    # warm up both paths (oneDNN kernels, Lightning imports)
    for arch in c.archs:
        lightning_run(evaluator, args.layer, arch)
        plain_run(evaluator, args.layer, arch)
    totals = {"lightning": 0.0, "plain": 0.0}
    print(f"{'architecture':<14} {'plain s':>8} {'lightning s':>12} {'ratio':>6}  accuracy (plain / lightning)")
    for arch in c.archs:
        times = {"lightning": [], "plain": []}
        accs = {}
        for _ in range(args.repeats):
            for name, fn in (("plain", plain_run), ("lightning", lightning_run)):
                acc, seconds = fn(evaluator, args.layer, arch)
                times[name].append(seconds)
                accs[name] = acc
        best = {k: min(v) for k, v in times.items()}
        totals["lightning"] += best["lightning"]
        totals["plain"] += best["plain"]
        same = "same" if accs["plain"] == accs["lightning"] else "DIFFERENT"
        print(f"{arch:<14} {best['plain']:8.3f} {best['lightning']:12.3f} {best['lightning'] / best['plain']:6.3f}  "
              f"{accs['plain']:.4f} / {accs['lightning']:.4f} ({same}); "
              f"medians {statistics.median(times['plain']):.3f} / {statistics.median(times['lightning']):.3f}")
    print(f"{'total':<14} {totals['plain']:8.3f} {totals['lightning']:12.3f} "
          f"{totals['lightning'] / totals['plain']:6.3f}")


if __name__ == "__main__":
    main()
