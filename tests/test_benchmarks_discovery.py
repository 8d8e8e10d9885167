"""benchmarks/discovery.py: the figures of a run from its trial log, the report, and one tiny arm
end to end (search, re-ranking, result line, resume, report)."""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
from benchmark_modules import BENCHMARKS, benchmark_module

SCRIPT = BENCHMARKS / "discovery.py"


@pytest.fixture(scope="module")
def discovery():
    with benchmark_module("discovery") as module:
        yield module


def entry(number, kind, verdict, cpu, values=None, layer=None, formula="f"):
    return {"number": number, "kind": kind, "layer": layer, "verdict": verdict, "cpu_total": cpu,
            "values": values, "score": sum(values) / len(values) if values else None, "formula": formula}


def log_of(scores_at: list[tuple[float, float | None]], bn_relu: float | None = 0.90) -> list[dict]:
    """Baselines, then candidates (cpu, score or None = rejected), each score on 2 archs."""
    log = [entry(0, "baseline", "evaluated", 2.0, [0.70, 0.70], layer="evonorm_b0")]
    if bn_relu is not None:
        log.append(entry(1, "baseline", "evaluated", 3.0, [bn_relu, bn_relu], layer="bn_relu"))
    for i, (cpu, score) in enumerate(scores_at, start=2):
        if score is None:
            log.append(entry(i, "candidate", "rejected:numerics", cpu))
        else:
            log.append(entry(i, "candidate", "evaluated", cpu, [score, score], formula=f"c{i}"))
    return log


def test_time_to_target_is_the_first_candidate_within_the_margin_of_bn_relu(discovery):
    log = log_of([(5.0, None), (10.0, 0.85), (20.0, 0.895), (30.0, 0.95)])
    m = discovery.run_metrics(log, cpu_cap=100.0)
    assert m["cpu_to_first_trained"] == 10.0
    assert m["cpu_to_target"] == 20.0  # 0.895 is within 0.01 of bn_relu's 0.90; 0.85 is not
    assert m["target_hit"]["formula"] == "c4"
    assert m["best"]["score"] == pytest.approx(0.95)
    assert (m["proposed"], m["trained"], m["rejected"]) == (4, 3, 1)
    # a candidate exactly at the margin counts; one just below does not
    assert discovery.run_metrics(log_of([(7.0, 0.89)]), 100.0)["cpu_to_target"] == 7.0
    assert discovery.run_metrics(log_of([(7.0, 0.8899)]), 100.0)["cpu_to_target"] is None
    # the target is bn_relu's score in the same run, not another baseline's (evonorm_b0: 0.70)
    assert discovery.run_metrics(log_of([(7.0, 0.75)]), 100.0)["cpu_to_target"] is None
    # reached after the cap: censored; no bn_relu score: no target
    assert discovery.run_metrics(log, cpu_cap=15.0)["cpu_to_target"] is None
    assert discovery.run_metrics(log, cpu_cap=15.0)["cpu_to_first_trained"] == 10.0
    assert discovery.run_metrics(log_of([(20.0, 0.95)], bn_relu=None), 100.0)["cpu_to_target"] is None


def test_a_run_stopped_at_the_target_ends_on_the_trial_that_gives_a_full_runs_time_to_target(discovery):
    full = log_of([(5.0, None), (10.0, 0.85), (20.0, 0.895), (30.0, 0.95), (40.0, 0.97)])
    rule = discovery.StopRule(cpu_cap=100.0, at_target=True)
    stopped = []
    for e in full:
        stopped.append(e)
        if rule.stop(e["kind"], e["layer"], e["values"], e["cpu_total"]):
            break
    assert [e["number"] for e in stopped] == [0, 1, 2, 3, 4]  # ends on the first candidate at the target
    assert discovery.run_metrics(stopped, 100.0)["cpu_to_target"] == discovery.run_metrics(full, 100.0)["cpu_to_target"]
    # a baseline above the level does not stop it (evonorm_b0 before bn_relu; bn_relu itself)
    rule = discovery.StopRule(cpu_cap=100.0, at_target=True)
    assert not rule.stop("baseline", "evonorm_b0", [0.99], 1.0)
    assert not rule.stop("baseline", "bn_relu", [0.90], 2.0)
    assert not rule.stop("candidate", None, [0.8899], 3.0) and rule.stop("candidate", None, [0.89], 4.0)
    # without the flag only the cap stops a run
    rule = discovery.StopRule(cpu_cap=50.0)
    assert not any(rule.stop(e["kind"], e["layer"], e["values"], e["cpu_total"]) for e in full)
    assert rule.stop("candidate", None, None, 50.0)


def test_repeats_count_trained_candidates_with_an_earlier_trained_candidates_values(discovery):
    log = log_of([(1.0, 0.5), (2.0, 0.6), (3.0, 0.5), (4.0, 0.5), (5.0, None)])
    log.append(entry(9, "candidate", "duplicate:2", 6.0, [0.5, 0.5]))  # not trained: not counted
    m = discovery.run_metrics(log, 100.0)
    assert (m["trained"], m["repeats"], m["duplicates"]) == (4, 2, 1)
    assert m["repeat_share"] == pytest.approx(0.5)


