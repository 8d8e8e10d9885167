"""Where an evolution run's candidates came from, and what each source cost: replayed from the study.

An evolution plugin (regularized_evolution, pareto_evolution) proposes from four sources: before
the population is ready, new graphs of the generator (`start-new`) and mutations of the best near
misses (`start-mutant`); then mutations of a tournament's winner (`mutant`) and streaks of new
graphs (`immigrant`). Which source found a run's first layer at the target, and where its CPU went
before, says which piece of the algorithm carries the search and which one costs it time.

Runs since the engine stores a trial's `origin` (the algorithm's word for where the proposal came
from) carry the source and kind, and runs since round 15 the parent (`parent`); older runs carry
neither, so both are rebuilt. A proposal is a pure function of the seed and the feedback so far
(opsearch/algorithm.py), so a fresh algorithm fed the run's finished trials in order, as
`Engine.recover` feeds them, proposes each recorded genome again; the replay checks that it does
(`mismatches`, 0 for an exact replay), reads each proposal's `origin` and the parent its mutator
was given, and warns where a stored origin disagrees. Exact for one-worker runs (several workers
interleave their proposals and feedback).

    python benchmarks/origins.py RUN.db [RUN2.db ...]          # one line per run, then the totals
    python benchmarks/origins.py --json origins.json RUN.db     # also every candidate's source

CPU per candidate: the rise of the run's cumulative CPU when the discovery benchmark's trial log
(RUN.jsonl beside RUN.db) is there, else the trial's `elapsed_s` (wall seconds). The target: the
first candidate whose mean score comes within `--margin` of the run's own bn_relu baseline.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Any

from discovery import TARGET_LAYER, TARGET_MARGIN, read_log

from opsearch.plugins.algorithms.evolution import ORIGIN_SOURCES as SOURCES
from opsearch.plugins.algorithms.mutation import MUTATION_KINDS


def _url(path_or_url: str) -> str:
    return path_or_url if "://" in path_or_url else "sqlite:///" + os.path.abspath(path_or_url)


def replay(study) -> tuple[list[dict[str, Any]], int]:
    """Every finished candidate of the run in trial order, with the source the replayed algorithm
    proposed it from (for a mutant also its mutation kind, its parent's trial number and the
    parent's mean score); and how many recorded genomes the replay did not propose again."""
    import optuna

    from opsearch import registry
    from opsearch.engine import _grade, _is_duplicate
    from opsearch.errors import UserError
    from opsearch.plugins.algorithms.evolution import AgingEvolution
    from opsearch.space import SearchSpace
    from opsearch.study.records import TrialRecord
    from opsearch.trials import LOST

    config = json.loads(study.user_attrs.get("config", "{}"))
    if config.get("seed_with_baselines"):
        raise UserError("origins: the replay covers searches from scratch (seed_with_baselines = false)")
    space = SearchSpace.from_name(config["space"], **config.get("space_options", {}))
    algorithm = registry.algorithms.create(config["algorithm"], space, len(config["archs"]),
                                           int(config.get("seed", 0)), **config.get("algorithm_options", {}))
    if not isinstance(algorithm, AgingEvolution):
        raise UserError(f"origins: algorithm {config['algorithm']!r} is not an evolution plugin")
    parent = _track_parents(algorithm)
    rows, mismatches, stored_disagree = [], 0, 0
    numbers: dict[tuple, int] = {}  # genome -> the first trial that fed it back (a parent's number)
    early: dict[int, float] = {}  # a trained trial -> its mean accuracy at the quality filter's step
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        record = TrialRecord.from_frozen(trial)
        if not record.state.is_finished() or record.kind != "candidate" or record.verdict == LOST \
                or record.genome is None:
            continue
        parent.clear()
        proposed = algorithm.propose()
        mismatches += tuple(proposed) != record.genome
        stored = record.user_attrs.get("origin")  # runs since the engine stores it
        stored_disagree += stored is not None and stored != algorithm.origin
        source, _, kind = (algorithm.origin or "").partition(":")
        is_mutant = source in ("start-mutant", "mutant") and kind not in ("", "none")
        values = record.values if record.state == optuna.trial.TrialState.COMPLETE and record.values else None
        parent_number = numbers.get(parent.genome) if is_mutant else None
        rows.append({"number": record.number, "origin": algorithm.origin, "source": source or None,
                     "mutation": kind if is_mutant else None,
                     "parent": parent_number,
                     "parent_score": parent.score if is_mutant else None,
                     "early": _early(record), "parent_early": early.get(parent_number),
                     "verdict": str(record.verdict or "").split(":")[0], "values": values,
                     "formula": record.user_attrs.get("formula"), "elapsed_s": record.user_attrs.get("elapsed_s")})
        algorithm.feedback(record.genome, values, _is_duplicate(record), _grade(record))  # as Engine.recover
        numbers.setdefault(record.genome, record.number)
        if record.verdict == "evaluated" and rows[-1]["early"] is not None:
            early.setdefault(record.number, rows[-1]["early"])
    if stored_disagree:
        print(f"origins: {stored_disagree} candidates' stored origin differs from the replay's", file=sys.stderr)
    return rows, mismatches


def _early(record) -> float | None:
    """The mean accuracy the quality filter measured after its short training (every
    architecture), None when it did not measure all of them."""
    from opsearch.lineage import early_accuracies

    accs = list(early_accuracies(record.user_attrs).values())
    archs = [k for k in record.user_attrs if k.startswith("acc/")]
    return sum(accs) / len(accs) if accs and (not archs or len(accs) == len(archs)) else None


def parent_margin_table(runs: list[tuple[list[dict], float | None]], margins: list[float]) -> list[dict]:
    """What the quality filter's ``parent_margin`` would have stopped in recorded runs: among the
    trained mutants of trained parents up to each run's first candidate at the target (the whole
    run without one), those whose early accuracy is below the parent's minus the margin; how many
    of them reached the target or beat their parent's score, and the seconds their training took
    after the quality step (`elapsed_s`). First order only: a run with the rule takes another
    course after its first stop."""
    children = []
    for rows, target in runs:
        for r in rows:
            if r["verdict"] == "evaluated" and r.get("early") is not None and r.get("parent_early") is not None:
                mean = sum(r["values"]) / len(r["values"])
                children.append({"target": target is not None and mean >= target,
                                 "better": r.get("parent_score") is not None and mean > r["parent_score"],
                                 "gap": r["parent_early"] - r["early"], "seconds": float(r["elapsed_s"] or 0.0)})
                if target is not None and mean >= target:
                    break
            elif target is not None and r["verdict"] == "evaluated" and sum(r["values"]) / len(r["values"]) >= target:
                break
    table = []
    for margin in margins:
        stopped = [c for c in children if c["gap"] > margin]
        table.append({"margin": margin, "children": len(children), "stopped": len(stopped),
                      "targets": sum(c["target"] for c in children),
                      "targets_stopped": sum(c["target"] for c in stopped),
                      "better": sum(c["better"] for c in children),
                      "better_stopped": sum(c["better"] for c in stopped),
                      "seconds": sum(c["seconds"] for c in children),
                      "seconds_stopped": sum(c["seconds"] for c in stopped)})
    return table


class _Parent:
    """The parent of the last mutation and its mean score (None for a near miss, whose objectives
    are only a grade). The source and the mutation's kind are the algorithm's own `origin`."""

    def __init__(self):
        self.genome: tuple | None = None
        self.score: float | None = None

    def clear(self) -> None:
        self.genome, self.score = None, None


def _track_parents(algorithm) -> _Parent:
    from opsearch.plugins.algorithms.evolution import GRADE_OFFSET

    seen = _Parent()
    mutate = algorithm.mutator.mutate

    def tracked_mutate(parent, *args, **kwargs):
        scores = [sum(o) / len(o) for g, o in algorithm.population + algorithm.near_misses if tuple(g) == tuple(parent)]
        seen.score = scores[-1] if scores and scores[-1] > -GRADE_OFFSET / 2 else None
        seen.genome = tuple(parent)
        return mutate(parent, *args, **kwargs)

    algorithm.mutator.mutate = tracked_mutate
    return seen


def _costs(rows: list[dict], log_path: str | None) -> tuple[list[float], float | None]:
    """Each candidate's CPU (from the discovery log) or wall seconds; the run's bn_relu score."""
    if log_path and os.path.exists(log_path):
        log = read_log(log_path)
        cpu = {e["number"]: e["cpu_total"] for e in log}
        bn = next((e["score"] for e in log if e.get("layer") == TARGET_LAYER and e.get("score") is not None), None)
        before = max((e["cpu_total"] for e in log if e["kind"] != "candidate" and e["number"] < rows[0]["number"]),
                     default=0.0) if rows else 0.0
        costs, last = [], before
        for r in rows:
            now = cpu.get(r["number"], last)
            costs.append(max(0.0, now - last))
            last = now
        return costs, bn
    return [float(r["elapsed_s"] or 0.0) for r in rows], None


def summarize(rows: list[dict], costs: list[float], target: float | None) -> dict[str, Any]:
    """Per source: proposals, CPU and trained candidates before the target (the whole run when
    it never got there), and which source proposed the layer at the target. Per mutation kind
    (mutants of trained parents only): the same, and how many trained children beat their
    parent's score."""
    cpu, proposed, trained = (collections.Counter() for _ in range(3))
    kinds = collections.defaultdict(collections.Counter)
    hit = None
    for r, c in zip(rows, costs):
        cpu[r["source"]] += c
        proposed[r["source"]] += 1
        k = kinds[r["mutation"]] if r["source"] == "mutant" and r.get("mutation") else None
        if k is not None:
            k["proposed"] += 1
            k["cpu"] += c
        if r["verdict"] == "evaluated":
            trained[r["source"]] += 1
            mean = sum(r["values"]) / len(r["values"])
            if k is not None:
                k["trained"] += 1
                k["better"] += r.get("parent_score") is not None and mean > r["parent_score"]
            if target is not None and mean >= target:
                hit = {"number": r["number"], "source": r["source"], "mutation": r.get("mutation"),
                       "score": mean, "formula": r["formula"]}
                if k is not None:
                    k["hits"] += 1
                break
    return {"hit": hit, "cpu": dict(cpu), "proposed": dict(proposed), "trained": dict(trained),
            "kinds": {kind: dict(v) for kind, v in kinds.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="a run's storage: a SQLite file or a storage URL (one run in it)")
    p.add_argument("--margin", type=float, default=TARGET_MARGIN, help="the target: bn_relu's score minus this")
    p.add_argument("--json", help="write every run's candidates with their sources here")
    p.add_argument("--parent-margins", default="", help="e.g. 0,0.02,0.05: what the quality filter's "
                   "parent_margin would have stopped in these runs (first order)")
    args = p.parse_args(argv)
    from opsearch.errors import UserError
    from opsearch.study.storage import open_run

    total = collections.defaultdict(collections.Counter)
    kinds = collections.defaultdict(collections.Counter)
    dump, targets = [], []
    print(f"{'run':42} {'mis':>3} {'search CPU':>10} {'by':>12}  CPU s before it: " + " / ".join(SOURCES))
    for path in args.runs:
        try:
            study = open_run(_url(path))
            rows, mismatches = replay(study)
        except UserError as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 2
        base = path[:-3] if path.endswith(".db") else None
        costs, bn = _costs(rows, base + ".jsonl" if base else None)
        s = summarize(rows, costs, None if bn is None else bn - args.margin)
        spent = sum(s["cpu"].values())
        for key in ("cpu", "proposed", "trained"):
            total[key].update(s[key])
        for kind, counts in s["kinds"].items():
            kinds[kind].update(counts)
        total["hits"][s["hit"]["source"] if s["hit"] else "none"] += 1
        where = f"{spent:10.0f}" if s["hit"] else f">{spent:9.0f}"
        print(f"{os.path.basename(path):42} {mismatches:3d} {where} {(s['hit'] or {}).get('source', '-'):>12}  "
              + " / ".join(f"{s['cpu'].get(k, 0):.0f} ({s['trained'].get(k, 0)}/{s['proposed'].get(k, 0)})"
                           for k in SOURCES))
        if mismatches:
            print(f"{path}: the replay proposed {mismatches} recorded genome(s) differently: the sources "
                  "are not the run's (several workers, or code other than the run's)", file=sys.stderr)
        dump.append({"run": path, "mismatches": mismatches, "summary": s, "candidates": rows})
        targets.append((rows, None if bn is None else bn - args.margin))
    print("totals before the target, CPU s (trained / proposed): "
          + "; ".join(f"{k} {total['cpu'].get(k, 0):.0f} ({total['trained'].get(k, 0)}/{total['proposed'].get(k, 0)})"
                      for k in SOURCES))
    print("the target's source: " + ", ".join(f"{k} {n}" for k, n in sorted(total["hits"].items())))
    print("mutants of trained parents before the target, by kind: proposed, CPU s, trained, trained "
          "and better than the parent, at the target")
    for kind in MUTATION_KINDS:
        k = kinds.get(kind, collections.Counter())
        print(f"  {kind:7} {k['proposed']:6d} {k['cpu']:8.0f} {k['trained']:5d} {k['better']:5d} {k['hits']:3d}")
    if args.parent_margins:
        margins = [float(m) for m in args.parent_margins.split(",")]
        print("parent_margin, first order: trained mutants of trained parents before the target; stopped; "
              "targets stopped; better than the parent stopped; training seconds after the quality step stopped")
        for t in parent_margin_table(targets, margins):
            print(f"  {t['margin']:<5g} {t['children']:5d} {t['stopped']:5d} ({t['stopped'] / max(t['children'], 1):.0%})"
                  f" {t['targets_stopped']:3d} of {t['targets']:<3d} {t['better_stopped']:4d} of {t['better']:<4d}"
                  f" {t['seconds_stopped']:7.0f} of {t['seconds']:.0f} s"
                  f" ({t['seconds_stopped'] / max(t['seconds'], 1e-9):.0%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
