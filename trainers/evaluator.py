"""Evaluate a candidate layer: train it inside K proxy architectures, return K validation accuracies.

    result = Evaluator(EvalConfig()).evaluate("evonorm_s0")
    result.accuracies        # {"resnet": 0.97, "mobilenetv2": 0.96, "efficientnet": 0.95}

Staged (the quality filter's protocol: 100 steps, check, then the rest):

    session = Evaluator(config).start(layer)
    early = session.train_until(100)          # {arch: accuracy after 100 steps}
    final = session.train_until(config.steps) # exactly what a straight run gives
    result = session.result()

Training runs through Lightning (`accelerator`, `devices`, `strategy`, `precision` are Lightning's
own options): per architecture one Trainer, one `ProxyModule` and one `ProxyDataModule`, with the
divergence and timing callbacks; ``Evaluator(config, logger="csv")`` (or "tensorboard") writes
learning curves to log_dir/<layer>/<architecture> (trainers/lit.py). Two ways to use several devices:
- several candidates at once, one per device or CPU process: the search's workers
  (`opsearch search --workers N`, opsearch/engine.py), each with its own evaluator;
- one evaluation spread over devices with DDP: ``EvalConfig(devices=2, strategy="ddp")``. Unless
  the process was started by a launcher (torchrun, SLURM), "ddp" forks its ranks from the
  evaluating process (Lightning's fork launcher: gloo on CPU, NCCL on GPUs) instead of re-running
  the command line; each rank takes its slice of every global batch, so the ranks together see the
  batches a single process would.

The default proxy (BENCHMARKS.md, "Evaluator", says how it was chosen) makes normalization matter
while staying cheap: digits at their native 8x8, width 8 and one block per stage, 300 steps of
batch 32 with SGD (momentum 0.9) at a peak learning rate of 0.1 that normalised networks absorb
and unnormalised inverted-residual networks do not (they stay at chance).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from opsearch import registry
from opsearch.config import DEFAULT_ARCHS
from opsearch.errors import UserError
from opsearch.evaluation import v0_range_union
from opsearch.trainers import data as data_module
from opsearch.trainers.data import ArrayData


NormActFactory = Callable[[int, bool], nn.Module]


@dataclass
class EvalConfig:
    """Everything that defines a proxy evaluation (stored with a study as JSON)."""

    dataset: str = "digits"
    archs: tuple[str, ...] = DEFAULT_ARCHS
    steps: int = 300
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    warmup_steps: int = 15
    label_smoothing: float = 0.0
    seed: int = 0
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_nodes: int = 1
    data_dir: str | None = None
    download: bool = False
    dataset_options: dict = field(default_factory=dict)
    # Options for every architecture ({"width": 8}) and/or per architecture ({"resnet": {...}}).
    arch_options: dict = field(default_factory=dict)
    # Options for opsearch.layers.norm_act (eps, groups, no_act, ...).
    layer_options: dict = field(default_factory=dict)
    val_batch_size: int = 1024
    # Optimizer steps per Lightning training_step call (amortises Lightning's per-call overhead;
    # results do not depend on it; 1 under multi-process DDP).
    steps_per_call: int = 10
    channels_last: bool | None = None  # None: channels-last on CPU (faster there), not on GPU
    threads: int | None = None  # torch intra-op threads while evaluating (None: leave as is)

    def __post_init__(self) -> None:
        if isinstance(self.archs, str):
            self.archs = tuple(a.strip() for a in self.archs.split(",") if a.strip())
        self.archs = tuple(self.archs)
        if not self.archs:
            raise UserError("no architectures given")
        if len(set(self.archs)) != len(self.archs):
            raise UserError(f"architectures repeat: {', '.join(self.archs)}")
        for name, value, low in (("steps", self.steps, 1), ("batch size", self.batch_size, 1),
                                 ("val batch size", self.val_batch_size, 1),
                                 ("steps_per_call", self.steps_per_call, 1),
                                 ("warmup steps", self.warmup_steps, 0), ("num_nodes", self.num_nodes, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"learning rate must be a positive number, got {self.lr!r}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["archs"] = list(self.archs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EvalConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown evaluation option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def options_for(self, arch: str) -> dict:
        common = {k: v for k, v in self.arch_options.items() if not isinstance(v, dict)}
        return {**common, **self.arch_options.get(arch, {})}


@dataclass
class ArchResult:
    """One architecture's outcome: accuracy (0 when diverged), steps trained, wall seconds, and
    the [min, max] of the layers' v0 entries over the training (None when unknown)."""

    accuracy: float
    diverged: bool
    steps: int
    seconds: float
    v0_range: list[float] | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EvalResult:
    layer: str
    accuracies: dict[str, float]
    per_arch: dict[str, ArchResult]
    seconds: float

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracies.values()) / max(1, len(self.accuracies))

    @property
    def diverged(self) -> bool:
        return any(r.diverged for r in self.per_arch.values())

    def trial_attrs(self) -> dict[str, Any]:
        """What a search stores beside the accuracies: ``train_s/<arch>``,
        ``diverged/<arch>`` for an architecture whose training diverged, and ``v0_range``, the
        [min, max] of v0 over every architecture's training when all of them are known (the
        equivalence filter's band rule reads it)."""
        attrs: dict[str, Any] = {}
        for arch, r in self.per_arch.items():
            if r.diverged:
                attrs[f"diverged/{arch}"] = True
            attrs[f"train_s/{arch}"] = round(float(r.seconds), 3)
        if (union := v0_range_union(r.v0_range for r in self.per_arch.values())) is not None:
            attrs["v0_range"] = union
        return attrs

    def to_dict(self) -> dict:
        return {"layer": self.layer, "accuracies": dict(self.accuracies),
                "mean_accuracy": self.mean_accuracy,
                "per_arch": {a: r.to_dict() for a, r in self.per_arch.items()},
                "seconds": self.seconds}


