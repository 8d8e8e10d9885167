"""Deterministic probe tensors shared by the layer-level filters (numerics, equivalence).

Inputs look like pre-normalization activations: per-channel offsets and scales around a
standard normal, so that means, variances and signs all vary across channels.
"""
from __future__ import annotations

import torch
from torch import nn


def generator(seed: int, *salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + hash(tuple(salt))) % (2**63 - 1))
    return g


def probe_input(shape: tuple[int, int, int, int], gen: torch.Generator,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, c, h, w = shape
    scale = torch.rand(1, c, 1, 1, generator=gen) * 1.5 + 0.5
    offset = torch.rand(1, c, 1, 1, generator=gen) * 2.0 - 1.0
    return (torch.randn(n, c, h, w, generator=gen) * scale + offset).to(dtype)


_MULTIPLICATIVE = ("v0", "weight")


@torch.no_grad()
def randomize_parameters(layer: nn.Module, gen: torch.Generator) -> None:
    """Move every parameter away from its initial value (v0=1, v1=0, weight=1, bias=0), so that
    graphs equal only at initialisation (``x * v0`` and ``x``) stop looking equal."""
    for name, p in layer.named_parameters():
        base = name.rsplit(".", 1)[-1]
        if base in _MULTIPLICATIVE:
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        else:
            p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
