"""What surrounds a candidate (opsearch/surround.py): the `activation` space keeps the network's
BatchNorm (the Swish setup), its compiled layer is BatchNorm -> f -> affine, the export carries
the BatchNorm, the run stores the surround, and known layers keep their own."""
from __future__ import annotations

import json

import optuna
import pytest
import torch
from optuna.trial import TrialState, create_trial
from torch import nn

from opsearch import cli, graph, layers, registry, surround
from opsearch.compile import export_source
from opsearch.config import SearchConfig
from opsearch.engine import Setup
from opsearch.local_run import run_search
from opsearch.errors import UserError
from opsearch.rejection import Candidate
from opsearch.study import open_run
from opsearch.trainers.evaluator import EvalConfig, Evaluator

RELU = layers.resolve("relu_only")  # max(x, 0)
SWISH = layers.resolve("swish_only")  # x * sigmoid(v0 * x)
ACTIVATIONS = {"relu": (RELU, nn.ReLU), "silu": (layers.resolve("silu_only"), nn.SiLU)}
# the tiny synthetic proxy of tests/test_evaluator.py (4 classes: chance is 0.25)
TINY = dict(dataset="synthetic", steps=30, batch_size=32, warmup_steps=2, lr=0.2,
            arch_options={"width": 4}, accelerator="cpu", threads=1)


def tiny_search(tmp_path, **overrides) -> SearchConfig:
    values = dict(
        name="act", space="activation", space_options={"num_nodes": 3}, budget=4, dataset="synthetic",
        archs=["mobilenetv2"], filters=["validity", "numerics", "equivalence"], baselines=[],
        evaluator={"steps": 3, "batch_size": 16, "val_batch_size": 128, "warmup_steps": 1,
                   "arch_options": {"width": 4, "depth": 1}},
        algorithm_options={"population_size": 4, "tournament_size": 2},
        storage=f"sqlite:///{tmp_path}/study.db", plots=False, seed=0, rerank={"enabled": False})
    values.update(overrides)
    return SearchConfig.from_dict(values)


def _perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.rand(p.shape, generator=gen) - 0.5)
    return module


# -- the declaration ---------------------------------------------------------------------------

def test_the_activation_space_declares_batchnorm_and_the_evonorm_space_none():
    assert registry.search_spaces.get("activation").surround == "batchnorm"
    assert registry.search_spaces.get("evonorm").surround == "none"
    assert registry.space_surround("activation") == "batchnorm"


def test_an_unknown_surround_is_a_user_error():
    with pytest.raises(UserError, match="unknown surround 'batchnrom'.*did you mean 'batchnorm'"):
        registry.search_space("x", surround="batchnrom")
    with pytest.raises(UserError, match="unknown surround"):
        layers.build(RELU, 4, surround="layernorm")


def test_a_plugin_space_can_declare_a_surround():
    @registry.search_space("test_surround_plugin_space", surround="batchnorm", replace=True)
    def space():
        return graph.LayerGraph.from_tuple(RELU)

    assert registry.space_surround("test_surround_plugin_space") == "batchnorm"


# -- the compiled layer ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_surrounded_layer_is_batchnorm_then_the_activation_at_init(name):
    g, act = ACTIVATIONS[name]
    layer = layers.build(g, 6, surround="batchnorm")
    assert isinstance(layer.norm, nn.BatchNorm2d) and layer.norm.affine
    assert {n for n, _ in layer.named_parameters()} == {
        "norm.weight", "norm.bias", "layer.v0", "layer.v1", "layer.weight", "layer.bias"}
    reference = nn.Sequential(nn.BatchNorm2d(6), act())
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # training mode: batch statistics, running estimates move alike
        x = torch.randn(4, 6, 5, 5, generator=gen) * 3 + 1
        torch.testing.assert_close(layer.train()(x), reference.train()(x))
    x = torch.randn(2, 6, 5, 5, generator=gen)
    torch.testing.assert_close(layer.eval()(x), reference.eval()(x))


def test_without_the_surround_the_layer_has_no_batchnorm():
    layer = layers.build(RELU, 6)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in layer.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in layers.build(RELU, 6, surround="none").modules())


def test_surround_takes_the_layers_eps_and_momentum():
    layer = layers.build(SWISH, 4, surround="batchnorm", eps=1e-3, momentum=0.5)
    assert layer.norm.eps == 1e-3 and layer.norm.momentum == 0.5 and layer.layer.eps == 1e-3


