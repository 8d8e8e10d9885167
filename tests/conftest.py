"""Running the suite in parallel (README: `python -m pytest -q -n 2`, pytest-xdist) beside one
PostgreSQL server.

tests/test_storage_outage.py stops and starts that server on purpose, which would fail any other
PostgreSQL test running at the same time in the other process. So every test marked `postgres`
holds a lock on the server for its duration (resources.postgres_lock, a file lock that every
process on this machine sees): shared for the tests that only use it, exclusive for those marked
`postgres(stops_server=True)`. resources.postgres_url() fails a test that asks for the server
without the mark. (xdist's own `--dist loadgroup` would keep them on one process, but it cannot
rename test ids under pytest 9, so its groups are ignored; `pytest_xdist_make_scheduler` below
keeps the tests that hold a machine-wide resource alone on one process instead, where the other
process never waits for them.)"""
from __future__ import annotations

import os

import pytest
import torch

import resources

# One torch thread per test process, as every opsearch worker has (trainers/plugin.py): the
# filters' tensors are too small to share, and a second thread made their checks 2.5-2.7x slower
# once the other core was busy (another xdist process, a benchmark), no faster on a quiet box
# (BENCHMARKS.md, "Filter threads and the test suite"). A test that wants more sets them itself.
torch.set_num_threads(1)


# Tests that hold a resource alone (the SLURM cluster; the PostgreSQL server they stop): run one
# after the other on one process. Spread over both, one process sat idle on the lock for minutes.
ALONE = ("tests/test_slurm.py::", "tests/test_storage_outage.py::test_postgres_stopped")


@pytest.hookimpl(optionalhook=True)  # (a hook of pytest-xdist: no error where it is not installed)
def pytest_xdist_make_scheduler(config, log):
    """xdist's `load` distribution, except that the ALONE tests are one unit of work, which
    goes out first (xdist sends larger units first), to one process."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class AloneTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "alone" if nodeid.startswith(ALONE) else nodeid

    return AloneTogether(config, log)


@pytest.fixture(autouse=True)
def _postgres_is_locked_for_marked_tests(request):
    mark = request.node.get_closest_marker("postgres")
    resources.current_test_marked_postgres = mark is not None
    url = os.environ.get("OPSEARCH_TEST_POSTGRES_URL")
    try:
        if mark is None or not url:
            yield
        else:
            with resources.postgres_lock(url, exclusive=bool(mark.kwargs.get("stops_server"))):
                yield
    finally:
        resources.current_test_marked_postgres = True


@pytest.fixture(autouse=True)
def _slurm_is_held_alone_by_marked_tests(request):
    if request.node.get_closest_marker("slurm") is None:
        yield
    else:
        with resources.machine_lock("slurm", exclusive=True):
            yield
