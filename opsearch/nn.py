"""Put a searched layer into an existing PyTorch model: `replace_norm_act`.

A found layer replaces a *pair* of modules, a normalization and the activation after it, so the
swap has to know which activation follows which BatchNorm2d in the forward pass. The rule:

1. If the model traces with ``torch.fx`` (torchvision's ResNets, MobileNets, EfficientNets do),
   the data flow decides, call site by call site. A BatchNorm2d whose output goes only to a
   ReLU/SiLU (module, ``F.relu``/``torch.relu``/``F.silu``, or ``.relu()``) becomes the layer
   with its activation (``act=True``) and that activation call is removed; a BatchNorm2d with
   no activation after it (the last norm of a residual block, a projection shortcut) becomes
   the layer's no-activation companion (``act=False``: for EvoNorms the per-channel affine, for
   bn_relu plain BN; see `opsearch.layers.norm_act`). An activation module shared by several
   call sites (torchvision's BasicBlock uses one ``relu`` after ``bn1`` and after the residual
   addition) loses only the call after the BatchNorm; the ReLU after the addition stays, as in
   the paper's reference ResNets. The result is a ``torch.fx.GraphModule`` with the same
   submodule names (state dict keys of everything but the replaced norms are unchanged).
2. Otherwise (forward code with data-dependent control flow), the model is changed in place by
   module order only: inside an ``nn.Sequential`` a BatchNorm2d directly followed by ReLU/SiLU
   becomes the layer and the activation an ``nn.Identity``; any other BatchNorm2d becomes the
   layer (``act=True``) and whatever activation its parent's forward applies after it stays,
   because a forward we cannot see cannot be rewritten. A warning says how many were left so.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

NormActFactory = Callable[[int, bool], nn.Module]

_ACT_MODULES = (nn.ReLU, nn.SiLU)
_ACT_FUNCTIONS = {F.relu, torch.relu, F.silu, torch.relu_}
_ACT_METHODS = {"relu", "relu_"}


def replace_norm_act(model: nn.Module, layer: Any, *, trace: bool = True, **options: Any) -> nn.Module:
    """Swap every BatchNorm2d (+ the ReLU/SiLU right after it) in ``model`` for ``layer``.

    ``layer``: a known layer name, a LayerGraph / plain graph, a graph JSON path, or a
    ``norm_act(num_channels, act)`` factory; ``options`` go to `opsearch.layers.norm_act`
    (eps, groups, no_act, ...). Returns the new model (see the module docstring for the rule);
    call ``.to(device)`` on it afterwards, the new layers are created on the CPU.
    """
    from opsearch import layers

    factory = layers.as_factory(layer, **options)
    if isinstance(model, nn.BatchNorm2d):  # nothing follows it: the no-activation companion
        return factory(model.num_features, False)
    if trace:
        try:
            traced = fx.symbolic_trace(model)
        except Exception:  # data-dependent control flow and the like: fall back to module order
            traced = None
        if traced is not None:
            return _replace_traced(model, traced, factory)
    return _replace_by_order(model, factory)


def _is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _ACT_MODULES)
    if node.op == "call_function":
        return node.target in _ACT_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ACT_METHODS
    return False


def _replace_traced(model: nn.Module, traced: fx.GraphModule, factory: NormActFactory) -> nn.Module:
    modules = dict(traced.named_modules())
    graph = traced.graph
    # Per BatchNorm module: its call sites and, for each, the activation node that alone uses it.
    sites: dict[str, list[tuple[fx.Node, fx.Node | None]]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.BatchNorm2d):
            users = list(node.users)
            act = users[0] if len(users) == 1 and _is_activation(users[0], modules) else None
            if act is not None and act.args and act.args[0] is not node:
                act = None
            sites.setdefault(node.target, []).append((node, act))
    for target, calls in sites.items():
        bn = modules[target]
        # One module object serves every call site: fold only when every site has an activation.
        fold = all(act is not None for _, act in calls)
        new = factory(bn.num_features, fold)
        _set_submodule(traced, target, new)
        if fold:
            for bn_node, act in calls:
                act.replace_all_uses_with(bn_node)
                graph.erase_node(act)
    graph.lint()
    # Shared activation modules no call site uses any more are dropped with the dead code.
    traced.delete_all_unused_submodules()
    traced.recompile()
    traced.train(model.training)
    return traced


def _replace_by_order(model: nn.Module, factory: NormActFactory) -> nn.Module:
    unfolded = 0

    def visit(parent: nn.Module) -> None:
        nonlocal unfolded
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if isinstance(child, nn.BatchNorm2d):
                nxt = children[i + 1] if i + 1 < len(children) else None
                follows = nxt is not None and isinstance(nxt[1], _ACT_MODULES)
                if isinstance(parent, nn.Sequential):
                    setattr(parent, name, factory(child.num_features, follows))
                    if follows:
                        setattr(parent, nxt[0], nn.Identity())
                else:
                    setattr(parent, name, factory(child.num_features, True))
                    unfolded += 1
            else:
                visit(child)

    visit(model)
    if unfolded:
        warnings.warn(f"replace_norm_act: the model does not trace with torch.fx; {unfolded} "
                      "BatchNorm2d outside nn.Sequential were replaced by the full layer and any "
                      "activation their forward applies after them was kept", stacklevel=3)
    return model


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


__all__ = ["replace_norm_act"]