def test_no_activation_slots_hold_the_batchnorm_alone():
    factory = layers.norm_act(SWISH, surround="batchnorm")
    alone = factory(8, act=False)
    assert type(alone) is nn.BatchNorm2d and alone.num_features == 8
    assert isinstance(factory(8, act=True).norm, nn.BatchNorm2d)
    same = layers.norm_act(SWISH, surround="batchnorm", no_act="same")(8, act=False)
    assert isinstance(same, layers.Surrounded)
    import pickle
    assert pickle.loads(pickle.dumps(factory)).surround == "batchnorm"  # process pools


def test_known_layers_keep_their_own_surround():
    # a baseline is a whole layer: the run's surround for candidates does not touch it
    bn_relu = layers.norm_act("bn_relu", surround="batchnorm")(8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bn_relu.modules())
    assert layers.surround_of("bn_relu", "batchnorm") == "none"
    # the activation space's references are surrounded whatever the option says
    for name, (g, act) in (("bn_then_relu", ACTIVATIONS["relu"]), ("bn_then_silu", ACTIVATIONS["silu"])):
        assert layers.surround_of(name) == "batchnorm"
        layer = layers.build(name, 6, surround="none")
        assert layer.graph == layers.build(g, 6).graph
        reference = nn.Sequential(nn.BatchNorm2d(6), act())
        x = torch.randn(4, 6, 3, 3)
        torch.testing.assert_close(layer(x), reference(x))
    assert type(layers.norm_act("bn_then_swish")(8, act=False)) is nn.BatchNorm2d


# -- export ------------------------------------------------------------------------------------

def _exported_class(source: str, name: str = "SearchedLayer"):
    imports = [line for line in source.splitlines() if line.lstrip().startswith(("import ", "from "))]
    assert imports and not any("opsearch" in line for line in imports)  # standalone
    namespace: dict = {}
    exec(compile(source, "<exported>", "exec"), namespace)
    return namespace[name]


def _assert_same_layer(exported: nn.Module, built: nn.Module, channels: int) -> None:
    exported.load_state_dict(built.state_dict())  # the same structure and keys
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(4, channels, 5, 5, generator=gen) * 2 + 0.5
        torch.testing.assert_close(exported.train()(x), built.train()(x))
    x = torch.randn(1, channels, 5, 5, generator=gen)
    torch.testing.assert_close(exported.eval()(x), built.eval()(x))


@pytest.mark.parametrize("g", [SWISH, RELU], ids=["swish", "relu"])
def test_export_round_trips_with_the_batchnorm(g):
    source = export_source(g, surround="batchnorm", eps=1e-4, momentum=0.2)
    assert "torch.nn.BatchNorm2d" in source and "surround: batchnorm" in source
    cls = _exported_class(source)
    for channels in (8, 5):
        built = _perturbed(layers.build(g, channels, surround="batchnorm", eps=1e-4, momentum=0.2))
        exported = cls(channels)
        assert isinstance(exported.norm, nn.BatchNorm2d) and exported.norm.momentum == 0.2
        _assert_same_layer(exported, built, channels)
    assert "BatchNorm2d" not in export_source(g)  # unsurrounded: as before


def _study_with_a_candidate_and_a_baseline(path, attrs):
    url = f"sqlite:///{path}"
    study = optuna.create_study(storage=url, study_name="act", directions=["maximize"])
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    for number_attrs, value in (({"kind": "candidate", "layer": None}, 0.9),
                                ({"kind": "baseline", "layer": "bn_relu"}, 0.8)):
        user_attrs = {k: v for k, v in number_attrs.items() if v is not None}
        user_attrs.update({"verdict": "evaluated", "acc/mobilenetv2": value,
                           "graph": json.dumps(graph.to_dict(SWISH if user_attrs["kind"] == "candidate"
                                                             else layers.resolve("bn_relu"))),
                           "formula": "f"})
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[value], user_attrs=user_attrs))
    return url


def test_export_command_builds_the_runs_surround_for_candidates_only(tmp_path, capsys):
    attrs = {"space": "activation", "archs": ["mobilenetv2"], "dataset": "synthetic", "surround": "batchnorm",
             "config": json.dumps({"evaluator": {"layer_options": {"surround": "batchnorm", "eps": 1e-4}}})}
    url = _study_with_a_candidate_and_a_baseline(tmp_path / "s.db", attrs)
    assert cli.main(["export", url, "--trial", "0"]) == 0
    cls = _exported_class(capsys.readouterr().out)
    _assert_same_layer(cls(8), _perturbed(layers.build(SWISH, 8, surround="batchnorm", eps=1e-4)), 8)
    assert cli.main(["export", url, "--trial", "1"]) == 0  # the bn_relu baseline: no surround
    cls = _exported_class(capsys.readouterr().out)
    _assert_same_layer(cls(8), _perturbed(layers.build("bn_relu", 8, eps=1e-4)), 8)
    assert cli.main(["show", url]) == 0
    assert "candidates are surrounded: batchnorm" in capsys.readouterr().out