def test_repeats_expected_by_chance_come_from_the_columns_alone(discovery):
    """Shuffling each architecture's scores on its own: columns with one value each make every
    later layer a repeat; columns of distinct values make none; a run's real repeats do not
    count unless the columns make them likely."""
    same = [entry(i, "candidate", "evaluated", float(i), [0.9, 0.8]) for i in range(5)]
    assert discovery.chance_repeats(same) == 4.0
    distinct = [entry(i, "candidate", "evaluated", float(i), [0.5 + i / 100, 0.6 - i / 100]) for i in range(5)]
    assert discovery.chance_repeats(distinct) == 0.0
    # two layers trained twice each, all four columns' values distinct otherwise: 2 real repeats,
    # about 2/3 expected by chance (each column has two pairs of equal values)
    twice = [entry(i, "candidate", "evaluated", float(i), v) for i, v in
             enumerate([[0.9, 0.8], [0.7, 0.6], [0.9, 0.8], [0.7, 0.6]])]
    assert discovery.run_metrics(twice, cpu_cap=100)["repeats"] == 2
    assert 0.3 < discovery.chance_repeats(twice, draws=2000) < 1.0
    rejected = [entry(9, "candidate", "rejected:quality", 9.0)]
    assert discovery.chance_repeats(rejected + same[:1]) == 0.0  # one trained layer: nothing to tie


def test_report_censors_at_the_cap_and_tests_each_arm_against_random(discovery):
    def result(arm, seed, times, cap=100.0):
        m = discovery.run_metrics(log_of([(t, 0.95) for t in times]), cap)
        return {"run": f"{arm}-s{seed}", "arm": arm, "algorithm": arm, "options": {}, "known": False,
                "reference": "random", "seed": seed, "cpu_cap": cap, "command": "python benchmarks/discovery.py X",
                "rerank": None, **m}

    results = [result("random", s, [200.0]) for s in range(3)]  # never within the cap
    results += [result("regularized_evolution", s, [10.0 * (s + 1)]) for s in range(3)]
    text = discovery.report(results, "r.jsonl", "python benchmarks/discovery.py --report")
    assert "python benchmarks/discovery.py X" in text and "--report" in text
    rows: dict[str, str] = {}
    for line in text.splitlines():  # the summary table comes first; later tables name the arms too
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    random_row = rows["random"].split("|")
    assert random_row[4].strip() == ">100" and random_row[5].strip() == "0/3"
    evo = rows["regularized_evolution"].split("|")
    assert evo[4].strip() == "20" and evo[5].strip() == "3/3"
    assert evo[8].strip() == "<=0.20"  # median 20 against the censored 100: random's true median is >= 100
    assert random_row[8].strip() == "-"  # the reference itself has no ratio
    assert float(evo[6].split()[0]) < 0.11  # Mann-Whitney: 3 against 3, all apart
    assert float(evo[7]) < 0.05  # log-rank: 3 events against 3 censored runs
    assert "| 0 | >100 | >100 |" in text  # a seed that never got there, marked


def test_a_ratio_of_medians_says_which_side_is_only_a_cap(discovery):
    """Random search's median at the cap means its true median is at least the cap, so the
    default's ratio against it is an upper bound; both medians at the cap give no ratio."""
    def runs(times, cap=100.0):
        return [{"cpu_to_target": t, "cpu_cap": cap} for t in times]

    reached, mostly_not, half = runs([10.0, 20.0, 30.0]), runs([10.0, None, None]), runs([10.0, None])
    assert discovery.ratio_bound(reached, reached) == ""
    assert discovery.ratio_bound(reached, mostly_not) == "<="
    assert discovery.ratio_bound(mostly_not, reached) == ">="
    assert discovery.ratio_bound(mostly_not, half) == "-"  # half reached: the upper middle is the cap
    assert discovery.compare([10.0, 20.0], [100.0, 100.0], "-")[1:] == ("-", "-")
    assert discovery.compare([10.0, 20.0], [100.0, 100.0], "<=")[1] == "<=0.15"
    # runs grown to a larger cap beside runs that were not: the median is a time only where no
    # run censored below it could have got there earlier
    grown = runs([100.0, 200.0, None], cap=400.0) + runs([300.0]) + runs([None], cap=150.0)
    assert not discovery.median_censored(runs([100.0, 200.0, 300.0], 400.0) + runs([None], 400.0))
    assert discovery.median_censored(grown)  # 200 is the middle value, but the run censored at 150 may precede it
    assert discovery._median(grown, "cpu_to_target") == ">200"
    assert not discovery.median_censored(grown[:-1] + runs([None], cap=350.0))  # every censored cap above 300
    assert discovery._median(grown[:-1] + runs([None], cap=350.0), "cpu_to_target") == "300"


