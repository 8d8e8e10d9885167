"""`opsearch dashboard RUN`: optuna-dashboard serves the study, with every trial's formula and verdict."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import optuna
import pytest

from opsearch.cli import main

ARCHS = ["resnet", "mobilenetv2"]
TRIALS = [  # (values or None when rejected, user attributes as the engine stores them)
    ([0.97, 0.95], {"verdict": "evaluated", "formula": "max(x * sigmoid(v0 * x), 0)", "kind": "candidate",
                    "acc/resnet": 0.97, "acc/mobilenetv2": 0.95, "elapsed_s": 9.5}),
    (None, {"verdict": "rejected:quality", "formula": "tanh(exp(x))", "kind": "candidate",
            "reason": "resnet validation accuracy 0.100 < 0.2 after 100 steps"}),
    ([0.96, 0.94], {"verdict": "evaluated", "formula": "x / std_g(x)", "kind": "baseline", "layer": "gn"}),
]


def _make_study(path, name="demo") -> str:
    url = f"sqlite:///{path}"
    study = optuna.create_study(storage=url, study_name=name, directions=["maximize"] * len(ARCHS))
    study.set_user_attr("archs", ARCHS)
    for values, attrs in TRIALS:
        state = optuna.trial.TrialState.COMPLETE if values else optuna.trial.TrialState.PRUNED
        study.add_trial(optuna.trial.create_trial(values=values, state=state, user_attrs=attrs))
    return url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, deadline: float, proc) -> dict:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.time() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
def test_dashboard_serves_each_trials_formula_and_verdict(tmp_path):
    pytest.importorskip("optuna_dashboard")
    url = _make_study(tmp_path / "study.db")
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "opsearch.cli", "dashboard", "demo", "--storage", url,
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        base = f"http://127.0.0.1:{port}"
        studies = _get_json(f"{base}/api/studies", deadline, proc)["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == "demo"]
        while True:  # the notes are written in the background, just after the start
            detail = _get_json(f"{base}/api/studies/{summary['study_id']}", deadline, proc)
            if all(t["note"]["body"] for t in detail["trials"]) or time.time() > deadline:
                break
            time.sleep(0.5)
        assert detail["objective_names"] == ARCHS  # objectives named after the architectures
        trials = sorted(detail["trials"], key=lambda t: t["number"])
        assert len(trials) == len(TRIALS)
        for trial, (values, attrs) in zip(trials, TRIALS):
            shown = {a["key"]: a["value"] for a in trial["user_attrs"]}
            assert shown["formula"] == attrs["formula"] and shown["verdict"] == attrs["verdict"]
            assert trial["state"] == ("Complete" if values else "Pruned")
            note = trial["note"]["body"]  # the box at the top of the trial's page
            assert attrs["formula"] in note and attrs["verdict"] in note
            assert attrs.get("reason", "") in note
        with urllib.request.urlopen(f"{base}/dashboard/studies/{summary['study_id']}", timeout=5) as r:
            assert r.status == 200 and b"<html" in r.read().lower()  # the page itself
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert f"http://127.0.0.1:{port}/dashboard/studies/" in err.decode()


def test_dashboard_without_the_package_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    url = _make_study(tmp_path / "study.db")
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import fails as if not installed
    assert main(["dashboard", "demo", "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'opsearch[dashboard]'" in err


def test_dashboard_bad_run_or_port_is_one_line(tmp_path, capsys):
    url = _make_study(tmp_path / "study.db")
    assert main(["dashboard", "nope", "--storage", url]) == 2
    assert "no run named 'nope'" in capsys.readouterr().err
    assert main(["dashboard", "demo", "--storage", url, "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    if importlib.util.find_spec("optuna_dashboard") is not None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            assert main(["dashboard", "demo", "--storage", url, "--port", str(port), "--no-notes"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"cannot serve on 127.0.0.1:{port}" in err


def test_dashboard_names_objectives_after_architectures_once(tmp_path):
    from opsearch.commands.dashboard import name_objectives

    url = _make_study(tmp_path / "study.db")
    study = optuna.load_study(study_name="demo", storage=url)
    name_objectives(study)
    assert optuna.load_study(study_name="demo", storage=url).metric_names == ARCHS
    study.set_metric_names(["a", "b"])  # names someone chose are kept
    name_objectives(study)
    assert optuna.load_study(study_name="demo", storage=url).metric_names == ["a", "b"]


def test_notes_are_added_once_and_never_replace_a_users_note(tmp_path):
    pytest.importorskip("optuna_dashboard")
    from optuna_dashboard._note import get_note_from_system_attrs, save_note_with_version

    from opsearch.commands.dashboard import add_notes

    url = _make_study(tmp_path / "study.db")
    study = optuna.load_study(study_name="demo", storage=url)
    storage, sid = study._storage, study._study_id
    mine = study.trials[2]._trial_id
    save_note_with_version(storage, sid, mine, 1, "my own note")
    assert add_notes(storage, sid) == len(TRIALS) - 1
    assert add_notes(storage, sid) == 0  # nothing twice
    attrs = storage.get_study_system_attrs(sid)
    assert get_note_from_system_attrs(attrs, mine)["body"] == "my own note"
    evaluated = get_note_from_system_attrs(attrs, study.trials[0]._trial_id)["body"]
    assert evaluated.startswith("**evaluated** · `max(x * sigmoid(v0 * x), 0)`")
    assert "resnet 0.9700 · mobilenetv2 0.9500" in evaluated
    rejected = get_note_from_system_attrs(attrs, study.trials[1]._trial_id)["body"]
    assert rejected.startswith("**rejected:quality** · `tanh(exp(x))`") and "0.100 < 0.2" in rejected