def test_a_run_from_before_surrounds_exports_without_one(tmp_path, capsys):
    url = _study_with_a_candidate_and_a_baseline(
        tmp_path / "old.db", {"space": "activation", "archs": ["mobilenetv2"], "config": "{}"})
    assert cli.main(["export", url, "--trial", "0"]) == 0
    assert "BatchNorm2d" not in capsys.readouterr().out


# -- the run: config, study attributes, filters, evaluator -------------------------------------

def test_the_run_stores_the_spaces_surround_and_its_filters_and_evaluator_use_it(tmp_path):
    config = tiny_search(tmp_path)
    setup = Setup.from_config(config)
    assert setup.config.evaluator["layer_options"] == {"surround": "batchnorm"}
    assert config.evaluator.get("layer_options") is None  # the caller's config is left alone
    assert setup.eval_config.layer_options["surround"] == "batchnorm"
    attrs = setup.study_attrs()
    assert attrs["surround"] == "batchnorm" and surround.of_run(attrs) == "batchnorm"
    stored = json.loads(attrs["config"])
    assert stored["evaluator"]["layer_options"]["surround"] == "batchnorm"  # rerank reads this
    assert surround.of_run({"config": attrs["config"]}) == "batchnorm"
    candidate = Candidate(RELU, layer_options=setup.eval_config.layer_options)  # what filters build
    assert isinstance(candidate.build(8).norm, nn.BatchNorm2d)
    assert isinstance(candidate.norm_act()(8).norm, nn.BatchNorm2d)
    # evonorm stays as it was; a user's explicit choice wins over the space's
    assert "layer_options" not in Setup.from_config(tiny_search(tmp_path, space="evonorm")).config.evaluator
    mine = tiny_search(tmp_path, evaluator={"layer_options": {"surround": "none"}})
    assert Setup.from_config(mine).study_attrs()["surround"] == "none"


def test_the_rerank_task_keeps_the_surround(tmp_path):
    setup = Setup.from_config(tiny_search(tmp_path, rerank={"enabled": True, "dataset": "synthetic"}))
    assert setup.rerank.task["layer_options"]["surround"] == "batchnorm"


def test_a_run_cannot_be_resumed_with_another_surround(tmp_path):
    Setup.from_config(tiny_search(tmp_path)).open_run()
    other = Setup.from_config(tiny_search(tmp_path, evaluator={"layer_options": {"surround": "none"}}))
    with pytest.raises(UserError, match="surround"):
        other.open_run()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenetv2", "efficientnet"])
def test_surrounded_relu_trains_above_chance_where_the_bare_one_is_at_chance(tmp_path, arch):
    bare = Evaluator(EvalConfig(**TINY, archs=(arch,))).evaluate(RELU).accuracies[arch]
    assert bare <= 0.3, bare  # chance: 0.25 (BENCHMARKS: swish_only 0.099 on 10 classes)
    # the activation space's evaluator config, as a search builds it
    evaluator = {k: v for k, v in TINY.items() if k not in ("dataset", "accelerator")}
    setup = Setup.from_config(tiny_search(tmp_path, archs=[arch], evaluator=evaluator))
    surrounded = Evaluator(setup.eval_config).evaluate(RELU).accuracies[arch]
    assert surrounded >= 0.8, surrounded
    reference = Evaluator(setup.eval_config).evaluate("bn_then_relu").accuracies[arch]
    assert reference == surrounded  # the known reference is built exactly as the candidate


@pytest.mark.slow
def test_a_small_activation_search_builds_its_candidates_and_references_alike(tmp_path):
    # relu_only (no surround) is not this run's layer: no equivalence keys, not fed to evolution;
    # bn_then_relu is, so a candidate max(x, 0) is its duplicate
    config = tiny_search(tmp_path, baselines=["relu_only", "bn_then_relu"], budget=6)
    run_search(config)
    study = open_run(config.storage, config.name)
    assert study.user_attrs["surround"] == "batchnorm"
    trials = study.get_trials()
    by_layer = {t.user_attrs.get("layer"): t for t in trials if t.user_attrs.get("kind") == "baseline"}
    assert "hash" not in by_layer["relu_only"].user_attrs
    assert by_layer["bn_then_relu"].user_attrs.get("hash") == graph.canonical_hash(RELU)
    assert "equiv_fp" in by_layer["bn_then_relu"].user_attrs
    assert "equiv_fp" not in by_layer["relu_only"].user_attrs
    verdicts = [t.user_attrs.get("verdict", "") for t in trials if t.user_attrs.get("kind") == "candidate"]
    assert len(verdicts) == config.budget and not any(v.startswith("failed") for v in verdicts), verdicts
