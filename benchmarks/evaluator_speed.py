"""Seconds per candidate and training steps per second of the default proxy on one device.

    python benchmarks/evaluator_speed.py [--accelerator cpu|gpu] [--threads N] [--layers a,b]
                                         [--repeats 2] [-O key=value ...]

One warm-up evaluation first (imports, oneDNN/cuDNN kernels, CUDA context), then each layer
`repeats` times; prints per layer the best wall seconds for the whole evaluation (all
architectures) and steps/s per architecture. On CPU, pin the cores with `taskset -c 0,1` to
measure "2 cores".
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--layers", default="bn_relu,evonorm_b0,evonorm_s0")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from opsearch.commands.evaluate import apply_options
    from opsearch.trainers.evaluator import EvalConfig, Evaluator

    config = EvalConfig(**apply_options({"accelerator": args.accelerator}, args.option))
    evaluator = Evaluator(config)
    device = torch.cuda.get_device_name(0) if args.accelerator in ("gpu", "cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"{device}; {evaluator.data.describe()}; {config.steps} steps x batch {config.batch_size}, "
          f"archs {','.join(config.archs)}, precision {config.precision}")
    t = time.perf_counter()
    evaluator.evaluate(args.layers.split(",")[0])
    print(f"warm-up evaluation {time.perf_counter() - t:.2f} s")
    for layer in args.layers.split(","):
        best = None
        for _ in range(args.repeats):
            t = time.perf_counter()
            result = evaluator.evaluate(layer)
            wall = time.perf_counter() - t
            if best is None or wall < best[0]:
                best = (wall, result)
        wall, result = best
        per_arch = ", ".join(f"{a} {r.steps / r.seconds:.0f} steps/s acc {r.accuracy:.3f}"
                             for a, r in result.per_arch.items())
        print(f"{layer:<12} {wall:6.2f} s per candidate ({per_arch})")


if __name__ == "__main__":
    main()
