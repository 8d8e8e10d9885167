"""Discovery from scratch: search algorithms compared fairly, with real training (issue 17; README "Searching from scratch").

One run = (arm, seed). An arm is an algorithm with its options under a label. Every run searches
the `evonorm` space with the default filters, evaluator and proxy (`SearchConfig` defaults), ONE
worker process with one torch thread, `seed_with_baselines = false` (no algorithm gets the known
layers), the baselines bn_relu, evonorm_b0 and evonorm_s0 trained first as references only, a
large candidate budget and a fixed CPU budget (`--cpu-cap`: CPU seconds of the worker process,
counted from when its Worker is built; the baselines are part of it, the same for every arm).
Each run is its own SQLite study under `--workdir`; each finished trial is appended to the run's
JSONL log (cpu_total, verdict, values, score, formula, number, kind, layer).

The cap is checked after each finished trial, so the candidate in flight when it passes still
finishes and counts (for the best and the re-ranking, as any search's last candidate would);
the times (to the first trained candidate, to the target) count only what finished within the
cap, so a censored run counts exactly as the cap.

After the search, unless `--no-rerank`: `opsearch rerank RUN --top 1 --seeds 3` (a child
process, one worker, baselines bn_relu, evonorm_b0, evonorm_s0) re-trains the run's best
candidate (the search's own rule: best mean accuracy over the architectures) on held-out data;
its verdicts against the three baselines go into the result line, and its CPU seconds are
counted apart from the search budget.

Per run: CPU seconds to the first trained candidate and to the first candidate whose search score
(mean accuracy over the architectures) is within 0.01 of bn_relu's in the same run; the best
score; candidates proposed / trained / duplicates / rejected; the share of trained candidates
whose values repeat an earlier trained candidate's exactly.

`--known` adds two arms with the known layers: `known` (the default algorithm fed the evaluated
known layers, `seed_with_baselines = true`, the default baselines, as a user gets that mode) and
its fair counterpart `known_mutations` (the same known layers; each proposal is one graph-aware
mutation of a uniformly chosen known layer, scores ignored: no selection).

Runs go seed-major (seed 0 of every arm, then seed 1, ...) so that a benchmark stopped early has
balanced arms. One JSON line per finished run is appended to `--results`; a run already there is
skipped (a run cut short starts again from scratch; one whose search ended but whose re-ranking
did not resumes at the re-ranking). A recorded run re-ranked with fewer seeds than `--rerank-seeds`
asks is re-ranked again (its stage keeps the seeds it trained and adds the next ones) and recorded
as a new line; the report reads the last line of each run. A run recorded under a smaller
`--cpu-cap` (same settings otherwise, its study still in `--workdir`) grows to the new cap: a
search stopped by its cap resumes its study and searches on (the same trials an uninterrupted run
would have; CPU seconds count on from its last trial), one stopped at the target is that seed's
run under any cap; the result (in a new `--results`: one file holds one cap per arm) says
`extended_from`.

    python benchmarks/discovery.py --algorithms regularized_evolution,pareto_evolution,nsga2,random \
        --seeds 0-4 --known --cpu-cap 1800
    python benchmarks/discovery.py --report
    python benchmarks/discovery.py --algorithms regularized_evolution --label re_pop50 \
        --options 'regularized_evolution:population_size=50,tournament_size=10' --seeds 0-4
    python benchmarks/discovery.py --quick --algorithms random --seeds 0 --cpu-cap 10   # smoke

`--options` is 'algo:key=value,key=value;algo2:key=value'. `--layer-options 'no_act=bn'` gives
every arm's candidates those layer options (`evaluator.layer_options`; here BatchNorm in the
networks' no-activation slots, where bn_relu has it, instead of the affine alone, as the EvoNorm
reference places its layers); each run records them, a run is never resumed or reported beside
runs under other layer options, and the known layers keep their own companions.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from search_efficiency import _bootstrap_ratio, parse_options  # noqa: E402

from opsearch import registry  # noqa: E402
from opsearch.algorithm import Algorithm, Option  # noqa: E402
from opsearch.errors import UserError  # noqa: E402
from opsearch.plugins.algorithms.generator import GENERATOR_OPTIONS, GraphGenerator  # noqa: E402
from opsearch.plugins.algorithms.mutation import MUTATION_OPTIONS, GraphMutator  # noqa: E402
from opsearch.registry import register_algorithm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
THIS_FILE = os.path.abspath(__file__)
DEFAULT_ALGORITHMS = "regularized_evolution,pareto_evolution,nsga2,random"
REFERENCES = ["bn_relu", "evonorm_b0", "evonorm_s0"]
TARGET_LAYER = "bn_relu"
TARGET_MARGIN = 0.01
KNOWN_LABEL = "known"
KNOWN_COUNTERPART = "known_mutations"
# --quick: a smoke test's search (the tiny proxy of the test searches, tests/studies.py)
QUICK = {"dataset": "synthetic", "space_options": {"num_nodes": 4},
         "evaluator": {"steps": 3, "batch_size": 16, "val_batch_size": 128, "warmup_steps": 1,
                       "arch_options": {"width": 4, "depth": 1}},
         "filter_options": {"quality": {"steps": 3}}}


# --------------------------------------------------------------------------------------------
# The fair counterpart of the mode with known layers


@register_algorithm(KNOWN_COUNTERPART, replace=True)
class KnownMutations(Algorithm):
    """One graph-aware mutation of a uniformly chosen known layer (fed back as a baseline); no
    selection. A random graph of the generator while no known layer has been fed back."""

    OPTIONS: ClassVar[dict[str, Option]] = {**MUTATION_OPTIONS, **GENERATOR_OPTIONS}

    def __init__(self, space, num_objectives: int, seed: int = 0, **options: Any):
        super().__init__(space, num_objectives, seed, **options)
        self.mutator = GraphMutator.from_options(space, self.options)
        self.generator = GraphGenerator.from_options(space, self.options)
        self.known_hashes = _known_layer_hashes()
        self.known: list = []  # genomes of the known layers fed back, in order
        self._known_keys: set[str] = set()
        self._seen: set[str] = set()  # what the evolutions' mutation avoids too

    def _propose(self, rng: random.Random):
        if not self.known:
            return self.generator.random_genome(rng)
        parent = self.known[int(rng.random() * len(self.known))]
        return self.mutator.mutate(parent, rng, self._seen)

    def _feedback(self, genome, objectives) -> None:
        key = self.mutator.hash_of(genome)
        if key is None:
            return
        self._seen.add(key)
        if objectives is not None and key in self.known_hashes and key not in self._known_keys:
            self._known_keys.add(key)
            self.known.append(tuple(genome))


def _known_layer_hashes() -> set[str]:
    from opsearch import graph, layers

    out = set()
    for name in layers.known_layers():
        try:
            out.add(graph.canonical_hash(layers.resolve(name)))
        except Exception:  # a plugin's layer that is not a graph
            continue
    return out


# --------------------------------------------------------------------------------------------
# Arms and runs


@dataclass
class Arm:
    label: str
    algorithm: str
    options: dict = field(default_factory=dict)
    known: bool = False  # seed_with_baselines with the default baselines

    @property
    def reference(self) -> str:
        """The arm this one is tested against in the report."""
        return KNOWN_COUNTERPART if self.known else "random"


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,2,5' -> [0, 2, 5]; '3' -> [3]."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, dash, high = part.partition("-")
        seeds += list(range(int(low), int(high) + 1)) if dash else [int(low)]
    return seeds


def parse_arm_options(text: str) -> dict[str, dict]:
    """'re:a=1,b=2;nsga2:c=3' -> {'re': {'a': 1, 'b': 2}, 'nsga2': {'c': 3}} (parse_options
    with several assignments per algorithm)."""
    items = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        algo, _, rest = item.partition(":")
        items += [f"{algo}:{kv.strip()}" for kv in rest.split(",") if kv.strip()]
    return parse_options(";".join(items))


def parse_layer_options(text: str) -> dict[str, Any]:
    """'no_act=bn,eps=1e-3' -> {'no_act': 'bn', 'eps': 0.001}: the candidates' layer options
    (`evaluator.layer_options`), each value read as `-O` reads it; what the layers do not take is
    refused now, before any run, by the check the layers themselves make (`layers.norm_act`)."""
    from opsearch.layers import norm_act

    out = parse_arm_options(f"layer:{text}").get("layer", {}) if text.strip() else {}
    try:
        norm_act("identity", **out)
    except UserError as e:
        raise SystemExit(f"--layer-options: {e}") from None
    return out


def make_arms(args) -> list[Arm]:
    from opsearch.config import SearchConfig

    options = parse_arm_options(args.options)
    names = [n.strip() for n in args.algorithms.split(",") if n.strip() and n.strip() != "none"]
    if args.label and len(names) != 1:
        raise SystemExit("--label names one arm: give exactly one algorithm with it")
    arms = [Arm(args.label or name, name, options.get(name, {})) for name in names]
    if args.known:
        default = SearchConfig().algorithm
        arms += [Arm(KNOWN_LABEL, default, options.get(default, {}), known=True),
                 Arm(KNOWN_COUNTERPART, KNOWN_COUNTERPART, options.get(KNOWN_COUNTERPART, {}), known=True)]
    for arm in arms:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", arm.label):
            raise SystemExit(f"arm label {arm.label!r}: letters, digits, '_', '.', '-' only")
    if len({a.label for a in arms}) != len(arms):
        raise SystemExit(f"two arms share a label: {[a.label for a in arms]}")
    for arm in arms:  # an unknown algorithm or option: say so before the first run
        registry.algorithms.get(arm.algorithm).validate_options(arm.options)
    return arms


def search_config(arm: Arm, seed: int, url: str, name: str, budget: int, quick: bool,
                  filter_options: dict | None = None, layer_options: dict | None = None) -> dict:
    """The run's SearchConfig as a dict: defaults except what makes the comparison fair (and
    `--filter-options`, `--layer-options`, the same for every arm)."""
    from opsearch.config import SearchConfig

    values: dict[str, Any] = dict(name=name, storage=url, space="evonorm", algorithm=arm.algorithm,
                                  algorithm_options=dict(arm.options), seed=seed, budget=budget,
                                  workers=1, plots=False, rerank={"enabled": False},
                                  seed_with_baselines=arm.known, plugins=[THIS_FILE])
    if not arm.known:
        values["baselines"] = list(REFERENCES)
    if quick:
        values.update(json.loads(json.dumps(QUICK)))
    for name_, opts in (filter_options or {}).items():
        values.setdefault("filter_options", {}).setdefault(name_, {}).update(opts)
    if layer_options:
        evaluator = values.get("evaluator", {})
        values["evaluator"] = {**evaluator, "layer_options": {**evaluator.get("layer_options", {}), **layer_options}}
    # checks every name and option now; as JSON keeps it (a resumed run compares it)
    return json.loads(json.dumps(SearchConfig.from_dict(values).to_dict()))


class _Stop(Exception):
    pass


class StopRule:
    """When a run's worker stops: at its CPU cap, or (`--stop-at-target`) at the first candidate
    whose search score comes within the margin of the run's own bn_relu (baselines train first).
    A run stopped at the target has the time to the target a full run with that seed would have
    (the same trials up to there); it spends no CPU on the rest, which only a re-ranking of the
    final best would need."""

    def __init__(self, cpu_cap: float, at_target: bool = False, margin: float = TARGET_MARGIN,
                 references_only: bool = False):
        self.cpu_cap, self.at_target, self.margin = cpu_cap, at_target, margin
        self.references_only = references_only  # `--check-host`: the known layers and nothing more
        self.level: float | None = None
        self.references = 0

    def replay(self, log: list[dict]) -> None:
        """The rule's state after the trials a resumed run already logged (the reference level is
        set by a baseline trained before the resume)."""
        for e in log:
            self.stop(e["kind"], e["layer"], e["values"], -math.inf)

    def stop(self, kind: str, layer: str | None, values: list[float] | None, cpu: float) -> bool:
        if cpu >= self.cpu_cap:
            return True
        self.references += kind == "baseline"
        if self.references_only and self.references >= len(REFERENCES):
            return True
        if not values:
            return False
        score = sum(values) / len(values)
        if kind == "baseline" and layer == TARGET_LAYER:
            self.level = score - self.margin
        return self.at_target and kind == "candidate" and self.level is not None and score >= self.level


def _search_worker(config_dict: dict, log_path: str, cpu_cap: float, stop_at_target: bool = False,
                   references_only: bool = False) -> None:
    """The run's one worker (a real `opsearch.engine.Worker`, in a child process): baselines
    first, then candidates until the CPU cap (or the target, with `stop_at_target`); every
    finished trial is logged. With trials already in the log (a run extended to a larger cap), the
    worker resumes the study and its CPU seconds count on from the last logged trial's."""
    import signal

    import torch

    from opsearch.config import SearchConfig
    from opsearch.engine import Setup, Worker, enqueue_baselines

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    torch.set_num_threads(1)
    setup = Setup.from_config(SearchConfig.from_dict(config_dict))
    run = setup.open_run()
    enqueue_baselines(run, setup)
    logged = read_log(log_path) if os.path.exists(log_path) else []
    offset = max((e["cpu_total"] for e in logged), default=0.0)
    log = open(log_path, "a", buffering=1)
    rule = StopRule(cpu_cap, at_target=stop_at_target, references_only=references_only)
    rule.replay(logged)

    def on_result(record, outcome) -> None:
        cpu = offset + time.process_time() - cpu0
        values = list(record.values) if record.values else None
        log.write(json.dumps({"t": time.time(), "cpu_total": round(cpu, 3), "number": record.number,
                              "kind": record.kind, "layer": record.user_attrs.get("layer"),
                              "verdict": record.user_attrs.get("verdict"), "values": values,
                              "score": sum(values) / len(values) if values else None,
                              "formula": record.user_attrs.get("formula")}) + "\n")
        if rule.stop(record.kind, record.user_attrs.get("layer"), values, cpu):
            raise _Stop  # the trial is recorded: the worker leaves nothing running

    worker = Worker(setup, run=run, on_result=on_result)
    cpu0 = time.process_time()
    try:
        worker.run_loop()
    except _Stop:
        pass
    log.close()


