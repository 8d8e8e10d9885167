"""How much of bn_relu's lead over found layers is where it sits, not what it computes.

A known layer brings its own companion for the architectures' no-activation slots (the last
norm of a residual block, the projection of an inverted residual): bn_relu puts BatchNorm
there. A candidate graph gets the per-channel affine alone there (`layer_options.no_act =
"affine"`, as the EvoNorm reference does; opsearch.layers.norm_act). So the discovery
benchmark's target, bn_relu's score, holds a structural lead no candidate can reach by its
formula. This measures that lead: bn_relu's own graph trained *as a candidate* against bn_relu,
paired by seed, and (the centering question) uncentered variants against that same graph.

    python benchmarks/no_act_slots.py --seeds 8 --results benchmarks/no_act_slots_results.jsonl
    python benchmarks/no_act_slots.py --split search --seeds 5 --results benchmarks/no_act_slots_results.jsonl
    python benchmarks/no_act_slots.py --layers found --seeds 8 --results benchmarks/no_act_slots_results.jsonl
    python benchmarks/no_act_slots.py --report --results benchmarks/no_act_slots_results.jsonl

Held-out split (default): the re-ranking task's data and seeds (1,000,000, 1,000,001, ...).
Search split: the search's data, seeds 0, 1, ... (a run with seed s trains everything with s).
Each (split, layer, seed) is one line appended to --results; a rerun skips the lines there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from opsearch.graph import GraphBuilder

SEED_BASE = 1_000_000  # opsearch.rerank.SEED_BASE: the re-ranking's first seed


def _bn_relu_graph():
    """max((x - mean_b(x)) / std_b(x) * v0 + v1, 0): bn_relu's graph, built as a candidate's."""
    from opsearch import layers

    return layers.get_graph("bn_relu")


def _uncentered(stat: str):
    """max(x / stat_b(x) * v0 + v1, 0): bn_relu without the centering."""
    def build():
        b = GraphBuilder()
        y = b.add(b.mul(b.div(b.x, b.op(stat, b.x)), b.v0), b.v1)
        b.max(y, b.zero)
        return b.build()
    return build


def _found(formula: str, write):
    """A layer a discovery run found (BENCHMARKS "Discovery from scratch"), rebuilt from its
    recorded formula; `write(b)` adds its nodes. The rebuilt graph must print that formula."""
    def build():
        from opsearch.graph import formula as formula_of

        b = GraphBuilder()
        write(b)
        g = b.build()
        if formula_of(g) != formula:
            raise AssertionError(f"rebuilt {formula_of(g)!r}, recorded {formula!r}")
        return g
    return build


def _e3(b):  # (-(x + x + std_i(x + x))) / rms_b(x + x)
    xx = b.add(b.x, b.x)
    b.div(b.neg(b.add(xx, b.std_i(xx))), b.rms_b(xx))


def _relu_over_std(b):  # max(x, 0) / std_b(max(x, 0))
    r = b.max(b.x, b.zero)
    b.div(r, b.std_b(r))


# Round 5's bests (one per run: the search's best by its own score, as the benchmark re-ranks it)
FOUND = {
    "evolution s0: tanh(x) / std_b(x)": lambda b: b.div(b.tanh(b.x), b.std_b(b.x)),
    "evolution s1: x / max(rms_b(x), x + x)":
        lambda b: b.div(b.x, b.max(b.rms_b(b.x), b.add(b.x, b.x))),
    "evolution s2: x / max(square(rms_b(x)), sqrt(x))":
        lambda b: b.div(b.x, b.max(b.square(b.rms_b(b.x)), b.sqrt(b.x))),
    "evolution s3: (-(x + x + std_i(x + x))) / rms_b(x + x)": _e3,
    "random s0: tanh(x) / rms_g(x)": lambda b: b.div(b.tanh(b.x), b.rms_g(b.x)),
    "random s1: max(x / std_b(x + v1), v1)":
        lambda b: b.max(b.div(b.x, b.std_b(b.add(b.x, b.v1))), b.v1),
    "random s2: x / mean_l(rms_i(x))": lambda b: b.div(b.x, b.mean_l(b.rms_i(b.x))),
    "random s3: tanh(x) / rms_b(x)": lambda b: b.div(b.tanh(b.x), b.rms_b(b.x)),
    "both s4: max(x, 0) / std_b(max(x, 0))": _relu_over_std,  # the same trial in both arms
}

# name -> what to train (a known name, or a function that builds a candidate graph)
BASE = {
    "bn_relu": lambda: "bn_relu",  # known layer: BatchNorm in the no-activation slots
    "bn_relu as a candidate": _bn_relu_graph,  # the same graph, the affine alone there
    "uncentered std_b": _uncentered("std_b"),
    "uncentered rms_b": _uncentered("rms_b"),
}
LAYERS = {**BASE, **{name: _found(name.split(": ", 1)[1], write) for name, write in FOUND.items()}}
REFERENCE = "bn_relu"
CANDIDATE_REFERENCE = "bn_relu as a candidate"


def read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def seed_list(split: str, n: int) -> list[int]:
    return [SEED_BASE + i for i in range(n)] if split == "heldout" else list(range(n))


def run(args) -> None:
    from opsearch.trainers.evaluator import EvalConfig, Evaluator

    done = {(r["split"], r["layer"], r["seed"]) for r in read(args.results)}
    names = ([REFERENCE, CANDIDATE_REFERENCE, *FOUND] if args.layers == "found"
             else [n.strip() for n in args.layers.split(",") if n.strip()])
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        sys.exit(f"unknown layer {unknown[0]!r}; known: {', '.join(LAYERS)}")
    dataset_options = {"split": "heldout"} if args.split == "heldout" else {}
    for seed in seed_list(args.split, args.seeds):  # seed-major: a stop leaves whole pairs
        for name in names:
            if (args.split, name, seed) in done:
                continue
            config = EvalConfig(seed=seed, threads=args.threads, dataset_options=dataset_options)
            start = time.process_time()
            result = Evaluator(config).evaluate(LAYERS[name]())
            line = {"split": args.split, "layer": name, "seed": seed,
                    "mean": result.mean_accuracy,
                    "accs": dict(result.accuracies),
                    "cpu_s": round(time.process_time() - start, 1)}
            with open(args.results, "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"{args.split} seed {seed} {name}: {line['mean']:.4f} {line['accs']}", flush=True)


def report(args) -> None:
    """Per split: each layer's mean over seeds, and its paired difference from bn_relu and from
    bn_relu's graph as a candidate (seed as the unit), Holm over each column's rows."""
    from opsearch.rerank_stats import holm, mean_interval, paired_test

    rows = read(args.results)
    for split in ("search", "heldout"):
        by: dict[str, dict[int, float]] = {}
        for r in rows:
            if r["split"] == split:
                by.setdefault(r["layer"], {})[r["seed"]] = r["mean"]
        if REFERENCE not in by:
            continue
        cells: dict[tuple[str, str], str] = {}
        for ref in (REFERENCE, CANDIDATE_REFERENCE):
            tests = []
            for name, scores in by.items():
                common = sorted(set(scores) & set(by.get(ref, {})))
                if name in (ref, REFERENCE) or len(common) < 2:  # each pair of layers tested once
                    continue
                tests.append((name, paired_test([scores[s] for s in common], [by[ref][s] for s in common])))
            for (name, t), p_holm in zip(tests, holm([t["p"] for _, t in tests])):
                cells[name, ref] = (f"{t['diff']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}], "
                                    f"p {t['p']:.3f}, Holm {p_holm:.3f}")
        print(f"\n{split} split: mean accuracy over the architectures; differences paired by seed "
              "(95% interval, paired t, Holm over the column)\n")
        print("| layer | seeds | mean [95% CI] | minus bn_relu | minus bn_relu as a candidate |")
        print("|---|---|---|---|---|")
        for name, scores in by.items():
            m = mean_interval(list(scores.values()), bounds=(0.0, 1.0))
            ci = f" [{m['low']:.4f}, {m['high']:.4f}]" if m["low"] is not None else ""
            print(f"| {name} | {len(scores)} | {m['mean']:.4f}{ci} | "
                  f"{cells.get((name, REFERENCE), '-')} | {cells.get((name, CANDIDATE_REFERENCE), '-')} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=("heldout", "search"), default="heldout")
    p.add_argument("--seeds", type=int, default=8, help="how many seeds per layer")
    p.add_argument("--layers", default=",".join(BASE),
                   help="comma-separated names (default: the first four), or 'found' for round 5's bests "
                        "with bn_relu and its candidate graph; names: " + "; ".join(LAYERS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "no_act_slots_results.jsonl"))
    p.add_argument("--report", action="store_true", help="only print the tables of --results")
    args = p.parse_args()
    if not args.report:
        run(args)
    report(args)


if __name__ == "__main__":
    main()
