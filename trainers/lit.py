"""Lightning pieces of a proxy evaluation: data module, module, callbacks, loggers.

One evaluation of a layer on one architecture is one `pl.Trainer` (the usual flags: max_steps,
accelerator, devices, strategy, precision, logger, callbacks) fitting one `ProxyModule` on one
`ProxyDataModule`:

- `ProxyDataModule` serves any registered dataset (digits, fashion_mnist, cifar10, synthetic, a
  user's) as Lightning expects: ``prepare_data`` fetches what the user asked to download, ``setup``
  loads the in-memory tensors, ``train_dataloader`` the training batches of the current stage,
  ``val_dataloader`` this rank's share of the validation set.
- `ProxyModule`: SGD with momentum, linear warmup then cosine decay over the run's full step
  count, weight decay on convolution and linear weights but not on the norm-act layers' own
  parameters (v0, v1, weight, bias, as the paper's reference excludes the EvoNorm variables).
  Validation runs in Lightning's validation loop at the end of every stage.
- `ProxyModule` also keeps the range of the layers' v0 entries over every step (``v0_range``):
  the equivalence filter merges layers equal only while v0 stays in a band (``max(0, v0)`` and
  ``v0``) when the earlier one's training kept it there (plugins/rejection/equivalence.py).
- `DivergenceCallback`: the first non-finite training loss stops the run and marks it diverged
  (accuracy 0); that step is not applied. `TimingCallback`: training and validation seconds.
- `make_logger`: Lightning's CSVLogger / TensorBoardLogger for learning curves.

Staged training (the quality filter trains 100 steps, checks the accuracy, then continues to the
full count) uses the same Trainer: each stage raises ``trainer.fit_loop.max_steps`` and fits again.
A stage is one Lightning epoch: the data module is reloaded every epoch and serves the batches of
steps [module.step, max_steps), and batch k of a run is a pure function of (seed, k), so a staged
run sees exactly the batches of a straight one and continues instead of starting over. The
module's step counter, optimizer state and results live in ``get_extra_state``, so they also
survive a fit in other processes (Lightning's fork/spawn DDP launchers send rank 0's state dict
back, not the loop's progress).

Optimization is manual (``automatic_optimization = False``), for speed: each ``training_step``
call takes k consecutive batches (`GroupedBatches`, one optimizer step each), so Lightning's
per-call hooks (more with automatic optimization's closure) are paid once per k steps, not once
per step, which on the tiny proxy is a measurable share of a step (BENCHMARKS.md, "Lightning
overhead"). Backward, the precision plugin, DDP gradient sync and device placement still
go through Lightning (``manual_backward``, the wrapped optimizer, the strategy).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from opsearch.compile import is_v0
from opsearch.errors import UserError
from opsearch.trainers.data import ArrayData, BatchStream, load, shard


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warmup to `base_lr` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Data

class ProxyDataModule(pl.LightningDataModule):
    """A registered dataset for proxy training, sharded by rank.

    Training batches come from a `BatchStream` (batch k is a function of (seed, k)) and cover
    the current stage: steps [trainer.lightning_module.step, trainer.max_steps), or one epoch
    when max_steps is not set. Pass `data` to reuse tensors already loaded (the evaluator loads
    each dataset once per process).
    """

    def __init__(self, dataset: str = "digits", *, batch_size: int = 32, seed: int = 0,
                 val_batch_size: int = 1024, steps_per_call: int = 1, data: ArrayData | None = None,
                 **options: Any):
        super().__init__()
        self.dataset = dataset
        self.options = options  # the reader's own: data_dir, download, image_size, ...
        self.batch_size = batch_size
        self.seed = seed
        self.val_batch_size = val_batch_size
        self.steps_per_call = steps_per_call
        self.data = data
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare_data(self) -> None:
        """Downloads (rank 0 only, as Lightning calls it) when the user asked for it."""
        if self.data is None and self.options.get("download"):
            load(self.dataset, **self.options)

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = load(self.dataset, **self.options)

    def _placed(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The training set on `device`: kept on an accelerator (it is small), no copy per step."""
        x, y = self.data.x_train, self.data.y_train
        if device.type == "cpu":
            return x, y
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (x.to(device), y.to(device))
        return self._on_device[key]

    def train_dataloader(self):
        self.setup()
        trainer = self.trainer
        module = trainer.lightning_module
        rank, world = trainer.global_rank, trainer.world_size
        start = int(getattr(module, "step", trainer.global_step))
        x, y = self._placed(module.device)
        # (a Trainer without max_steps, as users often write one: one epoch per fit epoch)
        stop = trainer.max_steps if trainer.max_steps >= 0 else start + len(y) // self.batch_size
        stream = BatchStream(x, y, self.batch_size, seed=self.seed, start_step=start,
                             num_steps=stop - start, rank=rank, world_size=world)
        # Several optimizer steps per training_step call amortise Lightning's per-call hooks;
        # under multi-process DDP each step needs its own forward through the DDP wrapper.
        return stream.grouped(self.steps_per_call if world == 1 else 1)

    def val_dataloader(self):
        self.setup()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        part = shard(len(self.data.y_val), rank, world)
        return _Chunks(self.data.x_val[part], self.data.y_val[part], self.val_batch_size)


