"""Search efficiency: how many evaluations evolution needs to reach a target, against random search.

Training networks for every candidate of 5 seeds x 4 algorithms is far too slow for a
benchmark, so the fitness is a cheap *functional* proxy with a real signal: how closely a
candidate layer, compiled by opsearch's own compiler, reproduces a target layer (EvoNorm-S0 by
default) on fixed probe batches. Objective k (one per probe batch, standing in for the paper's K
architectures) is the mean over channels of the R^2 of the best per-channel affine fit of the
target's output from the candidate's output (the compiled layer ends in a learnable per-channel
affine, so that is the closeness the layer can actually express), in training mode. The probes
give every sample and channel its own scale and shift, so normalisation over the right axes
matters. It rewards partial progress (e.g. x*sigmoid(x) already explains part of S0), and is
100% deterministic.

What counts as an evaluation: what the engine would *train*. A proposal whose graph is invalid
(graph.validate) or whose outputs are not finite is rejected for free, as the validity and
numerics filters do; a proposal functionally identical to an earlier one (same canonical hash,
or same rounded outputs on the probes, like the equivalence filter) reuses the earlier score.
Both counts are reported: evaluations (trained candidates) and proposals (all).

A threshold is reached when min over the K objectives >= it; several thresholds are reported.

    python benchmarks/search_efficiency.py                      # the recorded run
    python benchmarks/search_efficiency.py --seeds 2 --max-evals 2000 --thresholds 0.7   # quick

`--mode engine` runs real searches instead: the engine's own workers (2 processes, one torch
thread each), the default rejection pipeline and the Lightning evaluator, baselines first as in
`opsearch search` (with `seed_with_baselines`), one study per (algorithm, seed). Every finished
trial is logged with the CPU seconds of both workers so far (imports excluded); a threshold is a
mean validation accuracy over the architectures, plus `evonorm_b0`'s own score in that run. A
run ends when a candidate reaches every threshold, at `--budget` candidates or at `--cpu-cap`
CPU seconds; results are appended to `--json` after each run (`--resume` continues, `--report`
recomputes the tables from the logs):

    python benchmarks/search_efficiency.py --mode engine --algorithms regularized_evolution,random \
        --seeds 3 --budget 3000 --cpu-cap 150 --steps 150 --archs resnet,mobilenetv2 \
        --thresholds 0.6,0.75 --json engine.json --resume
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from opsearch import graph, layers, registry
from opsearch.compile import compile_graph
from opsearch.config import parse_assignment
from opsearch.errors import InvalidCandidate
from opsearch.space import SearchSpace

CHANNELS = 8
GROUPS = 4


def make_probes(num: int, seed: int = 0) -> list[torch.Tensor]:
    """K fixed probe batches (16, C, 4, 4) with a random scale and shift per sample and channel."""
    gen = torch.Generator().manual_seed(seed)
    probes = []
    for _ in range(num):
        x = torch.randn(16, CHANNELS, 4, 4, generator=gen)
        scale = torch.exp(torch.randn(16, CHANNELS, 1, 1, generator=gen))
        shift = torch.randn(16, CHANNELS, 1, 1, generator=gen)
        probes.append(x * scale + shift)
    return probes


def layer_outputs(plain, probes) -> list[torch.Tensor] | None:
    """Outputs of the compiled layer in training mode (at init), or None if not finite/invalid."""
    try:
        module = compile_graph(plain, CHANNELS, groups=GROUPS)
    except InvalidCandidate:
        return None
    except Exception as e:  # a compiler bug must not end the benchmark: report it, reject
        print(f"compiler error on {graph.prune(plain)}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    module.train()
    with torch.no_grad():
        outputs = [module(x) for x in probes]
    if not all(bool(torch.isfinite(y).all()) for y in outputs):
        return None
    return outputs


def affine_r2(candidate: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over channels of R^2 of the best affine fit target ~ a_c * candidate + b_c."""
    a = candidate.transpose(0, 1).reshape(CHANNELS, -1).double()
    b = target.transpose(0, 1).reshape(CHANNELS, -1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    va, vb = (a * a).sum(1), (b * b).sum(1)
    r = (a * b).sum(1) / torch.sqrt(va * vb).clamp_min(1e-300)
    r = torch.where((va > 1e-12 * vb.clamp_min(1e-300)) & (vb > 0), r, torch.zeros_like(r))
    return float((r * r).mean())


class Proxy:
    """Closeness to a target layer on fixed probes; memoised like the engine's dedup."""

    def __init__(self, target: str, num_objectives: int):
        self.probes = make_probes(num_objectives)
        self.target = layer_outputs(graph.as_plain(layers.resolve(target)), self.probes)
        assert self.target is not None

    def outputs_key(self, outputs: list[torch.Tensor]) -> str:
        h = hashlib.blake2b(digest_size=16)
        for y in outputs:
            h.update(torch.round(y * 1e4).to(torch.int64).numpy().tobytes())
        return h.hexdigest()

    def score(self, outputs: list[torch.Tensor]) -> tuple[float, ...]:
        return tuple(affine_r2(y, t) for y, t in zip(outputs, self.target))


@dataclass
class Result:
    algorithm: str
    seed: int
    thresholds: dict  # threshold -> (evaluations, proposals) when first reached, or None
    evaluations: int
    proposals: int
    best: float
    seconds: float


def search(name: str, options: dict, seed: int, space: SearchSpace, proxy: Proxy, k: int,
           thresholds: list[float], max_evals: int) -> Result:
    """Run one search until the highest threshold is reached or `max_evals` evaluations."""
    algorithm = registry.algorithms.create(name, space, k, seed, **options)
    by_hash: dict[str, tuple | None] = {}
    by_outputs: dict[str, tuple] = {}
    reached: dict[float, tuple[int, int] | None] = {t: None for t in thresholds}
    evaluations = proposals = 0
    best = -math.inf
    start = time.perf_counter()
    while evaluations < max_evals and proposals < 50 * max_evals:
        genome = algorithm.propose()
        proposals += 1
        plain = space.decode(genome)
        if not graph.is_valid(plain):
            algorithm.feedback(genome, None)  # validity filter: free
            continue
        key = graph.canonical_hash(plain)
        if key in by_hash:
            objectives = by_hash[key]  # structural duplicate: free
        else:
            outputs = layer_outputs(plain, proxy.probes)
            if outputs is None:
                objectives = None  # numerics filter: free
            else:
                out_key = proxy.outputs_key(outputs)
                if out_key in by_outputs:
                    objectives = by_outputs[out_key]  # functional duplicate: free
                else:
                    objectives = proxy.score(outputs)
                    by_outputs[out_key] = objectives
                    evaluations += 1  # a candidate the engine would train
            by_hash[key] = objectives
        algorithm.feedback(genome, objectives)
        if objectives is not None and min(objectives) > best:
            best = min(objectives)
            for t in thresholds:
                if reached[t] is None and best >= t:
                    reached[t] = (evaluations, proposals)
            if reached[max(thresholds)] is not None:
                break
    return Result(name, seed, reached, evaluations, proposals, best, time.perf_counter() - start)


def _run_task(task) -> Result:
    """One (algorithm, seed) run; a top-level function so that worker processes can run it."""
    name, options, seed, space_name, space_options, target, k, thresholds, max_evals = task
    torch.set_num_threads(1)
    space = SearchSpace.from_name(space_name, **space_options)
    r = search(name, options, seed, space, Proxy(target, k), k, thresholds, max_evals)
    reached = ", ".join(f"{t}: {v[0] if v else '-'}" for t, v in r.thresholds.items())
    print(f"{name:24s} seed {seed}: evaluations to reach {{{reached}}}; stopped after "
          f"{r.evaluations} evaluations / {r.proposals} proposals (best {r.best:.4f}, "
          f"{r.seconds:.0f}s)", file=sys.stderr, flush=True)
    return r


def parse_options(text: str) -> dict:
    """'nsga2:population_size=20;regularized_evolution:tournament_size=4' -> per-algorithm dict.
    Each value reads as `-O` reads it (opsearch.config.parse_assignment: a TOML value, else the
    text): kept as text, 'band=false' reached the equivalence filter as the string "false",
    which `bool()` reads as true."""
    out: dict[str, dict] = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        algo, _, assignment = item.partition(":")
        path, value = parse_assignment(assignment)
        out.setdefault(algo, {})[".".join(path)] = value
    return out


# --------------------------------------------------------------------------------------------
# Engine mode: the real search (filters + Lightning trainer on the default proxy), 2 workers


def _engine_worker(config_dict: dict, index: int, lock, stop, cpu, target, log_path: str,
                   cpu_cap: float, highest: float) -> None:
    """One engine worker (a real `opsearch.engine.Worker`) that logs every finished trial.

    Each log line carries the time, this worker's CPU seconds and the CPU seconds of all workers
    (a sampler thread keeps `cpu[i]` fresh every 0.25 s), all counted from the moment the worker
    starts working (imports and setup excluded: they are the same for every algorithm).
    """
    import signal
    import threading

    from opsearch.config import SearchConfig
    from opsearch.engine import Setup, Worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    config = SearchConfig.from_dict(config_dict)
    setup = Setup.from_config(config)
    worker = Worker(setup, lock=lock, worker_index=index)
    cpu0 = time.process_time()

    def sample() -> None:
        while True:
            cpu[index] = time.process_time() - cpu0
            time.sleep(0.25)

    threading.Thread(target=sample, daemon=True).start()
    log = open(log_path, "a", buffering=1)

    def on_result(record, outcome) -> None:
        cpu[index] = time.process_time() - cpu0
        values = list(record.values) if record.values else None
        score = sum(values) / len(values) if values else None
        if record.kind == "baseline" and record.user_attrs.get("layer") == "evonorm_b0" and score:
            target.value = score
        log.write(json.dumps({"t": time.time(), "worker": index, "number": record.number,
                              "kind": record.kind, "layer": record.user_attrs.get("layer"),
                              "verdict": record.user_attrs.get("verdict"), "values": values,
                              "score": score, "formula": record.user_attrs.get("formula"),
                              "cpu_total": sum(cpu[:])}) + "\n")
        if record.kind == "candidate" and score is not None and target.value > 0 \
                and score >= max(target.value, highest):
            stop.set()  # every threshold is reached: the parent ends the run
        if sum(cpu[:]) >= cpu_cap:
            stop.set()

    worker.on_result = on_result
    worker.run_loop()
    stop.set()  # budget reached


def engine_run(algorithm: str, seed: int, budget: int, cpu_cap: float, workdir: str,
               evaluator: dict, options: dict, archs: list[str] | None = None,
               highest: float = 0.0) -> dict:
    """One search with the real engine; returns the log of finished trials."""
    import multiprocessing
    import os

    from opsearch.config import SearchConfig
    from opsearch.engine import Setup, enqueue_baselines

    name = f"{algorithm}-s{seed}"
    url = f"sqlite:///{os.path.join(workdir, name + '.db')}"
    config = SearchConfig(name=name, storage=url, algorithm=algorithm, algorithm_options=options,
                          seed=seed, budget=budget, workers=2, evaluator=evaluator, plots=False,
                          **({"archs": archs} if archs else {}))
    setup = Setup.from_config(config)
    run = setup.open_run()
    enqueue_baselines(run, setup)
    log_path = os.path.join(workdir, name + ".jsonl")
    ctx = multiprocessing.get_context("spawn")
    lock, stop = ctx.Lock(), ctx.Event()
    cpu = ctx.Array("d", 2, lock=False)
    target = ctx.Value("d", 0.0, lock=False)
    start = time.time()
    procs = [ctx.Process(target=_engine_worker, args=(config.to_dict(), i, lock, stop, cpu, target,
                                                      log_path, cpu_cap, highest)) for i in range(2)]
    for p in procs:
        p.start()
    while not stop.is_set() and any(p.is_alive() for p in procs):
        stop.wait(0.5)
    for p in procs:  # a worker mid-evaluation is not waited for: its candidate does not count
        if p.is_alive():
            p.terminate()
        p.join()
    with open(log_path) as f:
        log = [json.loads(line) for line in f if line.strip()]
    return {"algorithm": algorithm, "seed": seed, "wall_s": time.time() - start, "log": log}


def engine_crossings(result: dict, thresholds: list[float]) -> dict:
    """Per threshold (a number, or 'evonorm_b0' = that baseline's score in this run): candidates
    proposed, candidates trained (verdict evaluated) and CPU seconds of both workers when a
    candidate's mean accuracy first reached it; None if never."""
    log = sorted(result["log"], key=lambda e: e["t"])
    b0 = next((e["score"] for e in log if e["layer"] == "evonorm_b0" and e["score"]), None)
    out: dict = {"evonorm_b0_score": b0}
    for t in thresholds + ["evonorm_b0"]:
        level = b0 if t == "evonorm_b0" else t
        proposals = trained = 0
        hit = None
        for e in log:
            if e["kind"] != "candidate":
                continue
            proposals += 1
            trained += e["verdict"] == "evaluated"
            if level is not None and e["score"] is not None and e["score"] >= level:
                hit = {"proposals": proposals, "evaluations": trained, "cpu_s": e["cpu_total"],
                       "formula": e["formula"], "score": e["score"]}
                break
        out[str(t)] = hit
    cands = [e for e in log if e["kind"] == "candidate"]
    out["total"] = {"proposals": len(cands), "evaluations": sum(e["verdict"] == "evaluated" for e in cands),
                    "cpu_s": max((e["cpu_total"] for e in log), default=0.0),
                    "best": max((e["score"] for e in cands if e["score"] is not None), default=None)}
    return out


def _bootstrap_ratio(a: list[float], b: list[float], reps: int = 2000, seed: int = 0):
    """95% percentile-bootstrap interval of median(a) / median(b) (runs resampled per side)."""
    import random

    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(a, k=len(a))) / max(statistics.median(rng.choices(b, k=len(b))), 1e-9)
                    for _ in range(reps))
    return ratios[int(0.025 * reps)], ratios[int(0.975 * reps) - 1]


