"""The PostgreSQL lock of the test suite (tests/conftest.py): a test that stops the server waits
for the tests that use it, and they wait for it, across processes."""
from __future__ import annotations

import os
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


def _wait_beside(child_exclusive: bool, seconds: float) -> float:
    """Seconds this process waits for a shared lock while a child holds the same lock."""
    url = f"postgresql://test-lock-{time.time_ns()}"
    code = HOLD.format(tests=os.path.dirname(__file__), url=url, exclusive=child_exclusive,
                       seconds=seconds)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    start = time.monotonic()
    with resources.postgres_lock(url, exclusive=False):
        waited = time.monotonic() - start
    child.wait(timeout=30)
    return waited


def test_an_exclusive_holder_keeps_users_out_until_it_is_done():
    assert _wait_beside(child_exclusive=True, seconds=1.5) > 0.5


def test_users_share_the_server():
    assert _wait_beside(child_exclusive=False, seconds=3) < 1.0
