"""External resources some tests need: a PostgreSQL server, Debian's Fashion-MNIST files.

Outside CI a missing resource skips the test with its reason; under CI (``CI=true``, as
`.ci/run` sets it) it fails it, so that CI cannot go green by skipping what it must test."""
from __future__ import annotations

import os

import pytest

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Skip (or, in CI, fail) the calling test because `reason`."""
    if in_ci():
        pytest.fail(f"CI must run this test, but {reason}", pytrace=False)
    pytest.skip(reason)


def postgres_url() -> str:
    url = os.environ.get("OPSEARCH_TEST_POSTGRES_URL")
    if not url:
        missing("OPSEARCH_TEST_POSTGRES_URL is not set (.ci/start-postgres starts a server)")
    return url


def fashion_mnist_dir() -> str:
    if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")):
        missing("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST_DIR
