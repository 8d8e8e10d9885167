"""Importing a script of benchmarks/ in a test (the scripts import their neighbours by name)."""
from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@contextlib.contextmanager
def benchmark_module(name: str):
    """The module benchmarks/<name>.py, with benchmarks/ on sys.path while it is in use."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
