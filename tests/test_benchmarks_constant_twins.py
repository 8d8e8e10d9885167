"""benchmarks/constant_twins.py: a trained candidate that only rewrites an earlier trained one's
x-independent parts, and starts as the same function, is counted as its twin; one that uses x
otherwise, or starts as another function, is not."""
from __future__ import annotations

import gzip
import json

import pytest
from benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def twins():
    with benchmark_module("constant_twins") as module:
        yield module


def cand(number, values, formula, verdict="evaluated"):
    return {"number": number, "kind": "candidate", "layer": None, "cpu_total": float(number),
            "verdict": verdict, "values": values, "formula": formula}


def test_the_skeleton_forgets_how_constants_are_written_not_how_x_is_used(twins):
    s = twins.x_skeleton
    assert s("x / std_l(x + v0)") == s("x / std_l(x + rms_i(v0)*mean_g(v0))") == s("x / std_l(v1 + x)")
    assert s("x * sigmoid(v0 * x)") == s("x * sigmoid(x * (v1 + v0))")
    assert s("x + v1*x") != s("x")  # v1 multiplies x: a use of x
    assert s("x / std_l(x + v0)") != s("x / std_l(x)")
    assert s("x / std_l(x + v0)") != s("x / std_b(x + v0)")
    assert s("v0") == s("rms_l(v1)") == twins.CONSTANT


def test_a_run_counts_its_twins_by_skeleton_and_start(twins):
    judge = twins.PairJudge(0)
    log = [cand(1, [0.90, 0.91], "x / std_l(x + v0)"),
           cand(2, None, "sqrt(x)", "rejected:numerics"),
           cand(3, [0.90, 0.91], "x / std_l(x + rms_i(v0)*mean_g(v0))"),  # starts as x / std_l(x + 1): a twin, tied
           cand(4, [0.50, 0.52], "x * sigmoid(v1 * x)"),  # starts as x / 2
           cand(5, [0.95, 0.96], "x * sigmoid(v0 * x)"),  # the same skeleton, but starts as swish: no twin
           cand(6, [0.97, 0.97], "x * sigmoid(x * (v1 + v0))"),  # starts as swish: a twin of 5, and the best
           cand(7, [0.80, 0.80], "x / std_l(x)"),  # another use of x (no v0 inside): no twin of 1
           cand(8, [0.90, 0.91], "x / std_l(x + v0)", "duplicate:1")]  # not trained
    found = twins.run_twins(log, judge)
    assert found["trained"] == 6
    pairs = [(t["later"]["number"], t["earlier"]["number"]) for t in found["twins"]]
    assert pairs == [(3, 1), (6, 5)]
    tied, best = found["twins"]
    assert tied["tie"] and tied["diff"] == pytest.approx(0.0) and not tied["new_best"]
    assert not best["tie"] and best["diff"] == pytest.approx(0.015) and best["new_best"]


def test_the_command_reports_each_run_and_an_arm_total(twins, tmp_path, capsys):
    log = [cand(1, [0.90, 0.91], "x / std_l(x + v0)"), cand(2, [0.90, 0.91], "x / std_l(v1 + x)")]
    results = tmp_path / "r.jsonl.gz"
    with gzip.open(results, "wt") as f:
        f.write(json.dumps({"run": "random-s0", "arm": "random", "seed": 0, "log": log}) + "\n")
    assert twins.main(["--results", str(results), "--twins"]) == 0
    out = capsys.readouterr().out
    assert "| random-s0 | 2 | 1 (50.0%) | 1 | +0.0000 [+0.0000, +0.0000] | 0 |" in out
    assert "- random: 1 of 2 trainings (50.0%) were constant twins; 0 set a new best" in out
    assert "trial 2 `x / std_l(v1 + x)` twins trial 1" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"run": "random-s1", "arm": "random", "seed": 1,
                               "log": [cand(1, [0.5], "x +* ")]}) + "\n")
    assert twins.main(["--results", str(bad)]) == 1  # one line, no traceback
    assert capsys.readouterr().err.startswith("error: ")
