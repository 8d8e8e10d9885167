"""Held-out verdicts on what each discovery run found (issue 17, "Done when", clause 1).

`benchmarks/discovery.py` times the runs to the target on the search's own one-seed score; this
asks the question the issue's first clause asks: is the layer a run found within its first
`--horizon` CPU seconds (30 CPU-minutes) level with BN-ReLU on held-out data, and does the default
algorithm get there in more seeds than random search?

It needs only the recorded result lines (their per-trial logs hold each candidate's formula and
score), not the runs' studies: each run's layer is read back from its formula
(`opsearch.formula_parser`), so results recorded on another machine, or whose studies are gone,
can be judged.

- The layers of a run: as the re-ranking stage takes them, its `--top` (5) best search scores
  among the candidates trained within the horizon (one per function; the earliest among equals);
  its answer is the one of them with the best held-out mean (the stage's pick: chosen on the same
  seeds it is then tested on, as the stage does). `--top 1` judges the search's own pick instead.
  A run stopped at the target before the horizon is judged on what it had trained by then (it
  could only have improved: this errs against the faster arm).
- The held-out task is the re-ranking stage's (`opsearch rerank` on a run of the benchmark's
  settings: the held-out split of digits, the stage's seeds 1,000,000, 1,000,001, ...). Every
  run's stage would train the same task with the same seeds, so each distinct layer (canonical
  hash) and each reference is trained once per seed and shared by the runs that found it.
- Per run: its answer's paired t-test against bn_relu over the seeds (the seed is the unit, the
  architectures are blocks: each seed's mean over them), its 95% interval, Holm-corrected within
  the arm; "level" = not worse after correction; "within 0.01" = the interval's lower end above
  -0.01 (non-inferiority at the issue's margin), the claim that does not rest on low power; a
  pick whose training diverged on a judged seed says so (its spread alone can make it "level"). The
  same against bn_relu's graph trained as a candidate (`bn_relu_graph`) and against evonorm_b0.
- Per arm: how many runs are level / within 0.01; the arms against each other with Fisher's exact
  test on those counts and Mann-Whitney on the runs' differences to bn_relu (the run as the unit).

- Confirmation (`--confirm N`): the answer is the best of five on the seeds it is then judged on,
  which flatters it (the winner's curse); each run's pick and the references are then trained on
  N further seeds of the stage, and the report judges the same picks on those seeds alone. A run
  picks once every one of its layers has every selection seed (lanes still training: rerun).
  The report then ends with "the best reached" (the issue's "where a target is missed, the best
  reached"): the layers with every seed, selection and fresh, against bn_relu and evonorm_b0.

- `--no-act bn`: the same layers held out with BatchNorm in the networks' no-activation slots (the
  last norm of a residual block, the projections), where the searches gave a candidate the affine
  alone and bn_relu, a known layer, keeps its BatchNorm: the verdict on what a layer computes in
  the slots it fills, apart from where it sits. Its lines go to their own `--out`. The default is
  the runs' own placement (`discovery.py --layer-options no_act=...`, recorded per run; the
  affine where a run records none), so runs searched with BatchNorm there are held out with it.

Work goes seed-major (every layer at the first seed, then the second, ...), one JSON line per
(layer, seed) appended to `--out`; a rerun skips what is there, so a stopped job loses at most
one training and `--seeds` can grow later. `--lane K/N` runs every N-th item (parallel processes
appending to the same file).

    python benchmarks/discovery_heldout.py --results benchmarks/discovery_round19_cap2100_results.jsonl.gz,benchmarks/discovery_round19_grown_results.jsonl.gz --seeds 8 --out heldout.jsonl [--lane 0/2]
    python benchmarks/discovery_heldout.py --results ... --out heldout.jsonl --report [--top 1]
    python benchmarks/discovery_heldout.py --results ... --seeds 8 --confirm 8 --out heldout.jsonl [--lane 0/2]   # then --report (with the same --seeds)

Round 20 (BENCHMARKS.md) is recorded in benchmarks/discovery_round20_heldout_results.jsonl.gz
(`--out` of a report may be that file; training appends to a plain .jsonl only).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import time
from typing import Any, Callable

from opsearch.config import RERANK_DEFAULTS
from opsearch.errors import UserError

import discovery  # benchmarks/ is on the path of a script run from it: the runs' settings and files

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_OUT = os.path.join(HERE, "discovery_heldout_results.jsonl")
HORIZON = 1800.0  # the issue's 30 CPU-minutes per run
MARGIN = discovery.TARGET_MARGIN
TARGET = discovery.TARGET_LAYER
DEFAULT_NO_ACT = "affine"  # a candidate's no-activation slots by default (a line or run that records none)


# --------------------------------------------------------------------------------------------
# What to train


def run_layers(result: dict, horizon: float, top: int) -> list[dict]:
    """The layers a run's re-ranking stage would take at `horizon` CPU seconds: its `top` best
    search scores among the candidates trained by then (the earliest among equals; duplicates
    stand for the trial they equal, so each function once), best first."""
    ranked = []
    for e in result["log"]:
        if e["kind"] != "candidate" or e.get("verdict") != "evaluated" or not e.get("values") \
                or e["cpu_total"] > horizon:
            continue
        score = sum(e["values"]) / len(e["values"])  # the search score: mean over the architectures
        ranked.append((-score, e["cpu_total"], e["number"], e))
    out, keys = [], set()
    for minus_score, _, _, e in sorted(ranked, key=lambda t: t[:3]):
        key = layer_key(e["formula"])
        if key in keys:
            continue
        keys.add(key)
        out.append({"number": e["number"], "score": -minus_score, "formula": e["formula"],
                    "cpu_total": e["cpu_total"], "key": key, "rank": len(out) + 1})
        if len(out) == top:
            break
    return out


def bn_relu_graph() -> str:
    """bn_relu's graph as a formula: trained from it, it is a candidate like any other (the affine
    alone in the networks' no-activation slots, where the known layer keeps BatchNorm), the
    comparator that differs from a found layer only in the layer."""
    from opsearch import graph, layers

    return graph.formula(layers.resolve(TARGET))


def bn_relu_graph_key() -> str:
    return layer_key(bn_relu_graph())


@functools.lru_cache(maxsize=None)
def layer_key(formula: str) -> str:
    """A layer's identity across runs: the canonical hash of the graph its formula reads back as
    (kept: a report reads each run's log once per comparator)."""
    from opsearch.formula_parser import parse_formula_plain
    from opsearch.graph import canonical_hash

    return canonical_hash(parse_formula_plain(formula))


def heldout_task(no_act: str = DEFAULT_NO_ACT) -> tuple[dict, Any, str]:
    """The re-ranking stage's held-out task of a benchmark run (its evaluator config as stored,
    the machine's evaluator config, the plugin name); `no_act` what a candidate gets in the
    networks' no-activation slots (`layer_options.no_act`; known layers keep their companion)."""
    from opsearch.config import SearchConfig
    from opsearch.evaluation import make_eval_config
    from opsearch.rerank import RerankTask

    arm = discovery.Arm(label="x", algorithm="random", options={}, known=False)
    values = discovery.search_config(arm, 0, "sqlite:///:memory:", "heldout", 1, quick=False)
    values["rerank"] = {"enabled": True}
    config = SearchConfig.from_dict(values)
    task = RerankTask.from_config(config)
    if no_act != DEFAULT_NO_ACT:
        task.task["layer_options"] = {**task.task.get("layer_options", {}), "no_act": no_act}
    return task.task, make_eval_config(config), task.evaluator_plugin


def work_items(layers: dict[str, str], seeds: list[int]) -> list[tuple[int, str, str]]:
    """(seed, key, layer) in seed-major order; references first within a seed."""
    names = list(discovery.REFERENCES) + sorted(k for k in layers if k not in discovery.REFERENCES)
    return [(seed, key, layers.get(key, key)) for seed in seeds for key in names]


# --------------------------------------------------------------------------------------------
# Training


def read_lines(path: str) -> list[dict]:
    """The (layer, seed) lines of `path`, read as discovery.py reads its results (a .gz reads as
    the text it compresses; a line cut short is skipped, so that item is trained again)."""
    return discovery.read_results(path)


def append_line(path: str, record: dict) -> None:
    """One write on an O_APPEND descriptor: lanes appending to one file do not interleave."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def heldout_evaluate(no_act: str = DEFAULT_NO_ACT) -> Callable[[int, str, str], dict]:
    """(seed, key, layer) -> the held-out accuracy per architecture, on the re-ranking stage's task
    with that seed (one evaluator per seed, kept while the seed lasts: building one loads data);
    a line trained with another `no_act` than the default (the affine) says so (`modes_of`)."""
    import torch

    from opsearch.formula_parser import parse_formula
    from opsearch.rejection import FilterContext
    from opsearch.rerank import task_eval_config

    torch.set_num_threads(1)
    task, machine, plugin = heldout_task(no_act)
    evaluators: dict[int, Any] = {}

    def evaluate(seed: int, key: str, layer: str) -> dict:
        if seed not in evaluators:
            evaluators.clear()
            config = task_eval_config(task, seed, machine, plugin)
            evaluators[seed] = FilterContext(eval_config=config, evaluator_plugin=plugin).get_evaluator()
        per_arch = evaluators[seed].evaluate(layer if key == layer else parse_formula(layer)).to_dict()["per_arch"]
        return {"acc": {a: r["accuracy"] for a, r in per_arch.items()},
                "diverged": [a for a, r in per_arch.items() if r["diverged"]],
                **({} if no_act == DEFAULT_NO_ACT else {"no_act": no_act})}

    return evaluate


def train(items: list[tuple[int, str, str]], out: str, lane: tuple[int, int],
          evaluate: Callable[[int, str, str], dict] | None = None, progress=print) -> int:
    """Train the items of this lane that `out` does not hold yet, in order; returns how many it
    trained. `evaluate` (default `heldout_evaluate()`) gives one item's accuracies."""
    k, n = lane
    todo = [it for i, it in enumerate(items) if i % n == k]
    evaluate = evaluate or heldout_evaluate()
    trained = 0
    for seed, key, layer in todo:
        if (seed, key) in {(r["seed"], r["key"]) for r in read_lines(out)}:
            continue  # done before, or by another lane (a rerun with another --lane split)
        start = time.process_time()
        record = {"seed": seed, "key": key, "layer": layer, **evaluate(seed, key, layer),
                  "cpu_s": round(time.process_time() - start, 2)}
        append_line(out, record)
        trained += 1
        progress(f"seed {seed} {layer[:60]}: {sum(record['acc'].values()) / len(record['acc']):.4f} "
                 f"({record['cpu_s']} CPU s)")
    return trained


# --------------------------------------------------------------------------------------------
# Statistics and the report


def modes_of(lines: list[dict]) -> set[str]:
    """The `no_act` modes the lines were trained in (a line without one: the default's)."""
    return {r.get("no_act", DEFAULT_NO_ACT) for r in lines}


def searched_no_act(results: list[dict]) -> str:
    """What the runs' candidates had in the no-activation slots in their searches (each run records
    its `--layer-options`); one placement per report, or the arms' picks were not chosen alike."""
    other = sorted({k for r in results for k in (r.get("layer_options") or {}) if k != "no_act"})
    if other:
        raise UserError(f"the runs were searched with layer options {', '.join(other)}: the held-out task "
                        "sets no_act only, so their layers would not be held out as they were searched")
    modes = {(r.get("layer_options") or {}).get("no_act", DEFAULT_NO_ACT) for r in results}
    if len(modes) > 1:
        raise UserError(f"the runs were searched with different no_act placements ({', '.join(sorted(modes))}): "
                        "hold out each placement's runs on their own")
    return modes.pop() if modes else DEFAULT_NO_ACT


def first_lines(lines: list[dict]) -> list[dict]:
    """The first line of each (layer, seed): the one that counts (parallel lanes can train an
    item twice)."""
    return list({(r["key"], r["seed"]): r for r in reversed(lines)}.values())


def scores_by_key(lines: list[dict]) -> dict[str, dict[int, float]]:
    """Each layer's held-out score per seed: its mean accuracy over the architectures."""
    out: dict[str, dict[int, float]] = {}
    for r in first_lines(lines):
        out.setdefault(r["key"], {})[r["seed"]] = sum(r["acc"].values()) / len(r["acc"])
    return out


def diverged_by_key(lines: list[dict]) -> dict[str, set[int]]:
    """The seeds on which each layer's held-out training diverged in some architecture (its
    accuracy there is chance or zero)."""
    out: dict[str, set[int]] = {}
    for r in first_lines(lines):
        if r.get("diverged"):
            out.setdefault(r["key"], set()).add(r["seed"])
    return out


def judge(run_scores: dict[int, float], ref_scores: dict[int, float]) -> dict:
    """The run's layer against the reference, paired over the seeds both have."""
    from opsearch.rerank_stats import paired_test

    seeds = sorted(set(run_scores) & set(ref_scores))
    test = paired_test([run_scores[s] for s in seeds], [ref_scores[s] for s in seeds])
    test["seeds"] = len(seeds)
    test["within_margin"] = test["low"] is not None and test["low"] > -MARGIN
    return test


def reranked_best(layers: list[dict], scores: dict[str, dict[int, float]]) -> dict | None:
    """The stage's pick among a run's layers: the best held-out mean over the seeds (the search's
    order among equals); only layers trained on every seed the reference has count."""
    ref_seeds = set(scores.get(TARGET, {}))
    trained = [lay for lay in layers if lay["key"] in scores and ref_seeds <= set(scores[lay["key"]])]
    if not trained:
        return None
    return max(trained, key=lambda lay: (sum(scores[lay["key"]][s] for s in ref_seeds) / max(len(ref_seeds), 1),
                                         -lay["rank"]))


def run_pick(layers: list[dict], scores: dict[str, dict[int, float]], top: int) -> dict | None:
    """A run's answer: the stage's pick among its layers (`top` > 1) or the search's own (top 1)."""
    if top > 1:
        return reranked_best(layers, scores)
    return layers[0] if layers else None


def on_seeds(scores: dict[str, dict[int, float]], seeds) -> dict[str, dict[int, float]]:
    """`scores` restricted to `seeds` (layers with none of them left out)."""
    keep = set(seeds)
    out = {key: {s: v for s, v in per.items() if s in keep} for key, per in scores.items()}
    return {key: per for key, per in out.items() if per}


def arm_verdicts(runs: list[dict], scores: dict[str, dict[int, float]], horizon: float,
                 top: int = 1, ref: str = TARGET,
                 judge_scores: dict[str, dict[int, float]] | None = None,
                 diverged: dict[str, set[int]] | None = None) -> list[dict]:
    """One row per run: the held-out best of its `top` layers (chosen on `scores`) and that
    layer's verdict against `ref` (bn_relu; or `bn_relu_graph_key()`) on `judge_scores` (default
    the same scores; other seeds for a confirmation), Holm-corrected within the arm. `diverged`
    (`diverged_by_key`) marks a pick whose training diverged on a judged seed: its wide interval
    can make it "level" by instability alone, so "level_stable" counts only picks that never did."""
    from opsearch.rerank_stats import holm

    judge_scores = scores if judge_scores is None else judge_scores
    rows = []
    for r in sorted(runs, key=lambda r: r["seed"]):
        layers = run_layers(r, horizon, top)
        layer = run_pick(layers, scores, top)
        row = {"seed": r["seed"], "layer": layer, "of": len(layers), "key": layer["key"] if layer else None}
        if layer and row["key"] in judge_scores and ref in judge_scores:
            row["vs"] = judge(judge_scores[row["key"]], judge_scores[ref])
            judged = set(judge_scores[row["key"]]) & set(judge_scores[ref])
            row["diverged"] = len((diverged or {}).get(row["key"], set()) & judged)
        rows.append(row)
    tested = [row for row in rows if row.get("vs") and row["vs"]["p"] is not None]
    for row, p in zip(tested, holm([row["vs"]["p"] for row in tested])):
        row["vs"]["p_holm"] = p
    for row in rows:
        v = row.get("vs")
        row["level"] = (bool(v) and v["p"] is not None  # one seed gives no test: not level
                        and not (v["p_holm"] < 0.05 and v["diff"] < 0))
        row["within_margin"] = bool(v) and v["within_margin"]
        row["level_stable"] = row["level"] and not row.get("diverged")
    return rows


def confirmation_layers(results: list[dict], scores: dict[str, dict[int, float]], horizon: float,
                        top: int) -> tuple[dict[str, str], int]:
    """({key: formula} of each run's pick, made on `scores` (the selection seeds), to be trained on
    fresh seeds; how many runs cannot pick yet): a run picks once each of its layers has every
    selection seed bn_relu has (a lane still training would otherwise change the pick)."""
    ref_seeds = set(scores.get(TARGET, {}))
    picks: dict[str, str] = {}
    waiting = 0
    for r in discovery.latest_per_run(results):
        layers = run_layers(r, horizon, top)
        if not layers:
            continue
        if not ref_seeds or any(not ref_seeds <= set(scores.get(lay["key"], {})) for lay in layers):
            waiting += 1
            continue
        layer = run_pick(layers, scores, top)
        picks.setdefault(layer["key"], layer["formula"])
    return picks, waiting


def compare_counts(a: list[dict], b: list[dict], field: str) -> float:
    """Fisher's exact test (two-sided) on how many runs of each arm have `field`."""
    from scipy.stats import fisher_exact

    ka, kb = sum(r[field] for r in a), sum(r[field] for r in b)
    return float(fisher_exact([[ka, len(a) - ka], [kb, len(b) - kb]]).pvalue)


def compare_diffs(a: list[dict], b: list[dict]) -> float | None:
    """Mann-Whitney (two-sided) on the runs' held-out differences to bn_relu (a run without a
    trained layer counts as the lowest)."""
    from scipy.stats import mannwhitneyu

    def diffs(rows):
        return [r["vs"]["diff"] if r.get("vs") else -1.0 for r in rows]

    if not a or not b:
        return None
    return float(mannwhitneyu(diffs(a), diffs(b), alternative="two-sided").pvalue)


def search_heldout_agreement(arms: dict[str, list[dict]], scores: dict[str, dict[int, float]],
                             horizon: float, top: int) -> dict:
    """Rank agreement of the search score and the held-out mean over every (run, layer) pair
    whose layer has all the reference's seeds."""
    from opsearch.rerank_stats import rank_agreement

    ref_seeds = sorted(scores.get(TARGET, {}))
    search, heldout = [], []
    for runs in arms.values():
        for r in runs:
            for lay in run_layers(r, horizon, top):
                held = scores.get(lay["key"], {})
                if ref_seeds and all(s in held for s in ref_seeds):
                    search.append(lay["score"])
                    heldout.append(sum(held[s] for s in ref_seeds) / len(ref_seeds))
    return rank_agreement(search, heldout)


def difference(v: dict) -> str:
    """A paired difference with its interval, or why it has none."""
    if v["low"] is None:
        return f"{v['diff']:+.4f} (no test: {v['word']})"
    return f"{v['diff']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]"


def report(results: list[dict], lines: list[dict], horizon: float, top: int, command: str,
           seeds: list[int] | None = None, confirm_seeds: list[int] = (), no_act: str | None = None,
           searches_lines: list[dict] | None = None) -> str:
    """The tables: each run's answer judged on the `seeds` it was chosen on (default: every seed
    in `lines`) and, where `confirm_seeds` were trained, judged again on those alone (the pick
    no longer judged on the seeds that chose it: no winner's curse). `no_act` is the lines' mode
    (default: the searches' own, `searched_no_act`). With `searches_lines` (the same layers trained
    in the searches' mode) each pick's difference between the two modes."""
    import numpy as np

    searched = searched_no_act(results)
    no_act = searched if no_act is None else no_act
    every = scores_by_key(lines)
    scores = every if seeds is None else on_seeds(every, seeds)
    arms: dict[str, list[dict]] = {}
    for r in discovery.latest_per_run(results):
        arms.setdefault(r["arm"], []).append(r)
    ref = scores.get(TARGET, {})
    pick = ("its search's best (top 1)" if top == 1 else
            f"the best held out of its top {top} by search score (the re-ranking stage's rule)")
    out = [f"# Held-out verdicts on each run's layer at {horizon:g} CPU s: {pick}", "",
           f"`{command}`", ""]
    if no_act != DEFAULT_NO_ACT or searched != DEFAULT_NO_ACT:
        where = (f"where the searches gave it {searched!r}" if searched != no_act else
                 "as the searches did (`discovery.py --layer-options no_act=...`)")
        out += [f"Held out with `layer_options.no_act = {no_act!r}`: every candidate (the runs' layers and bn_relu's graph) "
                f"gets that in the networks' no-activation slots, {where}; "
                "the known layers keep their own companion (bn_relu: BatchNorm; the EvoNorms: the affine, as in their "
                "reference, so against them the candidates now hold the lead that bn_relu holds over a candidate).", ""]
    out += [
           f"bn_relu held out: {len(ref)} seeds, mean {np.mean(list(ref.values())):.4f}" if ref else
           "bn_relu: not trained yet", ""]
    out += _reference_lines(scores, no_act)
    diverged = diverged_by_key(lines)
    out += _verdict_sections(arms, scores, scores, horizon, top, diverged)
    agreement = search_heldout_agreement(arms, scores, horizon, top)
    if agreement["n"] >= 3 and agreement["spearman"] is not None:
        out += ["", f"How well a run's one-seed search score ranks its layers held out ({agreement['n']} "
                    f"(run, layer) pairs, each run's top {top}, every seed trained): Spearman "
                    f"{agreement['spearman']:+.2f} (p {agreement['spearman_p']:.3g}), Kendall "
                    f"{agreement['kendall_tau']:+.2f}."]
    confirm = on_seeds(every, confirm_seeds)
    picks = confirmation_layers(results, scores, horizon, top)[0]
    if confirm.get(TARGET) and set(picks) & set(confirm):  # the references' fresh seeds alone confirm nothing
        out += ["", f"# Confirmation: each run's pick (chosen above) judged on {len(confirm[TARGET])} fresh seeds "
                    f"({min(confirm[TARGET])}-{max(confirm[TARGET])}) alone", ""]
        out += _reference_lines(confirm, no_act)
        out += _verdict_sections(arms, scores, confirm, horizon, top, diverged)
        out += _best_reached(arms, every, horizon, top)
    if searches_lines is not None and no_act != searched:
        out += _slot_lines(arms, scores, every, scores_by_key(searches_lines), horizon, top, no_act, searched)
    cpu = [r["cpu_s"] for r in lines]
    if cpu:
        out += ["", f"{len(lines)} trainings, median {np.median(cpu):.1f} CPU s each, {sum(cpu):.0f} CPU s in all."]
    return "\n".join(out) + "\n"


def _best_reached(arms: dict[str, list[dict]], every: dict[str, dict[int, float]], horizon: float,
                  top: int, rows: int = 5) -> list[str]:
    """The best any run reached: its layers trained on every seed bn_relu has (selection and
    fresh, so confirmed picks), by their difference to bn_relu, beside evonorm_b0 (the paper's own
    answer) on the same seeds. Picking the top rows among many flatters them; the arms and
    seeds are named so the figure can be read as what it is."""
    ref = every.get(TARGET, {})
    found: dict[str, tuple[str, set[str]]] = {}
    for arm, runs in arms.items():
        for r in runs:
            for lay in run_layers(r, horizon, top):
                if lay["key"] in every and set(ref) <= set(every[lay["key"]]):
                    found.setdefault(lay["key"], (lay["formula"], set()))[1].add(f"{arm} s{r['seed']}")
    if not ref or not found:
        return []
    judged = sorted(((judge(every[key], ref), key) for key in found), key=lambda t: -t[0]["diff"])
    out = ["", f"# The best reached: the {len(found)} layers trained on all {len(ref)} seeds (selection and fresh), "
               f"the top {min(rows, len(judged))} by difference to bn_relu (the best of {len(found)}: flattered by the choice)", ""]
    if "evonorm_b0" in every:
        out.append(f"evonorm_b0 against bn_relu on these seeds: {difference(judge(every['evonorm_b0'], ref))}")
    if bn_relu_graph_key() in every:
        out.append(f"bn_relu's graph as a candidate against bn_relu on these seeds: "
                   f"{difference(judge(every[bn_relu_graph_key()], ref))}")
    out += ["", "| layer | found by | - bn_relu [95%] | - evonorm_b0 [95%] |", "|---|---|---|---|"]
    for v, key in judged[:rows]:
        formula, by = found[key]
        b0 = difference(judge(every[key], every["evonorm_b0"])) if "evonorm_b0" in every else ""
        out.append(f"| `{formula[:70]}` | {', '.join(sorted(by))} | {difference(v)} | {b0} |")
    return out


def _slot_lines(arms: dict[str, list[dict]], scores: dict[str, dict[int, float]], every: dict[str, dict[int, float]],
                searches: dict[str, dict[int, float]], horizon: float, top: int, no_act: str,
                searched: str = DEFAULT_NO_ACT) -> list[str]:
    """How much of each pick's difference to bn_relu is where it sits: the pick trained with
    `no_act` in the no-activation slots minus the same layer with the searches' `searched` there,
    paired over every seed both modes have (the same task and seeds otherwise)."""
    rows = [("reference", "-", "bn_relu's graph", bn_relu_graph_key())]
    for arm, runs in arms.items():
        for r in sorted(runs, key=lambda r: r["seed"]):
            pick = run_pick(run_layers(r, horizon, top), scores, top)
            if pick is not None:
                rows.append((arm, str(r["seed"]), f"`{pick['formula'][:70]}`", pick["key"]))
    out = ["", f"# Where it sits: each pick with no_act {no_act!r} in the no-activation slots minus the same layer "
               f"with {searched!r} there (the searches' mode), paired over the seeds both modes have", "",
           "| arm | seed | layer | difference [95%] | seeds |", "|---|---|---|---|---|"]
    for arm, seed, label, key in rows:
        if key in every and key in searches:
            v = judge(every[key], searches[key])
            out.append(f"| {arm} | {seed} | {label} | {difference(v)} | {v['seeds']} |")
        else:
            out.append(f"| {arm} | {seed} | {label} | not trained in both modes | |")
    return out


def _reference_lines(scores: dict[str, dict[int, float]], no_act: str = DEFAULT_NO_ACT) -> list[str]:
    out = []
    ref = scores.get(TARGET, {})
    for name in discovery.REFERENCES[1:]:
        if name in scores and ref:
            v = judge(scores[name], ref)
            out.append(f"{name} against bn_relu: {difference(v)}"
                       + (f", p {v['p']:.3g}" if v["p"] is not None else "") + f", {v['seeds']} seeds")
    graph_key = bn_relu_graph_key()
    if graph_key in scores and ref:
        v = judge(scores[graph_key], ref)
        slots = "the affine alone" if no_act == DEFAULT_NO_ACT else f"no_act {no_act!r}"
        out.append(f"bn_relu's graph trained as a candidate ({slots} in the no-activation slots) "
                   f"against bn_relu: {difference(v)}" + (f", p {v['p']:.3g}" if v["p"] is not None else "")
                   + f", {v['seeds']} seeds")
    return out


def _verdict_sections(arms: dict[str, list[dict]], pick_scores: dict[str, dict[int, float]],
                      judge_scores: dict[str, dict[int, float]], horizon: float, top: int,
                      diverged: dict[str, set[int]] | None = None) -> list[str]:
    """Per arm its runs' table and counts against each comparator; then the arms compared."""
    import numpy as np

    out: list[str] = []
    graph_key = bn_relu_graph_key()

    def table(ref):
        return {arm: arm_verdicts(runs, pick_scores, horizon, top, ref=ref, judge_scores=judge_scores,
                                  diverged=diverged)
                for arm, runs in arms.items()}

    rows_by_arm = table(TARGET)
    comparators = [("bn_relu", rows_by_arm)] + [
        (label, table(key)) for label, key in (("bn_relu's graph as a candidate", graph_key),
                                               ("evonorm_b0", "evonorm_b0")) if key in judge_scores]
    for arm, rows in rows_by_arm.items():
        out += ["", f"## {arm}", "",
                "| seed | layer (search score, CPU s" + (", search rank" if top > 1 else "") + ") | held-out - bn_relu [95%] | p (Holm) | seeds (diverged) | level | within 0.01 |",
                "|---|---|---|---|---|---|---|"]
        for row in rows:
            layer, v = row["layer"], row.get("vs")
            what = (f"`{layer['formula'][:70]}` ({layer['score']:.4f}, {layer['cpu_total']:.0f}"
                    + (f", #{layer['rank']} of {row['of']}" if top > 1 else "") + ")"
                    if layer else "none trained")
            seeds = f"{v['seeds']} ({row['diverged']} diverged)" if v and row.get("diverged") else (f"{v['seeds']}" if v else "")
            if v and v["p"] is not None:
                verdict = f"{difference(v)} | {v['p']:.3g} ({v['p_holm']:.3g}) | {seeds}"
            elif v and v["diff"] is not None:
                verdict = f"{difference(v)} | | {seeds}"
            else:
                verdict = "not trained yet | | "
            out.append(f"| {row['seed']} | {what} | {verdict} | {'yes' if row['level'] else 'no'} "
                       f"| {'yes' if row['within_margin'] else 'no'} |")
        out.append("")
        for label, verdicts in comparators:
            these = verdicts[arm]
            judged = [r for r in these if r.get("vs")]
            if judged:
                unstable = sum(r["level"] and not r["level_stable"] for r in these)
                untrained = len(these) - len(judged)
                out.append(f"{arm} against {label}: level {sum(r['level'] for r in these)}/{len(these)}"
                           + (f" ({unstable} of them with a training that diverged)" if unstable else "") + ", "
                           f"within {MARGIN} (95% lower end above -{MARGIN}) {sum(r['within_margin'] for r in these)}/"
                           f"{len(these)}; median difference {np.median([r['vs']['diff'] for r in judged]):+.4f}"
                           + (f" ({untrained} of {len(these)} picks not trained on these seeds)" if untrained else ""))
            elif these:
                out.append(f"{arm} against {label}: no pick trained on these seeds (0 of {len(these)})")
    names = list(rows_by_arm)
    if len(names) >= 2:
        out += ["", "## Arms against each other (the run as the unit)", ""]
        for label, verdicts in comparators:
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    ra, rb = verdicts[a], verdicts[b]
                    if any(r["layer"] and not r.get("vs") for r in ra + rb):  # a pick lacks these seeds
                        out.append(f"- against {label}, {a} / {b}: not compared (not every pick trained on these seeds)")
                        continue
                    p_mw = compare_diffs(ra, rb)
                    out.append(f"- against {label}, {a} / {b}: level {sum(r['level'] for r in ra)}/{len(ra)} "
                               f"vs {sum(r['level'] for r in rb)}/{len(rb)} (Fisher p "
                               f"{compare_counts(ra, rb, 'level'):.3g}); within 0.01 "
                               f"{sum(r['within_margin'] for r in ra)}/{len(ra)} vs "
                               f"{sum(r['within_margin'] for r in rb)}/{len(rb)} (Fisher p "
                               f"{compare_counts(ra, rb, 'within_margin'):.3g})"
                               + (f"; the differences, Mann-Whitney p {p_mw:.3g}" if p_mw is not None else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    from opsearch.formula_parser import FormulaError

    try:
        return _main(argv)
    except FormulaError as e:  # a result file whose formula does not read back: one line, nothing lost
        print(f"error: a recorded formula: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/discovery_heldout.py " + shlex.join(argv)
    from opsearch.layers import NO_ACT_MODES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", required=True, help="discovery result files, comma-separated "
                   "(the last line of each run counts, as in discovery.py's report)")
    p.add_argument("--arms", default="regularized_evolution,random", help="comma-separated arm labels")
    p.add_argument("--seeds", type=int, default=8, help="held-out seeds per layer (the picks are made on them; a report takes the --seeds its "
                        "training had: further seeds in --out are the confirmation's)")
    p.add_argument("--confirm", type=int, default=0,
                   help="then train each run's pick and the references on this many further seeds, where the "
                        "report judges the picks again on those seeds alone (default 0)")
    p.add_argument("--top", type=int, default=RERANK_DEFAULTS["top_k"],
                   help="layers per run, as the re-ranking stage's top_k (default 5): the run's answer is "
                        "the best of them held out; 1 judges the search's own pick")
    p.add_argument("--horizon", type=float, default=HORIZON, help="CPU seconds of the run (default 1800)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON lines, one per (layer, seed); appended")
    p.add_argument("--lane", default="0/1", help="K/N: train every N-th item from the K-th")
    p.add_argument("--no-act", default=None, choices=NO_ACT_MODES,
                   help="what the candidates get in the networks' no-activation slots held out (default: as in "
                        f"the searches, {DEFAULT_NO_ACT!r} unless the runs record another; 'bn': BatchNorm, as "
                        "bn_relu has there); "
                        "--out must hold lines of that mode only")
    p.add_argument("--searches-out", default=None,
                   help="with --no-act other than the searches' and --report: a held-out file of the searches' mode "
                        "(the same task and seeds); the report adds each pick's difference between the modes")
    p.add_argument("--report", action="store_true", help="only print the tables")
    args = p.parse_args(argv)
    arms = set(args.arms.split(","))
    results = [r for path in args.results.split(",") for r in discovery.read_results(path)
               if r["arm"] in arms]
    if not results:
        print(f"error: no run of the arms {sorted(arms)} in {args.results}", file=sys.stderr)
        return 2
    from opsearch.rerank import stage_seeds

    try:
        searched = searched_no_act(results)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.no_act = args.no_act or searched
    task = heldout_task(args.no_act)[0]
    seeds = stage_seeds(task, args.seeds)
    lines = read_lines(args.out)
    other = sorted(modes_of(lines) - {args.no_act})
    if other:
        print(f"error: --out {args.out} holds lines trained with no_act {other[0]!r}, not {args.no_act!r}: "
              "give each mode its own file", file=sys.stderr)
        return 2
    if args.report:
        further = sorted({r["seed"] for r in lines} - set(seeds))  # a confirmation's seeds, if trained
        searches_lines = None
        if args.searches_out:
            searches_lines = read_lines(args.searches_out)
            if modes_of(searches_lines) - {searched}:
                print(f"error: --searches-out {args.searches_out} holds lines of another mode than the searches' "
                      f"{searched!r}", file=sys.stderr)
                return 2
        sys.stdout.write(report(results, lines, args.horizon, args.top, command, seeds, further, args.no_act,
                                searches_lines))
        return 0
    layers: dict[str, str] = {bn_relu_graph_key(): bn_relu_graph()}
    for r in discovery.latest_per_run(results):
        for layer in run_layers(r, args.horizon, args.top):
            layers.setdefault(layer["key"], layer["formula"])
    if args.out.endswith(".gz"):
        print(f"error: --out {args.out}: trainings append to a plain .jsonl (a recorded .gz is for --report)",
              file=sys.stderr)
        return 2
    k, n = (int(v) for v in args.lane.split("/"))
    items = work_items(layers, seeds)
    print(f"{len(layers)} distinct layers + {len(discovery.REFERENCES)} references x {len(seeds)} seeds; "
          f"lane {k}/{n}", flush=True)
    evaluate = heldout_evaluate(args.no_act)
    train(items, args.out, (k, n), evaluate, progress=lambda s: print(s, flush=True))
    if args.confirm > 0:
        picks, waiting = confirmation_layers(results, on_seeds(scores_by_key(read_lines(args.out)), seeds),
                                             args.horizon, args.top)
        picks.setdefault(bn_relu_graph_key(), bn_relu_graph())
        fresh = stage_seeds(task, args.seeds + args.confirm)[args.seeds:]
        print(f"confirmation: {len(picks) - 1} picks + the references x {len(fresh)} fresh seeds"
              + (f"; {waiting} run(s) cannot pick yet (their layers lack selection seeds): rerun to confirm them"
                 if waiting else ""), flush=True)
        train(work_items(picks, fresh), args.out, (k, n), evaluate, progress=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