class _Chunks:
    """(x, y) in consecutive chunks of `size`: one iterable (a list would be read by Lightning as
    several dataloaders)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int):
        self.x, self.y, self.size = x, y, size

    def __len__(self) -> int:
        return -(-len(self.y) // self.size)

    def __iter__(self):
        for i in range(0, len(self.y), self.size):
            yield self.x[i:i + self.size], self.y[i:i + self.size]


# ---------------------------------------------------------------------------------------------
# Module

class ProxyModule(pl.LightningModule):
    """One architecture with one candidate layer, trained for `total_steps` steps in stages."""

    def __init__(self, model: nn.Module, norm_act_modules: list[nn.Module], *, total_steps: int,
                 lr: float, num_val: int, momentum: float = 0.9, weight_decay: float = 5e-4,
                 warmup_steps: int = 0, label_smoothing: float = 0.0, nesterov: bool = False,
                 channels_last: bool | None = None):
        super().__init__()
        self.automatic_optimization = False  # see the module docstring: k steps per call
        self.model = model
        self.total_steps = total_steps
        self.lr = lr
        self.num_val = num_val  # validation samples over all ranks
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.label_smoothing = label_smoothing
        self.nesterov = nesterov
        self.channels_last = channels_last
        self._memory_format = torch.contiguous_format
        self._no_decay = {id(p) for m in norm_act_modules for p in m.parameters()}
        # the layers' v0 vectors (the IR's vector that starts at 1), whose range is kept
        self._v0 = [p for m in norm_act_modules for n, p in m.named_parameters() if is_v0(n)]
        self._v0_lo: torch.Tensor | None = None
        self._v0_hi: torch.Tensor | None = None
        self._val_correct: torch.Tensor | None = None
        self._val_finite: torch.Tensor | None = None
        # State that must survive a fit in another process (see get_extra_state).
        self.step = 0
        self.diverged = False  # set by DivergenceCallback
        self.val_acc: float | None = None
        self.val_step = -1
        self.opt_state: dict | None = None
        self.timings = {"train_s": 0.0, "val_s": 0.0}  # kept by TimingCallback
        self.v0_range: list[float] | None = _v0_range(self._v0)  # [min, max] of v0 at init and every step
        self.v0_range_steps = 0  # the steps v0_range saw (== step unless a stage's state was lost)

    # -- optimizer ----------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if id(p) in self._no_decay or p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)
        if self.opt_state is not None:  # momentum buffers of the previous stage
            opt.load_state_dict(self.opt_state)
        return opt

    # -- training -----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1 and self.device.type == "cpu":
            _share_cores(self.trainer)
        # Channels-last convolutions are ~25% faster for these small CPU networks (measured).
        # (not under DDP: its gradient buckets are contiguous and would copy every gradient)
        use = (self.device.type == "cpu" and self.trainer.world_size == 1 if self.channels_last is None
               else self.channels_last)
        self._memory_format = torch.channels_last if use else torch.contiguous_format
        self.model.to(memory_format=self._memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int):
        """One item of GroupedBatches: k consecutive batches, one optimizer step each."""
        xs, ys = batch
        opt = self.optimizers()
        total = xs.new_zeros((), dtype=torch.float32)
        done = 0
        for x, y in zip(xs, ys):
            loss = self._train_step(opt, x, y)
            if loss is None:
                break
            total += loss.detach()
            done += 1
        if done:
            self.log("train_loss", total / done, on_step=True, batch_size=done * len(ys[0]))
            self.log("step", float(self.step))  # the loggers' x axis: optimizer steps, not calls
        return None

    def _train_step(self, opt, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        x = x.contiguous(memory_format=self._memory_format)
        lr = learning_rate(self.step, self.total_steps, self.lr, self.warmup_steps)
        for group in opt.optimizer.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(self.model(x), y, label_smoothing=self.label_smoothing)
        self.manual_backward(loss)  # DivergenceCallback.on_before_backward looks at the loss first
        if self.diverged:  # a non-finite loss: this step is not applied, and training stops
            opt.zero_grad(set_to_none=True)
            return None
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.step += 1
        self._track_v0()
        return loss

    def _track_v0(self) -> None:
        """Widen the running [min, max] of the v0 entries (kept as tensors: no sync per step)."""
        if not self._v0:
            self.v0_range_steps += 1
            return
        lo, hi = _extremes(self._v0)
        if self._v0_lo is None:
            start = torch.tensor(self.v0_range if self.v0_range is not None else [math.nan, math.nan],
                                 dtype=lo.dtype, device=lo.device)
            self._v0_lo, self._v0_hi = start[0], start[1]
        # (NaN propagates: a run whose v0 went non-finite has no range)
        self._v0_lo = torch.minimum(self._v0_lo, lo)
        self._v0_hi = torch.maximum(self._v0_hi, hi)
        self.v0_range_steps += 1

    def tracked_v0_range(self) -> list[float] | None:
        """[min, max] of every v0 entry over the whole training so far, or None when unknown
        (a stage whose tracking did not come back, a non-finite v0)."""
        if self._v0_lo is not None:
            self.v0_range = [float(self._v0_lo), float(self._v0_hi)]
        if self.v0_range_steps != self.step or self.v0_range is None:
            return None
        return None if not all(math.isfinite(v) for v in self.v0_range) else list(self.v0_range)

    def on_train_end(self) -> None:
        # Keep momentum buffers for the next stage (moved to CPU: they travel in the state dict).
        opt = self.optimizers()
        opt = getattr(opt, "optimizer", opt)
        self.opt_state = _to_cpu(opt.state_dict())

    # -- validation (Lightning's validation loop, at the end of every stage) --------------------
    def on_validation_epoch_start(self) -> None:
        self._val_correct = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_finite = torch.ones((), dtype=torch.bool, device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        if self.diverged:
            return
        x, y = batch
        logits = self.model(x.contiguous(memory_format=self._memory_format))
        self._val_correct += (logits.argmax(dim=1) == y).sum()
        self._val_finite &= torch.isfinite(logits).all()  # NaN logits cannot count as right

    def on_validation_epoch_end(self) -> None:
        correct, finite = self._val_correct, self._val_finite
        if self.trainer.world_size > 1:
            correct = self.trainer.strategy.reduce(correct, reduce_op="sum")
            finite = self.trainer.strategy.reduce_boolean_decision(bool(finite), all=True)
        ok = bool(finite) and not self.diverged
        self.val_acc = float(correct) / max(1, self.num_val) if ok else 0.0
        self.val_step = self.step
        self.log("val_acc", self.val_acc, sync_dist=True)  # (the same on every rank already)
        self.log("step", float(self.step), sync_dist=True)

    # -- state that crosses process boundaries --------------------------------------------------
    def get_extra_state(self) -> Any:
        return {"step": self.step, "diverged": self.diverged, "val_acc": self.val_acc,
                "val_step": self.val_step, "opt_state": self.opt_state, "timings": dict(self.timings),
                "v0_range": self.tracked_v0_range(),
                "v0_range_steps": self.v0_range_steps}

    def set_extra_state(self, state: Any) -> None:
        self.step = int(state["step"])
        self.diverged = bool(state["diverged"])
        self.val_acc = state["val_acc"]
        self.val_step = int(state["val_step"])
        self.opt_state = state["opt_state"]
        self.timings = dict(state.get("timings") or self.timings)
        self.v0_range = state.get("v0_range")
        self.v0_range_steps = int(state.get("v0_range_steps", -1))
        self._v0_lo = self._v0_hi = None  # (continue from the loaded range)


def _v0_range(params: list[torch.Tensor]) -> list[float]:
    """[min, max] over the entries of `params` ([1, 1], v0's start, when there are none)."""
    if not params:
        return [1.0, 1.0]
    lo, hi = _extremes(params)
    return [float(lo), float(hi)]


def _extremes(params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) over every entry of `params`, as tensors on their device."""
    return torch.aminmax(torch.cat([p.detach().reshape(-1) for p in params]))


# ---------------------------------------------------------------------------------------------
# Callbacks

class DivergenceCallback(pl.Callback):
    """A NaN or infinite training loss stops the run and marks the module diverged (it then scores
    0); the module does not apply that step. Under DDP every rank takes the same decision (one
    rank stopping alone would leave the others waiting in an all-reduce)."""

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss).all())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            pl_module.diverged = True
            trainer.should_stop = True


class TimingCallback(pl.Callback):
    """Wall seconds spent training and validating, added to ``pl_module.timings`` (which travels
    with the module's state) and logged as ``train_s`` / ``val_s`` beside the learning curves."""

    def __init__(self) -> None:
        self._train_t0: float | None = None
        self._val_t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._train_t0 = time.perf_counter()

    def _stop_training_clock(self, pl_module) -> None:
        if self._train_t0 is not None:
            pl_module.timings["train_s"] += time.perf_counter() - self._train_t0
            self._train_t0 = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._stop_training_clock(pl_module)  # a stage's validation ends its training
        self._val_t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pl_module.timings["val_s"] += time.perf_counter() - self._val_t0
        pl_module.log("train_s", pl_module.timings["train_s"], sync_dist=True)
        pl_module.log("val_s", pl_module.timings["val_s"], sync_dist=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_training_clock(pl_module)  # (a stage that ended without validation)


# ---------------------------------------------------------------------------------------------
# Loggers

LOGGERS = ("csv", "tensorboard")


def check_logger(kind: str) -> None:
    """UserError (one line) for an unknown logger or one whose package is not installed."""
    if kind not in LOGGERS:
        raise UserError(f"unknown logger {kind!r}; known: {', '.join(LOGGERS)}")
    if kind == "tensorboard":
        from lightning_fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE

        if not (_TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE):
            raise UserError("--logger tensorboard needs the tensorboard package: "
                            "pip install 'opsearch[tensorboard]' (or use --logger csv)")


def make_logger(kind: str, save_dir: str, name: str, version: str):
    """Lightning's CSVLogger or TensorBoardLogger writing to save_dir/name/version."""
    check_logger(kind)
    if kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir, name=name, version=version)
    from pytorch_lightning.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir, name=name, version=version, default_hp_metric=False)


# ---------------------------------------------------------------------------------------------

def launches_processes(trainer: pl.Trainer) -> bool:
    """Whether the trainer's strategy forks or spawns its ranks (DDP outside a launcher): Lightning
    then refuses a second fit on the same Trainer, so each stage needs a fresh one."""
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def _share_cores(trainer: pl.Trainer) -> None:
    """CPU ranks forked or spawned by Lightning inherit the parent's thread count; give each its
    share of the cores instead of oversubscribing them (OpenMP threads spin when they wait)."""
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, _MultiProcessingLauncher):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(1, trainer.num_devices)))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
