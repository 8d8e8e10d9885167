"""opsearch: search new neural-network operators (normalization-activation layers first)."""
import os as _os

# OpenMP threads that spin while waiting make small-network training 5-10x slower whenever
# another process shares the cores (measured: `opsearch evaluate bn_relu` 306 s spinning vs 44 s
# passive on a busy 2-core machine). Only a default: set OMP_WAIT_POLICY yourself to override;
# it matters only when opsearch is imported before torch.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from opsearch.errors import InvalidCandidate, OpsearchError, UserError
from opsearch.graph import LayerGraph, Node
from opsearch.registry import search_space

__version__ = "0.1.0"

__all__ = ["InvalidCandidate", "OpsearchError", "UserError", "LayerGraph", "Node", "search_space"]
