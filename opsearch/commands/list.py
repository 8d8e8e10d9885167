"""`opsearch list`: print every registry and what is in it."""
from __future__ import annotations

import json

from opsearch import registry


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("list", help="list every registered plugin")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="import a Python file that registers plugins (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    for path in args.plugin:
        registry.load_plugin_file(path)
    listing = {kind: reg.names() for kind, reg in registry.ALL.items()}
    if args.json:
        print(json.dumps(listing))
        return 0
    for kind, names in listing.items():
        print(f"{kind}:")
        for name in names:
            obj = registry.ALL[kind].get(name)
            doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
            print(f"  {name:<26} {doc[0] if doc else ''}")
    return 0
