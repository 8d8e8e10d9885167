"""benchmarks/discovery_heldout.py: which layer a run answers with, the verdicts against bn_relu
(the seed as the unit, Holm within an arm), resumable training, and one real item end to end."""
from __future__ import annotations

import gzip
import json

import pytest
from benchmark_modules import BENCHMARKS, benchmark_module

SCRIPT = BENCHMARKS / "discovery_heldout.py"


@pytest.fixture(scope="module")
def heldout():
    with benchmark_module("discovery_heldout") as module:
        yield module


@pytest.fixture
def short_task(heldout, monkeypatch):
    """The re-ranking stage's held-out task with a third of its training steps: the same path
    (its data, seeds, networks, evaluator), 3x less CPU for the tests that train on it."""
    real = heldout.heldout_task

    def short(no_act=heldout.DEFAULT_NO_ACT):
        task, machine, plugin = real(no_act)
        return {**task, "steps": task["steps"] // 3}, machine, plugin

    monkeypatch.setattr(heldout, "heldout_task", short)


def cand(number, cpu, values, formula):
    return {"number": number, "kind": "candidate", "layer": None, "cpu_total": cpu,
            "verdict": "evaluated" if values else "rejected:numerics", "values": values, "formula": formula}


def run(arm, seed, log):
    return {"run": f"{arm}-s{seed}", "arm": arm, "seed": seed, "log": log}


def held_lines(table, **extra):
    """Held-out lines from {key: {seed: accuracy}} (one architecture)."""
    return [{"seed": s, "key": k, "acc": {"resnet": v}, "cpu_s": 1.0, **extra}
            for k, per in table.items() for s, v in per.items()]


def test_a_run_answers_with_its_best_search_score_by_the_horizon(heldout):
    log = [{"number": 0, "kind": "baseline", "layer": "bn_relu", "cpu_total": 5.0, "verdict": "evaluated",
            "values": [0.99, 0.99], "formula": "bn"},
           cand(1, 10.0, None, "sqrt(x)"),
           cand(2, 20.0, [0.90, 0.92], "tanh(x)"),
           cand(3, 30.0, [0.95, 0.93], "x / rms_b(x)"),
           cand(4, 40.0, [0.94, 0.94], "x / rms_i(x)"),  # the same score, later: not chosen
           cand(5, 99.0, [0.99, 0.99], "x / rms_g(x)")]  # after the horizon
    def pick(entries, horizon):
        return heldout.run_layers(run("random", 0, entries), horizon, top=1)

    layer = pick(log, 50.0)[0]
    assert layer["formula"] == "x / rms_b(x)" and layer["number"] == 3 and layer["cpu_total"] == 30.0
    assert pick(log, 100.0)[0]["formula"] == "x / rms_g(x)"
    assert pick(log, 25.0)[0]["formula"] == "tanh(x)"
    assert pick(log[:2], 100.0) == []  # nothing trained


def test_runs_that_found_the_same_function_share_its_trainings(heldout):
    assert heldout.layer_key("x / rms_b(x)") == heldout.layer_key("x/rms_b(x)")
    assert heldout.layer_key("(x + v1) * v0") == heldout.layer_key("v0 * (v1 + x)")  # commutative
    assert heldout.layer_key("x / rms_b(x)") != heldout.layer_key("x / rms_i(x)")


def scores(values_by_seed):
    return {1000 + i: v for i, v in enumerate(values_by_seed)}


def test_verdicts_are_paired_over_seeds_and_holm_corrected_within_an_arm(heldout):
    bn = [0.970, 0.975, 0.980, 0.972, 0.978, 0.974, 0.976, 0.971]
    table = {"bn_relu": scores(bn),
             "worse": scores([v - 0.030 + 0.002 * (i % 3) for i, v in enumerate(bn)]),
             "level": scores([v + (0.004 if i % 2 else -0.004) for i, v in enumerate(bn)]),
             "noisy": scores([v + (0.05 if i % 2 else -0.06) for i, v in enumerate(bn)]),
             "slightly": scores([v - 0.006 + 0.001 * (i % 2) for i, v in enumerate(bn)])}
    formulas = {"worse": "tanh(x)", "level": "x / rms_b(x)", "noisy": "x / rms_i(x)", "slightly": "x / rms_g(x)"}
    keys = {name: heldout.layer_key(f) for name, f in formulas.items()}
    table = {keys.get(k, k): v for k, v in table.items()}
    runs = [run("a", i, [cand(1, 10.0, [0.9], formulas[name])]) for i, name in enumerate(formulas)]
    runs.append(run("a", 9, []))  # trained nothing
    rows = {r["seed"]: r for r in heldout.arm_verdicts(runs, table, horizon=1800.0)}
    worse, level, noisy, slightly, nothing = rows[0], rows[1], rows[2], rows[3], rows[9]
    assert worse["vs"]["diff"] == pytest.approx(-0.028, abs=1e-3) and worse["vs"]["seeds"] == 8
    assert not worse["level"] and not worse["within_margin"]
    assert level["level"] and level["within_margin"]  # its interval lies within the margin
    assert noisy["level"] and not noisy["within_margin"]  # not distinguishable only for want of power
    # worse by a hair on every seed: p tiny, so not level; its interval is inside the margin
    assert not slightly["level"] and slightly["within_margin"]
    assert all(r["vs"]["p_holm"] >= r["vs"]["p"] for r in (worse, level, noisy, slightly))
    assert not nothing["level"] and not nothing["within_margin"] and "vs" not in nothing


def test_holm_can_turn_a_nominal_loss_into_not_distinguishable(heldout):
    bn = [0.970, 0.975, 0.980, 0.972]
    marginal = [v - d for v, d in zip(bn, (0.003, 0.010, 0.005, 0.008))]  # p about 0.025 alone
    table = {"bn_relu": scores(bn)}
    runs = []
    for i in range(4):
        f = ["x / rms_b(x)", "x / rms_i(x)", "x / rms_g(x)", "x / rms_l(x)"][i]
        table[heldout.layer_key(f)] = scores(marginal if i == 0 else bn)
        runs.append(run("a", i, [cand(1, 1.0, [0.9], f)]))
    rows = heldout.arm_verdicts(runs, table, horizon=10.0)
    assert rows[0]["vs"]["p"] < 0.05 and rows[0]["vs"]["p_holm"] >= 0.05 and rows[0]["level"]


def test_training_is_seed_major_resumable_and_split_into_lanes(heldout, tmp_path):
    out = str(tmp_path / "h.jsonl")
    items = heldout.work_items({"k1": "x / rms_b(x)", "k2": "tanh(x)"}, [7, 8])
    assert [(s, k) for s, k, _ in items][:5] == [(7, "bn_relu"), (7, "evonorm_b0"), (7, "evonorm_s0"),
                                                 (7, "k1"), (7, "k2")]
    calls, stop_at = [], [3]

    class Stopped(Exception):
        pass

    def evaluate(seed, key, layer):
        calls.append((seed, key))
        if len(calls) == stop_at[0]:
            stop_at[0] = None
            raise Stopped  # stopped mid-way: what finished is kept
        return {"acc": {"resnet": 0.5 + seed / 100}, "diverged": []}

    with pytest.raises(Stopped):
        heldout.train(items, out, (0, 2), evaluate=evaluate, progress=lambda s: None)
    assert len(heldout.read_lines(out)) == 2
    calls.clear()
    assert heldout.train(items, out, (0, 2), evaluate=evaluate, progress=lambda s: None) == 3
    assert calls[0] == items[4][:2]  # resumed where it stopped: lane 0 holds items 0, 2, 4, 6, 8
    assert len(calls) == 3
    assert heldout.train(items, out, (1, 2), evaluate=evaluate, progress=lambda s: None) == 5
    assert heldout.train(items, out, (0, 1), evaluate=evaluate, progress=lambda s: None) == 0
    lines = heldout.read_lines(out)
    assert sorted((r["seed"], r["key"]) for r in lines) == sorted((s, k) for s, k, _ in items)
    with open(out, "a") as f:
        f.write('{"seed": 7, "key": "cut sh')  # a line cut short by a crash is skipped, not fatal
    assert len(heldout.read_lines(out)) == len(items)
    with open(out, "rb") as f, gzip.open(out + ".gz", "wb") as g:
        g.write(f.read())  # a recorded file is kept gzipped: it reads the same
    assert heldout.read_lines(out + ".gz") == heldout.read_lines(out)


@pytest.mark.slow
def test_one_run_trained_on_the_held_out_task_and_reported(heldout, short_task, tmp_path, capsys):
    """The real path: a result file's run, its formula read back and trained with the re-ranking
    stage's task and seeds, beside the references; the report judges it against bn_relu."""
    log = [cand(1, 10.0, [0.97, 0.96, 0.98], "x / rms_b(x)")]
    results = tmp_path / "r.jsonl.gz"
    with gzip.open(results, "wt") as f:
        f.write(json.dumps(run("random", 3, log)) + "\n")
    out = tmp_path / "h.jsonl"
    assert heldout.main(["--results", str(results), "--arms", "random", "--seeds", "1", "--out", str(out)]) == 0
    lines = heldout.read_lines(str(out))
    assert heldout.main(["--results", str(results), "--arms", "random", "--seeds", "1", "--confirm", "1",
                         "--out", str(out)]) == 0  # the first seed is not trained again
    confirmed = [r for r in heldout.read_lines(str(out)) if r["seed"] == 1_000_001]
    assert heldout.read_lines(str(out))[:len(lines)] == lines
    assert sorted(r["key"] for r in confirmed) == sorted(r["key"] for r in lines)  # the pick and the references
    assert {r["key"] for r in lines} == {"bn_relu", "evonorm_b0", "evonorm_s0", heldout.layer_key("x / rms_b(x)"),
                                         heldout.bn_relu_graph_key()}
    as_name, as_graph = ({r["key"]: r for r in lines}[k] for k in ("bn_relu", heldout.bn_relu_graph_key()))
    assert as_name["acc"] != as_graph["acc"]  # the known layer keeps BatchNorm where a candidate has the affine
    assert {r["seed"] for r in lines} == {1_000_000}  # the stage's first seed, not the search's
    assert all(set(r["acc"]) == {"resnet", "mobilenetv2", "efficientnet"} for r in lines)
    assert all(0.5 < sum(r["acc"].values()) / 3 <= 1.0 for r in lines)  # trained, not chance
    capsys.readouterr()
    assert heldout.main(["--results", str(results), "--arms", "random", "--seeds", "1", "--out", str(out),
                         "--report"]) == 0
    chosen, confirm = capsys.readouterr().out.split("# Confirmation")
    for text in (chosen, confirm):  # one seed each: a difference, no verdict
        row = next(line for line in text.splitlines() if line.startswith("| 3 | `x / rms_b(x)`"))
        assert "(no test: too few seeds) | | 1 | no | no |" in row
    assert "1 fresh seeds (1000001-1000001) alone" in confirm


def test_a_runs_top_layers_are_distinct_functions_and_the_held_out_best_answers(heldout):
    log = [cand(1, 10.0, [0.95], "x / rms_b(x)"),
           cand(2, 11.0, [0.97], "tanh(x) / std_b(x)"),
           cand(3, 12.0, [0.96], "x/rms_b(x)"),  # the same function as trial 1, scored higher
           cand(4, 13.0, [0.94], "x / rms_i(x)"),
           {**cand(5, 14.0, [0.99], "x / rms_g(x)"), "verdict": "duplicate:2"},  # stands for trial 2
           cand(6, 15.0, [0.93], "x / rms_l(x)")]
    layers = heldout.run_layers(run("random", 0, log), horizon=100.0, top=3)
    assert [(lay["number"], lay["rank"]) for lay in layers] == [(2, 1), (3, 2), (4, 3)]
    keys = [lay["key"] for lay in layers]
    bn = {1000: 0.97, 1001: 0.98}
    table = {"bn_relu": bn, keys[0]: {1000: 0.95, 1001: 0.95}, keys[1]: {1000: 0.97, 1001: 0.975},
             keys[2]: {1000: 0.99}}  # the third lacks a seed: not eligible yet
    assert heldout.reranked_best(layers, table)["number"] == 3  # held out, the search's #2 is best
    rows = heldout.arm_verdicts([run("random", 0, log)], table, horizon=100.0, top=3)
    assert rows[0]["layer"]["number"] == 3 and rows[0]["of"] == 3 and rows[0]["vs"]["seeds"] == 2
    rows = heldout.arm_verdicts([run("random", 0, log)], table, horizon=100.0, top=1)
    assert rows[0]["layer"]["number"] == 2  # top 1: the search's own pick, whatever held out says


def test_a_pick_is_confirmed_on_fresh_seeds_it_was_not_chosen_on(heldout):
    """Best of five on the same seeds it is judged on flatters the pick (the winner's curse);
    the confirmation judges the same pick on further seeds alone."""
    formulas = ["x / rms_b(x)", "x / rms_i(x)", "x / rms_g(x)"]
    log = [cand(i + 1, 10.0 + i, [0.95 - i / 100], f) for i, f in enumerate(formulas)]
    keys = [heldout.layer_key(f) for f in formulas]
    lucky, steady, third = keys
    select, fresh = [1000, 1001, 1002, 1003], [1004, 1005, 1006, 1007]
    bn = {s: 0.97 + 0.001 * (s % 3) for s in select + fresh}
    table = {"bn_relu": bn,
             lucky: {**{s: bn[s] + 0.004 for s in select}, **{s: bn[s] - 0.02 - 0.001 * (s % 2) for s in fresh}},
             steady: {s: bn[s] - 0.001 * (s % 2) for s in select}}
    runs = [run("a", 0, log)]
    # the third layer lacks the selection seeds: the run cannot pick yet (the pick could change)
    assert heldout.confirmation_layers(runs, table, horizon=100.0, top=3) == ({}, 1)
    table[third] = {s: bn[s] - 0.05 for s in select}
    picks, waiting = heldout.confirmation_layers(runs, heldout.on_seeds(table, select), horizon=100.0, top=3)
    assert picks == {lucky: formulas[0]} and waiting == 0
    chosen = heldout.arm_verdicts(runs, heldout.on_seeds(table, select), horizon=100.0, top=3)[0]
    assert chosen["key"] == lucky and chosen["level"]  # on the seeds that chose it, it looks level
    confirmed = heldout.arm_verdicts(runs, heldout.on_seeds(table, select), horizon=100.0, top=3,
                                     judge_scores=heldout.on_seeds(table, fresh))[0]
    assert confirmed["key"] == lucky  # the same pick (fresh seeds do not choose) ...
    assert confirmed["vs"]["seeds"] == 4 and confirmed["vs"]["diff"] == pytest.approx(-0.0205, abs=1e-3)
    assert not confirmed["level"] and not confirmed["within_margin"]  # ... judged on the fresh seeds alone

    text = heldout.report(runs, held_lines(table), 100.0, 3, "cmd", seeds=select, confirm_seeds=fresh)
    chosen_part, confirm_part = text.split("# Confirmation")
    assert "bn_relu held out: 4 seeds" in chosen_part  # the fresh seeds stay out of the choice
    assert "a against bn_relu: level 1/1" in chosen_part
    assert "4 fresh seeds (1004-1007) alone" in confirm_part
    assert "a against bn_relu: level 0/1" in confirm_part and "`x / rms_b(x)`" in confirm_part
    # the best reached: only layers with every seed (the confirmed pick), judged on all of them
    best = text.split("# The best reached")[1]
    assert "the 1 layers trained on all 8 seeds" in best
    assert "| `x / rms_b(x)` | a s0 |" in best and "rms_i" not in best
    pooled = heldout.judge(table[lucky], bn)
    assert heldout.difference(pooled) in best and pooled["diff"] == pytest.approx(-0.0083, abs=1e-3)


def test_a_result_whose_formula_does_not_read_back_is_one_line(heldout, tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(run("random", 0, [cand(1, 1.0, [0.9], "x / foo(x)")])) + "\n")
    assert heldout.main(["--results", str(results), "--arms", "random", "--out", str(tmp_path / "h.jsonl"),
                         "--report"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: a recorded formula: not a formula: unknown op 'foo'") and "\n" not in err


def test_a_pick_level_only_by_a_diverged_seed_is_marked(heldout):
    """A layer a bit worse than bn_relu on every seed but one, where its training diverged, has a
    wide interval and passes as "level"; the report counts it apart from picks that never diverged."""
    seeds = list(range(1000, 1008))
    bn = {s: 0.975 + 0.002 * (s % 3) for s in seeds}
    shaky, steady = heldout.layer_key("x / rms_b(x)"), heldout.layer_key("x / rms_i(x)")
    archs = ("resnet", "mobilenetv2", "efficientnet")
    lines = [{"seed": s, "key": "bn_relu", "acc": {a: bn[s] for a in archs}, "diverged": [], "cpu_s": 1.0}
             for s in seeds]
    for s in seeds:  # shaky: 0.01 below on every seed, one architecture at 0 on the last one
        acc = {a: bn[s] - 0.01 - 0.002 * (s % 2) for a in archs}
        if s == seeds[-1]:
            acc["efficientnet"] = 0.0
        lines.append({"seed": s, "key": shaky, "acc": acc, "cpu_s": 1.0,
                      "diverged": ["efficientnet"] if s == seeds[-1] else []})
        lines.append({"seed": s, "key": steady, "acc": {a: bn[s] + 0.001 * (s % 2) for a in archs},
                      "diverged": [], "cpu_s": 1.0})
    runs = [run("a", 0, [cand(1, 10.0, [0.95], "x / rms_b(x)")]),
            run("a", 1, [cand(1, 10.0, [0.95], "x / rms_i(x)")])]
    assert heldout.diverged_by_key(lines) == {shaky: {seeds[-1]}}
    rows = heldout.arm_verdicts(runs, heldout.scores_by_key(lines), horizon=100.0,
                                diverged=heldout.diverged_by_key(lines))
    assert rows[0]["level"] and rows[0]["diverged"] == 1 and not rows[0]["level_stable"]
    assert rows[1]["level"] and rows[1]["diverged"] == 0 and rows[1]["level_stable"]
    # judged on seeds without the diverged one, the same pick is worse and has nothing to mark
    clean = heldout.on_seeds(heldout.scores_by_key(lines), seeds[:-1])
    row = heldout.arm_verdicts(runs, clean, horizon=100.0, diverged=heldout.diverged_by_key(lines))[0]
    assert not row["level"] and row["diverged"] == 0
    text = heldout.report(runs, lines, 100.0, 1, "cmd")
    assert "a against bn_relu: level 2/2 (1 of them with a training that diverged)" in text
    assert "| 8 (1 diverged) | yes |" in text


def test_picks_without_the_fresh_seeds_are_said_so_and_the_arms_not_compared(heldout):
    """Fresh seeds trained for the references and for some picks only (a held-out file shared
    across rounds): the confirmation counts say how many picks lack them and compares no arms on
    them (a missing pick is not the lowest score), while the selection part compares as before."""
    select, fresh = [1000, 1001, 1002, 1003], [1004, 1005, 1006, 1007]
    bn = {s: 0.97 + 0.001 * (s % 3) for s in select + fresh}
    confirmed, unconfirmed = heldout.layer_key("x / rms_b(x)"), heldout.layer_key("x / rms_i(x)")
    table = {"bn_relu": bn, confirmed: {s: bn[s] - 0.01 - 0.001 * (s % 2) for s in select + fresh},
             unconfirmed: {s: bn[s] - 0.02 - 0.001 * (s % 2) for s in select}}
    runs = [run("a", 0, [cand(1, 10.0, [0.95], "x / rms_b(x)")]),
            run("b", 0, [cand(1, 10.0, [0.95], "x / rms_i(x)")])]
    lines = held_lines(table)
    text = heldout.report(runs, lines, 100.0, 1, "cmd", seeds=select, confirm_seeds=fresh)
    chosen_part, confirm_part = text.split("# Confirmation")
    assert "Mann-Whitney" in chosen_part and "not compared" not in chosen_part
    assert "a against bn_relu: level 0/1, within 0.01" in confirm_part  # -0.0105: its pick has them
    assert "b against bn_relu: no pick trained on these seeds (0 of 1)" in confirm_part
    assert "a / b: not compared (not every pick trained on these seeds)" in confirm_part
    assert "Mann-Whitney" not in confirm_part
    # no pick has the fresh seeds (only the references do): no confirmation section at all
    lines = [r for r in lines if r["key"] == "bn_relu" or r["seed"] in select]
    assert "# Confirmation" not in heldout.report(runs, lines, 100.0, 1, "cmd", seeds=select, confirm_seeds=fresh)


def test_no_act_bn_sets_the_held_out_task_and_a_file_keeps_one_mode(heldout, tmp_path, capsys):
    """`--no-act bn` trains the candidates with BatchNorm in the no-activation slots; its lines say
    so, and a file of one mode is never judged or grown as the other (they would pair unlike trainings)."""
    assert "no_act" not in heldout.heldout_task()[0]["layer_options"]  # the default placement (the affine)
    assert heldout.heldout_task("bn")[0]["layer_options"]["no_act"] == "bn"
    log = [cand(1, 10.0, [0.97, 0.96, 0.98], "x / rms_b(x)")]
    results = tmp_path / "r.jsonl.gz"
    with gzip.open(results, "wt") as f:
        f.write(json.dumps(run("random", 3, log)) + "\n")
    line = {"seed": 1_000_000, "key": "bn_relu", "layer": "bn_relu", "acc": {"resnet": 0.9}, "diverged": [], "cpu_s": 1.0}
    for mode, other in (("affine", "bn"), ("bn", "affine")):
        out = tmp_path / f"{mode}.jsonl"
        out.write_text(json.dumps({**line, **({"no_act": "bn"} if mode == "bn" else {})}) + "\n")
        capsys.readouterr()
        for extra in (["--report"], []):  # neither judged nor grown as the other mode
            assert heldout.main(["--results", str(results), "--arms", "random", "--seeds", "1", "--out", str(out),
                                 "--no-act", other, *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"trained with no_act '{mode}', not '{other}'" in err
        assert out.read_text().count("\n") == 1  # nothing trained into it
        assert heldout.main(["--results", str(results), "--arms", "random", "--seeds", "1", "--out", str(out),
                             "--no-act", mode, "--report"]) == 0
        said = "gets that in the networks' no-activation slots" in capsys.readouterr().out
        assert said == (mode == "bn")  # the report says when the candidates were placed otherwise
    # the searches' side of "where it sits" must be of the searches' mode
    assert heldout.main(["--results", str(results), "--arms", "random", "--seeds", "1", "--out", str(tmp_path / "bn.jsonl"),
                         "--no-act", "bn", "--searches-out", str(tmp_path / "bn.jsonl"), "--report"]) == 2
    assert "holds lines of another mode than the searches' 'affine'" in capsys.readouterr().err


@pytest.mark.slow
def test_with_no_act_bn_bn_relus_graph_trains_as_bn_relu(heldout, short_task):
    """The real evaluator with `no_act = "bn"`: bn_relu's graph as a candidate gets BatchNorm where
    the known layer has it, so it trains to bn_relu's own accuracies (under the searches' affine it
    does not: test_one_run_trained_on_the_held_out_task_and_reported)."""
    evaluate = heldout.heldout_evaluate("bn")
    graph = evaluate(1_000_000, heldout.bn_relu_graph_key(), heldout.bn_relu_graph())
    known = evaluate(1_000_000, "bn_relu", "bn_relu")
    assert graph["no_act"] == known["no_act"] == "bn"
    assert graph["acc"] == known["acc"] and 0.5 < min(known["acc"].values())


def test_where_it_sits_pairs_each_pick_across_the_two_modes(heldout):
    """With the searches' lines beside the `--no-act bn` ones, the report gives each run's pick (the
    bn mode's) and bn_relu's graph the difference between the modes, paired by seed."""
    formulas = ["x / rms_b(x)", "tanh(x) / std_b(x)"]
    keys = [heldout.layer_key(f) for f in formulas]
    graph = heldout.bn_relu_graph_key()
    seeds = [1000, 1001, 1002, 1003]
    runs = [run("a", 0, [cand(i + 1, 10.0, [0.95 - i / 100], f) for i, f in enumerate(formulas)])]
    affine = {"bn_relu": {s: 0.98 for s in seeds}, graph: {s: 0.974 + 0.001 * (s % 2) for s in seeds},
              keys[0]: {s: 0.96 for s in seeds}, keys[1]: {s: 0.965 for s in seeds}}
    with_bn = {"bn_relu": affine["bn_relu"], graph: affine["bn_relu"],
               keys[0]: {s: 0.972 + 0.002 * (s % 2) for s in seeds}, keys[1]: {s: 0.97 for s in seeds}}
    text = heldout.report(runs, held_lines(with_bn, no_act="bn"), 100.0, 2, "cmd", seeds=seeds, no_act="bn",
                          searches_lines=held_lines(affine))
    part = text.split("# Where it sits")[1]
    assert "| reference | - | bn_relu's graph | +0.0055 [" in part  # 0.98 - (0.974, 0.975)
    # the bn mode's pick (x / rms_b(x): 0.973 against 0.97), its difference 0.013 between the modes
    assert "| a | 0 | `x / rms_b(x)` | +0.0130 [" in part and "tanh" not in part
    assert "| 4 |" in part
    assert "# Where it sits" not in heldout.report(runs, held_lines(affine), 100.0, 2, "cmd", seeds=seeds,
                                                   searches_lines=held_lines(affine))  # one mode: nothing to pair


def test_runs_searched_with_batchnorm_in_the_slots_are_held_out_with_it(heldout, tmp_path, capsys, monkeypatch):
    """Runs record their `--layer-options`; without `--no-act` the held-out task places the
    candidates as the runs' searches did, and runs searched under two placements (or layer options
    the task does not set) are refused in one line, not judged as one set."""
    log = [cand(1, 10.0, [0.97, 0.96, 0.98], "x / rms_b(x)")]

    def results_file(name, *layer_options):
        path = tmp_path / name
        path.write_text("".join(json.dumps({**run("random", s, log), "layer_options": o}) + "\n"
                                for s, o in enumerate(layer_options)))
        return str(path)

    searched_bn = results_file("bn.jsonl", {"no_act": "bn"}, {"no_act": "bn"})
    assert heldout.searched_no_act(heldout.discovery.read_results(searched_bn)) == "bn"
    assert heldout.searched_no_act([run("random", 0, log)]) == "affine"  # runs from before the option
    trained: list[str] = []

    def fake_evaluate(no_act):
        def evaluate(seed, key, layer):
            trained.append(no_act)
            return {"acc": {"resnet": 0.9}, "diverged": [], **({"no_act": no_act} if no_act != "affine" else {})}
        return evaluate

    monkeypatch.setattr(heldout, "heldout_evaluate", fake_evaluate)
    out = tmp_path / "held.jsonl"
    assert heldout.main(["--results", searched_bn, "--arms", "random", "--seeds", "1", "--out", str(out)]) == 0
    assert trained and set(trained) == {"bn"} and heldout.modes_of(heldout.read_lines(str(out))) == {"bn"}
    capsys.readouterr()
    assert heldout.main(["--results", searched_bn, "--arms", "random", "--seeds", "1", "--out", str(out), "--report"]) == 0
    assert "gets that in the networks' no-activation slots, as the searches did" in capsys.readouterr().out
    for placements, said in ((({"no_act": "bn"}, {}), "searched with different no_act placements (affine, bn)"),
                             (({"eps": 0.001},), "searched with layer options eps")):
        mixed = results_file("mixed.jsonl", *placements)
        assert heldout.main(["--results", mixed, "--arms", "random", "--seeds", "1", "--out", str(out), "--report"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err
