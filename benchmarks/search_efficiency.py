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
    """'nsga2:population_size=20;regularized_evolution:tournament_size=4' -> per-algorithm dict."""
    out: dict[str, dict] = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        algo, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        out.setdefault(algo, {})[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algorithms", default="regularized_evolution,pareto_evolution,nsga2,random")
    p.add_argument("--options", default="", help="per-algorithm options, 'algo:key=value;...'")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--target", default="evonorm_s0", help="known layer to approximate")
    p.add_argument("--thresholds", default="0.7,0.75,0.8",
                   help="targets: min over objectives of affine R^2 (comma-separated)")
    p.add_argument("--objectives", type=int, default=2, help="K probe batches = K objectives")
    p.add_argument("--space", default="evonorm")
    p.add_argument("--num-nodes", type=int, default=None)
    p.add_argument("--max-evals", type=int, default=10000, help="give up after this many evaluations")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (results identical)")
    p.add_argument("--json", metavar="FILE", help="also write the per-run results as JSON")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    thresholds = sorted(float(t) for t in args.thresholds.split(","))
    space_options = {} if args.num_nodes is None else {"num_nodes": args.num_nodes}
    space = SearchSpace.from_name(args.space, **space_options)
    options = parse_options(args.options)
    names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
    tasks = [(name, options.get(name, {}), seed, args.space, space_options, args.target, args.objectives,
              thresholds, args.max_evals) for name in names for seed in range(args.seeds)]
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = list(pool.imap(_run_task, tasks))
    else:
        results = [_run_task(task) for task in tasks]

    print(f"\nTarget layer {args.target}; score = min over {args.objectives} probe batches of the "
          f"per-channel affine R^2; space {space.name} ({space.num_nodes} nodes); {args.seeds} seeds; "
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
