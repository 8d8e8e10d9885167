"""Scale: search throughput with 1, 2 (and 4) local workers, and show / resume on a big study.

Throughput: the same search run with --workers 1, 2, ... on a fresh SQLite study each, the
worker counts interleaved (1, 2, 1, 2, ...) so that a busy shared machine distorts them alike.
Three searches: `cheap` (synthetic data, tiny networks, 3 training steps, validity + numerics +
equivalence: the engine's own costs dominate), `default` (the default search: default proxy
and filters, no baselines; most random candidates die in the filters) and `proxy` (real
training: the seven known layers, each trained on the default proxy's three architectures, plus
one candidate; every trial counts). For each run:

  rate      candidates per minute from the first trial's start to the last one's end;
  busy rate candidates per minute while every worker was working (from the last worker's first
            start to the first worker's last end): the steady state, without the start-up skew
            (the second process imports torch while the first already works) and the tail (the
            last candidate, trained alone) that dominate a run of a few seconds;
  cpu/cand  CPU seconds (user + sys, every process of the command) per candidate: the work
            itself; it grows with the workers only if they duplicate work or fight over locks;
  load      the 1-minute load average when the run started.

Big study: a 10,000-trial study (random evonorm candidates, 80% rejected, with the contract
attributes) is written straight into SQLite; then `opsearch show` (a fresh process, as a user runs
it) and a resume (a fresh Worker's recovery: open, sync, rebuild the algorithm and the equivalence
cache) are timed.

    python benchmarks/scale.py                                   # cheap, workers 1 2, 3 rounds
    python benchmarks/scale.py --search proxy --repeats 2 --trials 0      # real training
    python benchmarks/scale.py --workers 1 2 4 --trials 0        # no big study
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime

CHEAP = """
name = "scale"
budget = {budget}
dataset = "synthetic"
archs = ["resnet", "mobilenetv2"]
filters = ["validity", "numerics", "equivalence"]
baselines = []
storage = "{storage}"
workers = {workers}
plots = false
seed = {seed}

