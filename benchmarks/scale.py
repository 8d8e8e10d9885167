"""Scale: search throughput with 1, 2 and 4 local workers, and show / resume on a big study.

Throughput: the same cheap search (synthetic data, tiny networks, 3 training steps, the
validity + numerics + equivalence filters) run with --workers 1, 2, 4 on one SQLite study each;
candidates per minute counted from the first to the last finished candidate (process start-up,
the same for every worker count, is reported apart), and the ratio to one worker.

Big study: a 10,000-trial study (random evonorm candidates, 80% rejected, with the contract
attributes) is written straight into SQLite; then `opsearch show` (a fresh process, as a user runs
it) and a resume (a fresh Worker's recovery: open, sync, rebuild the algorithm and the equivalence
cache) are timed.

    python benchmarks/scale.py                      # workers 1 2 4, budget 40, 10,000 trials
    python benchmarks/scale.py --workers 1 2 --budget 20 --trials 2000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime

CONFIG = """
name = "scale"
space = "evonorm"
algorithm = "regularized_evolution"
budget = {budget}
dataset = "synthetic"
archs = ["resnet", "mobilenetv2"]
filters = ["validity", "numerics", "equivalence"]
baselines = []
storage = "{storage}"
workers = {workers}
plots = false
seed = 0

[evaluator]
steps = 3
batch_size = 16
val_batch_size = 128
warmup_steps = 1
arch_options = {{ width = 4, depth = 1 }}
"""


def throughput(tmp: str, workers: int, budget: int) -> tuple[float, float]:
    import optuna

    storage = f"sqlite:///{tmp}/w{workers}.db"
    path = os.path.join(tmp, f"w{workers}.toml")
    with open(path, "w") as f:
        f.write(CONFIG.format(budget=budget, storage=storage, workers=workers))
    start = time.time()
    subprocess.run([sys.executable, "-m", "opsearch", "search", "--config", path, "--quiet"],
                   check=True, capture_output=True, text=True)
    trials = optuna.load_study(study_name="scale", storage=storage).get_trials()
    first_start = min(t.datetime_start for t in trials).timestamp()
    last_end = max(t.datetime_complete for t in trials).timestamp()
    per_minute = len(trials) / ((last_end - first_start) / 60.0)
    return per_minute, first_start - start


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
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--trials", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"throughput on {os.cpu_count()} cores, budget {args.budget} per run")
        print(f"{'workers':>8} {'candidates/min':>15} {'ratio to 1':>11} {'start-up s':>11}")
        base = None
        for w in args.workers:
            per_minute, startup = throughput(tmp, w, args.budget)
            base = base or per_minute
            print(f"{w:>8} {per_minute:>15.1f} {per_minute / base:>11.2f} {startup:>11.1f}", flush=True)

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
