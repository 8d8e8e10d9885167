"""The evaluator: training on tiny configs, staged == straight, divergence, DDP and process pools."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from opsearch.errors import UserError
from opsearch.trainers.evaluator import EvalConfig, Evaluator
from opsearch.trainers.lit import learning_rate

# One torch thread: as fast for these tiny nets, and immune to OpenMP spinning on a busy machine.
TINY = dict(dataset="synthetic", steps=30, batch_size=32, warmup_steps=2, lr=0.2,
            arch_options={"width": 4}, accelerator="cpu", threads=1)


def tiny(**kw) -> EvalConfig:
    return EvalConfig(**{**TINY, **kw})


def _state(session, arch):
    return {k: v.clone() for k, v in session.runs[arch].module.model.state_dict().items()}


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [learning_rate(s, 100, 0.2, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.02) and lrs[9] == pytest.approx(0.2) and lrs[10] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.001 and learning_rate(100, 100, 0.2, 10) == 0.0
    assert learning_rate(0, 10, 1.0, 0) == 1.0  # no warmup: full rate at once


@pytest.mark.slow
def test_evaluate_learns_on_every_architecture_and_is_deterministic():
    evaluator = Evaluator(tiny())
    result = evaluator.evaluate("bn_relu")
    assert set(result.accuracies) == {"resnet", "mobilenetv2", "efficientnet"}
    assert all(acc > 0.5 for acc in result.accuracies.values()), result.accuracies  # chance: 0.25
    assert all(r.steps == 30 and not r.diverged and r.seconds > 0 for r in result.per_arch.values())
    assert result.seconds == pytest.approx(sum(r.seconds for r in result.per_arch.values()))
    again = Evaluator(tiny()).evaluate("bn_relu")
    assert again.accuracies == result.accuracies
    json.dumps(result.to_dict())  # plain data for --json and the study


@pytest.mark.slow
def test_staged_training_equals_straight_training():
    # The straight run takes one step per Lightning call, the staged one 10 (stages of 7 and 23
    # steps cut the groups unevenly): the arithmetic must be the same either way.
    config = tiny(archs=("resnet", "mobilenetv2"))
    straight = Evaluator(tiny(archs=("resnet", "mobilenetv2"), steps_per_call=1)).start("bn_relu")
    final = straight.train_until(30)
    staged = Evaluator(config).start("bn_relu")
    early = staged.train_until(7)
    assert set(early) == {"resnet", "mobilenetv2"}
    assert all(staged.runs[a].module.step == 7 for a in early)
    assert staged.train_until(30) == final
    assert staged.train_until(500) == final  # capped at config.steps; nothing more trains
    for arch in ("resnet", "mobilenetv2"):
        a, b = _state(straight, arch), _state(staged, arch)
        assert all(torch.equal(a[k], b[k]) for k in a), arch  # weights and BN running stats
    assert staged.result().per_arch["resnet"].steps == 30


class _NaNAfter(nn.Module):
    """ReLU for `after` training steps, then NaN: a layer that blows up mid-run."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after
        self.calls = 0
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x):
        if self.training:
            self.calls += 1
        y = torch.relu(x) * self.weight
        return y * float("nan") if self.calls > self.after else y


@pytest.mark.slow
def test_divergence_stops_at_once_and_scores_zero():
    evaluator = Evaluator(tiny(archs=("resnet",)))
    result = evaluator.evaluate(lambda c, act: _NaNAfter(3))
    r = result.per_arch["resnet"]
    assert r.diverged and r.accuracy == 0.0 and result.accuracies["resnet"] == 0.0
    assert r.steps == 3  # the NaN step is not applied and nothing trains after it
    assert result.diverged


@pytest.mark.slow
def test_no_weight_decay_on_the_layers_own_parameters():
    session = Evaluator(tiny(archs=("resnet",), weight_decay=0.01)).start("evonorm_b0")
    session.train_until(1)
    module = session.runs["resnet"].module
    opt = module.configure_optimizers()
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in module.model.named_parameters():
        layer_param = name.rsplit(".", 1)[-1] in ("v0", "v1") or (p.ndim == 1 and "conv" not in name)
        if layer_param:
            assert decay_of[id(p)] == 0.0, name
        elif p.ndim == 4:
            assert decay_of[id(p)] == 0.01, name


def test_bad_names_and_options_are_user_errors():
    with pytest.raises(UserError, match="known: .*resnet"):
        Evaluator(tiny(archs=("resnet", "vgg")))
    with pytest.raises(UserError, match="known: .*digits"):
        Evaluator(tiny(dataset="imagenet"))
    with pytest.raises(UserError, match="known: .*bn_relu"):
        Evaluator(tiny()).evaluate("bn_rleu")
    with pytest.raises(UserError, match="steps"):
        EvalConfig(steps=0)
    with pytest.raises(UserError, match="unknown evaluation option"):
        EvalConfig.from_dict({"stepz": 3})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_devices_that_do_not_exist_say_so():
    with pytest.raises(UserError, match="cannot run on accelerator='gpu'"):
        Evaluator(tiny(accelerator="gpu"))
    with pytest.raises(UserError, match="cannot run"):
        Evaluator(tiny(devices=0))


def test_config_round_trips_through_json():
    config = tiny(archs="resnet,efficientnet", seed=5)
    assert config.archs == ("resnet", "efficientnet")
    again = EvalConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert config.options_for("resnet") == {"width": 4}
    per_arch = tiny(arch_options={"width": 4, "resnet": {"depth": 2}})
    assert per_arch.options_for("resnet") == {"width": 4, "depth": 2}
    assert per_arch.options_for("efficientnet") == {"width": 4}


@pytest.mark.slow
def test_ddp_on_cpu_with_two_processes_matches_one_process():
    # A batch-independent layer: two ranks averaging gradients of half batches take the same step
    # as one process on the whole batch.
    config = tiny(archs=("resnet",), steps=6)
    single = Evaluator(config).start("evonorm_s0")
    single.train_until(6)
    ddp = Evaluator(tiny(archs=("resnet",), steps=6, devices=2, strategy="ddp")).start("evonorm_s0")
    ddp.train_until(3)  # staged under DDP too: optimizer state crosses the process boundary
    accuracies = ddp.train_until(6)
    assert ddp.result().per_arch["resnet"].steps == 6
    a, b = _state(single, "resnet"), _state(ddp, "resnet")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert accuracies == single.train_until(6)


def test_several_devices_mean_ddp_forked_from_this_process():
    from pytorch_lightning.strategies import DDPStrategy

    for config in (tiny(devices=2), tiny(devices="2", strategy="ddp"), tiny(devices=2, strategy="ddp_spawn")):
        strategy = Evaluator(config)._strategy()
        assert isinstance(strategy, DDPStrategy) and strategy._start_method in ("fork", "spawn")
    assert Evaluator(tiny())._strategy() == "auto"
