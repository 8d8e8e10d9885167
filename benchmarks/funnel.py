"""The funnel against flat evaluation: CPU seconds of the search and the held-out score of the
best candidate each one finds, side by side on the same seeds in one run.

For each seed, two searches with the same config apart from the funnel (opsearch/funnel.py):
``flat`` trains every candidate that passes the filters to ``--steps``; ``funnel`` trains it to
rung 1 and promotes the top 1/eta of each rung (rung 0 = the quality filter, the top rung =
``--steps``). Each search runs as `opsearch search` in a child process (one worker, one torch
thread), its CPU seconds measured from the child's rusage; then `opsearch rerank --top 1`
re-trains the best candidate (the leaderboard's: for the funnel, at its highest rung) on the
held-out split with several seeds, and its mean held-out accuracy over seeds and architectures is
the score. The searches of one seed run back to back, in alternating order, so that both see
the same machine load; CPU seconds are robust to other processes on a shared machine.

Results go to ``--out`` as one JSON line per search as soon as it ends (a long run can be
stopped and read), then a summary: per-seed CPU ratio funnel/flat and held-out difference, with
means and 95% t intervals over seeds (scipy.stats).

    python benchmarks/funnel.py --seeds 0,1 --budget 20 --archs resnet,mobilenetv2 --steps 480 \
        --rungs 100,120,480 --eta 4 --parallel 4

The baselines are evaluated in both searches: evolution starts from them (`seed_with_baselines`),
without which ~96% of random evonorm graphs die in the filters and a small budget trains
nothing. Flat trains them to ``--steps``; the funnel at rung 1 (``--funnel-baselines first``,
the default: the fidelity its candidates are compared at) or at the top rung (``top``: then
they cost the same in both modes and dilute the ratio). The summary also gives the ratio of the
candidates' own wall seconds (`elapsed_s` of candidates and promotions), the part the funnel
acts on.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

CONFIG = """
name = "{name}"
space = "{space}"
budget = {budget}
archs = {archs}
dataset = "{dataset}"
storage = "{storage}"
baselines = {baselines}
plots = false
seed = {seed}
workers = 1

[evaluator]
steps = {steps}

[filter_options.quality]
steps = {quality_steps}

[rerank]
enabled = false

[funnel]
enabled = {funnel}
eta = {eta}
steps = {rungs}
min_candidates = {min_candidates}
baselines = "{funnel_baselines}"
"""


def opsearch(args: list[str], log: str) -> tuple[float, float]:
    """Run one opsearch command; (CPU seconds, wall seconds) of that child alone (wait4's
    rusage, so that searches running at the same time are told apart)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OPSEARCH_FAULT", None)
    t0 = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "opsearch", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log) as f:
            raise RuntimeError(f"opsearch {args[0]} failed ({proc.returncode}):\n{f.read()[-3000:]}")
    return usage.ru_utime + usage.ru_stime, time.perf_counter() - t0


def held_out(storage: str, name: str) -> dict:
    """The re-ranked candidate: trial, formula, mean held-out accuracy (seeds x archs) and the
    spread of its per-seed means."""
    from opsearch.study import open_run, run_trials
    from opsearch.trials import by_number as search_by_number

    trials = run_trials(open_run(storage, name))  # with the stage studies' items
    items = [t for t in trials if t.user_attrs.get("kind") == "rerank" and t.state.name == "COMPLETE"]
    by_number = search_by_number(trials)
    # baselines are not re-ranked here (rerank.baselines=[]): every item is of the chosen layer,
    # a candidate, or the baseline a duplicate candidate rediscovered
    cands = items
    if not cands:
        return {"trial": None, "score": None, "evaluated": sum(
            1 for t in trials if t.user_attrs.get("kind") == "candidate"
            and t.user_attrs.get("verdict") == "evaluated")}
    of = int(cands[0].user_attrs["of_trial"])
    per_seed = [statistics.fmean(t.values) for t in cands if int(t.user_attrs["of_trial"]) == of]
    promoted = [t for t in trials if t.user_attrs.get("kind") == "promotion"]
    candidates = [t for t in trials if t.user_attrs.get("kind") == "candidate"]
    own = sum(float(t.user_attrs.get("elapsed_s") or 0) for t in trials
              if t.user_attrs.get("kind") in ("candidate", "promotion"))
    return {"candidates_wall_s": round(own, 1), "trial": of,
            "formula": by_number[of].user_attrs.get("layer") or by_number[of].user_attrs.get("formula"),
            "score": statistics.fmean(per_seed), "seed_scores": per_seed,
            "evaluated": sum(1 for t in candidates if t.user_attrs.get("verdict") == "evaluated"),
            "promotions": len(promoted),
            "top_rung": max([t.user_attrs.get("rung", 0) for t in promoted], default=None)}