# ---------------------------------------------------------------------------------------------

_DATA_CACHE: dict[tuple, ArrayData] = {}


def dataset_options(config: EvalConfig) -> dict:
    """The options of the config's dataset reader (its own, plus data_dir / download)."""
    options = dict(config.dataset_options)
    if config.data_dir is not None:
        options["data_dir"] = config.data_dir
    if config.download:
        options["download"] = True
    return options


def load_data(config: EvalConfig) -> ArrayData:
    """The config's dataset, loaded once per process."""
    options = dataset_options(config)
    key = (config.dataset, tuple(sorted((k, repr(v)) for k, v in options.items())))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = data_module.load(config.dataset, **options)
    return _DATA_CACHE[key]


def norm_act_factory(layer: Any, options: dict | None = None) -> tuple[NormActFactory, str]:
    """A norm_act factory and a label for `layer`: a known layer's name, a LayerGraph, a plain
    graph tuple, a graph JSON file, or already a factory ``(num_channels, act) -> nn.Module``."""
    from opsearch import layers  # the IR's factory: known layers and candidate graphs alike

    if layers.is_factory(layer):
        return layer, getattr(layer, "__name__", type(layer).__name__)
    factory = layers.norm_act(layer, **(options or {}))
    if isinstance(layer, (str, os.PathLike)):
        label = str(layer)
    else:
        try:
            from opsearch import graph
            label = graph.formula(layer)
        except Exception:
            label = "graph"
    return factory, label


def _log_name(label: str) -> str:
    """A folder name for a layer's logs: a file's stem, or the label with odd characters replaced."""
    if os.path.sep in label or label.endswith(".json"):
        label = os.path.splitext(os.path.basename(label))[0]
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[:80] or "layer"


def _stable_seed(seed: int, name: str) -> int:
    """A per-architecture init seed that does not change when other architectures are added."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


def _quiet_lightning() -> None:
    import pytorch_lightning  # noqa: F401  (its import sets its loggers to INFO: override after)

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*`srun` command is available.*")


def _several(devices: Any) -> bool:
    """Whether Lightning's `devices` asks for more than one device (an int, "N", or a list)."""
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    return isinstance(devices, int) and not isinstance(devices, bool) and devices > 1


