"""Trained candidates that only reparametrize an earlier trained one's constants: worth declining?

A proposal-side idea for the long runs' repeats (issue 17): an evolution could decline a child
that uses x exactly as an already trained layer does and differs only in how its x-independent
parts are written, when the two are one function at the start (`x / std_l(x + v0)` and
`x / std_l(x + rms_i(v0)*mean_g(v0))`: both start as `x / std_l(x + 1)`). Such a child is not the
same layer (training can move v0 across channels, so the equivalence filter keeps it apart, as
the issue requires); the question is what its training buys. This tool reads the discovery runs'
result files and, for each run, counts its "constant twins":

- the x-skeleton: the layer's graph with every maximal subexpression that does not depend on x
  replaced by one symbol, then hashed as `opsearch.graph.canonical_hash` hashes (commutative
  inputs sorted, zero folded); `x + v1*x` keeps its use of x and so is no twin of `x`;
- one function at the start: the equivalence fingerprint's "init" part within the cache's
  tolerance (`repeat_pairs.PairJudge.same_at_start`, the probes the run's filter drew);
- a trained candidate is a twin when an earlier trained candidate of its run has both; per run:
  how many, how many tie its twin's scores exactly, the difference of their mean scores, and how
  many set a new best of the run (what declining them would have lost).

    python benchmarks/constant_twins.py --results benchmarks/discovery_round26_affine_results.jsonl.gz
"""
from __future__ import annotations

import argparse
import hashlib
import sys

import numpy as np

import discovery  # benchmarks/ is on the path of a script run from it
from repeat_pairs import PairJudge, percent

CONSTANT = "c"


def x_skeleton(formula: str) -> str:
    """The canonical hash of the formula's graph with its x-independent subexpressions as one
    symbol: equal for layers that differ only in how they write their constants."""
    from opsearch import graph
    from opsearch.formula_parser import parse_formula_plain
    from opsearch.ops import OPS

    plain, out = graph._folded(graph._plain_checked(parse_formula_plain(formula)))
    keys = ["x" if name == "x" else CONSTANT for name in graph.INITIAL_VALUES]
    if out < len(keys):
        return keys[out]
    for op, inputs in plain:
        child = [keys[j] for j in graph._read_inputs(op, inputs)]
        if all(k == CONSTANT for k in child):
            keys.append(CONSTANT)
            continue
        if OPS[op].commutative:
            child.sort()
        keys.append(hashlib.blake2b(f"{op}({','.join(child)})".encode(), digest_size=12).hexdigest())
    return keys[-1]


def run_twins(log: list[dict], judge: PairJudge) -> dict:
    """The run's trained candidates, its constant twins (each with the earliest earlier trained
    candidate it twins), and what they scored."""
    seen: list[tuple[str, dict]] = []
    twins, trained, best = [], 0, -np.inf
    for e in log:
        if e["kind"] != "candidate" or e.get("verdict") != "evaluated" or not e.get("values"):
            continue
        trained += 1
        mean = float(np.mean(e["values"]))
        skeleton = x_skeleton(e["formula"])
        twin = next((t for s, t in seen if s == skeleton and judge.same_at_start(t["formula"], e["formula"])), None)
        if twin is not None:
            twins.append({"later": e, "earlier": twin, "tie": list(twin["values"]) == list(e["values"]),
                          "diff": mean - float(np.mean(twin["values"])), "new_best": mean > best})
        best = max(best, mean)
        seen.append((skeleton, e))
    return {"trained": trained, "twins": twins}


def report(results: list[dict], show: bool = False) -> str:
    judges: dict[int, PairJudge] = {}
    lines = ["| run | trained | constant twins | exact ties with the twin | mean-score difference to "
             "the twin: median [min, max] | twins that set a new best |", "|---|---|---|---|---|---|"]
    detail = []
    totals: dict[str, list[int]] = {}
    for r in sorted(discovery.latest_per_run(results), key=lambda r: (r["arm"], r["seed"])):
        judge = judges.setdefault(r["seed"], PairJudge(r["seed"]))
        found = run_twins(r.get("log") or [], judge)
        twins = found["twins"]
        diffs = [t["diff"] for t in twins]
        spread = (f"{np.median(diffs):+.4f} [{min(diffs):+.4f}, {max(diffs):+.4f}]" if diffs else "-")
        lines.append(f"| {r['run']} | {found['trained']} | {len(twins)} ({percent(len(twins), found['trained'])}) | "
                     f"{sum(t['tie'] for t in twins)} | {spread} | {sum(t['new_best'] for t in twins)} |")
        total = totals.setdefault(r["arm"], [0, 0, 0])
        total[0] += found["trained"]
        total[1] += len(twins)
        total[2] += sum(t["new_best"] for t in twins)
        detail += [f"- {r['run']}: trial {t['later']['number']} `{t['later']['formula']}` twins trial "
                   f"{t['earlier']['number']} `{t['earlier']['formula']}` ({t['diff']:+.4f})" for t in twins]
    out = ["Constant twins of the runs' trained candidates (benchmarks/constant_twins.py):", ""] + lines + [""]
    out += [f"- {arm}: {n} of {trained} trainings ({percent(n, trained)}) were constant twins; {new} set a new best"
            for arm, (trained, n, new) in totals.items()]
    if show and detail:
        out += [""] + detail
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="discovery.py result files, comma-separated (.gz reads)")
    parser.add_argument("--twins", action="store_true", help="also list every twin")
    args = parser.parse_args(argv)
    try:
        results = discovery.read_result_files(args.results)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        print(report(results, args.twins))
    except Exception as e:  # a bad recorded formula: one line, nothing lost (nothing is written)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
