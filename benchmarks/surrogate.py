"""A surrogate evaluator plugin: scores a layer in milliseconds, without training.

The score of a layer on an "architecture" is how well it normalises a probe batch whose
channels have random offsets and scales (the job a normalization layer has): per channel, the
output's mean should be near 0 and its standard deviation near 1, so the score is
``exp(-mean|mean| - mean|log std|)`` in [0, 1]. Each architecture name picks its own probe shape
(channels, batch), so the K objectives differ as real proxies do. Not a predictor of accuracy;
it shows that the search loop does not care how candidates are scored, and it lets benchmarks
and tests run the real engine (filters, recording, recovery) at no training cost:

    opsearch search --plugin benchmarks/surrogate.py --config run.toml   # evaluator_plugin = "surrogate"
"""
from __future__ import annotations

import zlib

import torch

from opsearch import layers, register_evaluator
from opsearch.evaluation import Evaluation, Evaluator

EVALUATIONS = []  # every layer scored in this process (tests count them)


@register_evaluator("surrogate")
class SurrogateEvaluator(Evaluator):
    """How well the layer normalises a probe batch (no training)."""

    OPTIONS = {"channels": 8, "batch_size": 8, "size": 4}

    def evaluate(self, layer) -> Evaluation:
        EVALUATIONS.append(layer)
        return Evaluation({arch: self.score(layer, arch) for arch in self.archs})

    def score(self, layer, arch: str) -> float:
        c = self.config
        channels = int(c.get("channels", 8)) + zlib.crc32(arch.encode()) % 5
        batch, size = int(c.get("batch_size", 8)), int(c.get("size", 4))
        gen = torch.Generator().manual_seed(int(c.get("seed", 0)) * 7919 + zlib.crc32(arch.encode()))
        x = torch.randn(batch, channels, size, size, generator=gen)
        x = x * (torch.rand(1, channels, 1, 1, generator=gen) * 3 + 0.2) + torch.randn(1, channels, 1, 1, generator=gen)
        module = layers.build(layer, channels)
        module.train()
        with torch.no_grad():
            y = module(x)
        if not bool(torch.isfinite(y).all()):
            return 0.0
        mean = y.mean(dim=(0, 2, 3)).abs().mean()
        log_std = torch.log(y.std(dim=(0, 2, 3)) + 1e-6).abs().mean()
        return float(torch.exp(-(mean + log_std)))