def run_search(config: dict, log_path: str, cpu_cap: float, stop_at_target: bool = False,
               references_only: bool = False) -> float:
    """The search of one run in a spawned child process; returns its wall seconds."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start = time.time()
    proc = ctx.Process(target=_search_worker, args=(config, log_path, cpu_cap, stop_at_target, references_only),
                       name="discovery-worker")
    proc.start()
    try:
        proc.join()
    except BaseException:
        proc.terminate()
        proc.join()
        raise
    if proc.exitcode != 0:
        raise RuntimeError(f"the search worker of {config['name']} exited with {proc.exitcode}")
    return time.time() - start


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# Metrics of one run


def count_repeats(values: list[tuple]) -> int:
    """How many of `values` (in order) equal an earlier one exactly."""
    seen: set[tuple] = set()
    repeats = 0
    for key in values:
        repeats += key in seen
        seen.add(key)
    return repeats


def chance_repeats(log: list[dict], draws: int = 200, seed: int = 0) -> float:
    """Repeats expected by chance among a run's trained candidates: the mean count when each
    architecture's column of scores is shuffled on its own (each column's values kept, the link
    between one layer's scores broken). Accuracies on a small validation set are coarse (1/287
    on digits), so different good layers tie on all architectures now and then; a repeat count
    near this one is not a function trained twice."""
    rows = [tuple(e["values"]) for e in log if e["kind"] == "candidate" and e["verdict"] == "evaluated"]
    if len(rows) < 2:
        return 0.0
    rng = random.Random(seed)
    columns = [list(c) for c in zip(*rows)]
    total = 0
    for _ in range(draws):
        for c in columns:
            rng.shuffle(c)
        total += count_repeats(list(zip(*columns)))
    return total / draws


NUMERICS_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def environment() -> dict:
    """Where a run's numbers were made, stored with its result: the host's CPU, the torch build
    and kernel path, and the variables that change either. CPU seconds and the search's course
    both depend on them, so a comparison across results can say which pairs share a host."""
    import platform

    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ}}


def run_metrics(log: list[dict], cpu_cap: float, margin: float = TARGET_MARGIN) -> dict:
    """The figures of one run from its trial log (in the order the trials finished)."""
    baselines = {e["layer"]: e["score"] for e in log if e["kind"] == "baseline"}
    target_score = baselines.get(TARGET_LAYER)
    level = target_score - margin if target_score is not None else None
    cands = [e for e in log if e["kind"] == "candidate"]
    trained = [e for e in cands if e["verdict"] == "evaluated"]
    first_trained = next((e["cpu_total"] for e in trained if e["cpu_total"] <= cpu_cap), None)
    hit = next((e for e in cands if level is not None and e["score"] is not None
                and e["score"] >= level and e["cpu_total"] <= cpu_cap), None)
    repeats = count_repeats([tuple(e["values"]) for e in trained])
    scored = [e for e in cands if e["score"] is not None]
    best = max(scored, key=lambda e: e["score"], default=None)
    return {
        "baselines": baselines,
        "target": level,
        "cpu_to_first_trained": first_trained,
        "cpu_to_target": hit["cpu_total"] if hit else None,
        "target_hit": ({"number": hit["number"], "score": hit["score"], "formula": hit["formula"]}
                       if hit else None),
        "best": ({"number": best["number"], "score": best["score"], "formula": best["formula"]}
                 if best else None),
        "proposed": len(cands),
        "trained": len(trained),
        "duplicates": sum(str(e["verdict"]).startswith("duplicate") for e in cands),
        "rejected": sum(str(e["verdict"]).startswith("rejected") for e in cands),
        "failed": sum(str(e["verdict"]).startswith("failed") for e in cands),
        "repeats": repeats,
        "repeat_share": repeats / len(trained) if trained else None,
        "cpu_total": max((e["cpu_total"] for e in log), default=0.0),
    }


# --------------------------------------------------------------------------------------------
# Re-ranking


def rerank_run(url: str, name: str, seeds: int) -> dict:
    """`opsearch rerank` of the run's best candidate against the references (a child process;
    its CPU seconds measured apart); the verdicts of the best against each reference."""
    import resource

    cmd = [sys.executable, "-m", "opsearch", "rerank", name, "--storage", url, "--top", "1",
           "--seeds", str(seeds), "--workers", "1", "--json", "--quiet",
           "-O", "rerank.baselines=" + json.dumps(REFERENCES)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    trained_before = rerank_trainings(url, name)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out: dict[str, Any] = {"command": "python " + shlex.join(cmd[1:]), "wall_s": round(time.time() - start, 1),
                           "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
                           "trainings": rerank_trainings(url, name) - trained_before}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        out["error"] = (proc.stderr or proc.stdout).strip()[-1500:] or f"exit {proc.returncode}"
        return out
    result = json.loads(lines[-1])["rerank"]
    out.update(rerank_verdicts(result))
    return out


def rerank_trainings(url: str, name: str) -> int:
    """How many re-ranking trainings the run's stage study holds (finished or failed): the difference
    around one call is the work it did, a count that CPU-time noise cannot blur."""
    import optuna

    from opsearch.rerank import KIND
    from opsearch.trials import stage_study_name

    try:
        study = optuna.load_study(study_name=stage_study_name(name, KIND), storage=url)
    except KeyError:  # no study yet
        return 0
    return sum(t.user_attrs.get("kind") == KIND and t.state.is_finished() for t in study.get_trials(deepcopy=False))


def rerank_verdicts(result: dict | None) -> dict:
    """From `opsearch rerank --json`'s statistics: the best candidate's held-out mean and, per
    reference, the difference, p and word; each reference's held-out mean."""
    if not result or result.get("best_trial") is None:
        return {"error": "no re-ranked candidate"}
    layers = result["layers"]
    best = next(r for r in layers if r["of_trial"] == result["best_trial"])
    out = {"stage": result.get("stage"), "complete": result.get("complete"),
           "best_trial": best["of_trial"], "best_formula": best["name"],
           "best_mean": best["overall"]["mean"], "best_seeds": len(best["seeds"]),
           "references": {r["name"]: r["overall"]["mean"] for r in layers if r["kind"] == "baseline"},
           "vs": {}}
    for ref in REFERENCES:
        v = best["vs"].get(ref)
        if v is not None:
            out["vs"][ref] = {"word": v.get("word"), "p": v.get("p"), "diff": v.get("diff")}
    out["level_with_target"] = _level(out["vs"].get(TARGET_LAYER))
    return out


