"""External resources some tests need: a PostgreSQL server, Debian's Fashion-MNIST files.

Outside CI a missing resource skips the test with its reason; under CI (``CI=true``, as
`.ci/run` sets it) it fails it, so that CI cannot go green by skipping what it must test."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile

import pytest

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Skip (or, in CI, fail) the calling test because `reason`."""
    if in_ci():
        pytest.fail(f"CI must run this test, but {reason}", pytrace=False)
    pytest.skip(reason)


# Set by tests/conftest.py for the running test: whether it is marked `postgres` (the mark that
# makes it hold the server's lock, so that it never runs while another test stops the server).
current_test_marked_postgres = True


@contextlib.contextmanager
def machine_lock(key: str, exclusive: bool):
    """Hold the lock named `key` for every process on this machine (a file lock): shared among
    the tests that only use a resource, exclusive for one that must have it alone
    (tests/conftest.py)."""
    name = hashlib.sha1(key.encode()).hexdigest()[:12]
    with open(os.path.join(tempfile.gettempdir(), f"opsearch-test-{name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def postgres_lock(url: str, exclusive: bool):
    """The lock of the PostgreSQL server at `url`: shared by tests that use the server, exclusive
    for one that stops it."""
    return machine_lock(f"postgres {url}", exclusive)


def postgres_url() -> str:
    if not current_test_marked_postgres:
        pytest.fail("a test that uses PostgreSQL must be marked postgres (tests/conftest.py)",
                    pytrace=False)
    url = os.environ.get("OPSEARCH_TEST_POSTGRES_URL")
    if not url:
        missing("OPSEARCH_TEST_POSTGRES_URL is not set (.ci/start-postgres starts a server)")
    return url


def fashion_mnist_dir() -> str:
    if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")):
        missing("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST_DIR
