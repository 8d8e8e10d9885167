"""A storage that goes away: every storage call waits it out for the storage grace period, says
so once on stderr, and past it the command stops with one line and exit status 3.

The unit tests drop a real SQLAlchemy connection error into storage calls; the end-to-end test
stops and starts a real PostgreSQL server in the middle of a 2-worker search (CI: .ci/run
starts the server with .ci/start-postgres; elsewhere it needs OPSEARCH_TEST_POSTGRES_URL and a
server this process may stop, and skips without)."""
from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from opsearch.study import guard, queue
from opsearch.errors import StorageUnavailable
from opsearch.study import LOST, Run, WorkerId, open_run, run_trials, set_storage_grace

import contract
import resources
from studies import TINY_PROXY_TOML

ATTRS = {"space": "evonorm", "archs": ["a"], "dataset": "digits"}


def _refused() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError(
        "SELECT 1", {}, ConnectionRefusedError(111, "connection to server at \"127.0.0.1\", port "
                                                    "5432 failed: Connection refused"))


@pytest.fixture
def run(tmp_path):
    set_storage_grace(None)
    yield Run.create_or_open(f"sqlite:///{tmp_path}/study.db", "s", ATTRS, ["space"])
    set_storage_grace(None)


def _outage_of(monkeypatch, storage, method: str, failures: int) -> list[float]:
    """The next `failures` calls of storage.<method> fail as a server that is down does."""
    real = getattr(type(storage), method).__get__(storage)
    calls: list[float] = []

    def flaky(*args, **kwargs):
        calls.append(time.monotonic())
        if len(calls) <= failures:
            raise _refused()
        return real(*args, **kwargs)

    # behind the guard, as the driver is
    guard = storage._opsearch_guard
    monkeypatch.setattr(storage, method, guard.wrap(flaky))
    return calls


def test_a_storage_call_waits_out_an_outage_and_says_so_once(run, monkeypatch, capsys):
    record = run.start_trial({"kind": "candidate", "genome": "[1]"}, WorkerId.current())
    calls = _outage_of(monkeypatch, run.storage, "set_trial_state_values", 3)
    monkeypatch.setattr(queue, "_finish", lambda storage, trial_id, state, values, attrs:
                        storage.set_trial_state_values(trial_id, state, values))
    set_storage_grace(30)
    assert run.finish_trial(record, TrialState.FAIL, None, {"verdict": "failed:x"})
    assert len(calls) == 4  # three refused, then through
    assert calls[3] - calls[0] >= 0.5 * 0.75 * (1 + 2 + 4) * 0.9  # backoff between tries
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("opsearch: storage unreachable, retrying for up to 30 s (sqlite:///"), err
    assert "Connection refused" in err[0] and err[1].startswith("opsearch: storage reachable again")
    assert len(err) == 2
    trial = run.storage.get_trial(record.trial_id)
    assert trial.state == TrialState.FAIL


def test_past_the_grace_period_one_error_and_the_study_as_it_was(run, monkeypatch):
    record = run.start_trial({"kind": "candidate", "genome": "[1]"}, WorkerId.current())
    _outage_of(monkeypatch, run.storage, "get_all_trials", 10 ** 6)
    set_storage_grace(1.5)
    start = time.monotonic()
    monkeypatch.setattr(queue, "_read_rdb_trials", lambda *args: None)  # Optuna's reader
    with pytest.raises(StorageUnavailable) as info:
        run.sync()
    assert 1.5 <= time.monotonic() - start < 5
    message = str(info.value)
    assert message.startswith("storage unreachable for 1.5 s (sqlite:///") and "\n" not in message
    assert info.value.exit_code == 3
    assert run.storage.get_trial(record.trial_id).state == TrialState.RUNNING  # untouched


def test_a_storage_that_answers_no_is_not_retried(run, monkeypatch):
    calls = []

    def wrong_password(*args, **kwargs):
        calls.append(1)
        raise sqlalchemy.exc.OperationalError(
            "connect", {}, Exception('FATAL:  password authentication failed for user "x"'))

    monkeypatch.setattr(run.storage, "get_all_trials", run.storage._opsearch_guard.wrap(wrong_password))
    set_storage_grace(30)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        run.storage.get_all_trials(run.study_id)
    assert calls == [1]


def test_silence_during_an_outage_is_not_a_lost_worker(run, monkeypatch):
    remote = WorkerId("some-other-host", 1234, "1")
    record = run.start_trial({"kind": "candidate", "genome": "[5]"}, remote)
    beat = run.storage.get_trial(record.trial_id).system_attrs["opsearch:heartbeat"]
    # the storage was away for 10 minutes and came back just now: nobody could beat meanwhile
    monkeypatch.setattr(guard._outage, "ended", beat + 600)
    assert run.reap_lost(grace_s=120, now=beat + 601) == []
    assert run.reap_lost(grace_s=120, now=beat + 600 + 121) == [record.number]


