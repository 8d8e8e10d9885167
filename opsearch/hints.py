"""The "did you mean" part of an error about an unknown name (a leaf: every module may use it)."""
from __future__ import annotations

import difflib
from typing import Any


def closest_hint(name: Any, known: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or nothing."""
    close = difflib.get_close_matches(str(name), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
