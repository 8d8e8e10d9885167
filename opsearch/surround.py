"""What the compiled layer puts around a candidate graph: one named choice per search space.

Why: the EvoNorm search makes a candidate the whole normalization-activation layer, but an
activation search in the Swish paper's style (Ramachandran, Zoph, Le, 2017) keeps the network's
BatchNorm and lets the candidate replace only the activation. An element-wise function alone
normalizes nothing, so without a surround every candidate of such a space leaves the deep
proxies (MobileNetV2, EfficientNet) at chance and the space cannot find anything.

- ``none``: the candidate graph, then the per-channel affine, is the whole layer (default).
- ``batchnorm``: ``BatchNorm2d`` (its own affine, the layer's eps and momentum), then the graph,
  then the per-channel affine (weight 1, bias 0: BatchNorm -> f at init). The slots where the
  architecture wants no activation hold the BatchNorm alone, as in the Swish paper's networks.

Who declares it: a search space (``@search_space("activation", surround="batchnorm")``), which
applies to its candidates, and a known layer (`opsearch.layers.declare_surround`), which is a
whole layer and keeps its own (``bn_relu`` has none even in a surrounded run; ``bn_then_relu``
is ReLU surrounded by BatchNorm, the fair reference for an activation space). A run stores its
candidates' surround (study attribute ``surround`` and the stored config's
``evaluator.layer_options.surround``), so that resuming, ``show``, ``export`` and ``rerank`` build
the same layer. To build one by hand: ``layers.build(graph, C, surround="batchnorm")`` (the module,
`opsearch.layers.Surrounded`, lives there: this module stays free of torch so that the
registry can check a space's declaration without importing it).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

from opsearch.errors import UserError
from opsearch.hints import closest_hint

NONE = "none"
SURROUNDS = {
    NONE: "the candidate is the whole layer",
    "batchnorm": "BatchNorm2d before the candidate, the network keeps its normalization",
}


def check(name: Any) -> str:
    """`name` if it is a known surround, else UserError with the known ones."""
    if name is None:
        return NONE
    if not isinstance(name, str) or name not in SURROUNDS:
        raise UserError(f"unknown surround {name!r}{closest_hint(name, list(SURROUNDS))}; "
                        f"known: {', '.join(SURROUNDS)}")
    return name


# --------------------------------------------------------------------------------------------
# Exported source (the same structure and state-dict keys as `layers.Surrounded`)


def export_class(name: str, class_name: str, core_class: str, formula: str, *, eps: float,
                 groups: int, momentum: float) -> str:
    """Standalone source of ``class_name``: the surround's module, then ``core_class``."""
    if check(name) == NONE:
        raise ValueError("no surround to export")
    return f'''

class {class_name}(torch.nn.Module):
    """BatchNorm2d (its own affine), then y = ({formula}) * weight + bias, per channel:
    the searched function replaces the activation, the network keeps its normalization."""

    SURROUND = {name!r}

    def __init__(self, num_channels, eps={eps!r}, groups={groups!r}, momentum={momentum!r}):
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(num_channels, eps=eps, momentum=momentum)
        self.layer = {core_class}(num_channels, eps=eps, groups=groups, momentum=momentum)

    def forward(self, x):
        return self.layer(self.norm(x))
'''


# --------------------------------------------------------------------------------------------
# Where a run's surround comes from and where it is kept


def of_config(config: Any) -> str:
    """The candidates' surround a search config sets (``evaluator.layer_options.surround``)."""
    options = (config.evaluator or {}).get("layer_options") or {}
    return check(options.get("surround", NONE)) if isinstance(options, dict) else NONE


def configured(config: Any, declared: str, takes_layer_options: bool) -> Any:
    """`config` with its space's surround (``declared``, `registry.space_surround`) written into
    ``evaluator.layer_options`` (unless the user set one there), when the evaluator plugin takes
    layer options; that config is what the run stores, so a re-ranking or a resumed run builds
    candidates the same way."""
    options = (config.evaluator or {}).get("layer_options")
    if isinstance(options, dict) and "surround" in options:
        check(options["surround"])
        return config
    if check(declared) == NONE or not takes_layer_options:
        return config
    evaluator = copy.deepcopy(config.evaluator or {})
    evaluator["layer_options"] = {**(evaluator.get("layer_options") or {}), "surround": declared}
    return dataclasses.replace(config, evaluator=evaluator)


def of_run(study_attrs: dict[str, Any]) -> str:
    """The candidates' surround of a stored run: its ``surround`` attribute, else its stored
    config's ``evaluator.layer_options.surround``, else ``none`` (runs from before surrounds)."""
    found = study_attrs.get("surround")
    if found is None:
        try:
            stored = json.loads(study_attrs.get("config") or "{}")
            found = ((stored.get("evaluator") or {}).get("layer_options") or {}).get("surround")
        except (TypeError, ValueError, AttributeError):
            found = None
    try:
        return check(found)
    except UserError:
        raise UserError(f"the run's stored surround {found!r} is unknown; known: {', '.join(SURROUNDS)}") from None
