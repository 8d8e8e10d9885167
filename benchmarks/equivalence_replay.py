"""Replay the equivalence filter as it is now over the trained layers of recorded studies.

Which trained candidates would the current rule have called `duplicate:<earlier trial>`, and did
training agree? A merged pair whose recorded scores are exactly equal is a repeat the rule now
saves (training could not tell them apart); a merged pair whose scores differ is a pair training
*did* separate, which the rule must never merge. So the replay measures both sides of a change to
the equivalence on real runs, without running them again.

Each study's trained layers (baselines and candidates, verdict `evaluated`) are fingerprinted in
trial order with the run's seed and the default layer options, and matched against the earlier
ones, as the filter does during a run. Fidelity: the share of layers whose stored fingerprint
(`equiv_fp`, from the rule the run used) the replay reproduces; a rule change shows as the rest.
`--max-entry-step S` replays a variant of the rule: no entry of a trainable vector moves further
than S from its initial value when the fingerprint probes where training can take it.

    python benchmarks/equivalence_replay.py /work/benchruns/r6/runs/*.db   # the rule: fidelity 100%
    python benchmarks/equivalence_replay.py --max-entry-step 0.5 /work/benchruns/r6/runs/*.db
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import optuna

from opsearch import graph
from opsearch.config import SearchConfig
from opsearch.evaluation import make_eval_config
from opsearch.plugins.rejection import _reach
from opsearch.plugins.rejection.equivalence import EquivalenceFilter
from opsearch.rejection import Candidate, EquivalenceCache, FilterContext


def trained_layers(url: str) -> tuple[str, SearchConfig, list]:
    """(study name, its stored config, [(number, plain graph, values, stored fp, formula)])."""
    names = [s.study_name for s in optuna.get_all_study_summaries(url) if "/" not in s.study_name]
    if len(names) != 1:
        raise SystemExit(f"{url}: expected one search study, found {names}")
    study = optuna.load_study(study_name=names[0], storage=url)
    config = SearchConfig.from_dict(json.loads(study.user_attrs["config"]), source=f"study {names[0]}")
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.user_attrs.get("verdict") != "evaluated" or not t.values or "graph" not in t.user_attrs:
            continue
        plain = graph.plain_from_dict(json.loads(t.user_attrs["graph"]))
        stored = t.user_attrs.get("equiv_fp")
        rows.append((t.number, plain, tuple(t.values), None if stored is None else np.array(json.loads(stored)),
                     t.user_attrs.get("formula") or graph.formula(plain)))
    return names[0], config, rows


def replay(url: str) -> dict:
    name, config, rows = trained_layers(url)
    seed = config.seed
    context = FilterContext(eval_config=make_eval_config(config), seed=seed, equivalence=EquivalenceCache(),
                            evaluator_plugin=config.evaluator_plugin)
    flt = EquivalenceFilter()
    options = context.layer_options()
    merged, reproduced, compared = [], 0, 0
    by_number = {}
    for number, plain, values, stored, formula in rows:
        candidate = Candidate(plain, layer_options=options)
        verdict = flt.check(candidate, context)
        if candidate.equiv_fp is not None and stored is not None and stored.shape == candidate.equiv_fp.shape:
            compared += 1
            reproduced += bool(np.abs(stored - candidate.equiv_fp).max() <= 1e-5)
        if verdict.duplicate_of is not None:
            earlier = by_number[verdict.duplicate_of]
            merged.append({"trial": number, "formula": formula, "same_as": verdict.duplicate_of,
                           "same_as_formula": earlier[1], "scores_equal": values == earlier[0],
                           "how": "as eps -> 0" if "eps -> 0" in verdict.reason else "exact"})
            continue  # a duplicate enters nothing, as in a run
        by_number[number] = (values, formula)
        context.equivalence.record(candidate, number, "evaluated", values)
    repeats = _repeats([values for _, _, values, _, _ in rows])
    return {"study": name, "url": url, "seed": seed, "trained": len(rows), "recorded_repeats": repeats,
            "merged": merged, "fidelity": (reproduced, compared)}


def _repeats(values: list[tuple]) -> int:
    seen, count = set(), 0
    for v in values:
        count += v in seen
        seen.add(v)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("studies", nargs="+", help="SQLite files or storage URLs of search studies")
    parser.add_argument("--max-entry-step", type=float, default=None,
                        help="replay with each entry of a trainable vector moving at most this far "
                             "(default: the rule as it is)")
    args = parser.parse_args(argv)
    _reach.MAX_ENTRY_STEP = args.max_entry_step
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    totals = {"trained": 0, "repeats": 0, "saved": 0, "separated": 0}
    print("| study | seed | trained | recorded repeats | merged now: scores equal (repeats saved) "
          "| merged now: scores differ (must be 0) | stored fingerprints reproduced |")
    print("|---|---|---|---|---|---|---|")
    details = []
    for path in args.studies:
        url = path if "://" in path else "sqlite:///" + os.path.abspath(path)
        r = replay(url)
        saved = sum(m["scores_equal"] for m in r["merged"])
        separated = len(r["merged"]) - saved
        totals["trained"] += r["trained"]
        totals["repeats"] += r["recorded_repeats"]
        totals["saved"] += saved
        totals["separated"] += separated
        print(f"| {r['study']} | {r['seed']} | {r['trained']} | {r['recorded_repeats']} | {saved} | {separated} | "
              f"{r['fidelity'][0]}/{r['fidelity'][1]} |")
        details += [(r["study"], m) for m in r["merged"]]
    print(f"| all | | {totals['trained']} | {totals['repeats']} | {totals['saved']} | {totals['separated']} | |")
    for study, m in details:
        print(f"- {study} trial {m['trial']} `{m['formula']}` = trial {m['same_as']} `{m['same_as_formula']}`: "
              f"scores {'equal' if m['scores_equal'] else 'DIFFER'} (merged {m['how']})")
    return 1 if totals["separated"] else 0


if __name__ == "__main__":
    sys.exit(main())
