"""What flushing denormal floats saves on bad candidates: training (the quality filter's 100
steps on two architectures) and the stability filter, with and without flush-to-zero.

    python benchmarks/denormals.py [--steps 100] [--layers "tanh(|sqrt(x)|)",...]

Layers are graph files or known names; the defaults are the layers BENCHMARKS.md reports:
`tanh(|sqrt(x)|)` and `sqrt(std_l(x))` (candidates seen in a search, built here from their
formulas) and evonorm_s0. Each is trained with torch.set_flush_denormal(False) and (True),
one after the other in the same process (the order alternates per layer), on the default
proxy's first two architectures.
"""
from __future__ import annotations

import argparse
import time

import torch

from opsearch.graph import GraphBuilder


def _tanh_abs_sqrt():
    b = GraphBuilder()
    b.tanh(b.abs(b.sqrt(b.x)))
    return b.plain()


def _sqrt_std_l():
    b = GraphBuilder()
    b.sqrt(b.std_l(b.x))
    return b.plain()


LAYERS = {"tanh(|sqrt(x)|)": _tanh_abs_sqrt, "sqrt(std_l(x))": _sqrt_std_l, "evonorm_s0": lambda: "evonorm_s0"}


def timed(flush: bool, fn) -> float:
    torch.set_flush_denormal(flush)
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        torch.set_flush_denormal(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from opsearch.rejection import Candidate, FilterContext, RejectionPipeline
    from opsearch.trainers.evaluator import EvalConfig, Evaluator

    config = EvalConfig(archs=("resnet", "mobilenetv2"), steps=args.steps, threads=args.threads)
    evaluator = Evaluator(config)
    evaluator.evaluate("bn_relu")  # warm-up: imports, data, kernels
    # the filter flushes by itself: time its body (_check) without that wrapper
    flt = RejectionPipeline.from_spec(["stability"]).filters[0]
    print(f"| layer | train {args.steps} steps x 2 archs, denormals s | flushed s | stability, denormals s | flushed s |")
    print("|---|---:|---:|---:|---:|")
    for i, name in enumerate(args.layers.split(",")):
        layer = LAYERS[name]() if name in LAYERS else name
        cells = {}
        for flush in ((False, True) if i % 2 == 0 else (True, False)):
            cells[("train", flush)] = timed(flush, lambda: evaluator.evaluate(layer))
            cells[("stability", flush)] = timed(flush, lambda: flt._check(Candidate(layer), FilterContext()))
        print(f"| {name} | {cells[('train', False)]:.1f} | {cells[('train', True)]:.1f} | "
              f"{cells[('stability', False)]:.2f} | {cells[('stability', True)]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