def test_the_command_line_says_one_line_and_exits_3(tmp_path):
    """`opsearch show` on a PostgreSQL URL where nothing listens: the line, exit 3."""
    env = dict(os.environ, OPSEARCH_STORAGE_GRACE_S="1")
    url = "postgresql+psycopg://nobody@127.0.0.1:9/none"  # port 9 (discard): refused
    done = subprocess.run([sys.executable, "-m", "opsearch", "show", "s", "--storage", url],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("opsearch: storage unreachable, retrying for up to 1 s"), lines
    assert lines[1].startswith("opsearch show: error: storage unreachable for 1 s"), lines
    assert len(lines) == 2 and "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------
# A real PostgreSQL server stopped and started in the middle of a 2-worker search

CONFIG = """
name = "{name}"
space = "evonorm"
algorithm = "regularized_evolution"
budget = {budget}
dataset = "synthetic"
archs = ["resnet"]
filters = ["validity", "numerics", "equivalence"]
baselines = ["bn_relu"]
storage = "{storage}"
workers = 2
plots = false
seed = 3
rerank = {{ enabled = false }}
""" + TINY_PROXY_TOML.replace("steps = 3\n", "steps = 200\n", 1)
# 200 training steps (about a second) instead of the tiny proxy's 3 (milliseconds): the workers
# must be training candidates when the server stops, not between two storage calls, or there
# is no candidate in flight to hand back and the test would not see the hand-back it checks.


class Postgres:
    """Stop and start the server behind a URL (this process's user, or root running it as
    postgres, may), with the options it was started with."""

    def __init__(self, url: str):
        engine = sqlalchemy.create_engine(url)
        try:
            with engine.connect() as conn:
                self.data = conn.execute(sqlalchemy.text("SHOW data_directory")).scalar()
        finally:
            engine.dispose()
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins:
            resources.missing("no pg_ctl to stop and start the test's PostgreSQL server")
        self.pg_ctl = bins[-1]
        self.runas = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        with open(os.path.join(self.data, "postmaster.opts")) as f:
            argv = shlex.split(f.read())
        options, skip = [], False
        for arg in argv[1:]:
            if skip:
                skip = False
            elif arg == "-D":
                skip = True
            else:
                options.append(arg)
        self.options = shlex.join(options)

    def stop(self) -> None:
        subprocess.run(self.runas + [self.pg_ctl, "-D", self.data, "stop", "-m", "fast", "-w"],
                       check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        subprocess.run(self.runas + [self.pg_ctl, "-D", self.data, "-l",
                                     os.path.join(self.data, "server.log"), "-w", "-o",
                                     self.options, "start"], check=True, capture_output=True,
                       timeout=60)


def _finished(url, name) -> int:
    try:
        return sum(t.state.is_finished() for t in run_trials(open_run(url, name)))
    except Exception:
        return -1


def _search(config, tmp_path, grace, log):
    env = {k: v for k, v in os.environ.items() if k != "OPSEARCH_FAULT"}
    env.update(OMP_NUM_THREADS="1", OPSEARCH_STORAGE_GRACE_S=str(grace))
    return subprocess.Popen([sys.executable, "-m", "opsearch", "search", "--config", str(config),
                             "--quiet"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), text=True)


@pytest.mark.slow
@pytest.mark.postgres(stops_server=True)  # no other PostgreSQL test runs meanwhile
# waited out: longer than a heartbeat (10 s), so heartbeats fail meanwhile; past the grace:
# more than twice the grace, so the workers give up while the server is still down
@pytest.mark.parametrize("outage_s, grace_s", [(15, 120), (8, 3)])
def test_postgres_stopped_and_started_in_the_middle_of_a_search(tmp_path, outage_s, grace_s):
    url = resources.postgres_url()
    server = Postgres(url)
    name = f"outage_{outage_s}_{os.getpid()}_{time.time_ns()}"
    budget = 24
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(name=name, budget=budget, storage=url))
    log = tmp_path / "search.err"
    proc = _search(config, tmp_path, grace_s, log)
    try:
        deadline = time.time() + 300
        while _finished(url, name) < 6 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, f"the search ended before the outage: {log.read_text()[-2000:]}"
        server.stop()
        try:
            time.sleep(outage_s)
        finally:
            server.start()
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    assert "Traceback" not in err, err[-3000:]
    # said once for the search, not once per worker
    assert err.count("opsearch: storage unreachable, retrying for up to") == 1, err[-3000:]
    if outage_s < grace_s:  # waited out in the same run
        assert code == 0, err[-3000:]
    else:  # one line, exit 3; the same command resumes the study
        assert code == 3, err[-3000:]
        assert f"opsearch search: error: storage unreachable for {grace_s:g} s" in err, err
        again = _search(config, tmp_path, grace_s, tmp_path / "again.err")
        assert again.wait(timeout=600) == 0, (tmp_path / "again.err").read_text()[-3000:]
    trials = run_trials(open_run(url, name))
    assert not [t for t in trials if not t.state.is_finished()], "a trial stayed RUNNING/WAITING"
    counted = [t for t in trials if t.user_attrs.get("kind") == "candidate"
               and t.user_attrs.get("verdict") != LOST]
    assert len(counted) == budget  # every candidate accounted for
    # none failed: past the grace period too, the candidates in flight when the workers stopped
    # were handed back as they were (WAITING again), not failed as lost by a crash
    lost = [t for t in trials if t.user_attrs.get("verdict") == LOST]
    assert not lost, [(t.number, t.user_attrs.get("reason")) for t in lost]
    contract.check_contract(trials, ["resnet"], ["validity", "numerics", "equivalence"])
    handed_back = [t for t in trials if "opsearch:handed_back" in t.system_attrs]
    assert bool(handed_back) == (outage_s >= grace_s), [t.number for t in handed_back]


def test_threads_do_not_share_a_retry(run, monkeypatch):
    """A heartbeat (no_retry) beside a retrying call fails at once, not after the grace."""
    from opsearch.study import no_retry

    _outage_of(monkeypatch, run.storage, "get_n_trials", 10 ** 6)
    set_storage_grace(30)
    result = []

    def beat():
        start = time.monotonic()
        with no_retry():
            try:
                run.storage.get_n_trials(run.study_id)
            except sqlalchemy.exc.OperationalError:
                result.append(time.monotonic() - start)

    thread = threading.Thread(target=beat)
    thread.start()
    thread.join(timeout=10)
    assert result and result[0] < 1.0
