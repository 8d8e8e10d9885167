"""benchmarks/repeat_pairs.py: each exact repeat of a run's scores is judged by the equivalence
filter's own tests, so a tie between different layers is told apart from a function trained twice."""
from __future__ import annotations

import gzip
import json

import pytest
from benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def pairs():
    with benchmark_module("repeat_pairs") as module:
        yield module


@pytest.fixture(scope="module")
def judge(pairs):
    return pairs.PairJudge()


def cand(number, values, formula, verdict="evaluated"):
    return {"number": number, "kind": "candidate", "layer": None, "cpu_total": float(number),
            "verdict": verdict, "values": values, "formula": formula}


def test_a_repeat_pairs_with_the_first_trained_candidate_of_its_scores(pairs):
    log = [{"number": 0, "kind": "baseline", "layer": "bn_relu", "verdict": "evaluated", "cpu_total": 1.0,
            "values": [0.5, 0.6], "formula": "bn"},  # a reference is not a candidate
           cand(1, [0.5, 0.6], "tanh(x)"),
           cand(2, None, "sqrt(x)", "rejected:numerics"),
           cand(3, [0.5, 0.6], "x * v0", "duplicate:1"),  # reused, not trained: no repeat
           cand(4, [0.5, 0.6], "sigmoid(x)"),
           cand(5, [0.6, 0.5], "|x|"),  # the same values in another order: not a repeat
           cand(6, [0.5, 0.6], "square(x)")]
    found = [(a["number"], b["number"]) for a, b in pairs.repeat_pairs(log)]
    assert found == [(1, 4), (1, 6)]


@pytest.mark.parametrize("a, b, kind", [
    ("x * tanh(x)", "tanh(x) * x", "same graph"),
    ("square(x)", "x * x", "same function"),
    ("max(x, sqrt(0))", "max(x, 0)", "same function"),  # equal in the eps limit only
    ("sqrt(v0 * x)", "sqrt(x * |v0|)", "same on a v0 band"),  # equal while v0 > 0
    ("tanh(x)", "sigmoid(x)", "different functions"),
    ("x / std_b(x)", "(-x) / rms_b(x + x)", "different functions"),  # a tie seen in round 20
])
def test_a_pair_is_judged_by_the_equivalence_filters_tests_in_their_order(judge, a, b, kind):
    assert judge.kind(a, b) == kind
    assert judge.kind(b, a) == kind


def test_the_report_counts_ties_of_different_layers_apart_from_functions_trained_twice(pairs, tmp_path):
    log = [cand(1, [0.9, 0.8], "square(x)"), cand(2, [0.9, 0.8], "x * x"),  # the same function
           cand(3, [0.7, 0.7], "tanh(x)"), cand(4, [0.7, 0.7], "sigmoid(x)"),  # a tie
           cand(5, [0.1, 0.2], "|x|")]
    results = [{"arm": "random", "seed": 0, "log": log},
               {"arm": "random", "seed": 1, "log": log[:3]}]
    text = pairs.report(results, show_pairs=True)
    row = next(line for line in text.splitlines() if line.startswith("| random"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["random", "2", "8", "3 (37.5%)", "0", "2", "0", "1", "2 (25.0%)", "0"]
    assert "trial 4 `sigmoid(x)` = trial 3 `tanh(x)` [0.7, 0.7]: different functions" in text

    path = tmp_path / "results.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(results[0]) + "\n")
    assert pairs.main(["--results", str(path)]) == 0


def test_a_bad_recorded_formula_is_one_line(pairs, tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"arm": "random", "seed": 0,
                                "log": [cand(1, [0.5], "tanh(x)"), cand(2, [0.5], "foo(x)")]}) + "\n")
    assert pairs.main(["--results", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: FormulaError") and "unknown op 'foo'" in err and "\n" not in err
    assert pairs.main(["--results", str(tmp_path / "missing.jsonl")]) == 2


@pytest.mark.parametrize("a, b, at_start", [
    ("std_l(x + (v0 + x))", "std_l(x + (v1 + x))", True),  # v0 = 1, v1 = 0: one shift over the channels
    ("x + v1 * x", "x", True),  # v1 starts at 0; its gradient does not
    ("tanh(x)", "sigmoid(x)", False),
    ("x / std_b(x)", "(-x) / rms_b(x + x)", False),
])
def test_different_functions_that_are_one_at_the_start_are_told_apart(pairs, judge, a, b, at_start):
    """Pairs training can tell apart (the filter keeps them) split by whether they start as one
    function; the report counts those in its last column."""
    assert judge.kind(a, b) == "different functions"
    assert judge.same_at_start(a, b) is at_start and judge.same_at_start(b, a) is at_start
    log = [cand(1, [0.9, 0.8], a), cand(2, [0.9, 0.8], b)]
    text = pairs.report([{"arm": "a", "seed": 0, "log": log}], show_pairs=True)
    row = next(line for line in text.splitlines() if line.startswith("| a "))
    assert row.strip("|").split("|")[-1].strip() == ("1" if at_start else "0")
    assert ("one function at the start" in text) is at_start


def test_each_run_is_judged_with_the_probes_its_own_filter_drew(pairs, monkeypatch):
    """The filter's probes are drawn from the run's seed, so a pair at the edge of a tolerance
    can be one function to seed 0's probes and two to the run's (`x / rms_b(v0)` and `x / v0` in
    round 25's seed-3 runs, which that run's filter rightly kept apart). The tool judged every
    run with seed 0's probes and called such pairs misses; it now uses the run's seed, one judge
    per seed, unless told otherwise."""
    built = []

    class Judge(pairs.PairJudge):
        def __init__(self, seed=0):
            built.append(seed)
            super().__init__(seed)

        def kind(self, a, b):
            return "same function" if self.seed == 0 else "different functions"

    monkeypatch.setattr(pairs, "PairJudge", Judge)
    log = [cand(51, [0.9895, 0.9512, 0.9512], "x / v0"), cand(387, [0.9895, 0.9512, 0.9512], "x / rms_b(v0)")]
    runs = [{"arm": "regularized_evolution", "seed": s, "log": log} for s in (3, 0, 4)]

    def same_function_cell(text):
        row = next(line for line in text.splitlines() if line.startswith("| regularized_evolution"))
        return [c.strip() for c in row.strip("|").split("|")][5]

    assert same_function_cell(pairs.report(runs, show_pairs=False)) == "1"  # the seed-0 run only
    assert sorted(built) == [0, 3, 4]
    built.clear()
    assert same_function_cell(pairs.report(runs, show_pairs=False, probe_seed=0)) == "3"
    assert built == [0]
