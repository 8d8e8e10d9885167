"""Fault points: named places where a test can make a worker die, to prove crash safety.

`OPSEARCH_FAULT=<point>:<n>` makes the process SIGKILL itself the n-th time it reaches <point>
(no cleanup, like a machine losing power). Unset, a fault point costs one dict lookup.

`OPSEARCH_FAULT=<point>:poison` with `OPSEARCH_FAULT_STATE=FILE` makes one candidate poisonous,
as a layer that crashes its process is: the first candidate to reach <point> (in any process)
writes its key into FILE, and every process that reaches <point> with that key SIGKILLs itself,
every time, whichever worker it is.

`OPSEARCH_FAULT=<point>:fill` with `OPSEARCH_FAULT_STATE=FILE` fills the disk FILE is on (meant
for a small, size-limited filesystem in a test: never the real disk) the first time the process
reaches <point>, by writing FILE until no space is left; the process goes on, and meets a full
disk at its next write. Removing FILE frees the space.
"""
from __future__ import annotations

import os
import signal

ENV = "OPSEARCH_FAULT"
STATE_ENV = "OPSEARCH_FAULT_STATE"
_hits: dict[str, int] = {}


def point(name: str, key: str | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    if count == "fill":
        if not _hits.get(name):
            _hits[name] = 1
            _fill(_state_path())
        return
    if count == "poison":
        if key is not None and key == _poisoned(key):
            os.kill(os.getpid(), signal.SIGKILL)
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _poisoned(key: str) -> str | None:
    """The poisonous key: the one in the state file, or `key` if it is the first to claim it."""
    path = _state_path()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        with open(path) as f:
            return f.read()
    with os.fdopen(fd, "w") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def _state_path() -> str:
    path = os.environ.get(STATE_ENV)
    if not path:
        raise RuntimeError(f"{ENV}=<point>:poison or :fill needs {STATE_ENV}=FILE")
    return path


def _fill(path: str, chunk: int = 1 << 16) -> None:
    """Write FILE until the disk it is on is full (then smaller and smaller pieces)."""
    block = b"\0" * chunk
    with open(path, "ab", buffering=0) as f:
        while chunk:
            try:
                while True:
                    f.write(block[:chunk])
            except OSError:
                chunk //= 2
