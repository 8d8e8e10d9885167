"""Reports over a small synthetic study: leaderboard, Pareto marks, rejection statistics, and the
`show` / `plot` commands end to end (an Optuna SQLite study built here, no search needed)."""
from __future__ import annotations

import json
import os

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from opsearch import cli, report

optuna.logging.set_verbosity(optuna.logging.WARNING)

ARCHS = ["resnet", "mobilenetv2"]
# EvoNorm-S0: x * sigmoid(v0 * x) / std_g(x)
EVONORM_S0 = {"schema": "opsearch.graph/1", "nodes": [
    {"op": "mul", "inputs": [2, 0]}, {"op": "sigmoid", "inputs": [4, 4]},
    {"op": "mul", "inputs": [0, 5]}, {"op": "std_g", "inputs": [0, 0]},
    {"op": "div", "inputs": [6, 7]}]}
RELU = {"schema": "opsearch.graph/1", "nodes": [{"op": "max", "inputs": [0, 1]}]}


def _candidate(verdict, values=None, formula="x", graph=RELU, elapsed=1.0, filters=None, **extra):
    attrs = {"kind": "candidate", "verdict": verdict, "formula": formula, "graph": json.dumps(graph),
             "elapsed_s": elapsed}
    for name, seconds in (filters or {}).items():
        attrs[f"filter_s/{name}"] = seconds
    if values is not None:
        attrs.update({f"acc/{a}": v for a, v in zip(ARCHS, values)})
    attrs.update(extra)
    return attrs


def synthetic_trials() -> list[tuple[TrialState, list[float] | None, dict]]:
    """(state, values, user attrs) for: 2 baselines, 3 evaluated, 1 duplicate, 4 rejected, 1 failed."""
    cheap = {"validity": 0.0001, "numerics": 0.01}
    upto_eq = {**cheap, "equivalence": 0.02}
    full = {**upto_eq, "stability": 0.3, "quality": 3.0}
    return [
        (TrialState.COMPLETE, [0.90, 0.80], {"kind": "baseline", "layer": "bn_relu", "verdict": "evaluated",
                                             "acc/resnet": 0.90, "acc/mobilenetv2": 0.80, "elapsed_s": 30.0}),
        (TrialState.COMPLETE, [0.50, 0.40], {"kind": "baseline", "layer": "identity", "verdict": "evaluated",
                                             "acc/resnet": 0.50, "acc/mobilenetv2": 0.40, "elapsed_s": 30.0}),
        (TrialState.PRUNED, None, _candidate("rejected:validity", elapsed=0.001, filters={"validity": 0.0001},
                                             reason="output does not depend on x")),
        (TrialState.COMPLETE, [0.88, 0.86], _candidate("evaluated", [0.88, 0.86], "x*sigmoid(v0*x) / std_g(x)",
                                                       EVONORM_S0, 30.0, full)),
        (TrialState.PRUNED, None, _candidate("rejected:numerics", elapsed=0.02, filters=cheap)),
        (TrialState.COMPLETE, [0.95, 0.70], _candidate("evaluated", [0.95, 0.70], "max(x, 0)", RELU, 30.0, full)),
        (TrialState.COMPLETE, [0.88, 0.86], _candidate("duplicate:3", [0.88, 0.86], "x*sigmoid(x*v0) / std_g(x)",
                                                       EVONORM_S0, 0.05, upto_eq,
                                                       **{"metric/equivalence/same_as": 3})),
        (TrialState.PRUNED, None, _candidate("rejected:stability", elapsed=0.4,
                                             filters={**upto_eq, "stability": 0.3})),
        (TrialState.PRUNED, None, _candidate("rejected:quality", elapsed=3.5, filters=full)),
        (TrialState.COMPLETE, [0.60, 0.60], _candidate("evaluated", [0.60, 0.60], "tanh(x)", RELU, 30.0, full)),
        (TrialState.FAIL, None, _candidate("failed:timeout", elapsed=900.0, filters=full)),
        (TrialState.PRUNED, None, _candidate("rejected:numerics", elapsed=0.02, filters=cheap)),
    ]


def make_study(path: str, study_name: str = "synth") -> str:
    """An Optuna SQLite study with the synthetic trials; returns its URL."""
    url = f"sqlite:///{path}"
    study = optuna.create_study(storage=url, study_name=study_name, directions=["maximize"] * len(ARCHS))
    for key, value in {"space": "evonorm", "algorithm": "random", "archs": ARCHS, "dataset": "digits",
                       "config": json.dumps({"seed": 0})}.items():
        study.set_user_attr(key, value)
    for state, values, attrs in synthetic_trials():
        study.add_trial(create_trial(state=state, values=values, user_attrs=attrs))
    return url


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    url = make_study(str(tmp_path_factory.mktemp("report") / "study.db"))
    return optuna.load_study(study_name="synth", storage=url).get_trials()


def test_pareto_mask_marks_only_non_dominated_points():
    points = [(1, 1), (2, 0), (0, 2), (0.5, 0.5), (1, 1), (2, 0), (1.5, 0.0)]
    assert report.pareto_mask(points) == [True, True, True, False, True, True, False]
    assert report.pareto_mask([]) == []
    assert report.pareto_mask([(3,), (1,), (3,)]) == [True, False, True]


def test_leaderboard_order_pareto_and_baselines(trials):
    rows = report.leaderboard(trials, ARCHS, top=10)
    assert [r.trial for r in rows] == [3, 0, 5, 9, 1]  # by mean; duplicate 6 left out
    marks = {r.trial: r.pareto for r in rows}
    # 5 (0.95, 0.70) and 3 (0.85, 0.85) and bn_relu (0.90, 0.80) trade off; 9 and identity are dominated
    assert marks == {3: True, 5: True, 0: True, 9: False, 1: False}
    assert [r.kind for r in rows if r.kind == "baseline"] == ["baseline", "baseline"]
    assert rows[0].name == "x*sigmoid(v0*x) / std_g(x)" and rows[1].name == "bn_relu"
    top1 = report.leaderboard(trials, ARCHS, top=1)
    assert [r.trial for r in top1] == [3, 0, 1]  # the best candidate plus every baseline


