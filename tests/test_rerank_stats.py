"""Statistics and selection of the re-ranking stage on hand-made trials (no training)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from optuna.trial import TrialState
from scipy import stats

from opsearch import report, rerank, rerank_stats

ARCHS = ["a", "b", "c"]


def trial(number, kind="candidate", verdict="evaluated", accs=None, state=TrialState.COMPLETE, **attrs):
    user = {"kind": kind, "verdict": verdict, **attrs}
    if accs is not None:
        user.update({f"acc/{a}": v for a, v in zip(ARCHS, accs)})
    return SimpleNamespace(number=number, state=state, values=list(accs) if accs else None,
                           user_attrs=user, datetime_complete=None)


def item(number, of_trial, seed, accs, stage="s", state=TrialState.COMPLETE, verdict="evaluated"):
    return trial(number, kind="rerank", verdict=verdict, accs=accs, state=state, stage=stage,
                 seed=seed, of_trial=of_trial)


def search_trials():
    return [
        trial(0, "baseline", accs=[0.99, 0.98, 0.99], layer="bn_relu", formula="bn"),
        trial(1, "baseline", accs=[0.40, 0.10, 0.10], layer="identity", formula="x"),
        trial(2, accs=[0.97, 0.96, 0.95], formula="f2", hash="h2"),
        trial(3, accs=[0.90, 0.90, 0.90], formula="f3", hash="h3"),
        trial(4, verdict="duplicate:2", accs=[0.97, 0.96, 0.95], formula="f2 again", hash="h4"),
        trial(5, verdict="rejected:quality", state=TrialState.PRUNED, formula="f5"),
        trial(6, accs=[0.98, 0.98, 0.98], formula="f6", hash="h6"),
    ]


def test_mean_interval_is_students_t():
    v = [0.9, 0.92, 0.95]
    got = rerank_stats.mean_interval(v)
    low, high = stats.t.interval(0.95, 2, loc=sum(v) / 3, scale=stats.sem(v))
    assert got["n"] == 3 and math.isclose(got["low"], low) and math.isclose(got["high"], high)
    assert rerank_stats.mean_interval([0.5])["low"] is None
    assert rerank_stats.mean_interval([0.5, 0.5]) == {"n": 2, "mean": 0.5, "low": 0.5, "high": 0.5}


def test_paired_test_words():
    bn = [0.99, 0.98, 0.99, 0.985, 0.975, 0.99, 0.98, 0.99, 0.97]
    ident = [0.40, 0.10, 0.10, 0.35, 0.12, 0.10, 0.38, 0.11, 0.10]
    worse = rerank_stats.paired_test(ident, bn)
    assert worse["word"] == "worse" and worse["p"] < 0.05 and worse["diff"] < 0
    assert math.isclose(worse["p"], stats.ttest_rel(ident, bn).pvalue)
    assert rerank_stats.paired_test(bn, ident)["word"] == "better"
    same = rerank_stats.paired_test(bn, list(bn))
    assert same["word"] == "not distinguishable" and same["p"] == 1.0
    noisy = rerank_stats.paired_test(bn, [b + (0.01 if i % 2 else -0.01) for i, b in enumerate(bn)])
    assert noisy["word"] == "not distinguishable" and noisy["p"] > 0.05
    shifted = rerank_stats.paired_test([b + 0.01 for b in bn], bn)
    assert shifted["p"] == 0.0 and shifted["word"] == "better"
    assert rerank_stats.paired_test([0.5], [0.4])["p"] is None


def test_rank_agreement_matches_scipy():
    s, h = [0.9, 0.8, 0.7, 0.6], [0.85, 0.86, 0.6, 0.5]
    got = rerank_stats.rank_agreement(s, h)
    assert math.isclose(got["kendall_tau"], stats.kendalltau(s, h).statistic)
    assert math.isclose(got["spearman"], stats.spearmanr(s, h).statistic)
    assert rerank_stats.rank_agreement([1, 2], [2, 1])["spearman"] is None
    assert rerank_stats.ranks([0.5, 0.9, 0.5]) == [2, 1, 2]


def test_selection_dedupes_functions_and_adds_baselines():
    chosen = rerank.select(search_trials(), ARCHS, top_k=2)
    assert [(c.of_trial, c.kind) for c in chosen] == [(6, "candidate"), (2, "candidate"),
                                                      (0, "baseline"), (1, "baseline")]
    top3 = rerank.select(search_trials(), ARCHS, top_k=3, baselines=["bn_relu"])
    # trial 4 duplicates trial 2: one entry, the original
    assert [c.of_trial for c in top3] == [6, 2, 3, 0]
    assert top3[1].attrs == {"formula": "f2", "hash": "h2"}
    assert "layer" in top3[-1].attrs and "layer" not in top3[0].attrs


def stage_trials(identity_accs, copy_of_bn=True):
    trials = search_trials()
    n = 100
    bn = {0: [0.99, 0.98, 0.99], 1: [0.985, 0.975, 0.99], 2: [0.98, 0.99, 0.97]}
    for seed in range(3):
        trials.append(item(n, 0, seed, bn[seed])); n += 1
        trials.append(item(n, 1, seed, identity_accs[seed])); n += 1
        trials.append(item(n, 6, seed, [0.97, 0.975, 0.98 - 0.005 * seed])); n += 1
        trials.append(item(n, 2, seed, [0.95, 0.96 + 0.01 * seed, 0.94])); n += 1
    if copy_of_bn:  # a second baseline trained identically: a copy of bn_relu
        trials.append(trial(7, "baseline", accs=[0.99, 0.98, 0.99], layer="bn_relu_copy"))
        for seed in range(3):
            trials.append(item(n, 7, seed, bn[seed])); n += 1
    return trials


def test_stage_summary_tests_ranks_and_best():
    identity = {0: [0.40, 0.10, 0.10], 1: [0.35, 0.12, 0.10], 2: [0.38, 0.11, 0.10]}
    trials = stage_trials(identity)
    attrs = {"archs": ARCHS, "rerank:s": json.dumps({"dataset": "digits", "steps": 300})}
    out = rerank_stats.summarize(trials, ARCHS, attrs)
    assert out["stage"] == "s" and out["complete"] and out["task"]["steps"] == 300
    by_trial = {layer["of_trial"]: layer for layer in out["layers"]}
    assert by_trial[1]["vs"]["bn_relu"]["word"] == "worse" and by_trial[1]["vs"]["bn_relu"]["p"] < 0.05
    assert by_trial[7]["vs"]["bn_relu"]["word"] == "not distinguishable"
    assert by_trial[7]["vs"]["bn_relu"]["p"] == 1.0
    assert by_trial[0]["overall"]["n"] == 3 and by_trial[0]["per_arch"]["a"]["n"] == 3
    # bn_relu and its copy tie first at the search (ties share the better rank)
    assert by_trial[0]["search_rank"] == by_trial[7]["search_rank"] == 1 and by_trial[6]["search_rank"] == 3
    assert out["best_trial"] == 6  # the best candidate held out
    assert out["agreement"]["n"] == 5 and out["agreement"]["spearman"] is not None
    # the search's report never sees the items
    s = report.summary(trials, attrs)
    assert s["candidates"] == 5 and {r["trial"] for r in s["leaderboard"]} == {0, 1, 2, 3, 6, 7}
    assert s["rerank"]["stage"] == "s"


def test_duplicated_item_first_finished_wins_and_pending_failed_counted():
    from datetime import datetime, timedelta

    trials = search_trials()
    t0 = datetime(2026, 1, 1)
    first = item(100, 0, 0, [0.9, 0.9, 0.9]); first.datetime_complete = t0 + timedelta(seconds=5)
    second = item(101, 0, 0, [0.1, 0.1, 0.1]); second.datetime_complete = t0 + timedelta(seconds=1)
    trials += [first, second, item(102, 0, 1, None, state=TrialState.RUNNING),
               item(103, 0, 2, None, state=TrialState.FAIL, verdict="failed:RuntimeError"),
               item(104, 0, 2, None, state=TrialState.FAIL, verdict="failed:worker_lost")]
    out = rerank_stats.summarize(trials, ARCHS, {})
    layer = out["layers"][0]
    assert layer["overall"]["mean"] == pytest.approx(0.1)  # trial 101 finished first
    assert out["duplicates_ignored"] == 1 and out["pending"] == 1 and out["failed"] == 1
    assert not out["complete"]


def test_no_rerank_is_none():
    assert rerank_stats.summarize(search_trials(), ARCHS, {}) is None
    assert report.summary(search_trials(), {"archs": ARCHS})["rerank"] is None


def test_plots_add_rerank_png_only_with_a_stage(tmp_path):
    import os

    from opsearch.commands.plot import write_plots

    identity = {0: [0.40, 0.10, 0.10], 1: [0.35, 0.12, 0.10], 2: [0.38, 0.11, 0.10]}
    with_stage = write_plots(stage_trials(identity), {"archs": ARCHS}, str(tmp_path / "a"))
    assert [os.path.basename(p) for p in with_stage][-1] == "rerank.png"
    assert os.path.getsize(with_stage[-1]) > 0
    without = write_plots(search_trials(), {"archs": ARCHS}, str(tmp_path / "b"))
    assert "rerank.png" not in [os.path.basename(p) for p in without]


def test_export_defaults_to_the_reranked_best(capsys):
    from opsearch.commands.export import select_trial

    identity = {0: [0.40, 0.10, 0.10], 1: [0.35, 0.12, 0.10], 2: [0.38, 0.11, 0.10]}
    trials = stage_trials(identity)
    # trial 6 was the search's best candidate (0.98); on the held-out task it stays ahead of 2
    assert select_trial(trials, ARCHS, None).number == 6
    assert "after re-ranking" in capsys.readouterr().err
    # held out, trial 2 wins: export follows the re-ranking, not the search
    for t in trials:
        if t.user_attrs.get("kind") == "rerank" and t.user_attrs["of_trial"] == 2:
            t.values = [0.999, 0.999, 0.999]
    assert select_trial(trials, ARCHS, None).number == 2
    assert "trial 2" in capsys.readouterr().err
    assert select_trial(search_trials(), ARCHS, None).number == 6  # no stage: the search's best


# --------------------------------------------------------------------------------------------
# The unit is the seed; a corrected family; intervals inside [0, 1]; the contest


def by_seed(rows):
    """{seed: accs per architecture} from a list of per-seed rows."""
    return {seed: tuple(row) for seed, row in enumerate(rows)}


def test_seed_test_hand_computed():
    # per-seed differences of the means over the architectures: 0.01, 0.02, 0.03
    base = by_seed([[0.90, 0.90, 0.90], [0.80, 0.85, 0.90], [0.95, 0.95, 0.95]])
    layer = by_seed([[0.93, 0.90, 0.90], [0.80, 0.91, 0.90], [0.98, 0.98, 0.98]])
    got = rerank_stats.seed_test(layer, base)
    # by hand: mean 0.02, sd 0.01, sem 0.01/sqrt(3), t = 2 sqrt(3), df = 3 seeds - 1 = 2;
    # Student's t with 2 df in closed form: two-sided p = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(6/7),
    # the 97.5% quantile = 0.95 sqrt(2 / (1 - 0.95^2)) = 4.3027
    assert got["n"] == 3 and got["df"] == 2
    assert got["diff"] == pytest.approx(0.02)
    assert got["p"] == pytest.approx(1 - math.sqrt(6 / 7))  # 0.0742
    half = 0.95 * math.sqrt(2 / (1 - 0.95 ** 2)) * 0.01 / math.sqrt(3)
    assert got["low"] == pytest.approx(0.02 - half) and got["high"] == pytest.approx(0.02 + half)
    assert got["word"] == "not distinguishable"
    # only the seeds both layers have are paired
    more = {**layer, 3: (0.5, 0.5, 0.5)}
    assert rerank_stats.seed_test(more, base)["n"] == 3


def test_holm_and_bh_hand_computed():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06
    assert rerank_stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Benjamini-Hochberg: 0.005 x 4/1, 0.01 x 4/2, 0.03 x 4/3, 0.04 x 4/4, then the running minimum
    assert rerank_stats.adjust(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert rerank_stats.adjust(p, "none") == p
    assert rerank_stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    tests = [{"p": q, "diff": d, "word": "better" if d > 0 else "worse"}
             for q, d in zip(p, [0.01, 0.02, -0.03, -0.04])]
    tests.append({"p": None, "diff": 0.1, "word": "too few seeds"})  # not in the family
    assert rerank_stats.correct(tests, "holm") == 4
    assert [t["word"] for t in tests[:4]] == ["better", "not distinguishable", "not distinguishable", "worse"]
    assert [t["p_corrected"] for t in tests[:4]] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [t["word_uncorrected"] for t in tests[:4]] == ["better", "better", "worse", "worse"]
    assert tests[4]["p_corrected"] is None and tests[4]["word"] == "too few seeds"


def test_the_unit_matters_architectures_are_blocks():
    # Better on architecture a only, by 0.03 on every seed, equal on b and c: the mean over the
    # architectures is higher on every seed. Pairs over (seed, architecture) count the fixed
    # difference between the architectures as noise (df 8, t <= 2 here): not significant. The
    # seeds see a consistent gain (df 2): better.
    base = by_seed([[0.90, 0.95, 0.97], [0.91, 0.94, 0.97], [0.89, 0.95, 0.96]])
    layer = by_seed([[0.930, 0.951, 0.969], [0.942, 0.939, 0.970], [0.918, 0.950, 0.961]])
    old_x = [v for s in range(3) for v in layer[s]]
    old_y = [v for s in range(3) for v in base[s]]
    assert stats.ttest_rel(old_x, old_y).pvalue > 0.05  # the old df-8 test: not distinguishable
    new = rerank_stats.seed_test(layer, base)
    assert new["df"] == 2 and new["p"] < 0.05 and new["word"] == "better"
    # The other way round: a seed that is good for the layer on every architecture at once (a
    # shared initialisation or batch order) gives 3 correlated pairs, not 3 replicates. The old
    # test takes 9 pairs for 9 replicates and calls the layer better; over the seeds it is not.
    layer = by_seed([[0.92, 0.97, 0.99], [0.91, 0.94, 0.97], [0.90, 0.96, 0.97]])
    old_x = [v for s in range(3) for v in layer[s]]
    assert stats.ttest_rel(old_x, old_y).pvalue < 0.05  # df 8: "better"
    new = rerank_stats.seed_test(layer, base)
    assert new["p"] > 0.05 and new["word"] == "not distinguishable"


def test_intervals_stay_inside_0_1():
    wide = rerank_stats.mean_interval([0.99, 0.62, 0.92])  # a t-interval of [0.46, 1.23]
    assert 0.0 <= wide["low"] < wide["mean"] < wide["high"] == 1.0
    low = rerank_stats.mean_interval([0.01, 0.30, 0.02])
    assert low["low"] == 0.0 and low["high"] <= 1.0
    diff = rerank_stats.paired_test([1.0, 0.1, 1.0], [0.0, 0.9, 0.0])
    assert -1.0 <= diff["low"] and diff["high"] <= 1.0
    # a whole stage: every interval it reports, per architecture and overall
    trials = search_trials()
    n = 100
    for seed, accs in enumerate([[1.0, 0.99, 0.35], [0.72, 1.0, 0.98], [1.0, 0.60, 0.99]]):
        trials.append(item(n, 6, seed, accs)); n += 1
        trials.append(item(n, 0, seed, [0.05, 0.40, 0.0 if seed else 0.3])); n += 1
    out = rerank_stats.summarize(trials, ARCHS, {})
    intervals = ([r["overall"] for r in out["layers"]]
                 + [d for r in out["layers"] for d in r["per_arch"].values()])
    assert any(d["high"] == 1.0 for d in intervals) and any(d["low"] == 0.0 for d in intervals)
    assert all(0.0 <= d["low"] <= d["mean"] <= d["high"] <= 1.0 for d in intervals)
    assert out["intervals"] == "Student t over seeds, clipped to [0, 1]"


def test_stage_json_carries_unit_test_and_corrected_words():
    identity = {0: [0.40, 0.10, 0.10], 1: [0.35, 0.12, 0.10], 2: [0.38, 0.11, 0.10]}
    attrs = {"archs": ARCHS, "config": json.dumps({"seed": 0, "rerank": {"correction": "holm"}})}
    out = rerank_stats.summarize(stage_trials(identity), ARCHS, attrs)
    assert out["unit"] == "seed" and "per-seed means" in out["test"] and "df = seeds - 1" in out["test"]
    assert out["correction"] == "holm"
    by_trial = {layer["of_trial"]: layer for layer in out["layers"]}
    tests = [t for layer in out["layers"] for t in layer["vs"].values()]
    # 2 candidates x 3 baselines + 3 baselines x the 2 others
    assert out["family"] == len(tests) == 2 * 3 + 3 * 2
    worse = by_trial[1]["vs"]["bn_relu"]
    assert worse["n"] == 3 and worse["df"] == 2  # seeds, not (seed, architecture) pairs
    assert worse["p_corrected"] >= worse["p"] and worse["word"] == "worse"
    family = [t for t in tests if t["p"] is not None]
    assert [t["p_corrected"] for t in family] == pytest.approx(rerank_stats.holm([t["p"] for t in family]))
    assert any(t["p_corrected"] > t["p"] for t in family)
    bh_attrs = {"archs": ARCHS, "config": json.dumps({"rerank": {"correction": "bh"}})}
    bh = rerank_stats.summarize(stage_trials(identity), ARCHS, bh_attrs)  # the run's setting
    bh_family = [t for layer in bh["layers"] for t in layer["vs"].values() if t["p"] is not None]
    assert bh["correction"] == "bh" and [t["p_corrected"] for t in bh_family] == pytest.approx(
        rerank_stats.adjust([t["p"] for t in bh_family], "bh"))
    # the same stage uncorrected: at least as many claims
    plain = rerank_stats.summarize(stage_trials(identity), ARCHS, attrs, correction="none")
    claims = lambda s: sum(t["word"] != "not distinguishable"  # noqa: E731
                           for layer in s["layers"] for t in layer["vs"].values())
    assert claims(plain) >= claims(out)
    assert json.loads(json.dumps(out)) == out  # plain JSON


def test_contest_adds_seeds_until_distinguishable_or_a_tie():
    a = by_seed([[0.95, 0.95, 0.95], [0.96, 0.96, 0.96], [0.95, 0.95, 0.95]])
    b = by_seed([[0.96, 0.96, 0.96], [0.94, 0.94, 0.94], [0.94, 0.94, 0.94]])
    c = by_seed([[0.50, 0.50, 0.50]] * 3)
    undecided = rerank_stats.contest({1: a, 2: b, 3: c}, [1, 2, 3], max_seeds=8)
    assert (undecided["best"], undecided["runner_up"]) == (1, 2)
    assert undecided["status"] == "undecided" and undecided["seeds"] == 3 and undecided["want"] == 4
    assert rerank_stats.contest({1: a, 2: b}, [1, 2], max_seeds=3)["status"] == "tie"
    # the runner-up has fewer seeds (it was third before): it catches up first
    more = {**a, 3: (0.95, 0.95, 0.95)}
    assert rerank_stats.contest({1: more, 2: b}, [1, 2], max_seeds=8)["want"] == 4
    decided = rerank_stats.contest({1: a, 3: c}, [1, 3], max_seeds=8)
    assert decided["status"] == "distinguishable" and decided["want"] == 3
    assert rerank_stats.contest({1: a}, [1, 2], max_seeds=8) is None
