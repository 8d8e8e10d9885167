"""What the equivalence fingerprint's crossed output costs: seconds per candidate, side by side.

The plain fingerprint probes each layer once more with its live v0 entries across 0
(`plugins/rejection/equivalence.py`, `_crossed`). This times the filter's fingerprints (plain,
eps-limit and band, as `describe_known` computes them) for the trained layers of recorded
studies, with and without that output, alternating per layer in one process (the box is
shared), and prints the ratio of the totals.

    python benchmarks/equivalence_cost.py STUDY.db [STUDY.db ...] [--limit 200]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import optuna

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from equivalence_replay import trained_layers  # noqa: E402

from opsearch.plugins.rejection import equivalence  # noqa: E402
from opsearch.plugins.rejection.equivalence import EquivalenceFilter  # noqa: E402
from opsearch.rejection import Candidate, FilterContext  # noqa: E402


def described(plain, seed: int, crossed: bool) -> Candidate:
    """A candidate with the fingerprints the filter computes; without the crossed output when
    ``crossed`` is false (the rule before it)."""
    original = equivalence._outputs
    if not crossed:
        equivalence._outputs = lambda layer, probes, reached, crossed=None: original(layer, probes, reached)
    try:
        candidate = Candidate(plain)
        EquivalenceFilter().describe_known(candidate, FilterContext(seed=seed))
        return candidate
    finally:
        equivalence._outputs = original


def seconds(plain, seed: int, crossed: bool) -> float:
    start = time.perf_counter()
    described(plain, seed, crossed)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("studies", nargs="+", help="SQLite files or storage URLs of search studies")
    parser.add_argument("--limit", type=int, default=200, help="layers timed at most (default 200)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    layers = []
    for path in args.studies:
        url = path if "://" in path else "sqlite:///" + os.path.abspath(path)
        _, config, rows = trained_layers(url)
        layers += [(row[1], config.seed) for row in rows]
    layers = layers[:args.limit]
    totals = {True: 0.0, False: 0.0}
    for index, (plain, seed) in enumerate(layers):
        for crossed in ((True, False) if index % 2 else (False, True)):
            totals[crossed] += seconds(plain, seed, crossed)
    n = len(layers)
    print(f"{n} layers: with the crossed output {1000 * totals[True] / n:.1f} ms per candidate, "
          f"without {1000 * totals[False] / n:.1f} ms; ratio {totals[True] / totals[False]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
