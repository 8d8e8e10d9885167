"""`opsearch export`: standalone source of a found layer, equal to the compiled layer; bad input
(unknown run or trial, a rejected trial, a tampered graph) is one line and exit status 2."""
from __future__ import annotations

import json

import optuna
import pytest
import torch
from optuna.trial import TrialState, create_trial

from opsearch import cli, graph
from opsearch.compile import compile_graph
from test_report import EVONORM_S0, make_study


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    return make_study(str(tmp_path_factory.mktemp("export") / "study.db"))


def _load_class(source: str, name: str):
    imports = [line for line in source.splitlines() if line.lstrip().startswith(("import ", "from "))]
    assert imports and not any("opsearch" in line for line in imports)  # standalone
    namespace: dict = {}
    exec(compile(source, "<exported>", "exec"), namespace)
    return namespace[name]


def _assert_same_layer(exported, compiled, channels):
    exported.load_state_dict(compiled.state_dict())
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # training mode, running statistics move
        x = torch.randn(4, channels, 5, 5, generator=gen) * 2 + 0.5
        torch.testing.assert_close(exported.train()(x), compiled.train()(x), rtol=1e-5, atol=1e-6)
    x = torch.randn(1, channels, 5, 5, generator=gen)
    torch.testing.assert_close(exported.eval()(x), compiled.eval()(x), rtol=1e-5, atol=1e-6)


def test_export_best_trial_to_stdout_equals_the_compiled_layer(url, capsys):
    assert cli.main(["export", url]) == 0
    source = capsys.readouterr().out
    assert "trial 3" in source and "std_g" in source  # the best mean: EvoNorm-S0
    cls = _load_class(source, "SearchedLayer")
    for channels in (8, 7, 64):
        g = graph.from_dict(EVONORM_S0)
        with torch.no_grad():
            compiled = compile_graph(g, channels)
            for p in compiled.parameters():
                p.uniform_(0.5, 1.5)
        _assert_same_layer(cls(channels), compiled, channels)


def test_export_a_chosen_trial_to_a_file_with_a_class_name(url, tmp_path, capsys):
    out = tmp_path / "sub" / "layer.py"
    assert cli.main(["export", url, "--trial", "6", "-o", str(out), "--class-name", "MyNorm"]) == 0
    assert capsys.readouterr().out == ""
    cls = _load_class(out.read_text(), "MyNorm")  # a duplicate's graph exports too
    assert cls(16)(torch.randn(2, 16, 3, 3)).shape == (2, 16, 3, 3)


@pytest.mark.parametrize("argv, message", [
    (["--trial", "2"], "trial 2 was rejected:validity"),
    (["--trial", "10"], "trial 10 was failed:timeout"),
    (["--trial", "99"], "no trial 99"),
    (["--class-name", "not valid"], "identifier"),
])
def test_export_bad_trials_are_one_line_exit_2(url, capsys, argv, message):
    assert cli.main(["export", url, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_export_of_a_run_that_does_not_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPSEARCH_RUNS_DIR", str(tmp_path))
    assert cli.main(["export", "nope"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_export_of_a_tampered_graph_never_runs_it(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 't.db'}"
    study = optuna.create_study(storage=url, study_name="t", directions=["maximize"])
    study.set_user_attr("archs", ["resnet"])
    evil = {"schema": "opsearch.graph/1", "nodes": [{"op": "__import__('os').system('touch pwned')",
                                                      "inputs": [0, 0]}]}
    study.add_trial(create_trial(state=TrialState.COMPLETE, values=[0.9], user_attrs={
        "kind": "candidate", "verdict": "evaluated", "graph": json.dumps(evil), "acc/resnet": 0.9}))
    assert cli.main(["export", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stored graph is invalid" in err
    assert not (tmp_path / "pwned").exists()


def test_export_with_no_evaluated_candidate(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'e.db'}"
    study = optuna.create_study(storage=url, study_name="e", directions=["maximize"])
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={"verdict": "rejected:numerics"}))
    assert cli.main(["export", url]) == 2
    assert "no evaluated candidate" in capsys.readouterr().err