def one_search(mode: str, seed: int, args, workdir: str) -> dict:
    name = f"{mode}-s{seed}"
    storage = f"sqlite:///{workdir}/{name}.db"
    rungs = [int(s) for s in args.rungs.split(",")]
    path = os.path.join(workdir, f"{name}.toml")
    with open(path, "w") as f:
        f.write(CONFIG.format(name=name, space=args.space, archs=json.dumps(args.archs.split(",")), budget=args.budget, dataset=args.dataset, storage=storage,
                              baselines=json.dumps(args.baselines.split(",") if args.baselines else []),
                              seed=seed, steps=args.steps, quality_steps=rungs[0], funnel=str(mode == "funnel").lower(),
                              eta=args.eta, rungs=json.dumps(rungs), min_candidates=args.min_candidates,
                              funnel_baselines=args.funnel_baselines))
    log = os.path.join(workdir, f"{name}.log")
    search_cpu, search_wall = opsearch(["search", "--config", path, "--quiet"], log)
    try:
        rerank_cpu, _ = opsearch(["rerank", name, "--storage", storage, "--top", "1", "--seeds",
                                  str(args.rerank_seeds), "--quiet", "-O", "rerank.baselines=[]"], log)
    except RuntimeError as e:  # e.g. no candidate passed the filters: no held-out score
        print(f"{name}: {str(e).splitlines()[-1]}", file=sys.stderr, flush=True)
        rerank_cpu = float("nan")
    return {"mode": mode, "seed": seed, "search_cpu_s": round(search_cpu, 1),
            "search_wall_s": round(search_wall, 1), "rerank_cpu_s": round(rerank_cpu, 1),
            **held_out(storage, name)}


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval (nan half-width with one value)."""
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return m, m - half, m + half


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--budget", type=int, default=20)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--archs", default="resnet,mobilenetv2,efficientnet")
    p.add_argument("--space", default="evonorm",
                   help="search space")
    p.add_argument("--steps", type=int, default=480, help="flat training steps = the funnel's top rung")
    p.add_argument("--rungs", default="100,120,480", help="funnel steps per rung (rung 0 = quality)")
    p.add_argument("--eta", type=int, default=4)
    p.add_argument("--min-candidates", type=int, default=3)
    p.add_argument("--baselines", default="bn_relu,gn_relu,ln_relu,evonorm_b0,evonorm_s0,relu_only,identity",
                   help="known layers evaluated in both searches (evolution starts from them)")
    p.add_argument("--funnel-baselines", default="first", choices=("top", "first"),
                   help="the funnel search's funnel.baselines: 'first' evaluates the baselines at "
                        "rung 1 (flat evaluates them at --steps), 'top' at the top rung like flat")
    p.add_argument("--rerank-seeds", type=int, default=2)
    p.add_argument("--parallel", type=int, default=1,
                   help="searches at once (CPU seconds are per search; both modes of a seed "
                        "start together, so they share the load)")
    p.add_argument("--out", default="benchmarks/funnel_results.jsonl")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    if int(args.rungs.split(",")[-1]) != args.steps:
        p.error("the last rung must equal --steps (the flat search's training)")
    workdir = args.workdir or tempfile.mkdtemp(prefix="funnel-bench-")
    os.makedirs(workdir, exist_ok=True)
    jobs = [(mode, seed) for i, seed in enumerate(int(s) for s in args.seeds.split(","))
            for mode in (("flat", "funnel") if i % 2 == 0 else ("funnel", "flat"))]
    print(f"work directory {workdir}", flush=True)
    rows = []
    lock = threading.Lock()

    def job(item):
        row = one_search(*item, args, workdir)
        with lock:
            rows.append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps({**row, "args": vars(args)}) + "\n")
            print(json.dumps(row), flush=True)

    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        for future in [pool.submit(job, item) for item in jobs]:
            future.result()
    pairs = {}
    for r in rows:
        pairs.setdefault(r["seed"], {})[r["mode"]] = r
    ratios, diffs = [], []
    print("\nseed  flat CPU s  funnel CPU s  ratio   flat held-out  funnel held-out")
    for seed, pair in sorted(pairs.items()):
        if "flat" not in pair or "funnel" not in pair:
            continue
        a, b = pair["flat"], pair["funnel"]
        ratios.append(b["search_cpu_s"] / a["search_cpu_s"])
        if a["score"] is not None and b["score"] is not None:
            diffs.append(b["score"] - a["score"])
        print(f"{seed:4d}  {a['search_cpu_s']:10.1f}  {b['search_cpu_s']:12.1f}  {ratios[-1]:5.2f}   "
              f"{a['score'] if a['score'] is not None else float('nan'):13.4f}  "
              f"{b['score'] if b['score'] is not None else float('nan'):15.4f}")
    if not ratios:
        return 1
    m, lo, hi = interval(ratios)
    print(f"CPU ratio funnel/flat: {m:.2f} (95% t interval {lo:.2f}..{hi:.2f}, {len(ratios)} seeds)")
    own = [pair["funnel"]["candidates_wall_s"] / pair["flat"]["candidates_wall_s"]
           for pair in pairs.values() if "flat" in pair and "funnel" in pair
           and pair["flat"].get("candidates_wall_s") and pair["funnel"].get("candidates_wall_s") is not None]
    if own:
        m, lo, hi = interval(own)
        print(f"candidates' own wall seconds funnel/flat: {m:.2f} (95% t interval {lo:.2f}..{hi:.2f})")
    if diffs:
        m, lo, hi = interval(diffs)
        print(f"held-out score funnel - flat: {m:+.4f} (95% t interval {lo:+.4f}..{hi:+.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
