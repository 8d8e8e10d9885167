"""Every known layer x proxy architecture on the default proxy: mean and spread over seeds.

    python benchmarks/proxy_table.py [--seeds 0,1,2] [--workers 2] [--layers a,b] [--out FILE.jsonl]
                                     [-O key=value ...]

Prints a markdown table (accuracy mean +- standard deviation over seeds per architecture, the
mean over architectures, and seconds per evaluation) for BENCHMARKS.md. Each worker process uses
cores // workers torch threads; `--out` keeps every raw result as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

_evaluators: dict = {}


def _evaluate(layer: str, seed: int, overrides: dict, threads: int) -> dict:
    import torch

    from opsearch.trainers.evaluator import EvalConfig, Evaluator

    torch.set_num_threads(threads)
    if seed not in _evaluators:
        _evaluators[seed] = Evaluator(EvalConfig(**{**overrides, "seed": seed}))
    result = _evaluators[seed].evaluate(layer)
    return {"layer": layer, "seed": seed, **result.to_dict()}


def _fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {spread:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layers", default=None, help="comma-separated (default: every known layer)")
    parser.add_argument("--out", default=None, help="append raw results here (JSON lines)")
    parser.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from opsearch import layers as layer_lib
    from opsearch.commands.evaluate import apply_options
    from opsearch.trainers.evaluator import EvalConfig

    overrides = apply_options({"accelerator": "cpu"}, args.option)
    config = EvalConfig(**overrides)
    names = args.layers.split(",") if args.layers else layer_lib.known_layers()
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    jobs = [(name, seed) for name in names for seed in seeds]
    print(f"# {len(names)} layers x {len(seeds)} seeds on {config.dataset}, archs {','.join(config.archs)}, "
          f"{config.steps} steps, lr {config.lr}, batch {config.batch_size}; {args.workers} workers x "
          f"{threads} threads", file=sys.stderr)
    results: list[dict] = []
    start = time.time()
    out = open(args.out, "a") if args.out else None
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(_evaluate, name, seed, overrides, threads) for name, seed in jobs]
        for future in as_completed(futures):
            r = future.result()
            results.append(r)
            if out:
                out.write(json.dumps(r) + "\n")
                out.flush()
            accs = " ".join(f"{a}={v:.3f}" for a, v in r["accuracies"].items())
            print(f"[{len(results)}/{len(jobs)} {time.time() - start:.0f}s] {r['layer']} seed {r['seed']}: "
                  f"{accs} ({r['seconds']:.1f} s)", file=sys.stderr, flush=True)
    archs = list(config.archs)
    print("| layer | " + " | ".join(archs) + " | mean | s / eval |")
    print("|---" * (len(archs) + 3) + "|")
    rows = []
    for name in names:
        rs = [r for r in results if r["layer"] == name]
        means = [statistics.fmean(r["accuracies"].values()) for r in rs]
        cells = [_fmt([r["accuracies"][a] for r in rs]) for a in archs]
        diverged = sum(1 for r in rs for d in r["per_arch"].values() if d["diverged"])
        note = f" ({diverged} diverged)" if diverged else ""
        rows.append((statistics.fmean(means), f"| {name}{note} | " + " | ".join(cells)
                     + f" | {_fmt(means)} | {statistics.fmean(r['seconds'] for r in rs):.1f} |"))
    for _, row in sorted(rows, key=lambda t: -t[0]):
        print(row)
    print(f"\n{len(jobs)} evaluations in {time.time() - start:.0f} s wall", file=sys.stderr)


if __name__ == "__main__":
    main()
