"""Flush denormal floats to zero while a candidate trains.

Bad candidates drive activations and gradients into the denormal range, where x86 float
arithmetic crawls: training such a candidate took an order of magnitude longer with denormals
than flushed, with the same accuracies (BENCHMARKS.md, "Rejection economy"; benchmarks/denormals.py).
Flushing changes values only below 1.2e-38,
so it changes no decision. The engine flushes around every candidate; filters that train
(stability, quality) flush too, so that they are as fast when run on their own.
"""
from __future__ import annotations

import torch


def flush_denormal_enabled() -> bool:
    """Whether the CPU currently flushes denormal floats to zero (torch has no getter)."""
    return bool((torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0)


class flush_denormals:
    """Context manager: flush denormals to zero inside, restore the previous setting after."""

    def __enter__(self) -> "flush_denormals":
        self.previous = flush_denormal_enabled()
        torch.set_flush_denormal(True)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_flush_denormal(self.previous)
