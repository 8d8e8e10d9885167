"""opsearch from Python (opsearch/api.py, opsearch/run.py): the same search as the command line,
its results as tables and figures, its layer in a plain PyTorch model, and bad input as the
command line's one line, raised."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState

import opsearch
from opsearch import api
from opsearch.cli import main
from opsearch.errors import UserError
from opsearch.study import Run
from studies import TINY_PROXY_TOML, add_finished, run_opsearch

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["resnet", "mobilenetv2"]
GRAPH = json.dumps({"schema": "opsearch.graph/1",
                    "nodes": [{"op": "sigmoid", "inputs": [0]}, {"op": "mul", "inputs": [0, 4]}]})

# The tiny proxy of the end-to-end tests (tests/studies.py), as a config file both front ends read.
TINY = """
space = "evonorm"
budget = 6
dataset = "synthetic"
archs = ["resnet", "mobilenetv2"]
filters = ["validity", "numerics", "equivalence"]
baselines = ["bn_relu"]
plots = false
seed = 1
""" + TINY_PROXY_TOML.format() + """
[rerank]
enabled = false
max_seeds = 2
"""


# --------------------------------------------------------------------------------------------
# Reading a run (hand-made studies: no training)


@pytest.fixture
def made(tmp_path):
    """A run as a search leaves it: a baseline, an evaluated and a rejected candidate, a
    re-ranking item."""
    url = f"sqlite:///{tmp_path}/study.db"
    run = Run.create_or_open(url, "r", {"space": "evonorm", "space_options": {}, "archs": ARCHS,
                                        "dataset": "synthetic"}, [])
    add_finished(run, {"kind": "baseline", "layer": "bn_relu", "verdict": "evaluated", "graph": GRAPH,
                       "formula": "relu(bn(x))", "elapsed_s": 1.0, "acc/resnet": 0.6,
                       "acc/mobilenetv2": 0.5}, TrialState.COMPLETE, [0.6, 0.5])
    add_finished(run, {"kind": "candidate", "verdict": "evaluated", "graph": GRAPH,
                       "formula": "x*sigmoid(x)", "elapsed_s": 2.0, "acc/resnet": 0.7,
                       "acc/mobilenetv2": 0.3}, TrialState.COMPLETE, [0.7, 0.3])
    add_finished(run, {"kind": "candidate", "verdict": "rejected:numerics", "graph": GRAPH,
                       "formula": "x", "elapsed_s": 0.1, "reason": "nan"}, TrialState.PRUNED, None)
    add_finished(run, {"kind": "rerank", "stage": "s", "seed": 1_000_000, "of_trial": 1,
                       "verdict": "evaluated", "graph": GRAPH, "formula": "x*sigmoid(x)",
                       "elapsed_s": 1.0, "acc/resnet": 0.2, "acc/mobilenetv2": 0.1},
                  TrialState.COMPLETE, [0.2, 0.1])
    return url


def test_trials_dataframe_has_a_row_per_trial_and_the_contract_as_columns(made):
    frame = opsearch.load("r", storage=made).trials_dataframe()
    assert list(frame["number"]) == [0, 1, 2, 3]
    for column in ("state", "kind", "verdict", "formula", "layer", "elapsed_s", "acc/resnet",
                   "acc/mobilenetv2", "mean", "stage", "seed", "of_trial", "reason"):
        assert column in frame.columns, column
    assert list(frame["kind"]) == ["baseline", "candidate", "candidate", "rerank"]
    assert list(frame["verdict"])[2] == "rejected:numerics" and frame["acc/resnet"].isna()[2]
    assert frame["mean"][1] == pytest.approx(0.5) and frame["state"][2] == "PRUNED"
    only = opsearch.load(made).trials_dataframe(kind="candidate")  # a URL holding one study
    assert list(only["number"]) == [1, 2] and "stage" not in only.columns


def test_leaderboard_and_pareto_front_are_the_reports(made):
    run = opsearch.load("r", storage=made)
    board = run.leaderboard()
    assert list(board["trial"]) == [0, 1]  # best mean first; rejections and re-ranking left out
    assert list(board.columns[:3]) == ["trial", "kind", "name"] and {"resnet", "mobilenetv2"} <= set(board)
    assert list(board["name"]) == ["bn_relu", "x*sigmoid(x)"]
    assert list(run.pareto_front()["trial"]) == [0, 1]  # neither beats the other on both


def test_best_is_what_export_picks_and_builds_a_module(made):
    layer = opsearch.load("r", storage=made).best()
    assert layer.trial == 1 and layer.formula and layer.accuracies == {"resnet": 0.7, "mobilenetv2": 0.3}
    import torch

    assert layer(8)(torch.randn(2, 8, 4, 4)).shape == (2, 8, 4, 4)
    assert "class Swishy" in layer.source("Swishy")
    with pytest.raises(UserError, match="trial 2 was rejected:numerics"):
        opsearch.load("r", storage=made).best(trial=2)


def test_load_of_no_run_raises_the_commands_line(made, tmp_path, capsys):
    with pytest.raises(UserError) as raised:
        opsearch.load("nope", storage=made)
    assert main(["show", "nope", "--storage", made]) == 2
    assert capsys.readouterr().err.strip() == f"opsearch show: error: {raised.value}"


# --------------------------------------------------------------------------------------------
# Bad input: the command line's message, raised, never SystemExit


def _space_for_this_session():
    @opsearch.search_space("api_test_space", replace=True)
    def api_test_space():
        return opsearch.LayerGraph(nodes=[opsearch.Node(op="sigmoid", inputs=[0])])
    return api_test_space


@pytest.mark.parametrize("keys, flags", [
    ({"space": "evonrom"}, ["--space", "evonrom"]),
    ({"budget": 0}, ["--budget", "0"]),
    ({"archs": ["resnet", "vgg"]}, ["--archs", "resnet,vgg"]),
    ({"algorithm_options": {"population_sise": 3}}, ["-O", "algorithm.population_sise=3"]),
])
def test_bad_input_raises_the_command_lines_message(tmp_path, capsys, keys, flags):
    url = f"sqlite:///{tmp_path}/study.db"
    with pytest.raises(UserError) as raised:
        opsearch.search(name="r", storage=url, dataset="synthetic", progress="none", **keys)
    assert main(["search", "--name", "r", "--storage", url, "--dataset", "synthetic", "--quiet", *flags]) == 2
    assert capsys.readouterr().err.strip() == f"opsearch search: error: {raised.value}"
    assert not (tmp_path / "study.db").exists()  # checked before anything was written


def test_unknown_keys_and_a_bad_progress_raise(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'bugdet' \(did you mean 'budget'\?\)"):
        opsearch.search(bugdet=5)
    with pytest.raises(UserError, match="progress must be one of"):
        opsearch.search(name="r", storage=f"sqlite:///{tmp_path}/s.db", progress="loud")


def test_a_space_is_a_name_or_its_decorated_function(tmp_path):
    fn = _space_for_this_session()
    assert api.build(None, {"space": fn}).space == "api_test_space"
    with pytest.raises(UserError, match="not a registered search space"):
        api.build(None, {"space": lambda: None})
    # worker processes cannot see a space registered in this session: said before any write
    url = f"sqlite:///{tmp_path}/study.db"
    with pytest.raises(UserError, match=r"search space 'api_test_space' is defined in this Python session"):
        opsearch.search(space=fn, workers=2, storage=url, dataset="synthetic", progress="none")
    assert not (tmp_path / "study.db").exists()


def test_tables_merge_into_the_config_file_and_scalars_replace(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('budget = 9\n[evaluator]\nsteps = 3\nbatch_size = 16\n')
    config = api.build(str(path), {"budget": 4, "evaluator": {"steps": 5}})
    assert config.budget == 4 and config.evaluator == {"steps": 5, "batch_size": 16}


# --------------------------------------------------------------------------------------------
# The whole loop on the tiny proxy


def _trials_as_searched(url, name):
    """What a search decided, trial by trial (timings apart)."""
    frame = opsearch.load(name, storage=url).trials_dataframe()
    return [(r.number, r.kind, r.verdict, r.formula, r.layer, r["acc/resnet"], r["acc/mobilenetv2"])
            for _, r in frame.fillna(-1).iterrows()]


@pytest.mark.slow
def test_the_python_loop_equals_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(TINY)
    url = f"sqlite:///{tmp_path}/study.db"
    cli = run_opsearch(["search", "--config", "tiny.toml", "--name", "cli", "--storage", url, "--quiet"],
                       cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    run = opsearch.search("tiny.toml", name="py", storage=url, progress="bar")
    assert "6/6" in capsys.readouterr().err  # the bar reached the budget
    assert run.name == "py"
    searched = _trials_as_searched(url, "py")
    assert searched == _trials_as_searched(url, "cli")  # the same trials at the same seed
    assert sum(k == "candidate" for _, k, *_ in searched) == 6
    assert any(v == "evaluated" for _, k, v, *_ in searched if k == "candidate")

    # another process opens it by name
    code = ("import opsearch, json; f = opsearch.load('py', storage=%r).trials_dataframe(); "
            "print(json.dumps([len(f), list(f.columns)]))" % url)
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                           timeout=300)
    rows, columns = json.loads(other.stdout)
    assert rows == len(searched) and {"kind", "verdict", "formula", "acc/resnet", "elapsed_s"} <= set(columns)

    table = run.rerank(top=2, seeds=2, max_seeds=2, progress="none")
    shown = json.loads(run_opsearch(["show", "py", "--storage", url, "--json"], cwd=tmp_path).stdout)["rerank"]
    assert list(table["trial"]) == [r["of_trial"] for r in shown["layers"]]  # the table of `show`
    assert list(table["mean"]) == pytest.approx([r["overall"]["mean"] for r in shown["layers"]])
    assert (table["kind"] == "candidate").sum() == 2 and set(table["seeds"]) == {2}
    assert table.attrs["rerank"]["stage"] == shown["stage"]

    layer = run.best()
    exported = run_opsearch(["export", "py", "--storage", url, "-o", "layer.py"], cwd=tmp_path)
    assert f"trial {layer.trial}," in exported.stderr  # what `opsearch export` picks
    _train_one_step(layer)

    figures = run.plot()
    assert set(figures) == {"best_so_far", "pareto", "rejections", "rerank"}
    import matplotlib.pyplot as plt
    for fig in figures.values():
        plt.close(fig)


def _train_one_step(layer):
    """The found layer in a plain PyTorch model: one SGD step changes its parameters."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layer(8), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    before = [p.detach().clone() for p in model[1].parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = nn.functional.cross_entropy(model(torch.randn(16, 3, 8, 8)), torch.randint(0, 4, (16,)))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert before and any(not torch.equal(b, p) for b, p in zip(before, model[1].parameters()))


