"""Speed of the search's hot paths, without training: what the tests used to time.

- recover: rebuild an algorithm from a history of N trials (a restarted worker pays it), then
  propose + feedback per candidate on that history;
- decode: random genome -> plain graph on the fast path of the `evonorm` space.

Targets (formerly assertions inside tests, which failed on a loaded machine): recover 10,000
trials < 2.5 s; propose + feedback < 5 ms (nsga2 < 50 ms); decode < 100 us per genome.

    python benchmarks/hot_paths.py [--history 10000] [--decode 2000]
"""
from __future__ import annotations

import argparse
import random
import time

from opsearch.algorithm import create_algorithm
from opsearch.space import SearchSpace

ALGORITHMS = ("regularized_evolution", "pareto_evolution", "nsga2", "random")


def bench_recover(space: SearchSpace, name: str, history_size: int, proposals: int) -> tuple[float, float]:
    rng = random.Random(0)
    history = [(space.random_genome(rng), (rng.random(), rng.random()) if rng.random() < 0.6 else None)
               for _ in range(history_size)]
    algorithm = create_algorithm(name, space, 2, seed=0)
    start = time.perf_counter()
    algorithm.recover(history)
    recover_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(proposals):
        algorithm.feedback(algorithm.propose(), (0.5, 0.5))
    return recover_s, (time.perf_counter() - start) / proposals


def bench_decode(space: SearchSpace, n: int) -> float:
    """Seconds per random_genome + decode (what the old test timed)."""
    rng = random.Random(0)
    start = time.perf_counter()
    for _ in range(n):
        space.decode(space.random_genome(rng))
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=10_000)
    parser.add_argument("--proposals", type=int, default=20)
    parser.add_argument("--decode", type=int, default=2000)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    args = parser.parse_args()
    space = SearchSpace.from_name("evonorm")
    print(f"| algorithm | recover {args.history:,} s | propose+feedback ms |")
    print("|---|---:|---:|")
    for name in args.algorithms.split(","):
        recover_s, per = bench_recover(space, name, args.history, args.proposals)
        print(f"| {name} | {recover_s:.3f} | {per * 1e3:.2f} |", flush=True)
    print(f"\nrandom_genome + decode (fast path): {bench_decode(space, args.decode) * 1e6:.1f} us per genome")


if __name__ == "__main__":
    main()