def _level(versus: dict | None) -> bool:
    """Not distinguishable from the reference, or better."""
    return bool(versus) and versus.get("word") in ("not distinguishable", "better")


def _level_by_mean(versus: dict | None) -> bool:
    """Level, and its held-out mean no more than the target margin below the reference's. With 3
    seeds a layer that collapses on one seed is 'not distinguishable' by its variance alone
    (round 5's seed 4: 0.047 below bn_relu, p 0.18); this is the check that it is level, not
    merely unresolved."""
    return _level(versus) and versus.get("diff") is not None and versus["diff"] >= -TARGET_MARGIN


# --------------------------------------------------------------------------------------------
# The benchmark


def run_key(arm_label: str, seed: int) -> str:
    return f"{arm_label}-s{seed}"


def read_result_files(paths: str) -> list[dict]:
    """The result lines of comma-separated `paths`, in order; a ValueError names a file that holds
    none (missing, empty, or every line cut short), for the tools that read recorded runs."""
    results = []
    for path in paths.split(","):
        found = read_results(path)
        if not found:
            raise ValueError(f"no result lines in {path}")
        results += found
    return results


def read_results(path: str) -> list[dict]:
    """The result lines of `path` (a .gz file reads as the text it compresses: the recorded
    results are kept gzipped, their per-trial logs are most of their size)."""
    if not os.path.exists(path):
        return []
    out = []
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        for line in f:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:  # a line cut short by a crash: its run is redone
                    continue
    return out


def _remove(*paths: str) -> None:
    for p in paths:
        if os.path.exists(p):
            os.remove(p)


