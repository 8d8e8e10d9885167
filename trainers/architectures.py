"""Proxy architectures: CPU-sized members of the three families of the paper's search.

- ``resnet``: basic residual blocks (conv-norm_act-conv-norm, shortcut, ReLU after the sum),
- ``mobilenetv2``: inverted residuals with a linear bottleneck,
- ``efficientnet``: MBConv blocks with squeeze-and-excitation (EfficientNet-B0 style).

Each is built from a ``norm_act(num_channels, act: bool) -> nn.Module`` factory
(`opsearch.layers.norm_act(layer)` gives one for any layer or candidate graph) and has the
signature ``(norm_act, num_classes, in_channels, *, width=..., depth=..., **options)``.
All are fully convolutional with a global average pool, so any input size works.

Slots without an activation. Wherever the family's own block has a normalization but no
activation -- the last norm of a residual block, the linear bottleneck (projection) of an
inverted residual / MBConv block, the norm of a projection shortcut -- the architecture calls
``norm_act(c, act=False)``. What fills that slot is the layer's business: for known layers it is
their declared companion (BN-ReLU -> BN, GN-ReLU -> GN, EvoNorms -> the per-channel affine alone,
as in the paper's reference code); for other graphs `opsearch.layers.norm_act`'s ``no_act``
option decides. Every other normalization in these networks is ``act=True``: the candidate layer
is the whole normalization-activation. The ReLU after a residual sum and the SiLU/sigmoid inside
squeeze-and-excitation are fixed parts of the architecture (as in the reference), not slots.

As in the paper's reference ResNet, the no-activation layer that ends each residual branch starts
with its output scale (``weight``) at zero (``zero_init_residual=True``), so every block starts as
its shortcut; without it unnormalised branches add up and the proxy diverges for good layers too.

Channel counts are not rounded to multiples of 8, so odd widths (``width=7``) give odd channel
counts; the layers' group rule copes with them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from opsearch.errors import UserError
from opsearch.registry import register_architecture

NormAct = Callable[[int, bool], nn.Module]


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)


def _channels(x: float) -> int:
    return max(1, int(round(x)))


def _check(name: str, width: int, depth: int, options: dict) -> None:
    if options:
        raise UserError(f"architecture {name!r}: unknown option(s) {', '.join(sorted(options))}")
    if width < 1 or depth < 1:
        raise UserError(f"architecture {name!r}: width and depth must be >= 1, got {width}, {depth}")


class _Head(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------
# ResNet

def zero_init_scale(module: nn.Module) -> None:
    """Set the layer's output scale (its per-channel `weight`) to 0, so the residual branch starts
    as zero; a layer without one is left alone."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 1:
        with torch.no_grad():
            weight.zero_()


