"""`opsearch evaluate`: JSON for scripts, one-line errors with exit status 2."""
from __future__ import annotations

import json

import pytest

from opsearch import graph, layers
from opsearch.cli import main

TINY = ["--dataset", "synthetic", "--archs", "resnet,mobilenetv2", "--steps", "4", "--batch-size", "32",
        "--accelerator", "cpu", "-O", "arch_options.width=4", "-O", "warmup_steps=1", "-O", "threads=1"]


@pytest.mark.slow
def test_json_output_has_accuracy_per_architecture(capsys):
    assert main(["evaluate", "bn_relu", *TINY, "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # stdout holds the JSON object and nothing else
    assert set(out["accuracies"]) == {"resnet", "mobilenetv2"}
    assert all(0.0 <= v <= 1.0 for v in out["accuracies"].values())
    assert out["per_arch"]["resnet"]["steps"] == 4 and out["per_arch"]["resnet"]["diverged"] is False
    assert out["layer"] == "bn_relu" and out["config"]["steps"] == 4
    assert out["formula"] == graph.formula(layers.resolve("bn_relu"))
    assert "resnet" in captured.err  # progress for a person goes to stderr


@pytest.mark.slow
def test_graph_file_as_layer(tmp_path, capsys):
    path = tmp_path / "layer.json"
    path.write_text(json.dumps(graph.to_dict(layers.get_graph("evonorm_s0"))))
    assert main(["evaluate", str(path), *TINY, "--archs", "resnet", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert set(json.loads(captured.out)["accuracies"]) == {"resnet"} and captured.err == ""


@pytest.mark.slow
def test_a_formula_as_layer(tmp_path, capsys):
    """What a table printed can be trained as it reads: the JSON says how it was read, and it
    trains as its graph file does."""
    b = graph.GraphBuilder()
    b.div(b.x, b.rms_b(b.x))
    path = tmp_path / "layer.json"
    path.write_text(json.dumps(graph.to_dict(b.plain())))
    outs = []
    for layer in ("x/rms_b( x )", str(path)):
        assert main(["evaluate", layer, *TINY, "--archs", "resnet", "--json", "--quiet"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["layer"] == "x/rms_b( x )" and outs[0]["formula"] == outs[1]["formula"] == "x / rms_b(x)"
    assert outs[0]["per_arch"]["resnet"]["steps"] == 4 and outs[0]["accuracies"] == outs[1]["accuracies"]


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "bn_rleu"], "known: .*bn_relu"),
    (["evaluate", "x / (x + "], "not a known layer, a graph file or a layer formula: .*column"),
    (["evaluate", "v0 * v1"], "output does not depend on x"),
    (["evaluate", "bn_relu", "--archs", "resnet,vgg"], "known: .*mobilenetv2"),
    (["evaluate", "bn_relu", "--dataset", "mnist"], "known: .*digits"),
    (["evaluate", "bn_relu", "--devices", "two"], "--devices"),
    (["evaluate", "bn_relu", "--steps", "0"], "steps"),
    (["evaluate", "bn_relu", "-O", "colour=1"], "evaluator .lightning.: unknown option .colour."),
    (["evaluate", "bn_relu", "--dataset", "cifar10", "--data-dir", "/nonexistent"], "data_batch_1"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    import re
    assert re.search(message, err), err


def test_devices_that_do_not_exist_exit_2(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    assert main(["evaluate", "bn_relu", *TINY, "--accelerator", "gpu"]) == 2
    assert "cannot run on accelerator='gpu'" in capsys.readouterr().err