def one_run(arm: Arm, seed: int, args, command: str) -> dict:
    name = run_key(arm.label, seed)
    base = os.path.join(os.path.abspath(args.workdir), name)
    url = f"sqlite:///{base}.db"
    log_path, done_path = base + ".jsonl", base + ".search.json"
    config = search_config(arm, seed, url, name, args.budget, args.quick, args.filter_opts,
                           args.layer_opts)
    done = None
    if os.path.exists(done_path):
        with open(done_path) as f:
            done = json.load(f)
    stop = bool(args.stop_at_target)
    same = done is not None and (done.get("config"), bool(done.get("stop_at_target"))) == (config, stop)
    if same and done["cpu_cap"] == args.cpu_cap:
        wall = done["wall_s"]  # the search ended; the re-ranking (if any) resumes
        print(f"{name}: search done earlier, re-ranking", file=sys.stderr, flush=True)
    elif same and done["cpu_cap"] < args.cpu_cap:
        wall = extend_search(done, config, name, log_path, done_path, args.cpu_cap, stop)
    elif same:  # starting again would throw away the longer search
        raise SystemExit(f"{base}.db holds {name} grown to {done['cpu_cap']:g} CPU s; give --cpu-cap "
                         f"{args.cpu_cap:g} another --workdir")
    else:  # a search cut short (its CPU is unknown) or with other settings starts again
        _remove(base + ".db", log_path, done_path)
        print(f"{name}: searching ({args.cpu_cap:g} CPU s{', until the target' if stop else ''})",
              file=sys.stderr, flush=True)
        wall = run_search(config, log_path, args.cpu_cap, stop)
        with open(done_path, "w") as f:
            json.dump({"wall_s": wall, "cpu_cap": args.cpu_cap, "stop_at_target": stop, "config": config}, f)
    with open(done_path) as f:
        extended_from = json.load(f).get("extended_from")
    log = read_log(log_path)
    metrics = run_metrics(log, args.cpu_cap)
    stopped = stop and metrics["cpu_to_target"] is not None
    rerank = None
    if stopped:
        rerank = {"error": "stopped at the target (not re-ranked)"}
    elif not args.no_rerank:
        if metrics["best"] is None:
            rerank = {"error": "no trained candidate"}
        else:
            print(f"{name}: re-ranking the best ({metrics['best']['formula']})", file=sys.stderr, flush=True)
            rerank = rerank_run(url, name, args.rerank_seeds)
    return {"run": name, "arm": arm.label, "algorithm": arm.algorithm, "options": arm.options,
            "known": arm.known, "reference": arm.reference, "seed": seed, "cpu_cap": args.cpu_cap,
            "stopped_at_target": stopped, "extended_from": extended_from,
            "filter_options": args.filter_opts, "layer_options": args.layer_opts,
            "budget": args.budget, "quick": args.quick, "command": command, "study": url,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "search_wall_s": round(wall, 1),
            "environment": environment(),
            **metrics, "rerank": rerank,
            "log": [{k: e[k] for k in ("number", "kind", "layer", "verdict", "cpu_total", "values",
                                        "formula")} for e in log]}


def extend_search(done: dict, config: dict, name: str, log_path: str, done_path: str, cpu_cap: float,
                  stop: bool) -> float:
    """A search that ended at a smaller CPU cap, grown to `cpu_cap`; returns its wall seconds.
    One that stopped at the target is already that seed's run under any larger cap (the same
    trials up to the target). One stopped by its cap resumes its study where it ended: the
    algorithms rebuild their state from the study and draw from (seed, feedback count), so the
    resumed run proposes what an uninterrupted run would (tests/test_benchmarks_discovery.py
    checks it against a straight run), and its CPU seconds count on from the last logged trial's
    (the restart's own setup is not counted, as a run's setup is not)."""
    old_cap = done["cpu_cap"]
    if stop and run_metrics(read_log(log_path), old_cap)["cpu_to_target"] is not None:
        print(f"{name}: stopped at the target within {old_cap:g} CPU s: the same run under {cpu_cap:g}",
              file=sys.stderr, flush=True)
        wall = done["wall_s"]
    else:
        print(f"{name}: extending its search from {old_cap:g} to {cpu_cap:g} CPU s", file=sys.stderr, flush=True)
        wall = done["wall_s"] + run_search(config, log_path, cpu_cap, stop)
    with open(done_path, "w") as f:
        json.dump({**done, "wall_s": wall, "cpu_cap": cpu_cap,
                   "extended_from": [*done.get("extended_from", []), old_cap]}, f)
    return wall


def rerank_due(result: dict, args) -> bool:
    """A recorded run whose best was re-ranked with fewer seeds than `--rerank-seeds` asks (or not
    at all): its re-ranking stage resumes with more seeds; the search is not run again."""
    if args.no_rerank or not result.get("best") or result.get("stopped_at_target"):
        return False
    rr = result.get("rerank") or {}
    return "vs" not in rr or (rr.get("best_seeds") or 0) < args.rerank_seeds


