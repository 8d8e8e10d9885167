"""opsearch: search new neural-network operators (normalization-activation layers first)."""
from opsearch.errors import InvalidCandidate, OpsearchError, UserError
from opsearch.graph import LayerGraph, Node
from opsearch.registry import (register_algorithm, register_architecture, register_dataset,
                               register_evaluator, register_filter, register_layer, search_space)

__version__ = "0.1.0"

__all__ = ["InvalidCandidate", "OpsearchError", "UserError", "LayerGraph", "Node", "search_space",
           "register_algorithm", "register_filter", "register_evaluator", "register_dataset",
           "register_architecture", "register_layer", "search", "load", "SearchRun"]


def __getattr__(name: str):
    """The Python front end (opsearch/api.py, opsearch/run.py), imported on first use: it sits
    above the commands, which `import opsearch` (a plugin file's first line) need not load."""
    if name in ("search", "load"):
        from opsearch import api
        return getattr(api, name)
    if name == "SearchRun":
        from opsearch.run import SearchRun
        return SearchRun
    raise AttributeError(f"module 'opsearch' has no attribute {name!r}")
