"""Could the quality test reject earlier? Accuracy curves of recorded candidates.

The quality filter trains a candidate 100 steps per architecture (one architecture at a time,
stopping at the first below 0.2) and costs about 30% of a from-scratch run's CPU in rejections
(BENCHMARKS, "Discovery from scratch"). A look at an earlier step would save part of that if the
hopeless architectures are already hopeless there and the passing ones already above the bar.
This tool replays candidates recorded in discovery result files (a seeded sample of each verdict,
`rejected:quality` and `evaluated`) through the filter's own per-architecture evaluators, records
each architecture's validation accuracy at the given steps (staged training: the same numbers as
a straight run), and reports, for a bar at each earlier step, how many of the curves that fail
at the last step it stops and how many that pass it would stop wrongly.

    python benchmarks/quality_curves.py --results benchmarks/discovery_round26_affine_results.jsonl.gz,benchmarks/discovery_round22_full_results.jsonl.gz --per-verdict 120 --out curves.jsonl
    python benchmarks/quality_curves.py --out curves.jsonl --report

Lines are appended (one per candidate) and a rerun skips the formulas already in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Callable

import discovery  # benchmarks/ is on the path of a script run from it

VERDICTS = ("rejected:quality", "evaluated")
BARS = (0.11, 0.12, 0.15, 0.2)


def sample_candidates(results: list[dict], per_verdict: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(verdict, run, formula): `per_verdict` of each verdict (fewer if the runs hold fewer), in a
    seeded random order."""
    pools: dict[str, list[tuple[str, str]]] = {v: [] for v in VERDICTS}
    for r in results:
        for e in r.get("log") or []:
            if e["kind"] == "candidate" and e.get("verdict") in pools:
                pools[e["verdict"]].append((r["run"], e["formula"]))
    rng = random.Random(seed)
    picked = [(v, run, f) for v, pool in pools.items() for run, f in rng.sample(pool, min(per_verdict, len(pool)))]
    rng.shuffle(picked)
    return picked


def filter_curves(steps: tuple[int, ...], min_accuracy: float = 0.2) -> Callable[[str], dict[str, list[float]]]:
    """formula -> {arch: accuracy at each of `steps`}, with the quality filter's per-architecture
    evaluators of the default search (digits, its three networks), one architecture at a time and
    stopping after the first below `min_accuracy` at the last step, as the filter does."""
    import torch

    from opsearch.config import SearchConfig
    from opsearch.denormals import flush_denormals
    from opsearch.evaluation import make_eval_config
    from opsearch.formula_parser import parse_formula_plain
    from opsearch.plugins.rejection.quality import _per_arch_evaluators
    from opsearch.rejection import FilterContext

    torch.set_num_threads(1)
    per_arch = _per_arch_evaluators(FilterContext(eval_config=make_eval_config(SearchConfig.from_dict({})),
                                                  evaluator_plugin="lightning"))  # the filter's own

    def curves(formula: str) -> dict[str, list[float]]:
        plain = parse_formula_plain(formula)
        out: dict[str, list[float]] = {}
        with flush_denormals():  # as the filter trains
            for arch, one in per_arch.items():
                session = one.start(plain)
                out[arch] = [round(session.train_until(step)[arch], 4) for step in steps]
                if out[arch][-1] < min_accuracy:
                    break
        return out

    return curves


def replay(candidates: list[tuple[str, str, str]], out: str, steps: tuple[int, ...],
           curves: Callable[[str], dict[str, list[float]]], progress=print) -> int:
    """Append one line per candidate not yet in `out`; returns how many it trained."""
    done = {line["formula"] for line in discovery.read_results(out)} if os.path.exists(out) else set()
    trained = 0
    for verdict, run, formula in candidates:
        if formula in done:
            continue
        start = time.process_time()
        line = {"verdict": verdict, "run": run, "formula": formula, "steps": list(steps),
                "curves": curves(formula), "cpu_s": round(time.process_time() - start, 2)}
        with open(out, "a") as f:
            f.write(json.dumps(line) + "\n")
        done.add(formula)
        trained += 1
        progress(f"{verdict:17s} {line['cpu_s']:6.2f} CPU s  {formula[:70]}")
    return trained


def report(lines: list[dict], min_accuracy: float = 0.2, bars: tuple[float, ...] = BARS) -> str:
    """For a bar at each step before the last: the share of the curves failing at the last step it
    stops there, and the number of passing curves it would stop."""
    if not lines:
        return "no curves"
    steps = lines[0]["steps"]
    curves = [c for line in lines for c in line["curves"].values()]
    passing = [c for c in curves if c[-1] >= min_accuracy]
    failing = [c for c in curves if c[-1] < min_accuracy]
    out = [f"Quality curves of {len(lines)} candidates ({sum(line['verdict'] == 'evaluated' for line in lines)} "
           f"recorded as evaluated): {len(passing)} architecture curves reach {min_accuracy:g} at step {steps[-1]}, "
           f"{len(failing)} do not (benchmarks/quality_curves.py).", "",
           "| a bar at step | below | stops, of the failing curves | stops wrongly, of the passing curves |",
           "|---|---|---|---|"]
    for i, step in enumerate(steps[:-1]):
        for bar in bars:
            caught = sum(c[i] < bar for c in failing)
            wrong = sum(c[i] < bar for c in passing)
            out.append(f"| {step} | {bar:g} | {caught} of {len(failing)} ({_pct(caught, len(failing))}) | "
                       f"{wrong} of {len(passing)} |")
    return "\n".join(out)


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.0f}%" if n else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=None, help="discovery.py result files, comma-separated (.gz reads)")
    p.add_argument("--per-verdict", type=int, default=120, help="candidates sampled per verdict")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed")
    p.add_argument("--steps", default="25,50,75,100", help="the steps to read accuracy at (the last: the filter's)")
    p.add_argument("--out", required=True, help="JSON lines, one per candidate; appended")
    p.add_argument("--report", action="store_true", help="only print the table of --out")
    args = p.parse_args(argv)
    if args.report:
        print(report(discovery.read_results(args.out)))
        return 0
    if not args.results:
        print("error: --results is required unless --report", file=sys.stderr)
        return 2
    try:
        steps = tuple(int(s) for s in args.steps.split(","))
        if not steps or any(b <= a for a, b in zip(steps, steps[1:])) or steps[0] < 1:
            raise ValueError
    except ValueError:
        print(f"error: --steps must be increasing positive integers, got {args.steps!r}", file=sys.stderr)
        return 2
    try:
        results = discovery.read_result_files(args.results)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    candidates = sample_candidates(results, args.per_verdict, args.seed)
    replay(candidates, args.out, steps, filter_curves(steps))
    print(report(discovery.read_results(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
