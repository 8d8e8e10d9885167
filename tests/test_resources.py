"""The PostgreSQL lock of the test suite (tests/conftest.py): a test that stops the server waits
for the tests that use it, and they wait for it, across processes."""
from __future__ import annotations

import subprocess
import sys
import time

import resources

HOLD = """
import sys, time
sys.path.insert(0, {tests!r})
import resources
with resources.postgres_lock({url!r}, exclusive={exclusive}):
    print("held", flush=True)
    time.sleep({seconds})
"""


def _hold_in_child(url, exclusive, seconds):
    import os
    code = HOLD.format(tests=os.path.dirname(__file__), url=url, exclusive=exclusive, seconds=seconds)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_an_exclusive_holder_keeps_users_out_until_it_is_done():
    url = f"postgresql://test-lock-{time.time_ns()}"
    child = _hold_in_child(url, exclusive=True, seconds=1.5)
    start = time.monotonic()
    with resources.postgres_lock(url, exclusive=False):
        waited = time.monotonic() - start
    child.wait(timeout=30)
    assert waited > 0.5, waited


def test_users_share_the_server():
    url = f"postgresql://test-lock-{time.time_ns()}"
    child = _hold_in_child(url, exclusive=False, seconds=3)
    start = time.monotonic()
    with resources.postgres_lock(url, exclusive=False):
        waited = time.monotonic() - start
    child.wait(timeout=30)
    assert waited < 1.0, waited
