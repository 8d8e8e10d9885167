"""The README's own-space example (`gated`) is a space a search can work in: it registers, keeps
the network's BatchNorm (without it, x * g(x) normalizes nothing and every candidate of a search
from scratch was rejected), and evolution's mutations, growth included, stay inside it."""
from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from opsearch import graph, layers, registry
from opsearch.plugins.algorithms.generator import GraphGenerator
from opsearch.plugins.algorithms.mutation import GraphMutator
from opsearch.space import SearchSpace

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_space_file(tmp_path: Path) -> Path:
    block = re.search(r"```python\n(# my_space\.py\n.*?)```", README.read_text(), re.S)
    assert block, "README lost its my_space.py example"
    path = tmp_path / "my_space.py"
    path.write_text(block.group(1))
    return path


def test_the_readme_space_keeps_batchnorm_and_evolves_inside_itself(tmp_path):
    registry.load_plugin_file(_readme_space_file(tmp_path))
    assert registry.space_surround("gated") == "batchnorm"
    space = SearchSpace.from_name("gated", num_nodes=4)
    rng = random.Random(0)
    parent = GraphGenerator(space).random_genome(rng)
    mutator = GraphMutator(space)
    sizes = set()
    for _ in range(200):
        child = mutator.mutate(parent, rng)
        plain = space.decode(child)  # a genome of this space: its last node is mul(x, gate)
        assert plain[-1][0] == "mul" and plain[-1][1][0] == graph.X
        sizes.add(len(graph.prune(plain)))
        if graph.is_valid(plain):
            parent = child
    assert len(sizes) >= 3, sizes  # graphs grew and shrank
    module = layers.build(graph.LayerGraph.from_tuple(space.decode(parent)), 8, surround="batchnorm")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    assert module(torch.randn(4, 8, 5, 5)).shape == (4, 8, 5, 5)