class BasicBlock(nn.Module):
    """conv3x3 -> norm_act -> conv3x3 -> norm (no act) ; + shortcut ; ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, norm_act: NormAct, zero_init: bool = True):
        super().__init__()
        self.conv1 = _conv(cin, cout, 3, stride)
        self.na1 = norm_act(cout, True)
        self.conv2 = _conv(cout, cout, 3)
        self.na2 = norm_act(cout, False)
        if zero_init:
            zero_init_scale(self.na2)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride), norm_act(cout, False))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.na2(self.conv2(self.na1(self.conv1(x))))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, three stages of `depth` basic blocks at widths (w, 2w, 4w), strides (1, 2, 2)."""

    def __init__(self, norm_act: NormAct, num_classes: int, in_channels: int, width: int, depth: int,
                 zero_init_residual: bool = True):
        super().__init__()
        self.stem = nn.Sequential(_conv(in_channels, width, 3), norm_act(width, True))
        blocks, cin = [], width
        for stage, mult in enumerate((1, 2, 4)):
            cout = width * mult
            for i in range(depth):
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1, norm_act,
                                         zero_init_residual))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = _Head(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@register_architecture("resnet")
def resnet(norm_act: NormAct, num_classes: int, in_channels: int, *, width: int = 8, depth: int = 1,
           zero_init_residual: bool = True, **options) -> nn.Module:
    """ResNet (basic blocks), 3 stages of `depth` blocks at widths w, 2w, 4w."""
    _check("resnet", width, depth, options)
    return ResNet(norm_act, num_classes, in_channels, width, depth, zero_init_residual)


# ---------------------------------------------------------------------------------------------
# Inverted residuals (MobileNetV2) and MBConv (EfficientNet)

class SqueezeExcite(nn.Module):
    """Channel gating from pooled features: pool -> 1x1 reduce -> SiLU -> 1x1 expand -> sigmoid."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(nn.functional.silu(self.reduce(s))))


class InvertedResidual(nn.Module):
    """[1x1 expand -> norm_act] -> kxk depthwise -> norm_act -> [SE] -> 1x1 project -> norm (no
    act: the linear bottleneck); identity shortcut when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: float, kernel: int,
                 norm_act: NormAct, se_ratio: float = 0.0):
        super().__init__()
        hidden = _channels(cin * expansion)
        layers: list[nn.Module] = []
        if hidden != cin:
            layers += [_conv(cin, hidden, 1), norm_act(hidden, True)]
        layers += [_conv(hidden, hidden, kernel, stride, groups=hidden), norm_act(hidden, True)]
        if se_ratio > 0:
            layers.append(SqueezeExcite(hidden, _channels(cin * se_ratio)))
        layers += [_conv(hidden, cout, 1), norm_act(cout, False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out + x if self.residual else out


class _InvertedNet(nn.Module):
    """Stem conv, a list of stages (expansion, channels, blocks, stride, kernel), 1x1 head conv."""

    def __init__(self, norm_act: NormAct, num_classes: int, in_channels: int, stem: int,
                 stages: list[tuple[float, int, int, int, int]], head: int, se_ratio: float):
        super().__init__()
        self.stem = nn.Sequential(_conv(in_channels, stem, 3), norm_act(stem, True))
        blocks, cin = [], stem
        for expansion, cout, n, stride, kernel in stages:
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion, kernel,
                                               norm_act, se_ratio))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = nn.Sequential(_conv(cin, head, 1), norm_act(head, True))
        self.head = _Head(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_conv(self.blocks(self.stem(x))))


@register_architecture("mobilenetv2")
def mobilenetv2(norm_act: NormAct, num_classes: int, in_channels: int, *, width: int = 8,
                depth: int = 1, expansion: float = 4.0, **options) -> nn.Module:
    """MobileNetV2: inverted residuals with linear bottlenecks, widths w, 1.5w, 2w, 3w."""
    _check("mobilenetv2", width, depth, options)
    w = width
    stages = [
        (1.0, _channels(w), 1, 1, 3),
        (expansion, _channels(1.5 * w), depth, 2, 3),
        (expansion, _channels(2 * w), depth, 2, 3),
        (expansion, _channels(3 * w), 1, 1, 3),
    ]
    return _InvertedNet(norm_act, num_classes, in_channels, _channels(w), stages, _channels(6 * w),
                        se_ratio=0.0)


@register_architecture("efficientnet")
def efficientnet(norm_act: NormAct, num_classes: int, in_channels: int, *, width: int = 8,
                 depth: int = 1, expansion: float = 4.0, se_ratio: float = 0.25, **options) -> nn.Module:
    """EfficientNet-B0 style: MBConv with squeeze-excitation, 3x3 and 5x5 depthwise kernels."""
    _check("efficientnet", width, depth, options)
    w = width
    stages = [
        (1.0, _channels(w), 1, 1, 3),
        (expansion, _channels(1.5 * w), depth, 2, 3),
        (expansion, _channels(2.5 * w), depth, 2, 5),
        (expansion, _channels(3 * w), 1, 1, 3),
    ]
    return _InvertedNet(norm_act, num_classes, in_channels, _channels(w), stages, _channels(6 * w),
                        se_ratio=se_ratio)


def build(name: str, norm_act: NormAct, num_classes: int, in_channels: int, **options) -> nn.Module:
    """The registered architecture `name` (unknown names raise UserError listing the known ones)."""
    from opsearch import registry

    return registry.architectures.create(name, norm_act, num_classes, in_channels, **options)