def test_best_trial_is_best_mean_candidate(trials):
    assert report.best_trial(trials, ARCHS).number == 3
    assert report.best_trial([t for t in trials if t.number in (2, 4)], ARCHS) is None


def test_rejection_and_time_statistics(trials):
    stats = {s.filter: s for s in report.filter_stats(trials)}
    assert {k: s.rejected for k, s in stats.items()} == {
        "validity": 1, "numerics": 2, "equivalence": 0, "stability": 1, "quality": 1}
    assert stats["equivalence"].duplicates == 1
    assert stats["validity"].ran == 10 and stats["quality"].ran == 5
    assert stats["quality"].mean_s == pytest.approx(3.0)
    counts = report.verdict_counts(trials)
    assert counts == {"rejected": 5, "evaluated": 3, "duplicate": 1, "failed": 1}
    times = report.time_per_candidate(trials)
    assert times["evaluated"]["mean_s"] == pytest.approx(30.0)
    assert times["rejected"]["count"] == 5
    summary = report.summary(trials, {"archs": ARCHS})
    assert summary["candidates"] == 10
    assert summary["not_trained_share"] == pytest.approx(0.6)
    assert summary["best_trial"] == 3


def test_best_so_far_counts_every_candidate(trials):
    series = report.best_so_far(trials, ARCHS)
    # candidates in order: 2 3 4 5 6 7 8 9 10 11 -> indices 1..10; evaluated/duplicate at 2, 4, 5, 8
    assert series["resnet"] == [(2, 0.88), (4, 0.95), (5, 0.95), (8, 0.95)]
    assert series["mobilenetv2"][-1] == (8, 0.86)


def test_show_json_and_table(tmp_path, capsys):
    url = make_study(str(tmp_path / "study.db"))
    assert cli.main(["show", url, "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert out.count("\n") == 1
    assert data["summary"]["leaderboard"][0]["trial"] == 3
    assert len(data["trials"]) == 12
    assert data["trials"][3]["user_attrs"]["verdict"] == "evaluated"
    assert cli.main(["show", url, "--top", "1"]) == 0
    text = capsys.readouterr().out
    assert "Leaderboard" in text and "bn_relu (baseline)" in text and "std_g" in text
    assert "Rejection filters" in text and "quality" in text
    assert "max(x, 0)" not in text  # --top 1


def test_show_resolves_run_names(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPSEARCH_RUNS_DIR", str(tmp_path))
    os.makedirs(tmp_path / "myrun")
    make_study(str(tmp_path / "myrun" / "study.db"), study_name="myrun")
    assert cli.main(["show", "myrun", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["candidates"] == 10


def test_show_unknown_run_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPSEARCH_RUNS_DIR", str(tmp_path))
    assert cli.main(["show", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_plot_writes_three_pngs(tmp_path, capsys):
    url = make_study(str(tmp_path / "study.db"))
    out_dir = tmp_path / "plots"
    assert cli.main(["plot", url, "-o", str(out_dir)]) == 0
    for name in ("best_so_far.png", "pareto.png", "rejections.png"):
        data = (out_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_of_a_run_with_no_evaluation(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    study = optuna.create_study(storage=url, study_name="e", directions=["maximize"] * 2)
    study.set_user_attr("archs", ARCHS)
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs=_candidate("rejected:validity")))
    assert cli.main(["plot", url, "-o", str(tmp_path / "p")]) == 0
    assert cli.main(["show", url]) == 0
    assert "1 candidates" in capsys.readouterr().out


def test_show_export_plot_pick_a_study_with_storage(tmp_path, capsys, monkeypatch):
    """Two studies in one storage: RUN --storage URL names one; plots go beside the study."""
    monkeypatch.chdir(tmp_path)
    os.makedirs(tmp_path / "db")
    url = make_study(str(tmp_path / "db" / "two.db"), study_name="first")
    make_study(str(tmp_path / "db" / "two.db"), study_name="second")
    assert cli.main(["show", url]) == 2  # ambiguous: says which studies it holds
    assert "it holds: first, second" in capsys.readouterr().err
    for name in ("first", "second"):
        assert cli.main(["show", name, "--storage", url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["study"] == name
        assert cli.main(["export", name, "--storage", url, "-o", str(tmp_path / f"{name}.py")]) == 0
        assert "class SearchedLayer" in (tmp_path / f"{name}.py").read_text()
        assert cli.main(["plot", name, "--storage", url]) == 0
        printed = capsys.readouterr().out.split()
        assert [os.path.dirname(p) for p in printed] == [str(tmp_path / "db" / name / "plots")] * 3
    assert not os.path.exists(tmp_path / "plots") and not os.path.exists(tmp_path / "runs")
    assert cli.main(["show", "third", "--storage", url]) == 2
    assert "no run named 'third'" in capsys.readouterr().err


def test_plot_of_a_named_run_goes_to_its_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPSEARCH_RUNS_DIR", str(tmp_path / "runs"))
    os.makedirs(tmp_path / "runs" / "myrun")
    make_study(str(tmp_path / "runs" / "myrun" / "study.db"), study_name="myrun")
    assert cli.main(["plot", "myrun"]) == 0
    printed = capsys.readouterr().out.split()
    assert {os.path.dirname(p) for p in printed} == {str(tmp_path / "runs" / "myrun" / "plots")}
