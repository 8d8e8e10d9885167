"""Fault points: named places where a test can make a worker die, to prove crash safety.

`OPSEARCH_FAULT=<point>:<n>` makes the process SIGKILL itself the n-th time it reaches <point>
(no cleanup, like a machine losing power). Unset, a fault point costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "OPSEARCH_FAULT"
_hits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
