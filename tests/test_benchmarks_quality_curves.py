"""benchmarks/quality_curves.py: recorded candidates replayed through the quality filter's
evaluators, accuracy read at earlier steps, and what a bar there would stop."""
from __future__ import annotations

import json

import pytest
from benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def qc():
    with benchmark_module("quality_curves") as module:
        yield module


def cand(number, verdict, formula):
    return {"number": number, "kind": "candidate", "verdict": verdict, "formula": formula,
            "values": None, "cpu_total": float(number), "layer": None}


def test_the_sample_takes_each_verdict_alone_and_is_seeded(qc):
    runs = [{"run": "a-s0", "log": [cand(1, "rejected:quality", "sqrt(x)"), cand(2, "evaluated", "x / rms_b(x)"),
                                    cand(3, "rejected:numerics", "log(x)"), cand(4, "rejected:quality", "tanh(x)"),
                                    {**cand(5, "evaluated", "bn"), "kind": "baseline"}]},
            {"run": "a-s1", "log": [cand(1, "evaluated", "x / rms_i(x)"), cand(2, "rejected:quality", "|x|")]}]
    picked = qc.sample_candidates(runs, per_verdict=2, seed=0)
    verdicts = [v for v, _, _ in picked]
    assert verdicts.count("rejected:quality") == 2 and verdicts.count("evaluated") == 2
    assert {f for _, _, f in picked} <= {"sqrt(x)", "tanh(x)", "|x|", "x / rms_b(x)", "x / rms_i(x)"}
    assert picked == qc.sample_candidates(runs, per_verdict=2, seed=0)
    assert len(qc.sample_candidates(runs, per_verdict=9, seed=0)) == 5  # all there are


def test_replay_appends_and_resumes(qc, tmp_path):
    out = str(tmp_path / "c.jsonl")
    calls = []

    def curves(formula):
        calls.append(formula)
        return {"resnet": [0.1, 0.3]}

    items = [("evaluated", "a-s0", "x / rms_b(x)"), ("rejected:quality", "a-s0", "sqrt(x)")]
    assert qc.replay(items[:1], out, (50, 100), curves, progress=lambda s: None) == 1
    assert qc.replay(items, out, (50, 100), curves, progress=lambda s: None) == 1  # the first is kept
    assert calls == ["x / rms_b(x)", "sqrt(x)"]
    lines = [json.loads(x) for x in open(out)]
    assert [line["formula"] for line in lines] == ["x / rms_b(x)", "sqrt(x)"]
    assert lines[0]["steps"] == [50, 100] and lines[0]["curves"] == {"resnet": [0.1, 0.3]}


def test_the_report_counts_what_a_bar_would_stop(qc):
    lines = [{"verdict": "evaluated", "steps": [50, 100], "curves": {"resnet": [0.105, 0.9], "mobilenetv2": [0.5, 0.95]}},
             {"verdict": "rejected:quality", "steps": [50, 100], "curves": {"resnet": [0.101, 0.11]}},
             {"verdict": "rejected:quality", "steps": [50, 100], "curves": {"resnet": [0.13, 0.19]}}]
    text = qc.report(lines, bars=(0.11, 0.15))
    assert "3 candidates (1 recorded as evaluated): 2 architecture curves reach 0.2 at step 100, 2 do not" in text
    assert "| 50 | 0.11 | 1 of 2 (50%) | 1 of 2 |" in text  # the late bloomer at 0.105 would be stopped
    assert "| 50 | 0.15 | 2 of 2 (100%) | 1 of 2 |" in text


@pytest.mark.slow
def test_the_filters_own_evaluators_give_the_curves(qc):
    curves = qc.filter_curves((2, 4), min_accuracy=2.0)  # a bar no architecture reaches: stops after the first
    got = curves("x / rms_b(x)")
    assert list(got) == ["resnet"]
    assert len(got["resnet"]) == 2 and all(0.0 <= a <= 1.0 for a in got["resnet"])
    assert qc.filter_curves((2, 4), min_accuracy=0.0)("x / rms_b(x)").keys() == {"resnet", "mobilenetv2", "efficientnet"}
