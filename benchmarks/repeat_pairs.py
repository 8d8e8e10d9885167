"""Exact repeats in discovery runs, read one pair at a time: the same function, or a tie?

Issue 17 asks that <= 2% of trained candidates repeat an earlier trained candidate's scores
exactly. Its intent is "never trains the same function twice"; but accuracies on a small
validation set are coarse (multiples of 1/287 on digits), so two different good layers can tie on
all three architectures by chance, and the longer a run, the more such ties (round 20: 3.0% and
3.2% in two runs searched to 1,800 CPU s, 2.4 and 1.7 expected from chance alone).

This tool splits the count. For every trained candidate whose scores equal an earlier trained
one's, both layers are read back from their formulas (`opsearch.formula_parser`) and compared by
the equivalence filter's own tests (`plugins/rejection/equivalence.py`), with the probes the
run's filter drew (its seed is the run's; `--seed` to judge with another's):
- "same graph": the canonical hashes are equal (the filter's first test; it cannot miss these
  unless it was off);
- "same function": the output fingerprints are within the filter's tolerance, at the run's eps or
  in the eps limit (its second and third tests): a pair the filter should have merged, a miss;
- "same on a v0 band": the fingerprints agree only with v0 held in one of the filter's bands (its
  fourth test, which merges only when the earlier training kept v0 there; the logs do not record
  v0's range, so these are possible misses, an upper bound);
- "different functions": none of these: a tie between two layers that train differently.

Only the last kind is outside the clause's intent; the first three are trainings the equivalence
rule could have saved. Of the different functions, the last column counts those that are one
function at the start (outputs equal with every trainable vector at its initial value, as
`std_l(2x + v0)` and `std_l(2x + v1)`: v0 = 1 and v1 = 0 are each one value over the channels)
and part only as training moves a vector: the filter keeps them apart by the issue's own rule
(never merge layers training can tell apart), and they tie more often than chance.

    python benchmarks/repeat_pairs.py --results benchmarks/discovery_round20_full_results.jsonl.gz [--pairs]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

import numpy as np

import discovery  # benchmarks/ is on the path of a script run from it: the runs' files

KINDS = ("same graph", "same function", "same on a v0 band", "different functions")


def repeat_pairs(log: list[dict]) -> list[tuple[dict, dict]]:
    """(earlier, later) for each trained candidate whose scores equal an earlier trained one's
    (the earliest of them), in the order the trials finished: the pairs `count_repeats` counts."""
    first: dict[tuple, dict] = {}
    pairs = []
    for e in log:
        if e["kind"] != "candidate" or e.get("verdict") != "evaluated" or not e.get("values"):
            continue
        key = tuple(e["values"])
        if key in first:
            pairs.append((first[key], e))
        else:
            first[key] = e
    return pairs


class PairJudge:
    """Compares two formulas with the equivalence filter's probes and its cache's matching rule
    (`EquivalenceCache.match`: tolerances, the eps limit, the bands)."""

    def __init__(self, seed: int = 0):
        from opsearch.plugins.rejection.equivalence import DEFAULT_SHAPES, LIMIT_ATOL, LIMIT_EPS
        from opsearch.rejection import V0_BANDS

        self.seed = seed
        self.shapes = DEFAULT_SHAPES
        self.bands = V0_BANDS
        self.limit_eps, self.limit_atol = LIMIT_EPS, LIMIT_ATOL
        self._cache: dict[str, tuple] = {}

    def _facts(self, formula: str) -> tuple:
        if formula not in self._cache:
            from opsearch.formula_parser import parse_formula_plain
            from opsearch.rejection import Candidate
            from opsearch.plugins.rejection.equivalence import fingerprint, fingerprints

            candidate = Candidate(parse_formula_plain(formula))
            fp, bands = fingerprints(candidate, self.shapes, self.seed, v0_bands=self.bands)
            limit = fingerprint(candidate, self.shapes, self.seed, eps=self.limit_eps)
            self._cache[formula] = (candidate.canonical_hash, fp, limit, bands)
        return self._cache[formula]

    def same_at_start(self, formula_a: str, formula_b: str) -> bool:
        """Whether the two compute one function with every trainable vector at its initial value:
        the plain fingerprint's "init" part (`equivalence.output_part`), within the cache's tolerance."""
        from opsearch.plugins.rejection.equivalence import output_part
        from opsearch.rejection import EquivalenceCache

        a, b = (output_part(self._facts(f)[1], len(self.shapes), "init") for f in (formula_a, formula_b))
        return bool(np.abs(a - b).max() <= EquivalenceCache().atol)

    def kind(self, formula_a: str, formula_b: str) -> str:
        """One of KINDS, by the filter's tests in its order."""
        from opsearch.rejection import CacheEntry, EquivalenceCache

        hash_a, fp_a, limit_a, bands_a = self._facts(formula_a)
        hash_b, fp_b, limit_b, bands_b = self._facts(formula_b)
        if hash_a == hash_b:
            return "same graph"
        # the earlier layer as the cache holds a trained trial; its training's v0 range is not in
        # the logs, so it is taken inside every band (band matches are possible misses only)
        cache = EquivalenceCache(v0_bands=self.bands)
        inside = (max(lo for lo, _ in self.bands), min(hi for _, hi in self.bands))
        cache.add(None, fp_a, CacheEntry(0, "evaluated", (0.0,)), limit_a, bands_a, inside)
        _, how = cache.match(fp_b, limit_b, self.limit_atol, bands_b)
        if how in ("exact", "limit"):
            return "same function"
        return "same on a v0 band" if how.startswith("band") else "different functions"


