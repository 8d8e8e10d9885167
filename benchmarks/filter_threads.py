"""Torch threads for the rejection filters' small networks: the stability filter's check (double
backpropagation through a width-8 resnet on a 16-image batch) under 1 and 2 intra-op threads,
side by side, on a quiet machine and beside a busy process.

Why: an opsearch worker runs one torch thread (trainers/plugin.py sets ``threads = 1``; the
engine applies it to the filters too), but a process that never sets it gets torch's default,
one thread per core: a test process, a notebook, an evaluator plugin that leaves ``threads``
unset. On a 2-core box with the other core busy, that made each check several times slower.

    python benchmarks/filter_threads.py [--rounds 3] [--busy N]

Each round checks the same candidates (the known layers and evonorm-space graphs that pass the
cheaper filters) once per setting, interleaved; prints the median CPU and wall seconds per check
per setting and the ratio of 2 threads to 1.
"""
from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time


def candidates(count: int) -> list:
    """The known layers, then evonorm-space graphs that pass validity and numerics (what reaches
    the stability filter in a search)."""
    from opsearch import graph, layers, registry
    from opsearch.rejection import Candidate, FilterContext
    from opsearch.space import SearchSpace

    out = [Candidate(layers.resolve(n)) for n in ("bn_relu", "evonorm_b0", "evonorm_s0", "gn_relu", "ln_relu")]
    space = SearchSpace(registry.search_spaces.get("evonorm")(), name="evonorm")
    numerics = registry.rejection_filters.get("numerics")()
    context = FilterContext(seed=0)
    rng = random.Random(0)
    while len(out) < count:
        plain = space.decode(space.random_genome(rng))
        if graph.is_valid(plain):
            candidate = Candidate(graph.prune(plain))
            if numerics.check(candidate, context).passed:
                out.append(candidate)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="N CPU-bound processes beside the checks (1: the other core of a 2-core box)")
    args = parser.parse_args()

    import torch

    from opsearch import registry
    from opsearch.rejection import FilterContext

    stability = registry.rejection_filters.get("stability")()
    context = FilterContext(seed=0)
    cands = candidates(args.candidates)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    cpu: dict[int, list[float]] = {1: [], 2: []}
    wall: dict[int, list[float]] = {1: [], 2: []}
    try:
        for _ in range(args.rounds):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                stability.check(cands[0], context)  # warm the thread pool
                for c in cands:
                    t, w = time.process_time(), time.perf_counter()
                    stability.check(c, context)
                    cpu[threads].append(time.process_time() - t)
                    wall[threads].append(time.perf_counter() - w)
    finally:
        for p in busy:
            p.kill()
    where = f"beside {args.busy} busy process(es)" if args.busy else "quiet"
    print(f"stability filter, {len(cands)} candidates x {args.rounds} rounds, {where}:")
    print("| threads | median CPU s / check | median wall s / check |")
    print("|---|---|---|")
    for threads in (1, 2):
        print(f"| {threads} | {statistics.median(cpu[threads]):.3f} | {statistics.median(wall[threads]):.3f} |")
    ratio = statistics.median(wall[2]) / statistics.median(wall[1])
    print(f"wall, 2 threads / 1 thread: {ratio:.2f}x")


if __name__ == "__main__":
    main()