[evaluator]
steps = 3
batch_size = 16
val_batch_size = 128
warmup_steps = 1
arch_options = {{ width = 4, depth = 1 }}
"""

PROXY = """
name = "scale"
budget = 1
storage = "{storage}"
workers = {workers}
plots = false
seed = {seed}
"""

DEFAULT = """
name = "scale"
budget = {budget}
baselines = []
storage = "{storage}"
workers = {workers}
plots = false
seed = {seed}
"""


def throughput(tmp: str, search: str, workers: int, budget: int, seed: int) -> dict:
    from opsearch.study import open_run

    tag = f"{search}-w{workers}-s{seed}"
    storage = f"sqlite:///{tmp}/{tag}.db"
    path = os.path.join(tmp, f"{tag}.toml")
    with open(path, "w") as f:
        f.write({"cheap": CHEAP, "default": DEFAULT, "proxy": PROXY}[search].format(
            budget=budget, storage=storage, workers=workers, seed=seed))
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    subprocess.run([sys.executable, "-m", "opsearch", "search", "--config", path, "--quiet"],
                   check=True, capture_output=True, text=True)
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    trials = [t for t in open_run(storage, "scale").get_trials()
              if t.datetime_complete is not None
              and (search == "proxy" or t.user_attrs.get("kind") == "candidate")]
    first = min(t.datetime_start for t in trials).timestamp()
    last = max(t.datetime_complete for t in trials).timestamp()
    by_worker: dict[int, list] = {}
    for t in trials:
        pid = (t.system_attrs.get("opsearch:worker") or {}).get("pid")
        by_worker.setdefault(pid, []).append(t)
    busy_from = max(min(t.datetime_start for t in ts).timestamp() for ts in by_worker.values())
    busy_to = min(max(t.datetime_complete for t in ts).timestamp() for ts in by_worker.values())
    in_busy = [t for t in trials if busy_from <= t.datetime_complete.timestamp() <= busy_to]
    busy_rate = (len(in_busy) / ((busy_to - busy_from) / 60.0)
                 if busy_to - busy_from > 1.0 and len(in_busy) >= 2 else float("nan"))
    return {"rate": len(trials) / ((last - first) / 60.0), "busy_rate": busy_rate,
            "startup": first - start, "wall": wall, "cpu_per_candidate": cpu / len(trials),
            "load": load, "workers_seen": len(by_worker)}


def scaling(tmp: str, search: str, workers: list[int], budget: int, repeats: int) -> None:
    import statistics

    what = "1 candidate + 7 baselines" if search == "proxy" else f"budget {budget}"
    print(f"\n{search} search, {what}, {os.cpu_count()} cores, rounds interleaved "
          f"({', '.join(map(str, workers))}) x {repeats}")
    print(f"{'round':>5} {'workers':>7} {'rate/min':>9} {'busy/min':>9} {'cpu s/cand':>10} "
          f"{'start-up s':>10} {'wall s':>7} {'load':>5}")
    results: dict[int, list[dict]] = {w: [] for w in workers}
    for r in range(repeats):
        for w in workers:
            res = throughput(tmp, search, w, budget, seed=r)
            results[w].append(res)
            print(f"{r:>5} {w:>7} {res['rate']:>9.1f} {res['busy_rate']:>9.1f} "
                  f"{res['cpu_per_candidate']:>10.2f} {res['startup']:>10.1f} {res['wall']:>7.1f} "
                  f"{res['load']:>5.1f}", flush=True)
    base = {k: statistics.median(x[k] for x in results[workers[0]]) for k in ("rate", "busy_rate", "wall")}
    print(f"median ratio to {workers[0]} worker(s):")
    for w in workers:
        med = {k: statistics.median(x[k] for x in results[w]) for k in ("rate", "busy_rate", "wall")}
        print(f"  {w} workers: rate x{med['rate'] / base['rate']:.2f}, busy rate "
              f"x{med['busy_rate'] / base['busy_rate']:.2f}, wall time x{base['wall'] / med['wall']:.2f} faster")


def big_study(tmp: str, n: int) -> str:
    """n finished candidate trials with the contract attributes, one write each."""
    import random

    from optuna.trial import FrozenTrial, TrialState

    from opsearch.engine import describe_graph
    from opsearch.space import SearchSpace
    from opsearch.study import Run

    url = f"sqlite:///{tmp}/big.db"
    archs = ["resnet", "mobilenetv2", "efficientnet"]
    run = Run.create_or_open(url, "big", {"space": "evonorm", "space_options": {}, "archs": archs,
                                          "dataset": "digits", "algorithm": "regularized_evolution"}, [])
    space = SearchSpace.from_name("evonorm")
    rng = random.Random(0)
    now = datetime.now()
    for i in range(n):
        genome = space.random_genome(rng)
        attrs = {"kind": "candidate", "genome": json.dumps(list(genome)), "elapsed_s": 0.05}
        attrs.update(describe_graph(space.decode(genome)))
        if rng.random() < 0.8:
            state, values = TrialState.PRUNED, None
            attrs["verdict"] = rng.choice(["rejected:validity", "rejected:numerics",
                                           "rejected:stability", "rejected:quality"])
        else:
            state, values = TrialState.COMPLETE, [rng.random() for _ in archs]
            attrs["verdict"] = "evaluated"
            attrs.update({f"acc/{a}": v for a, v in zip(archs, values)})
        run.storage.create_new_trial(run.study_id, template_trial=FrozenTrial(
            number=-1, state=state, value=None, values=values, datetime_start=now,
            datetime_complete=now, params={}, distributions={}, user_attrs=attrs, system_attrs={},
            intermediate_values={}, trial_id=-1))
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--search", choices=("cheap", "default", "proxy", "all"), default="cheap")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for search in (("cheap", "default", "proxy") if args.search == "all" else (args.search,)):
            scaling(tmp, search, args.workers, args.budget, args.repeats)
        if args.trials <= 0:
            return

        t = time.time()
        url = big_study(tmp, args.trials)
        print(f"\nbig study: {args.trials} trials written in {time.time() - t:.1f} s")
        t = time.time()
        subprocess.run([sys.executable, "-m", "opsearch", "show", url], check=True,
                       capture_output=True, text=True)
        print(f"opsearch show (fresh process, imports included): {time.time() - t:.2f} s")
        t = time.time()
        subprocess.run([sys.executable, "-c", "import opsearch.cli"], check=True)
        print(f"  of which python + import opsearch.cli: {time.time() - t:.2f} s")

        from opsearch.config import SearchConfig
        from opsearch.engine import Setup, Worker
        from opsearch.study import Run

        config = SearchConfig(name="big", storage=url, archs=["resnet", "mobilenetv2", "efficientnet"],
                              baselines=[])
        setup = Setup.from_config(config)
        t = time.time()
        run = Run(setup.open_run().storage, "big", url)
        worker = Worker(setup, run=run)
        n = worker.recover()
        print(f"resume (open + sync + recover algorithm and equivalence cache from {n} trials): "
              f"{time.time() - t:.2f} s")


if __name__ == "__main__":
    main()
