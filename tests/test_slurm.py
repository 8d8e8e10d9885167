"""A real SLURM (`.ci/start-slurm` starts a one-node cluster): `opsearch launch --executor slurm`
runs a job array on a PostgreSQL study to its budget; a job cancelled while it holds a candidate
loses nothing. Skipped, with the reason, where there is no SLURM, except under CI=true, where a
missing SLURM is a failure (CI is where it must run)."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import resources
from test_launch import TINY, assert_accounted, trials_of, wait_done

# above wait_done's own limits, so that a slow run fails with the jobs' logs, not a bare timeout
# (postgres: its workers share a PostgreSQL study; slurm: one such test on the SLURM at a time)
pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.slurm, pytest.mark.timeout(600)]

SLOW_FILTER = '''
import time
from opsearch.registry import register_filter
from opsearch.rejection import Filter


@register_filter("slow")
class SlowFilter(Filter):
    """Holds each candidate for a few seconds, so that a test can kill its worker meanwhile."""

    name = "slow"
    cost = 0.0

    def check(self, candidate, context):
        time.sleep({seconds})
        return self.accept()
'''


@functools.lru_cache(maxsize=None)
def _slurm_problem() -> str | None:
    """Why SLURM cannot run the tests, or None; asked once per process (a SLURM that is installed
    but not running takes sinfo ~9 s to say so)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM is absent (no sbatch/sinfo on PATH; bash .ci/start-slurm starts one)"
    out = subprocess.run(["sinfo", "-h", "-o", "%P %a %T"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0 or not out.stdout.strip():
        return f"SLURM does not answer: sinfo: {out.stderr.strip() or 'no partition'}"
    return None


def _slurm_ready() -> None:
    problem = _slurm_problem()
    if problem is not None:
        resources.missing(problem)


@pytest.fixture
def pg_url():
    _slurm_ready()
    return resources.postgres_url()


def launch(tmp_path, url, name, config, workers=2, extra=()):
    out = subprocess.run(
        [sys.executable, "-m", "opsearch", "launch", name, "--executor", "slurm", "--workers",
         str(workers), "--storage", url, "--config", str(config), "--slurm-time", "10",
         "--log-dir", str(tmp_path / "logs"), *extra],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    jobs = re.findall(r"job (\d+_\d+)", out.stdout)
    assert len(jobs) == workers, out.stdout
    return jobs


def squeue(jobs):
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True,
                         timeout=60).stdout
    return {line.split()[0]: line.split()[1] for line in out.splitlines()
            if line.split() and line.split()[0] in jobs}


def cleanup(jobs):
    subprocess.run(["scancel", *{j.split("_")[0] for j in jobs}], capture_output=True, timeout=60)


def logs_of(tmp_path, tail: int | None = 1500):
    """The jobs' logs, each cut to its last `tail` characters (for messages; None: whole)."""
    return "\n".join(f"--- {p}\n{p.read_text()[-tail if tail else 0:]}" for p in (tmp_path / "logs").rglob("*.out"))


def test_job_array_finishes_the_budget(tmp_path, pg_url):
    name = f"slurm_array_{os.getpid()}_{int(time.time())}"
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.format(budget=8, baselines='["bn_relu"]'))
    jobs = launch(tmp_path, pg_url, name, config)
    try:
        wait_done(pg_url, name, 8, timeout=420)
    except AssertionError:
        raise AssertionError(logs_of(tmp_path))
    finally:
        cleanup(jobs)
    trials = trials_of(pg_url, name)
    assert_accounted(trials, 8)
    owners = {t.system_attrs.get("opsearch:worker", {}).get("job") for t in trials}
    assert owners <= set(jobs) | {None}, owners  # each worker recorded its SLURM array job
    assert owners & set(jobs), owners


def slow_config(tmp_path, budget, seconds):
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW_FILTER.format(seconds=seconds))
    config = tmp_path / "slow.toml"
    config.write_text(TINY.format(budget=budget, baselines="[]").replace(
        'filters = ["validity", "numerics", "equivalence"]',
        f'filters = ["slow", "validity"]\nplugins = ["{plugin}"]'))
    return config


def wait_for_held_candidate(url, name, jobs, timeout=300):
    """(trial number, job) of a candidate that one of `jobs` holds RUNNING."""
    from optuna.trial import TrialState

    from opsearch.study import open_run

    deadline = time.time() + timeout
    while time.time() < deadline:
        for t in open_run(url, name).get_trials(deepcopy=False):
            job = (t.system_attrs.get("opsearch:worker") or {}).get("job")
            if t.state == TrialState.RUNNING and job in jobs and t.user_attrs.get("kind") == "candidate":
                return t.number, job
        time.sleep(0.3)
    raise AssertionError("no worker took a candidate")


def owners(trials):
    return [(t.system_attrs.get("opsearch:worker") or {}) for t in trials]


def signal_a_busy_job(tmp_path, url, name, seconds, scancel_args):
    """Launch 2 workers on a 4-candidate search whose candidates take `seconds`, send
    `scancel *scancel_args JOB` to a job while it holds a candidate, wait for the search to end.
    Returns (the candidate's lost trial, the job signalled, the retry that finished it)."""
    jobs = launch(tmp_path, url, name, slow_config(tmp_path, budget=4, seconds=seconds))
    try:
        try:
            number, job = wait_for_held_candidate(url, name, jobs)
            subprocess.run(["scancel", *scancel_args, job], check=True, timeout=60)
            wait_done(url, name, 4, timeout=420)
        except AssertionError:
            raise AssertionError(logs_of(tmp_path))
    finally:
        cleanup(jobs)
    trials = trials_of(url, name)
    assert_accounted(trials, 4)
    trials = [t for t in trials if t.user_attrs.get("kind") in ("candidate", "baseline")]  # the run's study
    victim = next(t for t in trials if t.number == number)
    assert victim.user_attrs.get("verdict") == "failed:worker_lost", victim.user_attrs
    retries = [t for t in trials if t.user_attrs.get("retry_of") == number]
    assert len(retries) == 1 and retries[0].state.is_finished()
    return victim, job, retries[0]


def test_cancelled_job_loses_nothing(tmp_path, pg_url):
    """scancel one job while it holds a candidate (held 10 s, longer than SLURM's KillWait, 5 s): that
    candidate is failed as lost, handed out again and finished by the other worker; nothing is
    left RUNNING."""
    name = f"slurm_cancel_{os.getpid()}_{int(time.time())}"
    _, job, retry = signal_a_busy_job(tmp_path, pg_url, name, 10, [])
    assert owners([retry])[0].get("job") != job  # the surviving worker finished it


def test_preempted_job_is_requeued_and_hands_its_candidate_back(tmp_path, pg_url):
    """USR2 (what SLURM sends before preemption or the time limit, with submitit's --signal):
    the worker hands its candidate back at once, submitit requeues the same job, and the
    requeued job (same job id, new process) carries on; the candidate is finished once."""
    name = f"slurm_requeue_{os.getpid()}_{int(time.time())}"
    victim, job, _ = signal_a_busy_job(tmp_path, pg_url, name, 6, ["--signal=USR2"])
    assert "stopped" in victim.user_attrs.get("reason", ""), victim.user_attrs  # handed back
    # the whole logs: a requeued job that also re-ranks prints more than a message's tail, and
    # its first start scrolled out of the last 1,500 characters (a CI run under load)
    log = logs_of(tmp_path, tail=None)
    assert log.count(f"job {job}") >= 2, log[-6000:]  # the same job started twice: requeued