def engine_report(results: list[dict], thresholds: list[float], names: list[str]) -> None:
    rows = {(r["algorithm"], r["seed"]): engine_crossings(r, thresholds) for r in results}
    for t in [str(x) for x in thresholds] + ["evonorm_b0"]:
        print(f"\nThreshold {t} (mean validation accuracy over the architectures):\n")
        print("| algorithm | reached | median evaluations | per-seed evaluations | median CPU s "
              "| per-seed CPU s | ratio of median evaluations to random | 95% bootstrap |")
        print("|---|---|---|---|---|---|---|---|")
        per: dict = {}
        for name in names:
            seeds = sorted(s for a, s in rows if a == name)
            ev, cpu, marks = [], [], []
            for s in seeds:
                c = rows[(name, s)]
                hit = c[t]
                ev.append(hit["evaluations"] if hit else c["total"]["evaluations"])
                cpu.append(hit["cpu_s"] if hit else c["total"]["cpu_s"])
                marks.append("" if hit else "+")
            per[name] = (ev, cpu, marks)
        base = per.get("random")
        for name, (ev, cpu, marks) in per.items():
            if not ev:
                continue
            reached = sum(m == "" for m in marks)
            ratio = ci = "-"
            if base and base[0] and name != "random":
                ratio = f"{statistics.median(ev) / max(statistics.median(base[0]), 1e-9):.3f}"
                if any(base[2]):
                    ratio = "<= " + ratio if not any(marks) else ratio + " (both censored)"
                lo, hi = _bootstrap_ratio(ev, base[0])
                ci = f"{lo:.2f}-{hi:.2f}"
            print(f"| {name} | {reached}/{len(ev)} | {statistics.median(ev):g}"
                  f"{'+' if reached < len(ev) else ''} | "
                  f"{', '.join(f'{e}{m}' for e, m in zip(ev, marks))} | {statistics.median(cpu):.0f} | "
                  f"{', '.join(f'{c:.0f}{m}' for c, m in zip(cpu, marks))} | {ratio} | {ci} |")
    b0 = [rows[k]["evonorm_b0_score"] for k in rows if rows[k]["evonorm_b0_score"]]
    if b0:
        print(f"\nevonorm_b0's score per run: {', '.join(f'{v:.4f}' for v in b0)}")