def rerank_again(result: dict, args, command: str) -> dict:
    """The recorded run with its re-ranking grown to `--rerank-seeds` seeds (the stage keeps the
    seeds it trained and adds the next ones). Appended as a new line: the last line of a run wins
    (`latest_per_run`), and the old line stays as the record of the smaller stage."""
    name, url = result["run"], result["study"]
    print(f"{name}: re-ranking the best again with {args.rerank_seeds} seeds", file=sys.stderr, flush=True)
    return {**result, "rerank": rerank_run(url, name, args.rerank_seeds), "rerank_command": command,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def at_horizon(result: dict, horizon: float) -> dict:
    """The run as one capped at `horizon` CPU s would have recorded it. One worker makes a run's
    course a function of its seed (round 21: a capped run's log is the exact prefix of the longer
    run's), so cutting a longer run's log at the horizon gives that run, but for the candidate in
    flight at the cap, which a capped run finishes and counts. A run stopped at the target before
    the horizon stays stopped; its re-ranking (of a best after the horizon) is dropped."""
    if horizon >= result["cpu_cap"]:
        return result
    log = [{**e, "score": sum(e["values"]) / len(e["values"]) if e.get("values") else None}
           for e in result["log"] if e["cpu_total"] <= horizon]
    metrics = run_metrics(log, horizon)
    grown = [c for c in result.get("extended_from") or [] if c < horizon]
    return {**result, **metrics, "cpu_cap": horizon, "cut_from": result["cpu_cap"], "rerank": None,
            "extended_from": grown or None,
            "stopped_at_target": bool(result.get("stopped_at_target")) and metrics["cpu_to_target"] is not None,
            "log": [{k: v for k, v in e.items() if k != "score"} for e in log]}


def latest_per_run(results: list[dict]) -> list[dict]:
    """One result per (arm, seed): the last one recorded (a re-ranking grown later replaces it)."""
    return list({(r["arm"], r["seed"]): r for r in results}.values())


def settings_of(r: dict) -> tuple:
    return (r["algorithm"], json.dumps(r["options"], sort_keys=True), r["known"], r["cpu_cap"], r["quick"],
            json.dumps(r.get("filter_options") or {}, sort_keys=True),
            json.dumps(r.get("layer_options") or {}, sort_keys=True))


def check_host(args) -> int:
    """`--check-host`: may this host's runs be paired with the recorded ones? Trains the known
    layers of each seed as a run does (the same worker, config and order; about 35 CPU s a seed)
    and says, per recorded arm, whose runs of that seed trained them to the same accuracies: only
    those share this host's evaluator bit for bit (`same_numerics`). Run it before pairing a new
    arm with arms recorded in an earlier session: the host may have changed under them."""
    recorded = [(os.path.basename(path), r) for path in args.results.split(",")
                for r in latest_per_run(read_results(path)) if r["quick"] == args.quick]
    os.makedirs(args.workdir, exist_ok=True)
    for seed in parse_seeds(args.seeds):
        name = f"host-check-s{seed}"
        base = os.path.join(os.path.abspath(args.workdir), name)
        _remove(base + ".db", base + ".jsonl")
        config = search_config(Arm("host-check", "random"), seed, f"sqlite:///{base}.db", name, 1_000_000,
                               args.quick, args.filter_opts, args.layer_opts)
        run_search(config, base + ".jsonl", math.inf, references_only=True)
        mine = numerics_of({"log": read_log(base + ".jsonl")})
        print(f"seed {seed}: this host's known layers: {list(mine or ())}")
        arms: dict[tuple[str, str], list[bool]] = {}
        for path, r in recorded:
            if r["seed"] == seed and (theirs := numerics_of(r)) is not None:
                arms.setdefault((path, r["arm"]), []).append(theirs == mine)
        for (path, arm), same in arms.items():
            print(f"  {path} {arm}: {sum(same)} of {len(same)} recorded runs of seed {seed} share this host's "
                  "numerics")
        if not arms:
            print(f"  no recorded run of seed {seed} with a log in {args.results}")
    print(environment())
    return 0


def bench_main(args, command: str) -> int:
    arms = make_arms(args)
    seeds = parse_seeds(args.seeds)
    os.makedirs(args.workdir, exist_ok=True)
    done = {(r["arm"], r["seed"]): r for r in read_results(args.results)}
    for seed in seeds:  # seed-major: a benchmark stopped early has every arm at the first seeds
        for arm in arms:
            old = done.get((arm.label, seed))
            if old is not None:
                mine = settings_of({"algorithm": arm.algorithm, "options": arm.options, "known": arm.known,
                                    "cpu_cap": args.cpu_cap, "quick": args.quick, "filter_options": args.filter_opts,
                                    "layer_options": args.layer_opts})
                if settings_of(old) != mine:
                    raise SystemExit(f"{args.results} holds {run_key(arm.label, seed)} with other settings "
                                     f"{settings_of(old)}; give this arm another --label or another --results")
                if not rerank_due(old, args):
                    continue
                result = rerank_again(old, args, command)
            else:
                result = one_run(arm, seed, args, command)
            with open(args.results, "a") as f:
                f.write(json.dumps(result, allow_nan=False, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
            rr = result["rerank"] or {}
            print(f"{result['run']}: first trained {_fmt(result['cpu_to_first_trained'], args.cpu_cap)} CPU s, "
                  f"target {_fmt(result['cpu_to_target'], args.cpu_cap)} CPU s, best "
                  f"{_num(result['best'] and result['best']['score'])} (bn_relu "
                  f"{_num(result['baselines'].get(TARGET_LAYER))}), {result['proposed']} proposed, "
                  f"{result['trained']} trained, repeats {_pct(result['repeat_share'])}; rerank vs bn_relu: "
                  f"{rr.get('vs', {}).get(TARGET_LAYER, {}).get('word', rr.get('error', '-'))}",
                  file=sys.stderr, flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# The report


def _num(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _fmt(cpu, cap) -> str:
    """A time, or the cap marked '>' when the run never got there (censored)."""
    return f">{cap:.0f}" if cpu is None else f"{cpu:.0f}"


def censored(runs: list[dict], key: str, scales: dict[int, float] | None = None) -> list[float]:
    """Each run's time, or its cap when it never got there; load-adjusted with `scales`."""
    return [t if t is not None else cap for t, cap in (scaled(r, scales or {}, key) for r in runs)]


def median_censored(runs: list[dict], key: str = "cpu_to_target",
                    scales: dict[int, float] | None = None) -> bool:
    """Whether the median of the censored times is only a lower bound, not a time reached. A run
    that never got there counts as its cap and its true time is at least that, so the median of
    the counted values never exceeds the true median; it equals it when the middle value(s) are
    times reached and no run censored below them could have got there earlier (every censored
    run's cap at or above them: always so with one cap, where this is "more than half got
    there"; not so where a run was grown to a larger cap and another was not)."""
    values = sorted((t if t is not None else cap, t is None)
                    for t, cap in (scaled(r, scales or {}, key) for r in runs))
    if not values:
        return False
    middle = [values[(len(values) - 1) // 2], values[len(values) // 2]]
    if any(cut for _, cut in middle):
        return True
    return any(cut and v < middle[-1][0] for v, cut in values)


def _median(runs: list[dict], key: str, scales: dict[int, float] | None = None) -> str:
    """Median of the censored times, marked '>' when it is censored (`median_censored`)."""
    med = statistics.median(censored(runs, key, scales))
    return f">{med:.0f}" if median_censored(runs, key, scales) else f"{med:.0f}"


def _versus(v: dict | None) -> str:
    if not v:
        return "-"
    word = {"not distinguishable": "n.d."}.get(v.get("word"), v.get("word"))
    diff = f"{v['diff']:+.3f} " if v.get("diff") is not None else ""
    p = f" p={v['p']:.2g}" if v.get("p") is not None else ""
    return f"{diff}{word}{p}"


def logrank_p(runs: list[dict], ref: list[dict], key: str = "cpu_to_target",
              scales: dict[int, float] | None = None) -> str:
    """Log-rank test (two-sided) of the times to the target, each run that never got there
    right-censored at its cap: the test made for censored times, beside Mann-Whitney, which
    counts a censored run as a tie at the cap. Load-adjusted with `scales`."""
    try:
        from scipy.stats import CensoredData, logrank
    except ImportError:  # scipy < 1.12
        return "-"

    def data(rs: list[dict]):
        pairs = [scaled(r, scales or {}, key) for r in rs]
        return CensoredData(uncensored=[t for t, _ in pairs if t is not None],
                            right=[cap for t, cap in pairs if t is None])

    if not runs or not ref or all(r[key] is None for r in runs + ref):
        return "-"
    p = logrank(data(runs), data(ref)).pvalue
    return "-" if math.isnan(p) else f"{p:.3g}"


def load_gauge(run: dict) -> float | None:
    """The CPU seconds a run spent training the known layers before its search: the same work in
    every run (the same three layers, steps and batch sizes), so it gauges the machine's load.
    On the 2-core box CPU seconds are not load-free: a run beside three other processes paid
    1.7x the CPU of a run beside one for the same first 172 candidates (round 6's evolution seed
    4 against round 10's, identical trajectories)."""
    base = [e["cpu_total"] for e in run.get("log") or [] if e["kind"] == "baseline"]
    return max(base) if base else None


def load_scales(runs: list[dict]) -> dict[int, float]:
    """Per run (by id): the median gauge of all runs over its own, so that times scaled by it are
    in the CPU seconds of a typically loaded run (a first-order correction: it assumes the load
    at a run's start held through the run)."""
    gauges = {id(r): g for r in runs if (g := load_gauge(r)) is not None}
    if not gauges:
        return {}
    typical = statistics.median(gauges.values())
    return {k: typical / g for k, g in gauges.items()}


def scaled(run: dict, scales: dict[int, float], key: str = "cpu_to_target") -> tuple[float | None, float]:
    """A run's time to the target and its cap, load-adjusted (unscaled without a gauge)."""
    k = scales.get(id(run), 1.0)
    return (None if run[key] is None else run[key] * k), run["cpu_cap"] * k


def _runs_by_seed(runs: list[dict], ref: list[dict]):
    """Per seed in both arms: the arm's run and the reference's."""
    other = {r["seed"]: r for r in ref}
    for r in runs:
        if (o := other.get(r["seed"])) is not None:
            yield r, o


def _seed_pairs(runs: list[dict], ref: list[dict], scales: dict[int, float], key: str):
    """Per seed in both arms: (time, cap) of the arm's run and of the reference's, load-adjusted."""
    for r, o in _runs_by_seed(runs, ref):
        yield scaled(r, scales, key), scaled(o, scales, key)


def paired_by_seed(runs: list[dict], ref: list[dict], scales: dict[int, float],
                   key: str = "cpu_to_target") -> tuple[int, int, int, str]:
    """Seed as the unit, paired: the two arms' runs of one seed share bn_relu's score, hence the
    target, which decides much of a run's time (targets of 0.980-0.981 were the slow seeds of
    both arms). Per seed, faster / slower on the load-adjusted times; undecided when both never
    got there, or one got there later than the other's cap. Sign test (two-sided, exact) on the
    decided seeds."""
    from scipy.stats import binomtest

    faster = slower = undecided = 0
    for (t, cap), (u, ucap) in _seed_pairs(runs, ref, scales, key):
        if t is not None and (t < u if u is not None else t < ucap):
            faster += 1
        elif u is not None and (u < t if t is not None else u < cap):
            slower += 1
        else:
            undecided += 1
    decided = faster + slower
    p = f"{binomtest(faster, decided, 0.5).pvalue:.3g}" if decided else "-"
    return faster, slower, undecided, p


def numerics_of(run: dict) -> tuple | None:
    """The accuracies the known layers trained to before a run's search (from its log): the
    fingerprint of the evaluator's floating point on that host. The same code and seed give
    different values on another CPU or kernel path (round 14: rounds 6-11 and 12-13 ran on hosts
    that differ so; on one host and torch build, ``ATEN_CPU_CAPABILITY=avx2``, ``=default`` and
    ``ONEDNN_MAX_CPU_ISA=AVX2`` each give other values again), and a search's course parts at the
    first differing float. None without a log."""
    values = tuple(tuple(e["values"]) for e in run.get("log") or []
                   if e["kind"] == "baseline" and e.get("values"))
    return values or None


def same_numerics(runs: list[dict], ref: list[dict]) -> tuple[int, int]:
    """Of the seeds both arms ran (with logs): how many trained their known layers to the same
    values. Only those pairs share the evaluator bit for bit, so only there is the pairing a
    common-random-numbers design (a proposal's random stream is a function of the seed and the
    feedback); a pair across numerics is two independent draws of the same seed's target."""
    pairs = [(numerics_of(r), numerics_of(o)) for r, o in _runs_by_seed(runs, ref)]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    return sum(a == b for a, b in pairs), len(pairs)


def paired_ratio(runs: list[dict], ref: list[dict], scales: dict[int, float],
                 key: str = "cpu_to_target", planned: float = 1.5) -> tuple[str, str, str, str]:
    """Seed as the unit, by how much: per seed the log of the arm's load-adjusted time over the
    reference's (a run that never got there counts as its cap, which understates the
    difference; seeds where neither got there are left out). Returns the geometric mean ratio,
    its 95% t interval, the Wilcoxon signed-rank p (two-sided) and the seeds per arm a paired
    test would need to show a `planned`-fold change with 80% power at this spread: what an arm
    of this size can and cannot show (the sign test uses only the direction)."""
    from scipy.stats import norm, t as student, wilcoxon

    logs = []
    for (t, cap), (u, ucap) in _seed_pairs(runs, ref, scales, key):
        if t is None and u is None:
            continue
        logs.append(math.log((t if t is not None else cap) / (u if u is not None else ucap)))
    if len(logs) < 2:
        return "-", "-", "-", "-"
    n, mean, sd = len(logs), statistics.fmean(logs), statistics.stdev(logs)
    half = student.ppf(0.975, n - 1) * sd / math.sqrt(n)
    p = "-" if not any(logs) else f"{wilcoxon(logs).pvalue:.3g}"
    need = math.ceil(((norm.ppf(0.975) + norm.ppf(0.8)) * sd / math.log(planned)) ** 2)
    return f"{math.exp(mean):.2f}", f"{math.exp(mean - half):.2f}-{math.exp(mean + half):.2f}", p, str(need)


def compare(times: list[float], ref: list[float], bound: str = "") -> tuple[str, str, str]:
    """Mann-Whitney p (two-sided), ratio of medians and its 95% bootstrap interval. `bound`
    (`ratio_bound`) marks a ratio whose median on one side is a cap, not a time."""
    from scipy.stats import mannwhitneyu

    if not times or not ref:
        return "-", "-", "-"
    p = mannwhitneyu(times, ref, alternative="two-sided").pvalue
    p_text = "-" if math.isnan(p) else f"{p:.3g}"
    if bound == "-":
        return p_text, "-", "-"
    ratio = statistics.median(times) / max(statistics.median(ref), 1e-9)
    lo, hi = _bootstrap_ratio(times, ref)
    return p_text, f"{bound}{ratio:.2f}", f"{lo:.2f}-{hi:.2f}"


def compare_arms(runs: list[dict], ref: list[dict], scales: dict[int, float] | None = None) -> tuple[str, str, str]:
    """`compare` on two arms' censored times to the target (load-adjusted with `scales`), the
    ratio marked as the bound it is (`ratio_bound`)."""
    return compare(censored(runs, "cpu_to_target", scales), censored(ref, "cpu_to_target", scales),
                   ratio_bound(runs, ref, scales))


def ratio_bound(runs: list[dict], ref: list[dict], scales: dict[int, float] | None = None) -> str:
    """How a ratio of censored medians reads: '<=' when the reference's median is its cap (its
    true median is at least that, so the arm's advantage is at least what the ratio says), '>='
    when the arm's is, '-' (no ratio) when both are, '' when both medians are times reached."""
    return {(False, False): "", (False, True): "<=", (True, False): ">=", (True, True): "-"}[
        (median_censored(runs, scales=scales), median_censored(ref, scales=scales))]


def _versus_arms(label: str, runs: list[dict], arms: dict[str, list[dict]]) -> list[str]:
    """The arms one arm is paired with: its reference (random; known_mutations for the arm with
    known layers) and, for a variant of an algorithm (another label: other options or filters),
    that algorithm's plain arm, so a change to the default is judged against the default."""
    out = []
    ref_label = runs[0].get("reference", "random")
    if ref_label != label and ref_label in arms:
        out.append(ref_label)
    plain = runs[0].get("algorithm")
    if plain and plain != label and plain in arms and plain not in out and not runs[0].get("known"):
        out.append(plain)
    return out


def report(results: list[dict], path: str, command: str) -> str:
    lines = [f"# Discovery from scratch: {path}", "", f"Report: `{command}`", ""]
    for cmd in dict.fromkeys(r["command"] for r in results):
        lines.append(f"Benchmark: `{cmd}`")
    for cmd in dict.fromkeys(r["rerank_command"] for r in results if r.get("rerank_command")):
        lines.append(f"Re-ranked again: `{cmd}`")
    arms: dict[str, list[dict]] = {}
    for r in results:
        arms.setdefault(r["arm"], []).append(r)
    for runs in arms.values():
        runs.sort(key=lambda r: r["seed"])
    placements = sorted({json.dumps(r.get("layer_options") or {}, sort_keys=True) for r in results})
    if len(placements) > 1:
        raise SystemExit(f"the results mix the candidates' layer options ({'; '.join(placements)}): their arms "
                         "were not judged alike; report each setting on its own")
    if placements and placements[0] != "{}":
        lines += ["", f"Candidates' layer options (`--layer-options`, every arm): {placements[0]}; "
                      "the known layers keep their own companions (bn_relu BatchNorm, the EvoNorms the affine)."]
    caps = sorted({r["cpu_cap"] for r in results})
    cut = sorted({r["cut_from"] for r in results if r.get("cut_from")})
    lines += ["", f"CPU cap per run: {', '.join(f'{c:g}' for c in caps)} s (one worker, one torch thread)"
              + (f"; {sum(bool(r.get('cut_from')) for r in results)} of {len(results)} runs cut there from caps of "
                 f"{', '.join(f'{c:g}' for c in cut)} s (`--horizon`: the same seed's run, its log cut; no re-ranking)"
                 if cut else "") + ". "
              f"Target: a candidate's search score (mean accuracy over the architectures) within "
              f"{TARGET_MARGIN} of bn_relu's in the same run. '>' = never reached within the cap "
              "(counted as the cap). Mann-Whitney U (two-sided; a censored run is a tie at the cap), the "
              "log-rank test (two-sided; censored runs right-censored at their cap) and the ratio of medians of the "
              "censored times to the target compare each arm with its reference (random; "
              "known_mutations for the arm with known layers); a ratio marked '<=' has a reference whose median "
              "is its cap (more than half of its runs never got there; with runs grown to different caps, also a "
              "median that a run censored below it could precede): the reference's true median is at least "
              "that, so the ratio is an upper bound and its interval describes that bound ('>=': the arm's "
              "median is its cap). Repeats: trained candidates whose "
              "values equal an earlier trained candidate's exactly; 'by chance': the count expected with "
              "each architecture's scores shuffled on their own within a run (ties of different "
              "layers on a coarse validation set). Re-ranked: the run's best "
              "re-trained on held-out data; 'level' = not distinguishable or better; 'by the mean too': "
              f"level and its held-out mean at most {TARGET_MARGIN} below bn_relu's (not level only by "
              "its variance). A run stopped at the target (`--stop-at-target`) counts for the times, the "
              "repeats and the CPU shares; it has no final best, so it is left out of 'median best' and the "
              "re-ranking.", ""]
    lines += ["| arm | runs | median CPU s to first trained | median CPU s to target | reached | "
              "vs reference: MWU p | log-rank p | ratio of medians | 95% bootstrap | median best | repeats (pooled) "
              "| re-ranked best level with bn_relu, evonorm_b0, evonorm_s0 | level with bn_relu by the mean too |",
              "|---" * 13 + "|"]
    for label, runs in arms.items():
        ref_label = runs[0].get("reference", "random")
        ref = arms.get(ref_label) if ref_label != label else None
        p, ratio, ci = compare_arms(runs, ref) if ref else ("-", "-", "-")
        lr = logrank_p(runs, ref) if ref else "-"
        trained = sum(r["trained"] for r in runs)
        repeats = sum(r["repeats"] for r in runs)
        by_chance = sum(chance_repeats(r.get("log") or []) for r in runs)
        reranked = [r for r in runs if r.get("rerank") and "vs" in r["rerank"]]
        level = ", ".join(str(sum(_level(r["rerank"]["vs"].get(name)) for r in reranked)) for name in REFERENCES)
        missing = len(runs) - len(reranked)
        bests = [r["best"]["score"] for r in runs if r["best"] and not r.get("stopped_at_target")]
        lines.append(f"| {label} | {len(runs)} | {_median(runs, 'cpu_to_first_trained')} | "
                     f"{_median(runs, 'cpu_to_target')} | {sum(r['cpu_to_target'] is not None for r in runs)}"
                     f"/{len(runs)} | {p}{f' (vs {ref_label})' if ref else ''} | {lr} | {ratio} | {ci} | "
                     f"{_num(statistics.median(bests) if bests else None)} | "
                     f"{_pct(repeats / trained if trained else None)} ({repeats}/{trained}; "
                     f"{by_chance:.1f} by chance) | "
                     f"{level} of {len(reranked)}{f' ({missing} not re-ranked)' if missing else ''} | "
                     f"{sum(_level_by_mean(r['rerank']['vs'].get(TARGET_LAYER)) for r in reranked)} "
                     f"of {len(reranked)} |")
    scales = load_scales(results)
    lines += ["", "## Paired by seed, and adjusted for load", "",
              "CPU seconds on the shared 2-core box depend on what runs beside a run, so each run's time "
              "and cap are also given load-adjusted: scaled by the median over its own CPU seconds for "
              "training the three known layers before its search (the same work in every run; 'load' = "
              "that gauge's range over the arm's runs). Each arm against its reference and, for a variant "
              "of an algorithm (another label), against that algorithm's plain arm. Paired: the runs of one seed in both arms share "
              "the target (bn_relu's score in that seed); faster / slower per seed on the adjusted "
              "times, undecided where neither got there (or one got there after the other's cap); exact "
              "two-sided sign test on the decided seeds; by how much: the geometric mean over seeds of "
              "the arm's time over the reference's (a run that never got there counts as its cap, which "
              "understates the difference), its 95% t interval and the Wilcoxon signed-rank p; 'seeds "
              "for 1.5x': per arm, what a paired test would need to show a 1.5-fold change with 80% "
              "power at this spread; 'same numerics': of the paired seeds, those whose known layers trained to "
              "the same accuracies in both arms (the same evaluator bit for bit: a common-random-numbers "
              "pair); a pair across hosts or kernel paths is two independent draws of the seed's target "
              "(rounds 12-13 on another host than rounds 6-11 for the same code).", "",
              "| arm | vs | load (known layers' CPU s) | median CPU s to target, adjusted | ratio of medians, "
              "adjusted | 95% bootstrap | log-rank p, adjusted | paired seeds: faster / slower / undecided "
              "| sign test p | paired ratio (geometric mean) | 95% t | signed-rank p | seeds for 1.5x | same numerics |",
              "|---" * 14 + "|"]
    for label, runs in arms.items():
        gauges = [g for r in runs if (g := load_gauge(r)) is not None]
        load = f"{min(gauges):.0f}-{max(gauges):.0f}" if gauges else "-"
        med_text = _median(runs, "cpu_to_target", scales)
        versus = _versus_arms(label, runs, arms)
        for ref_label in versus:
            ref = arms[ref_label]
            _, ratio, ci = compare_arms(runs, ref, scales)
            faster, slower, undecided, sign_p = paired_by_seed(runs, ref, scales)
            by_how_much = " | ".join(paired_ratio(runs, ref, scales))
            same, of = same_numerics(runs, ref)
            lines.append(f"| {label} | {ref_label} | {load} | {med_text} | {ratio} | {ci} | "
                         f"{logrank_p(runs, ref, scales=scales)} | {faster} / {slower} / {undecided} | {sign_p} | "
                         f"{by_how_much} | {same}/{of} |")
        if not versus:
            lines.append(f"| {label} | - | {load} | {med_text} |" + " - |" * 10)
    for label, runs in arms.items():
        r0 = runs[0]
        lines += ["", f"## {label}: {r0['algorithm']} {json.dumps(r0['options'])}"
                  f"{' (known layers fed back)' if r0['known'] else ''}", "",
                  "| seed | CPU s to first trained | CPU s to target | bn_relu | b0 | s0 | best | best formula "
                  "| proposed | trained | duplicates | rejected | repeats | re-ranked best mean (seeds) | vs bn_relu "
                  "| vs evonorm_b0 | vs evonorm_s0 | rerank CPU s | load (known layers' CPU s) |",
                  "|---" * 19 + "|"]
        for r in runs:
            rr = r.get("rerank") or {}
            vs = rr.get("vs", {})
            b = r["baselines"]
            rerank_cells = (f"{_num(rr.get('best_mean'))} ({rr.get('best_seeds', '?')}) | {_versus(vs.get('bn_relu'))} | "
                            f"{_versus(vs.get('evonorm_b0'))} | {_versus(vs.get('evonorm_s0'))}"
                            if "vs" in rr else f"{rr.get('error', 'not run')[:60]} | - | - | -")
            formula = (r["best"]["formula"] if r["best"] else "-").replace("|", "\\|")
            lines.append(f"| {r['seed']} | {_fmt(r['cpu_to_first_trained'], r['cpu_cap'])} | "
                         f"{_fmt(r['cpu_to_target'], r['cpu_cap'])} | {_num(b.get('bn_relu'))} | "
                         f"{_num(b.get('evonorm_b0'))} | {_num(b.get('evonorm_s0'))} | "
                         f"{_num(r['best'] and r['best']['score'])} | `{formula}` | {r['proposed']} | "
                         f"{r['trained']} | {r['duplicates']} | {r['rejected']} | {_pct(r['repeat_share'])} | "
                         f"{rerank_cells} | {rr.get('cpu_s', '-')} | {_num(load_gauge(r), 1)} |")
    lines += ["", "## Where the CPU went", "",
              "Share of each arm's pooled search CPU by the verdict of the candidate that spent it (from the "
              "runs' logs), and the share of proposals that repeat an earlier proposal's formula.", "",
              "| arm | " + " | ".join(CPU_KINDS) + " | repeated proposals (CPU) |", "|---" * (len(CPU_KINDS) + 2) + "|"]
    for label, runs in arms.items():
        shares, repeated, repeated_cpu = cpu_by_verdict([r.get("log") or [] for r in runs])
        lines.append(f"| {label} | " + " | ".join(_pct(shares.get(k)) for k in CPU_KINDS)
                     + f" | {_pct(repeated)} ({_pct(repeated_cpu)}) |")
    lines += grown_runs_table(arms)
    return "\n".join(lines) + "\n"


def growth_load(run: dict, gauge: str = "rejected:numerics") -> float | None:
    """How much dearer CPU was in a grown run's first extension than before it: the median CPU
    seconds of a numerics rejection (the cheapest, most uniform trial; its CPU as `trial_cpu` reads
    it) wholly inside the extension, over the same in the
    second half of the run before it. The run's own load gauge was taken at its start and says
    nothing of the extension's load; this one does, from the same log."""
    caps = run.get("extended_from") or []
    if not caps:
        return None
    first, upto = caps[0], (caps[1] if len(caps) > 1 else run["cpu_cap"])
    before, after = [], []
    for e, start, cpu in trial_cpu(run.get("log") or []):
        if e["verdict"] == gauge and first / 2 < start and e["cpu_total"] <= first:
            before.append(cpu)
        elif e["verdict"] == gauge and first < start and e["cpu_total"] <= upto:  # not the resume's first trial
            after.append(cpu)
    if not before or not after:
        return None
    return statistics.median(after) / statistics.median(before)


def grown_runs_table(runs_by_arm: dict[str, list[dict]]) -> list[str]:
    """The report's section on runs grown to a larger cap that searched on (not those that had
    stopped at the target): each one's extension load (`growth_load`) and, where it got there
    after its first cap, its time read on its first part's load."""
    grown = [r for runs in runs_by_arm.values() for r in runs if r.get("extended_from")
             and (r["cpu_to_target"] is None or r["cpu_to_target"] > r["extended_from"][0])]  # searched on
    if not grown:
        return []
    lines = ["", "## Runs grown to a larger cap", "",
             "A run recorded under a smaller `--cpu-cap` and grown (its study resumed). 'extension load': the "
             "median CPU s of a numerics rejection in its first extension over the same in the second half "
             "before it (`growth_load`); 'on its first part's load': a time reached after the first cap with "
             "the extension's CPU divided by that load.", "",
             "| arm | seed | grown from (CPU s) | cap | extension load | CPU s to target | on its first part's load |",
             "|---|---|---|---|---|---|---|"]
    for r in grown:
        k, t, first = growth_load(r), r["cpu_to_target"], r["extended_from"][0]
        on_first = (f"{first + (t - first) / k:.0f}" if k and t is not None and t > first else "-")
        lines.append(f"| {r['arm']} | {r['seed']} | {', '.join(f'{c:g}' for c in r['extended_from'])} | "
                     f"{r['cpu_cap']:g} | {_num(k, 2)} | {_fmt(t, r['cpu_cap'])} | {on_first} |")
    return lines


CPU_KINDS = ("baseline", "evaluated", "duplicate", "rejected:validity", "rejected:numerics",
             "rejected:equivalence", "rejected:stability", "rejected:quality", "failed")


def trial_cpu(log: list[dict]) -> list[tuple[dict, float, float]]:
    """Each trial of a run's log with the run's CPU seconds when it started and what it cost: the
    rise of the cumulative `cpu_total` at its line (one worker: trials run one after another)."""
    out, previous = [], 0.0
    for e in sorted(log, key=lambda e: e.get("cpu_total") or 0.0):
        now = e.get("cpu_total") or 0.0
        out.append((e, previous, now - previous))
        previous = now
    return out


def cpu_by_verdict(logs: list[list[dict]]) -> tuple[dict[str, float], float | None, float | None]:
    """Pooled CPU share per verdict kind (each trial's CPU = the rise of the run's cumulative
    `cpu_total` at its line), the share of proposals whose formula an earlier one of the same run
    had, and the CPU share those took."""
    spent: dict[str, float] = {}
    total = repeated = repeated_cpu = proposals = 0.0
    for log in logs:
        formulas = set()
        for e, _, cpu in trial_cpu(log):
            verdict = str(e.get("verdict") or "")
            kind = ("baseline" if e.get("kind") == "baseline" else
                    ":".join(verdict.split(":")[:2]) if verdict.startswith("rejected") else verdict.split(":")[0])
            spent[kind] = spent.get(kind, 0.0) + cpu
            total += cpu
            if e.get("kind") != "baseline":
                proposals += 1
                if e.get("formula") in formulas:
                    repeated += 1
                    repeated_cpu += cpu
                formulas.add(e.get("formula"))
    if not total:
        return {}, None, None
    return ({k: v / total for k, v in spent.items()}, repeated / proposals if proposals else None,
            repeated_cpu / total)


def _exit_on_sigterm() -> None:
    """SIGTERM (a scheduler's or a test's timeout) unwinds like Ctrl-C: the search worker is
    terminated and `subprocess.run` kills a running re-ranking, so no child outlives the
    benchmark (a re-ranking left behind once trained on for an hour)."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/discovery.py " + shlex.join(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algorithms", default=DEFAULT_ALGORITHMS, help="comma-separated ('none': only --known)")
    p.add_argument("--seeds", default="0-4", help="'0-4' or a list '0,1,2'")
    p.add_argument("--options", default="", help="'algo:key=value,key=value;algo2:key=value'")
    p.add_argument("--filter-options", default="", help="'filter:key=value,key=value;filter2:...' for "
                   "every arm (e.g. 'equivalence:absorb_affine=true', as round 2 ran)")
    p.add_argument("--layer-options", default="",
                   help="'key=value,...': the candidates' layer options for every arm (evaluator.layer_options; "
                        "e.g. 'no_act=bn': BatchNorm in the networks' no-activation slots, as bn_relu has there)")
    p.add_argument("--label", default=None, help="the arm's name (one algorithm only): the same "
                   "algorithm with other options is another arm")
    p.add_argument("--known", action="store_true", help="also the arms with known layers: "
                   f"'{KNOWN_LABEL}' (the default algorithm, seed_with_baselines) and '{KNOWN_COUNTERPART}'")
    p.add_argument("--cpu-cap", type=float, default=None,
                   help="CPU seconds of the worker per run (default 600; --quick: 10)")
    p.add_argument("--budget", type=int, default=1_000_000, help="candidates per run at most")
    p.add_argument("--workdir", default=os.path.join(HERE, "discovery_runs"))
    p.add_argument("--results", default=os.path.join(HERE, "discovery_results.jsonl"),
                   help="JSON lines, appended; --report reads several, comma-separated")
    p.add_argument("--no-rerank", action="store_true", help="skip the re-ranking of each run's best")
    p.add_argument("--stop-at-target", action="store_true",
                   help="end a run's search at its first candidate within the margin of bn_relu (its time to "
                        "the target is a full run's; it is not re-ranked and its best is left out of 'median best')")
    p.add_argument("--rerank-seeds", type=int, default=3,
                   help="seeds of each run's re-ranking (default 3); a run already recorded with fewer "
                        "is re-ranked again, its stage grown to this many, and recorded as a new line")
    p.add_argument("--quick", action="store_true", help="smoke test: synthetic data, tiny proxy and space")
    p.add_argument("--report", action="store_true", help="only print the tables of --results")
    p.add_argument("--horizon", type=float, default=None,
                   help="with --report: every run as if capped at this many CPU s (a longer run's log cut "
                        "there: one worker's search is a function of its seed), to compare arms run to "
                        "different caps at the smallest")
    p.add_argument("--check-host", action="store_true",
                   help="only train the known layers of --seeds here and say which runs in --results "
                        "trained them to the same accuracies (which recorded arms this host can be paired with)")
    args = p.parse_args(argv)
    if args.report:
        results = latest_per_run([r for path in args.results.split(",") for r in read_results(path)])
        if args.horizon is not None:
            results = [at_horizon(r, args.horizon) for r in results]
        sys.stdout.write(report(results, args.results, command))
        return 0
    args.filter_opts = parse_arm_options(args.filter_options)
    args.layer_opts = parse_layer_options(args.layer_options)
    if args.check_host:
        return check_host(args)
    if args.cpu_cap is None:
        args.cpu_cap = 10.0 if args.quick else 600.0
    try:
        return bench_main(args, command)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    _exit_on_sigterm()
    sys.exit(main())
