"""What the equivalence filter's v0-band fingerprints cost per candidate.

The band rule (plugins/rejection/equivalence.py, rule 4) fingerprints a candidate whose v0
training moves once more per band. This times the fingerprints of the same generator graphs of
the `evonorm` space with no band, with the wide band only and with every band of `V0_BANDS`,
alternating the three in each repeat (the box is shared: side by side, not one after the other),
and prints CPU milliseconds per candidate and the ratios:

    python benchmarks/band_cost.py                 # 80 graphs, 3 repeats
    python benchmarks/band_cost.py --graphs 200 --repeats 5
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from opsearch.plugins.algorithms.generator import GraphGenerator
from opsearch.plugins.rejection.equivalence import DEFAULT_SHAPES, fingerprints
from opsearch.rejection import V0_BANDS, Candidate
from opsearch.space import SearchSpace

SETTINGS = {"none": (), "wide band": V0_BANDS[:1], "every band": V0_BANDS}


def per_candidate_ms(graphs: list, bands) -> tuple[float, int]:
    """CPU ms per graph for its fingerprints with `bands`, and how many had a live v0."""
    start, live = time.process_time(), 0
    for plain in graphs:
        _, band_fps = fingerprints(Candidate(plain, layer_options={"eps": 1e-5}), DEFAULT_SHAPES, 0,
                                   v0_bands=bands)
        live += bool(band_fps)
    return (time.process_time() - start) / len(graphs) * 1000, live


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    space = SearchSpace.from_name("evonorm")
    generator, rng = GraphGenerator(space), random.Random(args.seed)
    graphs = [space.decode(generator.random_genome(rng)) for _ in range(args.graphs)]
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    live = 0
    for _ in range(args.repeats):
        for name, bands in SETTINGS.items():
            ms, live = per_candidate_ms(graphs, bands)
            times[name].append(ms)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"{args.graphs} generator graphs of evonorm ({live} with a live v0), {args.repeats} alternating repeats, "
          f"bands {list(V0_BANDS)}")
    print("| fingerprints | CPU ms per candidate (median) | vs none |")
    print("|---|---|---|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.2f} | {ms / med['none']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