def report(results: list[dict], show_pairs: bool, probe_seed: int | None = None) -> str:
    """The table (and with ``show_pairs`` every pair). Each run's pairs are judged with the probes
    its own equivalence filter drew (the filter's seed is the run's), so "same function" is a
    pair that filter would have merged: a miss. ``probe_seed`` judges every run with one seed's
    probes instead (a pair whose kind depends on the seed sits at the edge of a tolerance)."""
    judges: dict[int, PairJudge] = {}
    lines = ["| arm | runs | trained | exact repeats | " + " | ".join(KINDS)
             + " | repeats of one function | different functions, one at the start |",
             "|---" * (len(KINDS) + 6) + "|"]
    detail = []
    by_arm: dict[str, list[dict]] = {}
    for r in discovery.latest_per_run(results):
        by_arm.setdefault(r["arm"], []).append(r)
    for arm, runs in by_arm.items():
        counts: Counter = Counter()
        trained = repeats = 0
        for r in sorted(runs, key=lambda r: r["seed"]):
            seed = r["seed"] if probe_seed is None else probe_seed
            if seed not in judges:
                judges[seed] = PairJudge(seed)
            judge = judges[seed]
            log = r.get("log") or []
            trained += sum(1 for e in log if e["kind"] == "candidate" and e.get("verdict") == "evaluated")
            for earlier, later in repeat_pairs(log):
                kind = judge.kind(earlier["formula"], later["formula"])
                at_start = kind == "different functions" and judge.same_at_start(earlier["formula"], later["formula"])
                counts[kind] += 1
                counts["one at the start"] += at_start
                repeats += 1
                detail.append(f"- {arm} seed {r['seed']}: trial {later['number']} `{later['formula']}` "
                              f"= trial {earlier['number']} `{earlier['formula']}` "
                              f"{[round(v, 4) for v in later['values']]}: {kind}"
                              + (" (one function at the start)" if at_start else ""))
        same = repeats - counts["different functions"]
        lines.append(f"| {arm} | {len(runs)} | {trained} | {repeats} ({percent(repeats, trained)}) | "
                     + " | ".join(str(counts[k]) for k in KINDS)
                     + f" | {same} ({percent(same, trained)}) | {counts['one at the start']} |")
    out = ["Exact repeats of trained candidates' scores, by what the equivalence filter's tests say of "
           "each pair (benchmarks/repeat_pairs.py; the last line of each run counts):", ""] + lines
    if show_pairs and detail:
        out += [""] + detail
    return "\n".join(out)


def percent(k: int, n: int) -> str:
    return f"{100 * k / n:.1f}%" if n else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="discovery.py result files, comma-separated (.gz reads)")
    parser.add_argument("--pairs", action="store_true", help="also list every pair")
    parser.add_argument("--seed", type=int, default=None,
                        help="the probes' seed for every run (default: each run's own, as its filter drew them)")
    args = parser.parse_args(argv)
    try:
        results = discovery.read_result_files(args.results)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        print(report(results, args.pairs, args.seed))
    except Exception as e:  # a bad recorded formula: one line, nothing lost (nothing is written)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
