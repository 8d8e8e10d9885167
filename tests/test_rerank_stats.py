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
