"""`opsearch list`: every registry, each plugin with what a user needs to pick it: a known
layer's formula, a plugin's one-line description and its options with their defaults."""
from __future__ import annotations

import json
from typing import Any

from opsearch import registry
from opsearch.commands.common import load_plugins, plugin_parent


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("list", help="list every registered plugin with its options",
                              parents=[plugin_parent()])
    p.add_argument("--json", action="store_true",
                   help="one JSON object on stdout: {registry: {name: {doc, options | formula}}}")
    p.set_defaults(func=run)


def describe(kind: str, name: str) -> dict[str, Any]:
    """What `list` shows of one plugin: ``formula`` for a known layer, else ``doc`` (the first
    line of its docstring) and ``options`` (name -> default)."""
    reg = registry.ALL[kind]
    from opsearch import surround

    if reg is registry.layers:
        from opsearch import graph, layers

        info = {"formula": graph.formula(layers.get_graph(name))}
        around = layers.surround_of(name)
    else:
        doc = (getattr(reg.get(name), "__doc__", None) or "").strip().splitlines()
        info = {"doc": doc[0] if doc else "", "options": reg.options(name)}
        around = registry.space_surround(name) if reg is registry.search_spaces else surround.NONE
    if around != surround.NONE:  # what the compiled layer puts around the graph
        info["surround"] = around
    return info


def listing() -> dict[str, dict[str, dict[str, Any]]]:
    return {kind: {name: describe(kind, name) for name in reg.names()} for kind, reg in registry.ALL.items()}


def run(args) -> int:
    load_plugins(args)
    everything = listing()
    if args.json:
        print(json.dumps(everything, default=repr))
        return 0
    for kind, entries in everything.items():
        print(f"{kind}:")
        for name, info in entries.items():
            around = f"  (surround: {info['surround']})" if "surround" in info else ""
            if "formula" in info:
                print(f"  {name:<30} {info['formula']}{around}")
                continue
            print(f"  {name:<30} {info['doc']}{around}")
            if info["options"]:
                options = ", ".join(f"{k}={_show(v)}" for k, v in info["options"].items())
                print(f"  {'':<30} options: {options}")
    return 0


def _show(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "none"}[value]
    return repr(value) if not isinstance(value, dict) else json.dumps(value, default=repr)
