"""What several test files share: hand-made studies for tests that read a run without
searching, the tiny proxy of the test searches, and running the CLI in a child process."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime

from optuna.trial import FrozenTrial


def add_finished(run, user_attrs, state, values) -> None:
    """A finished trial written in one go, as a worker's last write leaves it."""
    now = datetime.now()
    run.storage.create_new_trial(run.study_id, template_trial=FrozenTrial(
        number=-1, state=state, value=None, values=values, datetime_start=now, datetime_complete=now,
        params={}, distributions={}, user_attrs=user_attrs, system_attrs={}, intermediate_values={},
        trial_id=-1))


# The tiny search of the end-to-end tests (4-node graphs, 3 training steps of a width-4 network):
# a str.format template fragment (braces doubled), appended to a test's own TOML header.
TINY_PROXY_TOML = """
[space_options]
num_nodes = 4

[algorithm_options]
population_size = 4
tournament_size = 2

[evaluator]
steps = 3
batch_size = 16
val_batch_size = 128
warmup_steps = 1
arch_options = {{ width = 4, depth = 1 }}
"""


def run_opsearch(args, cwd, fault=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """`python -m opsearch ARGS` in a child process, one torch thread, with the fault injection
    point `fault` (opsearch/faults.py) armed, or none even if this process has one; `env`: more
    environment variables."""
    env = {**os.environ, **(env or {})}
    env.pop("OPSEARCH_FAULT", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    if fault:
        env["OPSEARCH_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "opsearch", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def release_together(procs, ready_files, go, timeout=240.0) -> None:
    """Wait until every process has written its ready file (its imports and reads done), then
    touch `go`, so that they all start their racing part at the same instant. A process that
    exits first fails the test with its output."""
    deadline = time.time() + timeout
    while not all(f.exists() for f in ready_files):
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.05)
    go.touch()
