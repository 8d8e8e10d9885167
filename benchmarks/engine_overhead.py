"""Engine overhead: time per candidate for propose + record (no training), and study recovery.

For each algorithm, a study on SQLite is filled with H trials of history (H = 100, 1,000,
10,000; random genomes of the evonorm space with random objectives, a share of them rejected),
then the engine's own path is timed for `--candidates` more candidates: propose -> record RUNNING
-> record the result in one write -> feed back -> sync. Beside it, in the same run and on the
same storage kind: pyglove's regularized evolution (`pg.evolution.regularized_evolution`, its own
propose/feedback on pg DNA) and Optuna's NSGAIISampler through `study.ask()`/`tell()` with one
categorical parameter per gene, each at the same history size. Recovery: opening the study and
rebuilding the algorithm from H trials (what a restarted worker does).

    python benchmarks/engine_overhead.py                 # H = 100, 1000, 10000
    python benchmarks/engine_overhead.py --history 100 1000 --candidates 50

Each worker builds its evaluator once before its first candidate (Worker._warm_up: Lightning's
import, the data; ~2 s for the first worker of a process); that is done before the timing, so
the mean is the steady state. "median CPU ms" is the process CPU time per candidate (time.process_time): on a loaded machine
the wall times inflate with other processes, the CPU times much less.
Rows marked * rebuilt pyglove's generator from only the last `--pyglove-recover-max` trials.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime

import optuna
from optuna.trial import TrialState

from opsearch.config import DEFAULT_ARCHS
from opsearch.space import SearchSpace
from opsearch.study import Run, WorkerId

ARCHS = list(DEFAULT_ARCHS)
ALGORITHMS = ["regularized_evolution", "pareto_evolution", "random", "nsga2"]


def _sqlite_path(url: str) -> str:
    assert url.startswith("sqlite:///"), url
    return url[len("sqlite:///"):]


def _bulk_insert(url: str, study_id: int, trials: list[dict]) -> None:
    """Append finished trials to an Optuna SQLite study in one transaction, with the row formats
    Optuna's RDB storage writes (state names, naive UTC datetimes, 'FINITE' values, JSON attrs):
    seconds for 10,000 trials, where one storage call per trial takes tens of minutes on a loaded
    2-core box. Each trial: {"state", "values", "user_attrs", "params": {name: (index, dist json)}}."""
    import sqlite3

    now = datetime.utcnow().isoformat(sep=" ")
    con = sqlite3.connect(_sqlite_path(url))
    with con:
        (number,) = con.execute("SELECT COUNT(*) FROM trials WHERE study_id = ?", (study_id,)).fetchone()
        for t in trials:
            cur = con.execute("INSERT INTO trials (number, study_id, state, datetime_start, datetime_complete) "
                              "VALUES (?, ?, ?, ?, ?)", (number, study_id, t["state"], now, now))
            trial_id = cur.lastrowid
            number += 1
            if t.get("values"):
                con.executemany("INSERT INTO trial_values (trial_id, objective, value, value_type) "
                                "VALUES (?, ?, ?, 'FINITE')",
                                [(trial_id, k, v) for k, v in enumerate(t["values"])])
            con.executemany("INSERT INTO trial_user_attributes (trial_id, key, value_json) VALUES (?, ?, ?)",
                            [(trial_id, k, json.dumps(v)) for k, v in t.get("user_attrs", {}).items()])
            con.executemany("INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json) "
                            "VALUES (?, ?, ?, ?)",
                            [(trial_id, k, float(i), d) for k, (i, d) in t.get("params", {}).items()])
    con.close()


def fill_history_fast(url: str, name: str, space: SearchSpace, n: int, seed: int) -> Run:
    """H finished candidate trials (random genomes, 80% rejected, random objectives), written in
    one SQLite transaction."""
    run = Run.create_or_open(url, name, {"space": "evonorm", "archs": ARCHS, "dataset": "synthetic"}, [])
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        genome = space.random_genome(rng)
        rejected = rng.random() < 0.8
        attrs = {"kind": "candidate", "genome": json.dumps(list(genome)), "formula": "f",
                 "verdict": "rejected:numerics" if rejected else "evaluated", "elapsed_s": 0.01}
        values = None if rejected else [rng.random() for _ in ARCHS]
        trials.append({"state": "PRUNED" if rejected else "COMPLETE", "values": values, "user_attrs": attrs})
    _bulk_insert(url, run.study_id, trials)
    return run


def time_engine(url: str, name: str, space: SearchSpace, algorithm: str, candidates: int):
    """(recovery seconds, median and mean ms per candidate) on the engine's own worker loop.

    A real `Worker` (recover, pop/propose, record RUNNING, result in one write, feedback, sync)
    whose `process` returns a made-up result instead of filtering and training.
    """
    from opsearch.config import SearchConfig
    from opsearch.engine import Outcome, Setup, Worker

    config = SearchConfig(name=name, storage=url, algorithm=algorithm, archs=list(ARCHS),
                          baselines=[], budget=10**9, dataset="synthetic")
    setup = Setup.from_config(config)
    t0 = time.perf_counter()
    run = Run(setup.open_run().storage, name, url)
    worker = Worker(setup, run=run)
    worker.recover()
    recovery = time.perf_counter() - t0
    worker._warm_up()  # once per process (Lightning's import, the data): not a per-candidate cost
    rng = random.Random(1)
    times: list[float] = []
    cpu_times: list[float] = []
    last = [time.perf_counter()]
    last_cpu = [time.process_time()]

    def fake_process(record):
        values = [rng.random() for _ in ARCHS]
        return Outcome(TrialState.COMPLETE, values, {
            "verdict": "evaluated", "elapsed_s": 0.0, **{f"acc/{a}": v for a, v in zip(ARCHS, values)}})

    def on_result(record, outcome):
        now, now_cpu = time.perf_counter(), time.process_time()
        times.append(now - last[0])
        cpu_times.append(now_cpu - last_cpu[0])
        last[0], last_cpu[0] = now, now_cpu

    worker.process = fake_process
    worker.on_result = on_result
    last[0], last_cpu[0] = time.perf_counter(), time.process_time()
    worker.run_loop(max_candidates=candidates)
    return recovery, statistics.median(times) * 1e3, statistics.mean(times) * 1e3, statistics.median(cpu_times) * 1e3


def time_pyglove(url: str, name: str, space: SearchSpace, history: int, candidates: int,
                 recover_max: int = 10**9):
    """pyglove's regularized evolution: recover from history (at most its last `recover_max`
    trials), then propose + record + feedback on the storage holding the whole history."""
    import pyglove as pg

    run = Run.create_or_open(url, name, {"space": "evonorm", "archs": ARCHS, "dataset": "synthetic"}, [])
    run.sync()
    gen = pg.evolution.regularized_evolution(population_size=100, tournament_size=10, seed=0)
    gen.setup(space.dna_spec)
    hist = [r for r in run.trials() if r.genome is not None][-recover_max:]
    t0 = time.perf_counter()
    items = []
    for position, r in enumerate(hist):
        dna = space.to_dna(r.genome)
        dna.use_spec(space.dna_spec)
        dna.set_metadata("initial_population", False)  # what pyglove's recover expects
        dna.set_metadata("generation_id", position)
        dna.set_metadata("proposal_id", position)
        items.append((dna, float(sum(r.values) / len(r.values)) if r.values else 0.0))
    gen.recover(items)
    recovery = time.perf_counter() - t0
    me = WorkerId.current()
    times, cpu_times = [], []
    rng = random.Random(1)
    for _ in range(candidates):
        t, c = time.perf_counter(), time.process_time()
        dna = gen.propose()
        genome = space.from_dna(dna)
        record = run.start_trial({"kind": "candidate", "genome": json.dumps(list(genome))}, me)
        values = [rng.random() for _ in ARCHS]
        run.finish_trial(record, TrialState.COMPLETE, values, {"verdict": "evaluated"})
        gen.feedback(dna, sum(values) / len(values))
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    return recovery, statistics.median(times) * 1e3, statistics.mean(times) * 1e3, statistics.median(cpu_times) * 1e3


def time_optuna_nsga2(url: str, name: str, space: SearchSpace, history: int, candidates: int):
    """Optuna's NSGAIISampler with its own ask/tell on the same storage, H trials of history."""
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    dists = {f"g{i}": optuna.distributions.CategoricalDistribution(list(range(n)))
             for i, n in enumerate(space.gene_sizes)}
    study = optuna.create_study(study_name=name, storage=storage,
                                directions=["maximize"] * len(ARCHS),
                                sampler=optuna.samplers.NSGAIISampler(seed=0))
    rng = random.Random(0)
    as_json = {k: optuna.distributions.distribution_to_json(d) for k, d in dists.items()}
    trials = []
    for _ in range(history):  # what study.add_trial(create_trial(...)) stores, in one transaction
        params = {k: (rng.randrange(len(d.choices)), as_json[k]) for k, d in dists.items()}
        trials.append({"state": "COMPLETE", "values": [rng.random() for _ in ARCHS], "params": params})
    _bulk_insert(url, study._study_id, trials)
    t0 = time.perf_counter()
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=optuna.samplers.NSGAIISampler(seed=0))
    study.trials  # what a restarted worker reads
    recovery = time.perf_counter() - t0
    times, cpu_times = [], []
    for _ in range(candidates):
        t, c = time.perf_counter(), time.process_time()
        trial = study.ask(dists)
        study.tell(trial, [rng.random() for _ in ARCHS])
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    return recovery, statistics.median(times) * 1e3, statistics.mean(times) * 1e3, statistics.median(cpu_times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--skip-references", action="store_true")
    parser.add_argument("--reference-max-history", type=int, default=10**9,
                        help="run pyglove / Optuna only up to this history")
    parser.add_argument("--pyglove-recover-max", type=int, default=1000,
                        help="rebuild pyglove's generator from at most the last N trials (its aging "
                             "population is 100; recovering costs ~15 ms per trial); the storage "
                             "still holds the whole history")
    args = parser.parse_args()
    space = SearchSpace.from_name("evonorm")
    print(f"evonorm space: {len(space.gene_sizes)} genes; {args.candidates} candidates timed per row; "
          f"SQLite (WAL) on {tempfile.gettempdir()}")
    print(f"{'history':>8} {'method':<34} {'recover s':>10} {'median ms':>10} {'mean ms':>9} {'median CPU ms':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for h in args.history:
            base = os.path.join(tmp, f"h{h}.db")
            fill_history_fast(f"sqlite:///{base}", "base", space, h, seed=h)

            def fresh_copy(label: str) -> str:
                """The same history in a file of its own: each method starts from identical trials."""
                path = os.path.join(tmp, f"h{h}_{label}.db")
                shutil.copyfile(base, path)
                return f"sqlite:///{path}"

            for algorithm in args.algorithms:
                rec, med, mean, cpu = time_engine(fresh_copy(algorithm.replace(":", "_")), "base", space,
                                                  algorithm, args.candidates)
                print(f"{h:>8} {'opsearch ' + algorithm:<34} {rec:>10.3f} {med:>10.2f} {mean:>9.2f} {cpu:>14.2f}",
                      flush=True)
            if args.skip_references or h > args.reference_max_history:
                continue
            n = args.candidates if h <= 1000 else max(10, args.candidates // 5)
            rec, med, mean, cpu = time_pyglove(fresh_copy("pg"), "base", space, h, n, args.pyglove_recover_max)
            label = "pyglove regularized_evolution" + ("*" if h > args.pyglove_recover_max else "")
            print(f"{h:>8} {label:<34} {rec:>10.3f} {med:>10.2f} {mean:>9.2f} {cpu:>14.2f}", flush=True)
            rec, med, mean, cpu = time_optuna_nsga2(f"sqlite:///{tmp}/optuna{h}.db", "optuna", space, h,
                                                    args.candidates)
            print(f"{h:>8} {'optuna NSGAIISampler ask/tell':<34} {rec:>10.3f} {med:>10.2f} {mean:>9.2f} {cpu:>14.2f}",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