def engine_main(args, names: list[str], thresholds: list[float]) -> int:
    """Run every (algorithm, seed) in sequence, appending each result to --json as it ends."""
    import os
    import tempfile

    evaluator = {}
    if args.steps:
        evaluator["steps"] = args.steps
    options = parse_options(args.options)
    results: list[dict] = []
    if args.json and os.path.exists(args.json) and (args.resume or args.report):
        import gzip

        with (gzip.open(args.json, "rt") if args.json.endswith(".gz") else open(args.json)) as f:
            results = json.load(f)["runs"]  # a kept record may be gzipped (--report)
    done = {(r["algorithm"], r["seed"]) for r in results}
    if args.report:
        engine_report(results, thresholds, names)
        return 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="opsearch-efficiency-")
    os.makedirs(workdir, exist_ok=True)
    # interleave algorithms so that a run cut short still has every algorithm at the first seeds
    for seed in range(args.seeds):
        for name in names:
            if (name, seed) in done:
                continue
            r = engine_run(name, seed, args.budget, args.cpu_cap, workdir, evaluator, options.get(name, {}),
                           args.archs.split(",") if args.archs else None, max(thresholds))
            results.append(r)
            c = engine_crossings(r, thresholds)
            summary = ", ".join(f"{t}: {c[str(t)]['evaluations'] if c[str(t)] else '-'}"
                                for t in thresholds + ["evonorm_b0"])
            print(f"{name:24s} seed {seed}: evaluations to reach {{{summary}}}; "
                  f"{c['total']['proposals']} proposals, {c['total']['evaluations']} trained, "
                  f"{c['total']['cpu_s']:.0f} CPU s, {r['wall_s']:.0f} s wall, best {c['total']['best']}",
                  file=sys.stderr, flush=True)
            if args.json:
                tmp = args.json + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"mode": "engine", "budget": args.budget, "cpu_cap": args.cpu_cap,
                               "steps": args.steps, "archs": args.archs, "thresholds": thresholds, "runs": results}, f)
                os.replace(tmp, args.json)
    engine_report(results, thresholds, names)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algorithms", default="regularized_evolution,pareto_evolution,nsga2,random")
    p.add_argument("--options", default="", help="per-algorithm options, 'algo:key=value;...'")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed-list", default=None, help="surrogate mode: these seeds (e.g. 3,4) instead of 0..seeds-1")
    p.add_argument("--target", default="evonorm_s0", help="known layer to approximate")
    p.add_argument("--thresholds", default="0.7,0.75,0.8",
                   help="targets: min over objectives of affine R^2 (comma-separated)")
    p.add_argument("--objectives", type=int, default=2, help="K probe batches = K objectives")
    p.add_argument("--space", default="evonorm")
    p.add_argument("--num-nodes", type=int, default=None)
    p.add_argument("--max-evals", type=int, default=10000, help="give up after this many evaluations")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (results identical)")
    p.add_argument("--json", metavar="FILE", help="also write the per-run results as JSON (--report also reads a .gz)")
    p.add_argument("--mode", choices=("surrogate", "engine"), default="surrogate",
                   help="surrogate: the functional proxy above; engine: real searches (filters and "
                        "training on the default proxy, 2 workers), thresholds in mean accuracy")
    p.add_argument("--budget", type=int, default=400, help="engine mode: candidates per run at most")
    p.add_argument("--cpu-cap", type=float, default=600.0,
                   help="engine mode: stop a run after this many CPU seconds of its two workers")
    p.add_argument("--steps", type=int, default=None, help="engine mode: training steps (default: "
                   "the evaluator's, 300)")
    p.add_argument("--archs", default=None, help="engine mode: proxy architectures (default: the "
                   "search default, resnet,mobilenetv2,efficientnet)")
    p.add_argument("--workdir", default=None, help="engine mode: keep the studies and logs here")
    p.add_argument("--resume", action="store_true", help="engine mode: keep the runs already in --json")
    p.add_argument("--report", action="store_true",
                   help="engine mode: only print the tables of the runs in --json (thresholds may "
                        "differ from the run's: crossings are recomputed from the logs)")
    args = p.parse_args(argv)
    if args.mode == "engine":
        names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
        thresholds = sorted(float(t) for t in args.thresholds.split(","))
        return engine_main(args, names, thresholds)

    torch.set_num_threads(1)
    thresholds = sorted(float(t) for t in args.thresholds.split(","))
    seeds = [int(v) for v in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    space_options = {} if args.num_nodes is None else {"num_nodes": args.num_nodes}
    space = SearchSpace.from_name(args.space, **space_options)
    options = parse_options(args.options)
    names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
    tasks = [(name, options.get(name, {}), seed, args.space, space_options, args.target, args.objectives,
              thresholds, args.max_evals) for name in names for seed in seeds]
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = list(pool.imap(_run_task, tasks))
    else:
        results = [_run_task(task) for task in tasks]

    print(f"\nTarget layer {args.target}; score = min over {args.objectives} probe batches of the "
          f"per-channel affine R^2; space {space.name} ({space.num_nodes} nodes); seeds {seeds}; "
          f"cap {args.max_evals} evaluations (a run that did not reach a threshold counts as the "
          f"cap, marked +).\n")
    for t in thresholds:
        print(f"Threshold {t}:\n")
        print("| algorithm | reached | median evaluations | median proposals | per-seed evaluations "
              "| ratio to random |")
        print("|---|---|---|---|---|---|")
        medians = {}
        for name in names:
            rs = [r for r in results if r.algorithm == name]
            evals = [r.thresholds[t][0] if r.thresholds[t] else args.max_evals for r in rs]
            props = [r.thresholds[t][1] if r.thresholds[t] else r.proposals for r in rs]
            medians[name] = (statistics.median(evals), statistics.median(props), rs, evals)
        base = medians.get("random", (None,))[0]
        for name, (med, med_props, rs, evals) in medians.items():
            ratio = f"{med / base:.3f}" if base else "-"
            per_seed = ", ".join(f"{e}" + ("" if r.thresholds[t] else "+") for e, r in zip(evals, rs))
            capped = any(not r.thresholds[t] for r in rs)
            print(f"| {name} | {sum(bool(r.thresholds[t]) for r in rs)}/{len(rs)} | {med:g}"
                  f"{'+' if capped and med >= args.max_evals else ''} | {med_props:g} | {per_seed} | {ratio} |")
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**r.__dict__, "thresholds": {str(k): v for k, v in r.thresholds.items()}}
                       for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
