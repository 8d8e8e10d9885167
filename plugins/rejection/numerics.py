"""`numerics`: forward and backward of the compiled layer on small probe batches.

Rejects a candidate when, in training mode or in eval mode (after a few training-mode passes have
moved the running statistics, batch size 1 as at inference):
- an output, an input gradient or a parameter gradient is NaN or Inf;
- the output ignores its input: two different inputs give the same output (``x - x``,
  ``sigmoid(exp(exp(x)))``, or ``std_b(x)`` in eval mode, where it reads only running statistics),
  or the input gradient is zero everywhere (nothing below the layer would train).
  These two are tested with the layer's parameters moved off their initial values, so that a
  layer that is merely zero at initialisation (``x * v1``, v1 = 0) is not rejected: it can train;
- (``reject_statistics``, default on) the output is one value per sample and channel, constant
  over the positions in training mode (``std_i(x)``, ``rms_g(x)``): a statistic of x, which
  erases every spatial feature below it. Small random graphs are often such statistics; the
  quality filter would reject them too, at 100 training steps each.

Probe shapes include odd channel counts (groups fall back to a divisor) and a group size > 1.
"""
from __future__ import annotations

from typing import Sequence

import torch

from opsearch.plugins.rejection import _probes
from opsearch.registry import register_filter
from opsearch.rejection import Candidate, Filter, FilterContext, Verdict

DEFAULT_SHAPES = ((8, 16, 6, 6), (4, 7, 5, 3), (2, 64, 3, 3))


@register_filter("numerics")
class NumericsFilter(Filter):
    """Reject NaN/Inf outputs or gradients, zero input gradients, outputs that ignore the input."""

    cost = 0.01
    default = True
    from_graph_alone = True

    def __init__(self, shapes: Sequence[Sequence[int]] = DEFAULT_SHAPES, train_passes: int = 2,
                 constant_rtol: float = 1e-6, reject_statistics: bool = True):
        super().__init__()
        self.shapes = [tuple(int(v) for v in s) for s in shapes]
        if not self.shapes or any(len(s) != 4 or min(s) < 1 for s in self.shapes):
            from opsearch.errors import UserError
            raise UserError(f"numerics: shapes must be lists of 4 positive ints (N, C, H, W), got {shapes!r}")
        self.train_passes = max(1, int(train_passes))
        self.constant_rtol = float(constant_rtol)
        self.reject_statistics = bool(reject_statistics)

    def check(self, candidate: Candidate, context: FilterContext) -> Verdict:
        max_abs = 0.0
        for index, shape in enumerate(self.shapes):
            gen = _probes.generator(context.seed, 17, index)
            problem, peak = self._check_shape(candidate, shape, gen)
            if problem:
                return self.reject(f"{problem} (probe {'x'.join(map(str, shape))})", shape=str(shape))
            max_abs = max(max_abs, peak)
        return self.accept(max_abs_output=max_abs)

    def _check_shape(self, candidate: Candidate, shape, gen) -> tuple[str, float]:
        n, c, h, w = shape
        layer = candidate.build(c)
        layer.train()
        peak = 0.0
        for step in range(self.train_passes):
            problem, p = _forward_backward(layer, _probes.probe_input(shape, gen), gen, "training")
            if problem:
                return problem, 0.0
            peak = max(peak, p)
            layer.zero_grad(set_to_none=True)
        layer.eval()
        problem, p = _forward_backward(layer, _probes.probe_input((1, c, h, w), gen), gen, "eval")
        if problem:
            return problem, 0.0
        peak = max(peak, p)
        # Does the output depend on the input? Parameters off their initial values (see module doc).
        _probes.randomize_parameters(layer, gen)
        for mode, batch in (("training", n), ("eval", 1)):
            layer.train(mode == "training")
            state = {k: v.clone() for k, v in layer.state_dict().items()}
            x1 = _probes.probe_input((batch, c, h, w), gen).requires_grad_(True)
            y1 = layer(x1)
            y1.backward(torch.randn(y1.shape, generator=gen))
            layer.load_state_dict(state)  # the second pass sees the same running statistics
            with torch.no_grad():
                y2 = layer(_probes.probe_input((batch, c, h, w), gen))
            layer.load_state_dict(state)
            y1 = y1.detach()
            if not (torch.isfinite(y1).all() and torch.isfinite(y2).all()):
                return f"non-finite output in {mode} mode with trained-like parameters", 0.0
            scale = max(float(y1.abs().max()), float(y2.abs().max()), 1e-30)
            if float((y1 - y2).abs().max()) <= self.constant_rtol * scale:
                return f"output does not depend on the input in {mode} mode", 0.0
            if self.reject_statistics and mode == "training" and h * w > 1 and _flat_per_instance(y1, scale):
                return "output is one value per channel and instance (a statistic of x, not a layer)", 0.0
            if x1.grad is None or not bool((x1.grad != 0).any()):
                return f"zero input gradient in {mode} mode", 0.0
        return "", peak


def _flat_per_instance(y: torch.Tensor, scale: float) -> bool:
    """Whether y holds one value per (sample, channel): constant over the positions."""
    spread = (y - y.mean(dim=(2, 3), keepdim=True)).abs().max()
    return float(spread) <= 1e-6 * scale


def _forward_backward(layer, x: torch.Tensor, gen: torch.Generator, mode: str) -> tuple[str, float]:
    x = x.requires_grad_(True)
    y = layer(x)
    if y.shape != x.shape:
        return f"output shape {tuple(y.shape)} differs from input shape {tuple(x.shape)}", 0.0
    if not torch.isfinite(y).all():
        return f"non-finite output in {mode} mode", 0.0
    upstream = torch.randn(y.shape, generator=gen)
    (y * upstream).sum().backward()
    if x.grad is not None and not torch.isfinite(x.grad).all():
        return f"non-finite input gradient in {mode} mode", 0.0
    for name, p in layer.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"non-finite gradient of {name} in {mode} mode", 0.0
    return "", float(y.detach().abs().max())