README_LOOP = re.compile(r"<!-- python-loop -->\s*```python\n(.*?)```", re.S)


@pytest.mark.slow
def test_the_readme_python_loop_runs(tmp_path, monkeypatch):
    """The README's loop, verbatim, with the search made tiny (the keys the test adds win)."""
    code = README_LOOP.search((ROOT / "README.md").read_text()).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(TINY)
    real = api.search
    monkeypatch.setattr(api, "search", lambda *a, **k: real("tiny.toml", **{**k, **_tiny_keys()}))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert isinstance(scope["layer"], opsearch.run.FoundLayer)
    assert scope["run"].name == opsearch.load(scope["run"].name).name


def _tiny_keys():
    return {"budget": 6, "algorithm": "regularized_evolution", "progress": "none", "plots": False}


NOTEBOOK = ROOT / "examples" / "python_api.ipynb"


@pytest.mark.slow
def test_the_example_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """examples/python_api.ipynb on the tiny proxy: in a Jupyter kernel with nbclient (its
    progress bar, inline figures), else its code cells in order as one script."""
    monkeypatch.setenv("OPSEARCH_EXAMPLE", "tiny")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = json.loads(NOTEBOOK.read_text())
    try:
        import nbclient
        import nbformat
    except ImportError:
        nbclient = None
    if nbclient is None:
        script = "\n\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    nb = nbformat.reads(NOTEBOOK.read_text(), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # a figure shown inline
    assert (tmp_path / "runs" / "notebook_example" / "study.db").exists()
