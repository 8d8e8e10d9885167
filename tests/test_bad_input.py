"""The catalogue of bad input: each one clear line on stderr, exit status 2, no traceback,
and nothing in an existing study changed."""
from __future__ import annotations

import json

import pytest
from optuna.trial import TrialState

from opsearch.cli import main
from opsearch.study import Run, open_run, run_trials
from studies import add_finished

ARCHS = ["resnet", "mobilenetv2"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """An existing run with finished trials, as a search would have left it (one for the module:
    every case checks that it left the study unchanged, so they can share it)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('bad_input')}/study.db"
    run = Run.create_or_open(url, "r", {"space": "evonorm", "space_options": {}, "archs": ARCHS,
                                        "dataset": "synthetic"}, [])
    graph = json.dumps({"schema": "opsearch.graph/1",
                        "nodes": [{"op": "sigmoid", "inputs": [0]}, {"op": "mul", "inputs": [0, 4]}]})
    add_finished(run, {"kind": "candidate", "verdict": "evaluated", "graph": graph,
                      "formula": "x * sigmoid(x)", "genome": "[0]", "elapsed_s": 1.0,
                      "acc/resnet": 0.5, "acc/mobilenetv2": 0.6}, TrialState.COMPLETE, [0.5, 0.6])
    add_finished(run, {"kind": "candidate", "verdict": "rejected:numerics", "graph": graph,
                      "formula": "x", "genome": "[1]", "elapsed_s": 0.1}, TrialState.PRUNED, None)
    return url


def snapshot(url):
    return [(t.number, t.state, t.values, t.user_attrs) for t in run_trials(open_run(url, "r"))]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def search_args(url, *extra):
    return ["search", "--storage", url, "--name", "r", "--dataset", "synthetic",
            "--archs", ",".join(ARCHS), "--quiet", "--no-plots", *extra]


CASES = {
    "unknown space": lambda t, u: search_args(u, "--space", "evonrom"),
    "unknown algorithm": lambda t, u: search_args(u, "--algorithm", "regularised_evolution"),
    "unknown dataset": lambda t, u: ["search", "--storage", u, "--name", "r", "--dataset", "imagenet"],
    "unknown architecture": lambda t, u: ["search", "--storage", u, "--name", "r", "--dataset",
                                          "synthetic", "--archs", "resnet,vgg"],
    "unknown filter": lambda t, u: search_args(u, "--filters", "validity,speed"),
    "unknown baseline layer": lambda t, u: search_args(u, "--baselines", "bn_relu,evonorm_b9"),
    "budget zero": lambda t, u: search_args(u, "--budget", "0"),
    "budget negative": lambda t, u: search_args(u, "--budget", "-3"),
    "budget not a number": lambda t, u: search_args(u, "--budget", "ten"),
    "workers zero": lambda t, u: search_args(u, "--workers", "0"),
    "steps zero": lambda t, u: search_args(u, "--steps", "0"),
    "config file missing": lambda t, u: search_args(u, "--config", str(t / "nope.toml")),
    "config not TOML": lambda t, u: search_args(u, "--config", write(t, "bad.toml", "budget = = 3\n[")),
    "config unknown key": lambda t, u: search_args(u, "--config", write(t, "k.toml", "budjet = 3\n")),
    "config wrong type": lambda t, u: search_args(u, "--config", write(t, "w.toml", 'budget = "ten"\n')),
    "config archs not a list": lambda t, u: ["search", "--storage", u, "--name", "r", "--config",
                                             write(t, "a.toml", "archs = 3\n")],
    "plugin file missing": lambda t, u: search_args(u, "--plugin", str(t / "missing.py")),
    "plugin syntax error": lambda t, u: search_args(u, "--plugin", write(t, "syn.py", "def f(:\n")),
    "plugin raises": lambda t, u: search_args(u, "--plugin", write(t, "boom.py", "raise RuntimeError('boom')\n")),
    "space returns wrong type": lambda t, u: search_args(
        u, "--plugin", write(t, "space42.py", "from opsearch import search_space\n"
                                              "@search_space('answer')\ndef answer():\n    return 42\n"),
        "--space", "answer"),
    "unknown space option": lambda t, u: search_args(u, "-O", "space.num_nodez=3"),
    "unknown algorithm option": lambda t, u: search_args(u, "-O", "algorithm.populaton_size=3"),
    "bad option syntax": lambda t, u: search_args(u, "-O", "population_size"),
    "unknown evaluator option": lambda t, u: search_args(u, "-O", "evaluator.stepz=3"),
    "unknown filter option": lambda t, u: search_args(u, "-O", "filter.quality.min_acc=0.3"),
    "bad storage scheme": lambda t, u: ["search", "--storage", "nosuchdb://host/x", "--quiet"],
    "storage not a database": lambda t, u: ["search", "--storage",
                                            f"sqlite:///{write(t, 'fake.db', 'not sqlite')}", "--quiet"],
    "gpu that does not exist": lambda t, u: search_args(u, "--accelerator", "gpu"),
    "data dir without the files": lambda t, u: ["search", "--storage", u, "--name", "r", "--dataset",
                                                "fashion_mnist", "--data-dir", str(t / "empty"),
                                                "--archs", ",".join(ARCHS)],
    "incompatible resume": lambda t, u: ["search", "--storage", u, "--name", "r", "--dataset",
                                         "synthetic", "--archs", "resnet", "--quiet"],
    "invalid run name": lambda t, u: ["search", "--name", "../x", "--quiet"],
    "show missing run": lambda t, u: ["show", str(t / "nothing.db") + ".log"],
    "show unknown study": lambda t, u: ["show", u.replace("study.db", "other.db")],
    "export missing trial": lambda t, u: ["export", u, "--trial", "99"],
    "export rejected trial": lambda t, u: ["export", u, "--trial", "1"],
    "evaluate unknown layer": lambda t, u: ["evaluate", "bn_rleu", "--dataset", "synthetic"],
    "evaluate graph file missing": lambda t, u: ["evaluate", str(t / "layer.json")],
    "evaluate malformed graph file": lambda t, u: ["evaluate", write(t, "layer.json", '{"schema": 3}')],
    "unknown command option": lambda t, u: ["search", "--budgett", "3"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case, study, tmp_path, capsys):
    (tmp_path / "empty").mkdir(exist_ok=True)
    before = snapshot(study)
    args = CASES[case](tmp_path, study)
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (case, err)
    assert len(lines) == 1, (case, err)
    assert "Traceback" not in err and "error" in lines[0].lower()
    assert snapshot(study) == before
