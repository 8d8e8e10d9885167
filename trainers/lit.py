"""The Lightning module and data module for proxy training.

`ProxyModule` trains one architecture built with one candidate layer: SGD with momentum, a linear
warmup then cosine decay defined over the run's full step count, weight decay on convolution and
linear weights but not on the norm-act layers' own parameters (v0, v1, weight, bias, as the
paper's reference excludes the EvoNorm variables), and a stop at the first non-finite loss
(`diverged`, accuracy 0) rather than training on NaNs.

Staged training (the quality filter trains 100 steps, checks, then continues) is built in: the
module keeps its own step counter, sets the learning rate from it, and stores its optimizer state
and results in ``get_extra_state`` so that they survive a fit in other processes (Lightning's
fork/spawn DDP launchers send rank 0's state dict back). Each stage is a fresh, cheap Trainer
fitting the next slice of a `BatchStream`; the slices of a staged run are exactly the batches of a
straight one, so continuing gives exactly what a straight run gives.

Optimization is manual (``automatic_optimization = False``): one forward, one backward, one
step, no closures; and each training_step call takes several consecutive batches
(`GroupedBatches`, one optimizer step each), so Lightning's per-call hooks (~0.7 ms on a CPU core)
are paid once per k steps. Precision plugins, DDP gradient sync and device placement still go
through Lightning (`manual_backward`, the wrapped optimizer, the strategy).
"""
from __future__ import annotations

import math
import os
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from opsearch.trainers.data import ArrayData, BatchStream, shard


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warmup to `base_lr` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class ProxyDataModule(pl.LightningDataModule):
    """Serves the training batches of steps [start_step, stop_step) of a run, sharded by rank."""

    def __init__(self, data: ArrayData, batch_size: int, seed: int, steps_per_call: int = 1):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_call = steps_per_call
        self.start_step = 0
        self.stop_step = 0
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def train_dataloader(self):
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        x, y = self.data.x_train, self.data.y_train
        device = trainer.lightning_module.device if trainer is not None else x.device
        if device.type != "cpu":  # keep the (small) training set on the accelerator: no copy per step
            key = str(device)
            if key not in self._on_device:
                self._on_device[key] = (x.to(device), y.to(device))
            x, y = self._on_device[key]
        stream = BatchStream(x, y, self.batch_size, seed=self.seed, start_step=self.start_step,
                             num_steps=self.stop_step - self.start_step, rank=rank, world_size=world)
        # Several optimizer steps per training_step call amortise Lightning's per-call hooks;
        # under multi-process DDP each step needs its own forward through the DDP wrapper.
        return stream.grouped(self.steps_per_call if world == 1 else 1)


class ProxyModule(pl.LightningModule):
    """One architecture with one candidate layer, trained for `total_steps` steps in stages."""

    def __init__(self, model: nn.Module, norm_act_modules: list[nn.Module], data: ArrayData, *,
                 total_steps: int, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                 warmup_steps: int = 0, label_smoothing: float = 0.0, val_batch_size: int = 1024,
                 nesterov: bool = False, channels_last: bool | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.data = data
        self.total_steps = total_steps
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.label_smoothing = label_smoothing
        self.val_batch_size = val_batch_size
        self.nesterov = nesterov
        self.channels_last = channels_last
        self._memory_format = torch.contiguous_format
        self._no_decay = {id(p) for m in norm_act_modules for p in m.parameters()}
        # State that must survive a fit in another process (see get_extra_state).
        self.step = 0
        self.diverged = False
        self.val_acc: float | None = None
        self.val_step = -1
        self.opt_state: dict | None = None

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
        if self.opt_state is not None:
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
        for x, y in zip(xs, ys):
            if not self._train_step(opt, x, y):
                break
        return None

    def _train_step(self, opt, x: torch.Tensor, y: torch.Tensor) -> bool:
        x = x.contiguous(memory_format=self._memory_format)
        lr = learning_rate(self.step, self.total_steps, self.lr, self.warmup_steps)
        for group in opt.optimizer.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(self.model(x), y, label_smoothing=self.label_smoothing)
        finite = bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # every rank must agree, or DDP's all-reduce would hang
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            self.diverged = True
            self.trainer.should_stop = True
            return False
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.step += 1
        return True

    def on_train_end(self) -> None:
        # Keep momentum buffers for the next stage (moved to CPU: they travel in the state dict).
        opt = self.optimizers()
        opt = getattr(opt, "optimizer", opt)
        self.opt_state = _to_cpu(opt.state_dict())
        self.val_acc = 0.0 if self.diverged else self.validate()
        self.val_step = self.step

    @torch.no_grad()
    def validate(self) -> float:
        """Validation accuracy; under DDP each rank scores its shard and the counts are summed."""
        trainer = self._trainer
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None and distributed else (0, 1)
        part = shard(len(self.data.y_val), rank, world)
        x_all, y_all = self.data.x_val[part], self.data.y_val[part]
        was_training = self.model.training
        self.model.eval()
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        plugin = trainer.precision_plugin if trainer is not None else None
        for i in range(0, len(y_all), self.val_batch_size):
            x = x_all[i:i + self.val_batch_size].to(self.device).contiguous(memory_format=self._memory_format)
            y = y_all[i:i + self.val_batch_size].to(self.device)
            if plugin is not None:
                x = plugin.convert_input(x)
                with plugin.forward_context():
                    logits = self.model(x)
            else:
                logits = self.model(x)
            correct += (logits.argmax(dim=1) == y).sum()
            if not bool(torch.isfinite(logits).all()):
                correct.zero_()  # NaN logits cannot count as right by argmax luck
                break
        self.model.train(was_training)
        if world > 1:
            correct = trainer.strategy.reduce(correct, reduce_op="sum")
        return float(correct) / max(1, len(self.data.y_val))

    # -- state that crosses process boundaries --------------------------------------------------
    def get_extra_state(self) -> Any:
        return {"step": self.step, "diverged": self.diverged, "val_acc": self.val_acc,
                "val_step": self.val_step, "opt_state": self.opt_state}

    def set_extra_state(self, state: Any) -> None:
        self.step = int(state["step"])
        self.diverged = bool(state["diverged"])
        self.val_acc = state["val_acc"]
        self.val_step = int(state["val_step"])
        self.opt_state = state["opt_state"]


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