def _launched_externally() -> bool:
    """True inside torchrun or multi-task srun launches, where Lightning's own "ddp" is right.
    (An opsearch worker is a one-task SLURM job: its DDP, if any, forks its ranks itself.)"""
    if any(v in os.environ for v in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")):
        return True
    try:
        return int(os.environ.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        return False


def _cluster_plugins() -> list:
    """Inside a one-task SLURM job (an opsearch worker launched through submitit), a plain
    cluster environment: Lightning would otherwise pick SLURMEnvironment, which installs its own
    requeue signal handler; submitit owns requeue there."""
    if "SLURM_JOB_ID" not in os.environ or _launched_externally():
        return []
    from lightning_fabric.plugins.environments import LightningEnvironment

    return [LightningEnvironment()]


class Evaluator:
    """Trains layers on the proxy architectures of one EvalConfig; reusable for many layers."""

    def __init__(self, config: EvalConfig | None = None, *, logger: str | None = None,
                 log_dir: str | None = None, **overrides):
        """`logger` ("csv" or "tensorboard", Lightning's loggers) writes each architecture's
        learning curves to log_dir/<layer>/<architecture> (log_dir defaults to ./logs)."""
        config = config or EvalConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.builders = {arch: registry.architectures.get(arch) for arch in config.archs}
        self.logger = logger
        self.log_dir = log_dir if log_dir is not None or logger is None else "logs"
        if logger is not None:
            from opsearch.trainers.lit import check_logger

            check_logger(logger)  # unknown, or its package missing: one line now, before training
        _quiet_lightning()
        self.data = load_data(config)
        self._check_devices()

    # -- Lightning --------------------------------------------------------------------------
    def _strategy(self):
        """Lightning's strategy, except that the DDP family runs with a static graph (DDP then
        accepts parameters that never get a gradient: a compiled candidate holds v0/v1 even where
        its formula ignores them) and that plain "ddp", outside a launcher, forks its ranks from
        this process instead of re-running the command line."""
        strategy = self.config.strategy
        if strategy == "auto" and _several(self.config.devices):
            strategy = "ddp"  # what Lightning's auto picks for several devices, launched our way
        start_methods = {"ddp": "fork", "ddp_fork": "fork", "ddp_notebook": "fork", "ddp_spawn": "spawn"}
        if isinstance(strategy, str) and strategy in start_methods:
            from pytorch_lightning.strategies import DDPStrategy

            if strategy == "ddp" and _launched_externally():
                return DDPStrategy(static_graph=True)
            return DDPStrategy(start_method=start_methods[strategy], static_graph=True)
        return strategy

    def trainer(self, max_steps: int, logger: Any = False, callbacks: Sequence[Any] = ()):
        """The Trainer of one evaluation (one layer on one architecture), reused by every stage:
        Lightning's usual flags, the divergence and timing callbacks, no checkpoints, progress bar
        or model summary. One stage is one epoch (see trainers/lit.py); construction ~5 ms."""
        import pytorch_lightning as pl
        from lightning_fabric.utilities.exceptions import MisconfigurationException

        from opsearch.trainers.lit import DivergenceCallback, TimingCallback

        c = self.config
        try:
            return pl.Trainer(
                accelerator=c.accelerator, devices=c.devices, strategy=self._strategy(),
                precision=c.precision, num_nodes=c.num_nodes, plugins=_cluster_plugins(),
                max_steps=max_steps, max_epochs=1, reload_dataloaders_every_n_epochs=1,
                num_sanity_val_steps=0, logger=logger, log_every_n_steps=1,
                callbacks=[DivergenceCallback(), TimingCallback(), *callbacks],
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                use_distributed_sampler=False, benchmark=False, inference_mode=True,
                default_root_dir=self.log_dir)
        except UserError:
            raise
        except (MisconfigurationException, ValueError, RuntimeError, TypeError) as e:
            raise UserError(f"cannot run on accelerator={c.accelerator!r} devices={c.devices!r} "
                            f"strategy={c.strategy!r} precision={c.precision!r}: {e}".replace("\n", " ")) from None

    def _check_devices(self) -> None:
        """Fail now, with one line, if the accelerator/devices/strategy/precision cannot run."""
        self.trainer(1)

    # -- evaluation -------------------------------------------------------------------------
    def start(self, layer: Any) -> "EvalSession":
        factory, label = norm_act_factory(layer, self.config.layer_options)
        return EvalSession(self, factory, label)

    def evaluate(self, layer: Any, progress: Callable[[str, ArchResult], None] | None = None) -> EvalResult:
        """Train `layer` for `config.steps` on every architecture; accuracies + timings."""
        session = self.start(layer)
        session.train_until(self.config.steps, progress=progress)
        return session.result()


@dataclass
class _ArchRun:
    module: Any
    datamodule: Any
    trainer: Any
    seconds: float = 0.0
    stages: int = 0


class EvalSession:
    """One layer's training on every architecture, advanced in stages by `train_until`: each
    architecture has one Trainer, whose fit continues where the previous stage stopped."""

    def __init__(self, evaluator: Evaluator, factory: NormActFactory, label: str):
        self.evaluator = evaluator
        self.factory = factory
        self.label = label
        self.runs: dict[str, _ArchRun] = {}
        self.seconds = 0.0

    def _build(self, arch: str) -> _ArchRun:
        from opsearch.trainers.lit import ProxyDataModule, ProxyModule, make_logger

        ev = self.evaluator
        c, data = ev.config, ev.data
        created: list[nn.Module] = []

        def recording(num_channels: int, act: bool) -> nn.Module:
            m = self.factory(num_channels, act)
            created.append(m)
            return m

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_stable_seed(c.seed, arch))
            model = ev.builders[arch](recording, data.num_classes, data.in_channels, **c.options_for(arch))
        module = ProxyModule(model, created, total_steps=c.steps, lr=c.lr, num_val=len(data.y_val),
                             momentum=c.momentum, weight_decay=c.weight_decay,
                             warmup_steps=c.warmup_steps, label_smoothing=c.label_smoothing,
                             nesterov=c.nesterov, channels_last=c.channels_last)
        datamodule = ProxyDataModule(c.dataset, batch_size=c.batch_size, seed=c.seed,
                                     val_batch_size=c.val_batch_size, steps_per_call=c.steps_per_call,
                                     data=data, **dataset_options(c))
        logger = make_logger(ev.logger, ev.log_dir, _log_name(self.label), arch) if ev.logger else False
        return _ArchRun(module, datamodule, ev.trainer(0, logger=logger))

    def train_until(self, step: int, progress: Callable[[str, ArchResult], None] | None = None
                    ) -> dict[str, float]:
        """Train every architecture up to `step` (at most config.steps); validation accuracy of
        each (0 for a diverged run)."""
        from opsearch.trainers.lit import launches_processes

        c = self.evaluator.config
        step = min(int(step), c.steps)
        accuracies = {}
        threads = torch.get_num_threads()
        if c.threads is not None:
            torch.set_num_threads(c.threads)
        try:
            for arch in c.archs:
                t0 = time.perf_counter()
                run = self.runs.get(arch)
                if run is None:
                    run = self.runs[arch] = self._build(arch)
                m, trainer = run.module, run.trainer
                if not m.diverged and m.step < step:
                    if run.stages and launches_processes(trainer):
                        # Lightning fits a Trainer whose DDP forks/spawns its ranks only once; the
                        # module carries its step and optimizer state into a fresh one.
                        run.trainer = trainer = self.evaluator.trainer(0, logger=trainer.logger or False)
                    run.stages += 1
                    # The next stage of the same fit: one more epoch, up to `step` (see lit.py).
                    trainer.fit_loop.epoch_loop.max_steps = step  # (what Trainer(max_steps=) sets)
                    trainer.fit_loop.max_epochs = trainer.current_epoch + 1
                    with warnings.catch_warnings():
                        _quiet_lightning()
                        trainer.fit(m, datamodule=run.datamodule)
                if m.diverged:
                    m.val_acc, m.val_step = 0.0, m.step
                elif m.val_step != m.step:  # (a stage that ended without its validation)
                    with warnings.catch_warnings():
                        _quiet_lightning()
                        trainer.validate(m, datamodule=run.datamodule, verbose=False)
                    # (read back from the logged metric: a forked DDP validation does not send
                    # the module's state back, its logged metrics it does)
                    m.val_acc, m.val_step = float(trainer.callback_metrics["val_acc"]), m.step
                run.seconds += time.perf_counter() - t0
                accuracies[arch] = float(m.val_acc or 0.0)
                if progress is not None:
                    progress(arch, self._arch_result(arch))
        finally:
            if c.threads is not None:
                torch.set_num_threads(threads)
        self.seconds = sum(r.seconds for r in self.runs.values())
        return accuracies

    def _arch_result(self, arch: str) -> ArchResult:
        run = self.runs[arch]
        m = run.module
        return ArchResult(accuracy=0.0 if m.diverged else float(m.val_acc or 0.0), diverged=m.diverged,
                          steps=m.step, seconds=run.seconds, v0_range=m.tracked_v0_range())

    def result(self) -> EvalResult:
        per_arch = {arch: self._arch_result(arch) for arch in self.evaluator.config.archs if arch in self.runs}
        return EvalResult(self.label, {a: r.accuracy for a, r in per_arch.items()}, per_arch,
                          sum(r.seconds for r in per_arch.values()))
