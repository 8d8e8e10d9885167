"""opsearch: search new neural-network operators (normalization-activation layers first)."""
from opsearch.errors import InvalidCandidate, OpsearchError, UserError
from opsearch.graph import LayerGraph, Node
from opsearch.registry import (register_algorithm, register_architecture, register_dataset,
                               register_evaluator, register_filter, register_layer, search_space)

__version__ = "0.1.0"

__all__ = ["InvalidCandidate", "OpsearchError", "UserError", "LayerGraph", "Node", "search_space",
           "register_algorithm", "register_filter", "register_evaluator", "register_dataset",
           "register_architecture", "register_layer"]
