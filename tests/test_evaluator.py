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


# -- Lightning as its users know it: one Trainer per evaluation, callbacks, loggers -------------

class _CountSteps:
    """A callback counting the backward passes (one per training step) of a fit."""

    def __new__(cls):
        import pytorch_lightning as pl

        class Counter(pl.Callback):
            steps = 0

            def on_before_backward(self, trainer, pl_module, loss):
                self.steps += 1

        return Counter()


@pytest.mark.slow
def test_staged_training_continues_the_same_trainer_without_starting_over():
    session = Evaluator(tiny(archs=("resnet",))).start("bn_relu")
    early = session.train_until(7)
    run = session.runs["resnet"]
    trainer = run.trainer
    assert trainer.global_step == 7 and run.module.val_step == 7
    assert trainer.callback_metrics["val_acc"] == pytest.approx(early["resnet"])  # Lightning's val loop
    counter = _CountSteps()
    trainer.callbacks.append(counter)
    final = session.train_until(30)
    assert session.runs["resnet"].trainer is trainer  # one Trainer for the whole evaluation
    assert counter.steps == 23 and trainer.global_step == 30  # continued from step 7
    assert trainer.current_epoch == 2  # one epoch per stage
    assert trainer.callback_metrics["val_acc"] == pytest.approx(final["resnet"])
    assert trainer.state.fn == "fit"  # validated inside fit (no separate trainer.validate)
    assert session.train_until(30) == final and counter.steps == 23  # nothing left to train


@pytest.mark.slow
def test_divergence_is_the_callbacks_decision():
    from opsearch.trainers.lit import DivergenceCallback

    session = Evaluator(tiny(archs=("resnet",))).start(lambda c, act: _NaNAfter(3))
    session.train_until(30)
    run = session.runs["resnet"]
    assert any(isinstance(cb, DivergenceCallback) for cb in run.trainer.callbacks)
    assert run.module.diverged and run.module.step == 3 and run.trainer.global_step == 3
    assert session.result().per_arch["resnet"].accuracy == 0.0


@pytest.mark.slow
def test_timing_callback_splits_training_and_validation_time():
    session = Evaluator(tiny(archs=("resnet",))).start("bn_relu")
    session.train_until(30)
    timings = session.runs["resnet"].module.timings
    assert timings["train_s"] > 0 and timings["val_s"] > 0
    assert timings["train_s"] + timings["val_s"] <= session.result().seconds


@pytest.mark.slow
def test_csv_logger_writes_learning_curves(tmp_path):
    import csv

    evaluator = Evaluator(tiny(archs=("resnet", "mobilenetv2")), logger="csv", log_dir=str(tmp_path))
    session = evaluator.start("bn_relu")
    session.train_until(10)
    result = (session.train_until(30), session.result())[1]
    for arch in ("resnet", "mobilenetv2"):
        with open(tmp_path / "bn_relu" / arch / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        losses = [(int(r["step"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]
        vals = [(int(r["step"]), float(r["val_acc"])) for r in rows if r.get("val_acc")]
        assert len(losses) >= 3 and losses[-1][1] < losses[0][1]  # a learning curve that falls
        assert [s for s, _ in vals] == [10, 30]  # validation at the end of each stage
        assert vals[-1][1] == pytest.approx(result.accuracies[arch])


def test_unknown_or_missing_loggers_are_user_errors(monkeypatch):
    import lightning_fabric.loggers.tensorboard as tb

    with pytest.raises(UserError, match="unknown logger 'wandb'"):
        Evaluator(tiny(), logger="wandb")
    monkeypatch.setattr(tb, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(tb, "_TENSORBOARDX_AVAILABLE", False)
    with pytest.raises(UserError, match=r"pip install 'opsearch\[tensorboard\]'"):
        Evaluator(tiny(), logger="tensorboard")


@pytest.mark.slow
def test_tensorboard_logger_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    Evaluator(tiny(archs=("resnet",), steps=10), logger="tensorboard", log_dir=str(tmp_path)).evaluate("identity")
    assert list((tmp_path / "identity" / "resnet").glob("events.out.tfevents.*"))


def test_evaluate_command_logger_flags(tmp_path, capsys):
    from opsearch.cli import main

    assert main(["evaluate", "bn_relu", "--log-dir", str(tmp_path)]) == 2
    assert "--log-dir needs --logger" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_command_writes_csv_curves(tmp_path, capsys):
    from opsearch.cli import main

    args = ["evaluate", "identity", "--dataset", "synthetic", "--archs", "resnet", "--steps", "10",
            "--accelerator", "cpu", "-O", "arch_options.width=4", "--logger", "csv", "--log-dir",
            str(tmp_path), "--json", "--quiet"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert (tmp_path / "identity" / "resnet" / "metrics.csv").is_file()
    assert out["accuracies"]["resnet"] >= 0


@pytest.mark.slow
def test_datamodule_and_module_work_in_a_plain_lightning_trainer():
    """The pieces are ordinary Lightning: a user's own Trainer fits and validates them."""
    import pytorch_lightning as pl

    from opsearch import layers, registry
    from opsearch.trainers.lit import DivergenceCallback, ProxyDataModule, ProxyModule

    dm = ProxyDataModule("synthetic", batch_size=16, num_train=64, num_val=32)
    dm.setup("fit")
    model = registry.architectures.get("resnet")(layers.norm_act("bn_relu"), dm.data.num_classes,
                                                 dm.data.in_channels, width=4)
    module = ProxyModule(model, [], total_steps=8, lr=0.1, num_val=len(dm.data.y_val))
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[DivergenceCallback()])
    trainer.fit(module, datamodule=dm)
    assert module.step == trainer.global_step == 8
    assert trainer.callback_metrics["val_acc"] == pytest.approx(module.val_acc)
    module.model.eval()  # Lightning's validation loop counted what a hand-written one counts
    with torch.no_grad():
        by_hand = float((module.model(dm.data.x_val).argmax(1) == dm.data.y_val).float().mean())
    assert module.val_acc == pytest.approx(by_hand) and module.val_step == 8