def test_a_layer_level_only_by_its_variance_is_not_level_by_the_mean(discovery):
    """Round 5's seed 4: 0.047 below bn_relu held out, 'not distinguishable' (p 0.18) because one
    seed collapsed. The report counts it level (the issue's word) but not level by the mean."""
    def result(seed, diff, word):
        m = discovery.run_metrics(log_of([(10.0, 0.95)]), 100.0)
        rerank = {"vs": {"bn_relu": {"word": word, "p": 0.2, "diff": diff}}, "best_mean": 0.9, "best_seeds": 3}
        return {"run": f"evo-s{seed}", "arm": "evo", "algorithm": "evo", "options": {}, "known": False,
                "reference": "random", "seed": seed, "cpu_cap": 100.0, "command": "x", "rerank": rerank, **m}

    results = [result(0, -0.047, "not distinguishable"), result(1, -0.004, "not distinguishable"),
               result(2, +0.002, "better"), result(3, -0.03, "worse")]
    row = next(line for line in discovery.report(results, "r", "c").splitlines() if line.startswith("| evo |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[12].startswith("3, ") and cells[13] == "2 of 4"


@pytest.mark.slow
def test_one_tiny_arm_end_to_end(tmp_path):
    results = tmp_path / "results.jsonl"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--algorithms", "random", "--seeds", "0",
           "--cpu-cap", "10", "--rerank-seeds", "2", "--workdir", str(tmp_path / "runs"),
           "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = results.read_text().splitlines()
    r = json.loads(line)
    assert (r["arm"], r["algorithm"], r["seed"], r["known"], r["cpu_cap"]) == ("random", "random", 0, False, 10.0)
    assert set(r["baselines"]) == {"bn_relu", "evonorm_b0", "evonorm_s0"}
    assert r["cpu_total"] >= 10.0 and r["proposed"] == sum(e["kind"] == "candidate" for e in r["log"])
    assert r["trained"] >= 1 and 0 < r["cpu_to_first_trained"] <= 10.0  # about 4 s idle; room for a loaded box
    for e in r["log"]:
        assert {"cpu_total", "verdict", "values", "formula", "number", "kind", "layer"} <= set(e)
    assert [e["kind"] for e in r["log"][:3]] == ["baseline"] * 3  # references first
    assert r["environment"]["cpu_capability"] and r["environment"]["torch"]  # which host made these numbers
    rr = r["rerank"]
    assert "error" not in rr, rr
    assert set(rr["vs"]) == {"bn_relu", "evonorm_b0", "evonorm_s0"} and rr["cpu_s"] > 0
    assert rr["best_trial"] == r["best"]["number"]
    # resumable: the run in the results file is not run again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "searching" not in again.stderr
    assert len(results.read_text().splitlines()) == 1
    # more re-ranking seeds: the stage grows (its first 2 seeds kept), the search is not run again
    more = subprocess.run(cmd[:cmd.index("--rerank-seeds") + 1] + ["3"] + cmd[cmd.index("--rerank-seeds") + 2:],
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "searching" not in more.stderr and "again with 3 seeds" in more.stderr
    first, grown = (json.loads(x) for x in results.read_text().splitlines())
    assert (first["rerank"]["best_seeds"], grown["rerank"]["best_seeds"]) == (2, 3)
    assert grown["rerank"]["best_trial"] == first["rerank"]["best_trial"]
    assert grown["log"] == first["log"] and grown["cpu_total"] == first["cpu_total"]
    layers = 1 + 3  # the best and the three references
    assert first["rerank"]["trainings"] == 2 * layers
    assert grown["rerank"]["trainings"] == layers  # one new seed per layer, not three
    rep = subprocess.run([sys.executable, str(SCRIPT), "--report", "--results", str(results)],
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert "--cpu-cap 10" in rep.stdout and "| random | 1 |" in rep.stdout  # the last line of the run only
    assert f"{grown['rerank']['best_mean']:.4f} (3)" in rep.stdout
    # may this host be paired with the recorded runs? the same host trains the known layers alike;
    # a run whose known layers trained otherwise (another host) is not the same evaluator
    other = dict(grown, arm="elsewhere", log=[dict(e, values=[v * 0.99 for v in e["values"]])
                                              if e["kind"] == "baseline" else e for e in grown["log"]])
    (tmp_path / "elsewhere.jsonl").write_text(json.dumps(other) + "\n")
    check = subprocess.run([sys.executable, str(SCRIPT), "--check-host", "--quick", "--seeds", "0",
                            "--workdir", str(tmp_path / "runs"),
                            "--results", f"{results},{tmp_path / 'elsewhere.jsonl'}"],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "results.jsonl random: 1 of 1 recorded runs of seed 0 share this host's numerics" in check.stdout
    assert "elsewhere.jsonl elsewhere: 0 of 1 recorded runs of seed 0" in check.stdout


def _trials(log: list[dict]) -> list[tuple]:
    return [(e["number"], e["kind"], e["verdict"], e["values"], e["formula"]) for e in log]


@pytest.mark.slow
def test_a_run_extended_to_a_larger_cap_proposes_what_a_straight_run_does(tmp_path):
    """Growing a censored run's cap resumes its study: the trials are those of an uninterrupted
    run with the larger cap, and its CPU counts on from where it ended."""
    def run(cap, workdir, results):
        cmd = [sys.executable, str(SCRIPT), "--quick", "--algorithms", "random", "--seeds", "0", "--no-rerank",
               "--cpu-cap", str(cap), "--workdir", str(tmp_path / workdir), "--results", str(tmp_path / results)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / results).read_text().splitlines()[-1]), proc.stderr

    short, _ = run(4, "grown", "short.jsonl")
    grown, err = run(8, "grown", "grown.jsonl")
    straight, _ = run(8, "straight", "straight.jsonl")
    assert "extending its search from 4 to 8 CPU s" in err
    assert grown["extended_from"] == [4.0] and straight["extended_from"] is None
    assert grown["log"][:len(short["log"])] == short["log"]  # the first part is kept as it was
    assert len(grown["log"]) > len(short["log"]) and grown["cpu_total"] >= 8.0
    cpus = [e["cpu_total"] for e in grown["log"]]
    assert cpus == sorted(cpus)  # counted on from the last logged trial, not from 0
    n = min(len(grown["log"]), len(straight["log"]))
    assert n > len(short["log"])
    assert _trials(grown["log"][:n]) == _trials(straight["log"][:n])
    assert [e["kind"] for e in grown["log"]].count("baseline") == 3  # references not trained again


def test_a_run_stopped_at_the_target_is_the_same_run_under_a_larger_cap(discovery, tmp_path, monkeypatch):
    log = log_of([(5.0, None), (10.0, 0.85), (20.0, 0.895)])
    log_path, done_path = tmp_path / "r.jsonl", tmp_path / "r.search.json"
    log_path.write_text("".join(json.dumps(e) + "\n" for e in log))
    done = {"wall_s": 30.0, "cpu_cap": 25.0, "stop_at_target": True, "config": {}}

    def no_search(*a, **k):
        raise AssertionError("searched again")

    monkeypatch.setattr(discovery, "run_search", no_search)
    assert discovery.extend_search(done, {}, "r", str(log_path), str(done_path), 50.0, True) == 30.0
    assert json.loads(done_path.read_text())["cpu_cap"] == 50.0
    assert json.loads(done_path.read_text())["extended_from"] == [25.0]
    # stopped by its cap (never at the target): it searches on to the new cap
    censored = log_of([(5.0, None), (10.0, 0.85), (26.0, 0.86)])
    log_path.write_text("".join(json.dumps(e) + "\n" for e in censored))
    calls = []
    monkeypatch.setattr(discovery, "run_search", lambda *a, **k: calls.append(a) or 12.0)
    assert discovery.extend_search(done, {}, "r", str(log_path), str(done_path), 50.0, True) == 42.0
    assert len(calls) == 1 and calls[0][2] == 50.0


def test_a_run_grown_to_a_larger_cap_is_not_thrown_away_by_the_smaller_cap(discovery, tmp_path):
    import argparse

    args = argparse.Namespace(workdir=str(tmp_path), budget=100, quick=True, filter_opts={}, layer_opts={},
                              stop_at_target=True, cpu_cap=10.0, no_rerank=True)
    arm = discovery.Arm("random", "random")
    base = tmp_path / "random-s0"
    config = discovery.search_config(arm, 0, f"sqlite:///{base}.db", "random-s0", 100, True, {})
    (tmp_path / "random-s0.search.json").write_text(json.dumps(
        {"wall_s": 9.0, "cpu_cap": 20.0, "stop_at_target": True, "config": config, "extended_from": [10.0]}))
    (tmp_path / "random-s0.db").write_text("the grown study")
    with pytest.raises(SystemExit, match="grown to 20 CPU s"):
        discovery.one_run(arm, 0, args, "cmd")
    assert (tmp_path / "random-s0.db").read_text() == "the grown study"


def test_a_grown_runs_extension_load_compares_its_cheapest_trials_across_the_resume(discovery):
    """The extension's numerics rejections against those of the second half before it: the
    resume's first trial (warm-up) and the first half are left out; the report reads a time
    reached in the extension on the first part's load."""
    def rejections(start, stop, each):
        return [entry(0, "candidate", "rejected:numerics", round(start + i * each, 6))
                for i in range(1, int(round((stop - start) / each)) + 1)]

    log = (rejections(0.0, 50.0, 0.5) + rejections(50.0, 100.0, 1.0)  # first half dearer: not counted
           + [entry(0, "candidate", "rejected:numerics", 109.0)]  # the resume's warm-up: not counted
           + rejections(109.0, 111.0, 2.0) + [entry(0, "candidate", "evaluated", 150.0, [0.9, 0.9])])
    run = {"arm": "random", "seed": 3, "extended_from": [100.0], "cpu_cap": 200.0, "cpu_to_target": 150.0,
           "log": log}
    assert discovery.growth_load(run) == pytest.approx(2.0)
    assert discovery.growth_load({**run, "extended_from": None}) is None
    [row] = [line for line in discovery.grown_runs_table({"random": [run]}) if line.startswith("| random |")]
    assert row.split("|")[5:8] == [" 2.00 ", " 150 ", " 125 "]  # 100 + (150 - 100) / 2
    stopped_before = {**run, "cpu_to_target": 80.0}  # reached the target before its first cap: not grown
    assert discovery.grown_runs_table({"random": [stopped_before]}) == []


def test_a_resumed_stop_rule_knows_the_level_its_baselines_set_before(discovery):
    log = log_of([(5.0, None), (10.0, 0.85)])
    rule = discovery.StopRule(100.0, at_target=True)
    rule.replay(log)
    assert not rule.stop("candidate", None, [0.85, 0.85], 12.0)
    assert rule.stop("candidate", None, [0.895, 0.895], 13.0)  # within 0.01 of bn_relu's 0.90
    fresh = discovery.StopRule(100.0, at_target=True)
    assert not fresh.stop("candidate", None, [0.895, 0.895], 13.0)  # no level without the replay


def _re_rankings(pgid: int) -> list[int]:
    """Live (not zombie) `opsearch rerank` processes of a process group, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z" and b"rerank" in argv:
                found.append(int(entry))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_terminated_benchmark_leaves_no_re_ranking_running(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--quick", "--algorithms", "random", "--seeds", "0",
           "--cpu-cap", "6", "--rerank-seeds", "3", "--workdir", str(tmp_path / "runs"),
           "--results", str(tmp_path / "results.jsonl")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stderr:
            if "re-ranking the best" in line:
                break
        else:
            pytest.fail(f"the run never reached its re-ranking (exit {proc.wait()})")
        deadline = time.time() + 30
        while time.time() < deadline and not _re_rankings(proc.pid):
            time.sleep(0.1)
        assert _re_rankings(proc.pid)  # the re-ranking child runs
        proc.terminate()
        assert proc.wait(timeout=60) != 0
        deadline = time.time() + 10
        while time.time() < deadline and _re_rankings(proc.pid):
            time.sleep(0.1)
        assert _re_rankings(proc.pid) == []  # nothing outlives the benchmark
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_recorded_results_read_gzipped(tmp_path, discovery):
    import gzip

    rows = [{"run": "random-s0", "seed": 0}, {"run": "random-s1", "seed": 1}]
    plain = tmp_path / "r.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    packed = tmp_path / "r.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write(plain.read_text())
    assert discovery.read_results(str(packed)) == discovery.read_results(str(plain)) == rows


def test_logrank_censors_runs_that_never_reached_the_target_at_their_cap(discovery):
    """Arm A: the target at 100 and 300 CPU s, and one run capped at 200 that never got there;
    arm B: 250, and two runs capped at 480. By hand, over the event times 100 (A), 250 (B) and
    300 (A), with A's capped run out of the risk set after 200: observed 2 for A, expected
    3/6 + 1/4 + 1/3 = 1.083, variance 0.25 + 0.1875 + 0.2222 = 0.660, statistic 1.27, p = 0.26.
    Counting the capped run as reaching the target at its cap would change all of it."""
    from scipy.stats import chi2

    def run(cpu, cap=480.0):
        return {"cpu_to_target": cpu, "cpu_cap": cap}

    a = [run(100.0), run(None, cap=200.0), run(300.0)]
    b = [run(250.0), run(None), run(None)]
    # at each event time: (at risk in A, at risk overall, events in A, events overall)
    table = [(3, 6, 1, 1), (1, 4, 0, 1), (1, 3, 1, 1)]
    observed = sum(d1 for _, _, d1, _ in table)
    expected = sum(n1 * d / n for n1, n, _, d in table)
    variance = sum(n1 * (n - n1) * d * (n - d) / (n * n * (n - 1)) for n1, n, _, d in table)
    by_hand = chi2.sf((observed - expected) ** 2 / variance, 1)
    assert 0.25 < by_hand < 0.27
    assert float(discovery.logrank_p(a, b)) == pytest.approx(by_hand, abs=5e-4)
    # every run censored: no event to test
    assert discovery.logrank_p([run(None)] * 3, [run(None)] * 3) == "-"


def test_load_adjusted_times_and_the_paired_sign_test(discovery):
    """The same work costs more CPU seconds on a loaded box: a run whose known layers took twice
    the typical CPU has its times halved before the arms are compared. Paired by seed, an arm
    faster only before that adjustment is slower after it; two runs that never got there, or a
    time beyond the other run's cap, decide nothing."""
    def run(seed, cpu, gauge, cap=400.0):
        log = [entry(0, "baseline", "evaluated", gauge, [0.9, 0.9], layer="bn_relu")]
        return {"seed": seed, "cpu_to_target": cpu, "cpu_cap": cap, "log": log}

    # seeds 0-1: the arm ran loaded (its known layers took 20 CPU s, typically 10)
    arm = [run(0, 60.0, 20.0), run(1, 70.0, 20.0), run(2, 30.0, 10.0), run(3, 35.0, 10.0),
           run(4, None, 10.0), run(5, 150.0, 10.0)]
    ref = [run(0, 40.0, 10.0), run(1, 50.0, 10.0), run(2, 45.0, 10.0), run(3, 50.0, 10.0),
           run(4, None, 10.0), run(5, None, 10.0, cap=100.0)]
    scales = discovery.load_scales(arm + ref)
    assert scales[id(arm[0])] == 0.5 and scales[id(ref[0])] == 1.0
    assert discovery.scaled(arm[0], scales) == (30.0, 200.0)
    faster, slower, undecided, p = discovery.paired_by_seed(arm, ref, scales)
    assert (faster, slower, undecided) == (4, 0, 2)
    assert float(p) == pytest.approx(0.125)  # 4 of 4 decided seeds, two-sided exact
    # without the adjustment the loaded seeds go the other way
    assert discovery.paired_by_seed(arm, ref, {})[:3] == (2, 2, 2)
    text = discovery.report([dict(r, arm="evolution", algorithm="e", options={}, known=False,
                                  reference="random", command="c", rerank=None, **_metrics_stub())
                             for r in arm] + [dict(r, arm="random", algorithm="random", options={}, known=False,
                                                   reference="random", command="c", rerank=None, **_metrics_stub())
                                              for r in ref], "r.jsonl", "report")
    row = next(line for line in text.split("## Paired")[1].splitlines() if line.startswith("| evolution |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2] == "10-20" and cells[7] == "4 / 0 / 2" and cells[8] == "0.125"
    assert cells[3] == "35"  # adjusted: 30, 35, 30, 35, 150 and the cap 400: median 35
    # a variant of an algorithm (another label) is paired with random and with the plain arm
    variant = [dict(r, arm="variant", algorithm="evolution", options={"x": 1}, known=False, reference="random",
                    command="c", rerank=None, **_metrics_stub()) for r in ref]
    plain = [dict(r, arm="evolution", algorithm="evolution", options={}, known=False, reference="random",
                  command="c", rerank=None, **_metrics_stub()) for r in arm]
    randoms = [dict(r, arm="random", algorithm="random", options={}, known=False, reference="random",
                    command="c", rerank=None, **_metrics_stub()) for r in ref]
    text = discovery.report(variant + plain + randoms, "r.jsonl", "report")
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.split("## Paired")[1].split("\n## ")[0]
            .splitlines() if line.startswith("| variant |")]
    assert [r[1] for r in rows] == ["random", "evolution"]
    assert rows[1][7] == "0 / 4 / 2"  # the variant is the reference runs: slower where the arm was faster


def test_paired_ratio_is_the_geometric_mean_over_seeds_with_a_censored_run_at_its_cap(discovery):
    """Per seed the log of the arm's time over the reference's: 50/100, 200/100, 100/100, and a run
    that never got there (its cap, 400) against 100; a seed where neither got there is left out.
    Logs ln2 x (-1, 1, 0, 2): geometric mean 2^0.5, t interval exp(0.5 ln2 +- 3.182 x 0.895 / 2),
    and ((1.96 + 0.842) x 0.895 / ln 1.5)^2 = 38.2, so 39 seeds to show 1.5x."""
    def run(seed, cpu, cap=400.0):
        return {"seed": seed, "cpu_to_target": cpu, "cpu_cap": cap}

    arm = [run(0, 50.0), run(1, 200.0), run(2, 100.0), run(3, None), run(4, None)]
    ref = [run(0, 100.0), run(1, 100.0), run(2, 100.0), run(3, 100.0), run(4, None)]
    ratio, interval, p, need = discovery.paired_ratio(arm, ref, {})
    sd = math.log(2) * statistics.stdev([-1, 1, 0, 2])
    half = 3.1824 * sd / 2
    assert float(ratio) == pytest.approx(2 ** 0.5, abs=0.005)
    lo, hi = (float(x) for x in interval.split("-"))
    assert lo == pytest.approx(math.exp(0.5 * math.log(2) - half), abs=0.005)
    assert hi == pytest.approx(math.exp(0.5 * math.log(2) + half), abs=0.005)
    assert need == "39"
    assert 0.2 < float(p) < 1.0  # three nonzero differences cannot be significant
    # one seed in common is no spread: nothing to say
    assert discovery.paired_ratio(arm[:1], ref[:1], {}) == ("-", "-", "-", "-")


def test_seeds_pair_as_the_same_evaluator_only_where_the_known_layers_trained_alike(discovery):
    """Two runs of one seed share the evaluator bit for bit only if their known layers trained to
    the same accuracies (another host or kernel path gives other floats, and the searches part
    there): seed 1's reference trained on such a host (the same numbers, another order), seed 2's
    candidates differ but not its known layers, seed 3 has no log, seed 4 only one arm."""
    def run(seed, known, candidate=0.5, log=True):
        entries = [entry(0, "baseline", "evaluated", 10.0, known, layer="bn_relu"),
                   entry(1, "candidate", "evaluated", 12.0, [candidate, candidate])]
        return {"seed": seed, "cpu_to_target": 50.0, "cpu_cap": 400.0, "log": entries if log else None}

    arm = [run(0, [0.9, 0.8]), run(1, [0.9, 0.8]), run(2, [0.9, 0.8]), run(3, [0.9, 0.8], log=False),
           run(4, [0.9, 0.8])]
    ref = [run(0, [0.9, 0.8]), run(1, [0.8, 0.9]), run(2, [0.9, 0.8], candidate=0.7), run(3, [0.9, 0.8])]
    assert discovery.same_numerics(arm, ref) == (2, 3)
    assert discovery.numerics_of(arm[3]) is None
    text = discovery.report([dict(r, arm="evolution", algorithm="e", options={}, known=False, reference="random",
                                  command="c", rerank=None, **_metrics_stub()) for r in arm]
                            + [dict(r, arm="random", algorithm="random", options={}, known=False,
                                    reference="random", command="c", rerank=None, **_metrics_stub()) for r in ref],
                            "r.jsonl", "report")
    row = next(line for line in text.split("## Paired")[1].splitlines() if line.startswith("| evolution |"))
    assert row.rstrip().endswith("| 2/3 |")


def test_each_result_says_which_host_and_kernel_path_made_it(discovery, monkeypatch):
    import torch

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("MKL_CBWR", raising=False)
    env = discovery.environment()
    assert env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2" and "MKL_CBWR" not in env["env"]
    assert env["cpu"] and env["cores"] >= 1


def _metrics_stub() -> dict:
    return {"cpu_to_first_trained": 1.0, "baselines": {}, "best": None, "proposed": 1, "trained": 1,
            "duplicates": 0, "rejected": 0, "repeats": 0, "repeat_share": 0.0}


def test_cpu_by_verdict_charges_each_trial_the_rise_of_the_cumulative_cpu(discovery):
    """The report's 'where the CPU went': each line's CPU is what the run's cumulative counter rose
    by at it (lines may be logged out of order), and repeats are counted by formula."""
    log = [
        {"kind": "baseline", "verdict": "evaluated", "cpu_total": 10.0, "formula": "bn"},
        {"kind": "candidate", "verdict": "rejected:numerics", "cpu_total": 11.0, "formula": "rms_b(x)"},
        {"kind": "candidate", "verdict": "evaluated", "cpu_total": 31.0, "formula": "x / rms_b(x)"},
        {"kind": "candidate", "verdict": "rejected:numerics", "cpu_total": 12.0, "formula": "rms_b(x)"},
        {"kind": "candidate", "verdict": "duplicate:2", "cpu_total": 40.0, "formula": "x / rms_b(x + 0)"},
    ]
    shares, repeated, repeated_cpu = discovery.cpu_by_verdict([log])
    assert shares == pytest.approx({"baseline": 0.25, "rejected:numerics": 0.05, "evaluated": 0.475,
                                    "duplicate": 0.225})
    assert repeated == pytest.approx(1 / 4)  # the second rms_b(x)
    assert repeated_cpu == pytest.approx(1 / 40)
    assert discovery.cpu_by_verdict([[]]) == ({}, None, None)


def test_arm_options_read_as_toml_values_so_false_is_false(discovery):
    from opsearch import registry

    options = discovery.parse_arm_options("equivalence:band=false,limit_atol=0.001;quality:parent_margin=0.02")
    assert options == {"equivalence": {"band": False, "limit_atol": 0.001}, "quality": {"parent_margin": 0.02}}
    assert registry.rejection_filters.create("equivalence", **options["equivalence"]).band is False


def test_a_longer_run_cut_at_a_horizon_reads_as_the_run_capped_there(discovery):
    """--horizon: arms run to different caps compare at the smallest; a run's log cut at the
    horizon gives what a run capped there recorded (times censored at the horizon, the best and
    the counts of what finished by then)."""
    full = log_of([(5.0, None), (10.0, 0.85), (20.0, 0.86), (30.0, 0.86), (40.0, 0.895), (50.0, 0.97)])
    stored = [{k: e[k] for k in ("number", "kind", "layer", "verdict", "cpu_total", "values", "formula")}
              for e in full]  # result lines keep no score: it is recomputed from the values
    result = {"run": "a-s0", "arm": "a", "algorithm": "a", "options": {}, "known": False, "reference": "random",
              "command": "python benchmarks/discovery.py X", "seed": 0, "cpu_cap": 100.0, "stopped_at_target": False,
              "extended_from": [60.0], "rerank": {"vs": {}}, "log": stored, **discovery.run_metrics(full, 100.0)}
    cut = discovery.at_horizon(result, 35.0)
    capped = discovery.run_metrics([e for e in full if e["cpu_total"] <= 35.0], 35.0)
    assert {k: cut[k] for k in capped} == capped
    assert cut["cpu_to_target"] is None and result["cpu_to_target"] == 40.0  # reached after the horizon: censored
    assert (cut["trained"], cut["repeats"], cut["best"]["score"]) == (3, 1, pytest.approx(0.86))
    assert cut["cpu_cap"] == 35.0 and cut["cut_from"] == 100.0 and cut["rerank"] is None
    assert cut["extended_from"] is None  # grown at 60, past the horizon: not a grown run there
    assert len(cut["log"]) == 6 and "score" not in cut["log"][0]  # 2 baselines, 4 candidates
    assert discovery.at_horizon(result, 45.0)["cpu_to_target"] == 40.0
    assert discovery.at_horizon(result, 100.0) is result  # at or past its cap: the run itself
    text = discovery.report([cut], "r.jsonl", "cmd")
    assert "CPU cap per run: 35 s" in text and "1 of 1 runs cut there from caps of 100 s" in text


def test_layer_options_are_every_arms_and_part_of_a_runs_settings(discovery, tmp_path):
    """`--layer-options no_act=bn`: every arm's candidates get it (evaluator.layer_options, beside
    the proxy's own evaluator keys); a run recorded under other layer options is neither resumed
    nor paired with this one, and a bad option is refused before any run, in one line."""
    import argparse

    assert discovery.parse_layer_options("no_act=bn") == {"no_act": "bn"}
    assert discovery.parse_layer_options("") == {}
    for bad, said in (("noact=bn", r"unknown layer option\(s\) 'noact'"), ("no_act=bm", "no_act must be one of"),
                       ("surround=bn", "unknown surround 'bn'")):
        with pytest.raises(SystemExit, match=said) as e:
            discovery.parse_layer_options(bad)
        assert "\n" not in str(e.value)
    arm = discovery.Arm("random", "random")
    plain = discovery.search_config(arm, 0, "sqlite:///:memory:", "x", 10, True)
    placed = discovery.search_config(arm, 0, "sqlite:///:memory:", "x", 10, True, None, {"no_act": "bn"})
    assert "layer_options" not in plain["evaluator"]
    assert placed["evaluator"] == {**plain["evaluator"], "layer_options": {"no_act": "bn"}}
    assert {k: v for k, v in placed.items() if k != "evaluator"} == {k: v for k, v in plain.items() if k != "evaluator"}
    # a results file holding the run under the default placement: not resumed under another
    results = tmp_path / "r.jsonl"
    old = {"arm": "random", "seed": 0, "algorithm": "random", "options": {}, "known": False, "cpu_cap": 10.0,
           "quick": True, "filter_options": {}, "layer_options": {}}
    results.write_text(json.dumps(old) + "\n")
    args = argparse.Namespace(algorithms="random", options="", label=None, known=False, seeds="0",
                              workdir=str(tmp_path / "w"), results=str(results), cpu_cap=10.0, quick=True,
                              filter_opts={}, layer_opts={"no_act": "bn"}, budget=100, no_rerank=True,
                              stop_at_target=False, rerank_seeds=3)
    with pytest.raises(SystemExit, match="with other settings"):
        discovery.bench_main(args, "cmd")
    results.write_text(json.dumps({**old, "layer_options": {"no_act": "bn"}}) + "\n")  # and the other way round
    args.layer_opts = {}
    with pytest.raises(SystemExit, match="with other settings"):
        discovery.bench_main(args, "cmd")
    args.layer_opts = {"no_act": "bn"}
    assert discovery.bench_main(args, "cmd") == 0  # the same settings: done, nothing run
    assert results.read_text().count("\n") == 1


def test_a_report_names_the_candidates_layer_options_and_never_mixes_two(discovery):
    def result(arm, seed, layer_options):
        m = discovery.run_metrics(log_of([(10.0, 0.95)]), 100.0)
        return {"run": f"{arm}-s{seed}", "arm": arm, "algorithm": arm, "options": {}, "known": False,
                "reference": "random", "seed": seed, "cpu_cap": 100.0, "command": "cmd", "rerank": None,
                "layer_options": layer_options, **m}

    bn = [result(a, s, {"no_act": "bn"}) for a in ("random", "regularized_evolution") for s in range(2)]
    text = discovery.report(bn, "r.jsonl", "cmd")
    assert 'Candidates\' layer options (`--layer-options`, every arm): {"no_act": "bn"}' in text
    assert "layer options" not in discovery.report([dict(r, layer_options={}) for r in bn], "r.jsonl", "cmd")
    with pytest.raises(SystemExit, match="mix the candidates' layer options"):
        discovery.report(bn[:2] + [dict(r, layer_options={}) for r in bn[2:]], "r.jsonl", "cmd")


@pytest.mark.slow
def test_a_run_under_layer_options_searches_with_them(tmp_path):
    """The option reaches the run's stored config, which the engine's evaluator and filters read
    (`evaluator.layer_options`), and the run's result line."""
    import optuna

    results = tmp_path / "results.jsonl"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--algorithms", "random", "--seeds", "0", "--cpu-cap", "4",
           "--no-rerank", "--layer-options", "no_act=bn", "--workdir", str(tmp_path / "runs"),
           "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(results.read_text())
    assert r["layer_options"] == {"no_act": "bn"} and r["trained"] >= 1
    study = optuna.load_study(study_name="random-s0", storage=f"sqlite:///{tmp_path / 'runs' / 'random-s0.db'}")
    config = study.user_attrs["config"]
    config = json.loads(config) if isinstance(config, str) else config
    assert config["evaluator"]["layer_options"] == {"no_act": "bn"}
