"""Rejection economy: how much full training the rejection pipeline saves on random candidates.

Random candidates from the evonorm space go through the default pipeline (validity, numerics,
equivalence, stability, quality) exactly as the engine runs it: a survivor's full evaluation
continues the quality filter's sessions to the full step count; duplicates reuse the earlier
result; every finished candidate is recorded in the equivalence cache. Measured:

- share of candidates not fully trained (rejected, or duplicate of an earlier one); target >= 90%;
- mean wall time of a rejected candidate against a fully evaluated one; target <= 5%;
- share caught by each filter, duplicates found, mean time per filter.

Fully evaluated random candidates are rare, so the denominator is also measured on reference
layers (bn_relu, evonorm_s0, evonorm_b0 as plain graphs, i.e. as a candidate would be) through
the same pipeline plus full training, interleaved with the random candidates (one every
`--reference-every` candidates, in rotation) so that both see the same machine load. Times are
wall seconds and this process's CPU seconds (robust to other processes on a shared machine).
Denormal floats are flushed for the whole run (`--denormals keep` to not), as the evaluator
should: otherwise the full trainings of bad-but-surviving layers slow down 10x, which would only
flatter the ratio.

    python benchmarks/rejection_economy.py --candidates 200 --seed 0 --json out.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--space", default="evonorm")
    parser.add_argument("--steps", type=int, default=None, help="full training steps (EvalConfig default)")
    parser.add_argument("--archs", default=None, help="comma-separated (EvalConfig default)")
    parser.add_argument("--references", default="bn_relu,evonorm_s0,evonorm_b0")
    parser.add_argument("--reference-every", type=int, default=40)
    parser.add_argument("--denormals", choices=("flush", "keep"), default="flush")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 makes CPU seconds robust to other load)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--json", default=None, help="write the raw results here")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.denormals == "flush":
        torch.set_flush_denormal(True)
    import logging
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)

    from opsearch import layers
    from opsearch.rejection import Candidate, FilterContext, RejectionPipeline
    from opsearch.space import SearchSpace
    from opsearch.trainers.evaluator import EvalConfig

    overrides = {"accelerator": args.accelerator}
    if args.steps:
        overrides["steps"] = args.steps
    if args.archs:
        overrides["archs"] = tuple(args.archs.split(","))
    config = EvalConfig(**overrides)
    pipeline = RejectionPipeline.from_spec(None)
    context = FilterContext(eval_config=config, seed=args.seed)
    t = time.perf_counter()
    context.get_evaluator()
    print(f"evaluator ready in {time.perf_counter() - t:.1f} s; archs {config.archs}, {config.steps} steps; "
          f"filters {pipeline.names}; torch threads {torch.get_num_threads()}", flush=True)

    def process(plain, number):
        """One candidate as the engine handles it; returns a record."""
        candidate = Candidate(plain)
        start, cpu_start = time.perf_counter(), time.process_time()
        outcome = pipeline.run(candidate, context)
        status = outcome.status
        objectives = None
        if status == "passed":
            accs = context.get_evaluator().resume(outcome.warm_start).accuracies
            objectives = tuple(accs[a] for a in config.archs)
            status = "evaluated"
        elif outcome.duplicate_of is not None:
            objectives = outcome.objectives
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if status == "evaluated" or status.startswith("rejected:"):
            context.equivalence.record(candidate, number, status, objectives)
        return {"number": number, "status": status, "elapsed_s": elapsed, "cpu_s": cpu, "reason": outcome.reason,
                "filter_s": outcome.filter_seconds, "objectives": objectives,
                "formula": _formula(plain)}

    # warm-up (first Lightning fit, first compile): not counted
    process(layers.resolve("relu_only"), -1)
    context.equivalence = type(context.equivalence)()

    space = SearchSpace.from_name(args.space)
    rng = random.Random(args.seed)
    reference_names = [n for n in args.references.split(",") if n]
    records, references = [], []

    def reference():
        # references use a cache of their own: they must neither be found as duplicates of
        # each other nor make random candidates duplicates of them
        name = reference_names[len(references) % len(reference_names)]
        random_cache, context.equivalence = context.equivalence, type(context.equivalence)()
        try:
            rec = process(layers.resolve(name), 10_000 + len(references))
        finally:
            context.equivalence = random_cache
        rec["layer"] = name
        references.append(rec)
        print(f"[reference] {name:<12} {rec['status']:<22} {rec['elapsed_s']:7.2f} s "
              f"(cpu {rec['cpu_s']:.2f} s)", flush=True)

    t_all = time.perf_counter()
    for i in range(args.candidates):
        if reference_names and i % args.reference_every == 0:
            reference()
        rec = process(space.decode(space.random_genome(rng)), i)
        records.append(rec)
        if rec["status"] in ("evaluated",) or rec["status"].startswith(("rejected:quality", "duplicate")) \
                or (i + 1) % 25 == 0:
            print(f"[{i + 1}/{args.candidates}] {rec['status']:<22} {rec['elapsed_s']:7.2f} s  "
                  f"{rec['formula'][:70]}", flush=True)
    while reference_names and len(references) < len(reference_names):
        reference()
    total_wall = time.perf_counter() - t_all

    summary = summarize(records, references)
    summary.update({"candidates": args.candidates, "seed": args.seed, "space": args.space,
                    "archs": list(config.archs), "steps": config.steps, "filters": pipeline.names,
                    "total_wall_s": total_wall, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                    "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
                    "denormals": args.denormals})
    print_summary(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "records": records, "references": references}, f, indent=1)
    return 0


def _formula(plain) -> str:
    from opsearch import graph
    try:
        return graph.formula(plain)
    except Exception as e:  # an invalid graph still gets a line
        return f"<invalid: {e}>"


def summarize(records, references) -> dict:
    n = len(records)
    by_status = collections.Counter(r["status"].split(":")[0] for r in records)
    by_filter = collections.Counter(r["status"].split(":", 1)[1] for r in records
                                    if r["status"].startswith("rejected:"))
    rejected = [r for r in records if r["status"].startswith("rejected:")]
    evaluated = [r for r in records if r["status"] == "evaluated"]
    duplicates = [r for r in records if r["status"].startswith("duplicate:")]
    ref_eval = [r for r in references if r["status"] == "evaluated"]
    filter_times = collections.defaultdict(list)
    for r in records:
        for f, s in r["filter_s"].items():
            filter_times[f].append(s)

    def mean(xs):
        return statistics.fmean(xs) if xs else float("nan")

    cpu_rejected = mean([r["cpu_s"] for r in rejected])
    cpu_full = mean([r["cpu_s"] for r in evaluated + ref_eval])
    mean_rejected = mean([r["elapsed_s"] for r in rejected])
    mean_not_trained = mean([r["elapsed_s"] for r in rejected + duplicates])
    mean_full_random = mean([r["elapsed_s"] for r in evaluated])
    mean_full_ref = mean([r["elapsed_s"] for r in ref_eval])
    mean_full = mean([r["elapsed_s"] for r in evaluated + ref_eval])
    return {
        "counts": dict(by_status),
        "rejected_by_filter": dict(by_filter),
        "share_not_fully_trained": (len(rejected) + len(duplicates)) / n if n else 0.0,
        "share_rejected": len(rejected) / n if n else 0.0,
        "share_by_filter": {f: c / n for f, c in by_filter.items()},
        "duplicates": len(duplicates),
        "mean_s_rejected": mean_rejected,
        "median_s_rejected_by_quality": statistics.median([r["elapsed_s"] for r in rejected
                                                           if r["status"] == "rejected:quality"] or [0.0]),
        "median_s_fully_evaluated": statistics.median([r["elapsed_s"] for r in evaluated + ref_eval] or [0.0]),
        "mean_s_rejected_or_duplicate": mean_not_trained,
        "mean_s_rejected_by_filter": {f: mean([r["elapsed_s"] for r in rejected
                                               if r["status"] == f"rejected:{f}"]) for f in by_filter},
        "mean_s_filter_when_run": {f: mean(ts) for f, ts in filter_times.items()},
        "mean_s_fully_evaluated_random": mean_full_random,
        "mean_s_fully_evaluated_reference": mean_full_ref,
        "mean_s_fully_evaluated": mean_full,
        "ratio_rejected_to_full": mean_rejected / mean_full if mean_full == mean_full else float("nan"),
        "cpu_s_rejected": cpu_rejected,
        "cpu_s_fully_evaluated": cpu_full,
        "ratio_rejected_to_full_cpu": cpu_rejected / cpu_full if cpu_full == cpu_full else float("nan"),
        "reference_results": [{"layer": r.get("layer", "?"), "status": r["status"], "elapsed_s": r["elapsed_s"],
                               "cpu_s": r["cpu_s"], "objectives": r["objectives"]} for r in references],
        "evaluated_random": [{"formula": r["formula"], "objectives": r["objectives"],
                              "elapsed_s": r["elapsed_s"]} for r in evaluated],
    }


def print_summary(s: dict) -> None:
    print()
    print(f"candidates: {s['candidates']} random from '{s['space']}' (seed {s['seed']}); "
          f"archs {','.join(s['archs'])}, {s['steps']} steps; total {s['total_wall_s']:.0f} s")
    print(f"outcomes: {s['counts']}")
    print(f"not fully trained (rejected or duplicate): {100 * s['share_not_fully_trained']:.1f}%  "
          f"(rejected {100 * s['share_rejected']:.1f}%, duplicates {s['duplicates']})")
    print("caught by filter: " + ", ".join(f"{f} {100 * v:.1f}%" for f, v in s["share_by_filter"].items()))
    print("mean s per rejected candidate, by filter: "
          + ", ".join(f"{f} {v:.3f}" for f, v in s["mean_s_rejected_by_filter"].items()))
    print("mean s of each filter when it runs: "
          + ", ".join(f"{f} {v:.4f}" for f, v in s["mean_s_filter_when_run"].items()))
    print(f"mean wall s: rejected {s['mean_s_rejected']:.3f}; rejected or duplicate "
          f"{s['mean_s_rejected_or_duplicate']:.3f}; fully evaluated: random {s['mean_s_fully_evaluated_random']:.1f} "
          f"(n={len(s['evaluated_random'])}), reference layers {s['mean_s_fully_evaluated_reference']:.1f}, "
          f"all {s['mean_s_fully_evaluated']:.1f}")
    print(f"medians: quality rejection {s['median_s_rejected_by_quality']:.2f} s, "
          f"full evaluation {s['median_s_fully_evaluated']:.1f} s")
    print(f"rejected / fully evaluated: {100 * s['ratio_rejected_to_full']:.2f}% of wall time; "
          f"{100 * s['ratio_rejected_to_full_cpu']:.2f}% of CPU time (rejected {s['cpu_s_rejected']:.3f} "
          f"cpu s, fully evaluated {s['cpu_s_fully_evaluated']:.1f} cpu s)")


if __name__ == "__main__":
    sys.exit(main())
