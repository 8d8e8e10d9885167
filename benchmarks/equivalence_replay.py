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
than S from its initial value when the fingerprint probes where training can take it (since the
fingerprint's crossed output takes live v0 entries across 0 at every seed, the bound alone no
longer merges clips of v0 at 0).

The other side of a change that merges less: each candidate the run called a duplicate of a
trained layer (verdict `duplicate:<trial>`) is checked again in its place in the run; one the rule
as it is no longer merges with any earlier trained layer is a training the change adds
("of them not merged now").

The band rule (rule 4 of plugins/rejection/equivalence.py) needs each earlier layer's
``v0_range``, which studies recorded before it lack: `--retrain` trains such a layer again (the
study's evaluator, seed and layer options) when a later one matches it on the band, and also
checks that the retraining reproduces its recorded scores.

    python benchmarks/equivalence_replay.py /work/benchruns/r6/runs/*.db   # the rule: fidelity 100%
    python benchmarks/equivalence_replay.py --max-entry-step 0.5 /work/benchruns/r6/runs/*.db
    python benchmarks/equivalence_replay.py --retrain /work/benchruns/r6/runs/*.db   # with the band rule
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
from opsearch.rejection import Candidate, EquivalenceCache, FilterContext, Verdict


def trained_layers(url: str) -> tuple[str, SearchConfig, list]:
    """(study name, its stored config, [(number, plain graph, values, stored fp, formula, v0_range)])."""
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
                     t.user_attrs.get("formula") or graph.formula(plain), t.user_attrs.get("v0_range")))
    return names[0], config, rows


def recorded_duplicates(url: str, study_name: str) -> list[tuple[int, tuple, str, int]]:
    """The study's candidates the run's rule called duplicates of a trained layer (verdict
    ``duplicate:<trial>``): [(number, plain graph, formula, same_as)]."""
    study = optuna.load_study(study_name=study_name, storage=url)
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        verdict = t.user_attrs.get("verdict", "")
        if verdict.startswith("duplicate:") and "graph" in t.user_attrs:
            plain = graph.plain_from_dict(json.loads(t.user_attrs["graph"]))
            rows.append((t.number, plain, t.user_attrs.get("formula") or graph.formula(plain),
                         int(verdict.split(":", 1)[1])))
    return rows


def replay(url: str, retrain: bool = False) -> dict:
    name, config, rows = trained_layers(url)
    seed = config.seed
    context = FilterContext(eval_config=make_eval_config(config), seed=seed, equivalence=EquivalenceCache(),
                            evaluator_plugin=config.evaluator_plugin)
    flt = EquivalenceFilter()
    options = context.layer_options()
    merged, reproduced, compared = [], 0, 0
    by_number = {}
    ranges: dict[int, list | None] = {}  # trial -> v0_range (recorded, or from a retraining)
    band_rows: list[tuple[int, list]] = []  # earlier trained layers' band fingerprints, one per band
    retrained: list[dict] = []
    duplicates = {row[0]: row for row in recorded_duplicates(url, name)}
    kept_apart = []  # recorded duplicates the rule as it is would train
    trained_rows = {row[0]: row for row in rows}
    for number in sorted({*trained_rows, *duplicates}):
        if number in duplicates:
            _, plain, formula, same_as = duplicates[number]
            values = stored = v0_range = None
        else:
            _, plain, values, stored, formula, v0_range = trained_rows[number]
        candidate = Candidate(plain, layer_options=options)
        verdict = flt.check(candidate, context)
        if verdict.passed and candidate.equiv_fp_bands:
            for earlier, bands in band_rows:  # the band rule, with ranges found lazily
                equal_on = [i for i, (band, mine) in enumerate(zip(bands, candidate.equiv_fp_bands))
                            if band.shape == mine.shape
                            and np.abs(band - mine).max() <= context.equivalence.atol]
                if not equal_on:
                    continue
                if ranges.get(earlier) is None and retrain:
                    ranges[earlier], check = _retrain(context, rows, earlier)
                    retrained.append(check)
                if any(context.equivalence.kept_in_band(ranges.get(earlier), i) for i in equal_on):
                    verdict = Verdict(False, flt.name, "band", duplicate_of=earlier)
                    break
        if number in duplicates:  # not trained in the run: it enters nothing either way
            if verdict.duplicate_of is None:
                kept_apart.append({"trial": number, "formula": formula, "same_as": same_as,
                                   "same_as_formula": by_number.get(same_as, (None, "?"))[1]})
            continue
        if candidate.equiv_fp is not None and stored is not None and stored.shape == candidate.equiv_fp.shape:
            compared += 1
            reproduced += bool(np.abs(stored - candidate.equiv_fp).max() <= 1e-5)
        if verdict.duplicate_of is not None:
            earlier = by_number[verdict.duplicate_of]
            merged.append({"trial": number, "formula": formula, "same_as": verdict.duplicate_of,
                           "same_as_formula": earlier[1], "scores_equal": values == earlier[0],
                           "how": ("on the v0 band" if verdict.reason == "band" else
                                   "as eps -> 0" if "eps -> 0" in verdict.reason else "exact")})
            continue  # a duplicate enters nothing, as in a run
        by_number[number] = (values, formula)
        ranges[number] = v0_range
        if candidate.equiv_fp_bands:
            band_rows.append((number, candidate.equiv_fp_bands))
        context.equivalence.record(candidate, number, "evaluated", values)
    repeats = _repeats([row[2] for row in rows])
    return {"study": name, "url": url, "seed": seed, "trained": len(rows), "recorded_repeats": repeats,
            "merged": merged, "fidelity": (reproduced, compared), "retrained": retrained,
            "duplicates": len(duplicates), "kept_apart": kept_apart}


def _retrain(context: FilterContext, rows: list, number: int) -> tuple[list | None, dict]:
    """Train a recorded layer again: its v0_range, and whether the scores came out as recorded."""
    plain, values, formula = next((r[1], r[2], r[4]) for r in rows if r[0] == number)
    result = context.get_evaluator().evaluate(plain)
    attrs = result.trial_attrs()
    again = tuple(float(result.accuracies[a]) for a in result.accuracies)
    return attrs.get("v0_range"), {"trial": number, "formula": formula, "v0_range": attrs.get("v0_range"),
                                   "scores_reproduced": again == tuple(values)}


def _repeats(values: list[tuple]) -> int:
    seen, count = set(), 0
    for v in values:
        count += v in seen
        seen.add(v)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("studies", nargs="+", help="SQLite files or storage URLs of search studies")
    parser.add_argument("--retrain", action="store_true",
                        help="train an earlier layer again when a later one matches it on the v0 band "
                             "and its study has no v0_range (recorded before the band rule)")
    parser.add_argument("--max-entry-step", type=float, default=None,
                        help="replay with each entry of a trainable vector moving at most this far "
                             "(default: the rule as it is)")
    args = parser.parse_args(argv)
    _reach.MAX_ENTRY_STEP = args.max_entry_step
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    totals = {"trained": 0, "repeats": 0, "saved": 0, "separated": 0, "duplicates": 0, "kept_apart": 0}
    print("| study | seed | trained | recorded repeats | merged now: scores equal (repeats saved) "
          "| merged now: scores differ (must be 0) | recorded duplicates | of them not merged now "
          "(trainings added) | stored fingerprints reproduced |")
    print("|---|---|---|---|---|---|---|---|---|")
    details, retrained_all, apart_all = [], [], []
    for path in args.studies:
        url = path if "://" in path else "sqlite:///" + os.path.abspath(path)
        r = replay(url, retrain=args.retrain)
        saved = sum(m["scores_equal"] for m in r["merged"])
        separated = len(r["merged"]) - saved
        totals["trained"] += r["trained"]
        totals["repeats"] += r["recorded_repeats"]
        totals["saved"] += saved
        totals["separated"] += separated
        totals["duplicates"] += r["duplicates"]
        totals["kept_apart"] += len(r["kept_apart"])
        print(f"| {r['study']} | {r['seed']} | {r['trained']} | {r['recorded_repeats']} | {saved} | {separated} | "
              f"{r['duplicates']} | {len(r['kept_apart'])} | {r['fidelity'][0]}/{r['fidelity'][1]} |")
        details += [(r["study"], m) for m in r["merged"]]
        apart_all += [(r["study"], k) for k in r["kept_apart"]]
        retrained_all += [(r["study"], c) for c in r["retrained"]]
    print(f"| all | | {totals['trained']} | {totals['repeats']} | {totals['saved']} | {totals['separated']} | "
          f"{totals['duplicates']} | {totals['kept_apart']} | |")
    for study, c in retrained_all:
        print(f"- retrained {study} trial {c['trial']} `{c['formula']}`: v0_range {c['v0_range']}, "
              f"recorded scores {'reproduced' if c['scores_reproduced'] else 'NOT reproduced'}")
    for study, m in details:
        print(f"- {study} trial {m['trial']} `{m['formula']}` = trial {m['same_as']} `{m['same_as_formula']}`: "
              f"scores {'equal' if m['scores_equal'] else 'DIFFER'} (merged {m['how']})")
    for study, k in apart_all:
        print(f"- {study} trial {k['trial']} `{k['formula']}`: recorded as trial {k['same_as']}'s duplicate "
              f"(`{k['same_as_formula']}`), not merged now")
    return 1 if totals["separated"] else 0


if __name__ == "__main__":
    sys.exit(main())
