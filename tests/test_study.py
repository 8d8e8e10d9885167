"""The study layer: storages, one-write records, incremental sync, lost workers."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from opsearch.errors import UserError
from opsearch.study import (LOST, LOST_TWICE, Run, WorkerId, open_run, open_storage, resolve)

import resources
from studies import release_together

ATTRS = {"space": "evonorm", "archs": ["a", "b"], "dataset": "digits"}


@pytest.fixture(params=["sqlite", "journal", pytest.param("postgres", marks=pytest.mark.postgres)])
def run(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/study.db"
    elif request.param == "journal":
        url = f"journal:///{tmp_path}/study.log"
    else:
        url = resources.postgres_url()
    name = f"t{os.getpid()}_{time.time_ns()}"
    return Run.create_or_open(url, name, ATTRS, ["space", "archs"])


def test_start_and_finish_write_the_contract_attributes(run):
    record = run.start_trial({"kind": "candidate", "genome": "[1, 2]", "formula": "x"},
                             WorkerId.current())
    assert record.state == TrialState.RUNNING
    assert run.finish_trial(record, TrialState.COMPLETE, [0.5, 0.75],
                            {"verdict": "evaluated", "acc/a": 0.5, "acc/b": 0.75, "elapsed_s": 1.0})
    study = optuna.load_study(study_name=run.study_name, storage=run.storage)
    (t,) = study.get_trials()
    assert t.state == TrialState.COMPLETE and t.values == [0.5, 0.75]
    assert t.user_attrs["verdict"] == "evaluated" and t.user_attrs["formula"] == "x"
    assert t.user_attrs["acc/b"] == 0.75
    # a finished trial cannot be finished again (a reaper and its worker race safely)
    assert not run.finish_trial(record, TrialState.FAIL, None, {"verdict": "failed:x"})
    assert study.get_trials()[0].user_attrs["verdict"] == "evaluated"


def test_complete_needs_finite_values(run):
    record = run.start_trial({"kind": "candidate"})
    with pytest.raises(ValueError):
        run.finish_trial(record, TrialState.COMPLETE, [float("nan"), 1.0], {})


def test_sync_is_incremental_and_sees_other_writers(run):
    other = Run(open_storage(run.url) if "journal" not in run.url else run.storage,
                run.study_name, run.url)
    r1 = run.start_trial({"kind": "candidate", "genome": "[0]"})
    assert [r.number for r in other.sync()] == []  # nothing finished yet
    assert other.candidates_counted() == 1
    run.finish_trial(r1, TrialState.PRUNED, None, {"verdict": "rejected:numerics"})
    finished = other.sync()
    assert [(r.number, r.verdict) for r in finished] == [(r1.number, "rejected:numerics")]
    assert other.sync() == []  # reported once


def test_a_trial_another_worker_created_just_before_mine_is_seen_and_reaped(run):
    """Two workers start a candidate at once: the other's trial gets the lower id, mine the
    higher. My next sync must still read the other's (CI, stop 33: remembering my own trial's
    id as "read up to here" hid the other's for good, so its lost candidate was never reaped,
    never handed out again, and the search ended with it RUNNING)."""
    other = Run(open_storage(run.url) if "journal" not in run.url else run.storage,
                run.study_name, run.url)
    run.sync()
    remote = WorkerId("some-other-host", 1234, "1")
    theirs = other.start_trial({"kind": "candidate", "genome": "[7]"}, remote)
    mine = run.start_trial({"kind": "candidate", "genome": "[8]"}, WorkerId.current())
    run.sync()
    assert {r.number for r in run.unfinished()} == {theirs.number, mine.number}
    assert run.candidates_counted() == 2
    assert theirs.number in run.reap_lost(grace_s=60, now=time.time() + 120)


def test_enqueued_trial_is_popped_once(run):
    run.enqueue({"kind": "baseline", "layer": "bn_relu"})
    me = WorkerId.current()
    first = run.pop_waiting(me)
    assert first is not None and first.user_attrs["layer"] == "bn_relu"
    assert run.pop_waiting(me) is None


# One worker process of the race below: waits for the start file, pops until nothing waits, and
# prints the numbers it holds with the worker that each trial's stored attributes name.
_POPPER = """
import json, os, sys, time
from opsearch.study import Run, WorkerId
url, name, go = sys.argv[1:4]
run = Run.create_or_open(url, name, json.loads(sys.argv[4]), ["space", "archs"])
run.sync()
me = WorkerId.current()
open(sys.argv[5], "w").close()  # ready: it knows the waiting trials
while not os.path.exists(go):
    time.sleep(0.002)
held = []
while (record := run.pop_waiting(me)) is not None:
    held.append(record.number)
trials = {t.number: t for t in run.storage.get_all_trials(run.study_id)}
print(json.dumps({"me": me.to_json(), "held": held,
                  "named": [trials[n].system_attrs.get("opsearch:worker") for n in held]}))
"""


@pytest.mark.slow
def test_workers_popping_at_once_never_hold_the_same_trial(run, tmp_path):
    """Optuna's claim reads, then writes; SQLite's driver starts the transaction only at the
    write, so two workers could both read WAITING and both run the candidate (7-95 of 200
    trials held twice by four processes before the claim became one compare-and-set)."""
    import json

    for i in range(80):
        run.enqueue({"kind": "baseline", "layer": f"l{i}"})
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _POPPER, run.url, run.study_name, str(go),
                               json.dumps(ATTRS), str(tmp_path / f"ready{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    release_together(procs, [tmp_path / f"ready{i}" for i in range(4)], go, timeout=120)
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    held = [n for r in results for n in r["held"]]
    assert sorted(held) == sorted(set(held)), f"{len(held) - len(set(held))} trials held twice"
    assert len(held) == 80
    for r in results:  # each claim wrote its worker with it
        assert all(named == r["me"] for named in r["named"])


def _dead_worker() -> WorkerId:
    """A worker of this host whose process is gone. Its start time is a token of its own: pids are
    reused, and a fixed one ("1") matched markers that other tests' stopped workers left on this
    host (mark_stopped), so the crash looked like a stop on purpose (a flaky CI failure)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return WorkerId(WorkerId.current().host, proc.pid, f"gone-{uuid.uuid4().hex}")


def test_trial_of_a_dead_local_worker_is_requeued(run):
    record = run.start_trial({"kind": "candidate", "genome": "[3, 1]", "formula": "f"},
                             _dead_worker())
    alive = run.start_trial({"kind": "candidate", "genome": "[2, 2]"}, WorkerId.current())
    assert run.reap_lost(grace_s=3600) == [record.number]
    trials = {t.number: t for t in optuna.load_study(study_name=run.study_name,
                                                      storage=run.storage).get_trials()}
    assert trials[record.number].state == TrialState.FAIL
    assert trials[record.number].user_attrs["verdict"] == LOST
    assert trials[alive.number].state == TrialState.RUNNING
    waiting = [t for t in trials.values() if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs["genome"] == "[3, 1]"
    assert waiting[0].user_attrs["retry_of"] == record.number
    # the lost trial no longer counts toward the budget; its requeued copy does
    assert run.candidates_counted() == 2
    assert run.reap_lost(grace_s=3600) == []


def test_silent_remote_worker_is_requeued_after_grace(run):
    remote = WorkerId("some-other-host", 1234, "1")
    record = run.start_trial({"kind": "candidate", "genome": "[5]"}, remote)
    assert run.reap_lost(grace_s=60) == []
    assert run.reap_lost(grace_s=60, now=time.time() + 120) == [record.number]


def _trials(run):
    return {t.number: t for t in optuna.load_study(study_name=run.study_name,
                                                    storage=run.storage).get_trials()}


def test_a_candidate_that_loses_its_worker_twice_is_failed_not_handed_out_again(run):
    first = run.start_trial({"kind": "candidate", "genome": "[3, 1]", "hash": "h31", "formula": "f"},
                            _dead_worker())
    assert run.reap_lost(grace_s=3600) == [first.number]
    retry = run.pop_waiting(_dead_worker())  # its second worker dies too
    assert retry.user_attrs["retry_of"] == first.number and retry.user_attrs["worker_losses"] == 1
    assert run.reap_lost(grace_s=3600) == [retry.number]
    trials = _trials(run)
    assert trials[first.number].user_attrs["verdict"] == LOST
    second = trials[retry.number]
    assert second.state == TrialState.FAIL and second.user_attrs["verdict"] == LOST_TWICE
    assert second.user_attrs["worker_losses"] == 2
    assert f"trial {first.number}: its worker process is gone" in second.user_attrs["reason"]
    assert f"trial {retry.number}: its worker process is gone" in second.user_attrs["reason"]
    assert not [t for t in trials.values() if not t.state.is_finished()], "handed out a third time"
    assert run.pop_waiting(WorkerId.current()) is None
    assert run.candidates_counted() == 1  # it counts toward the budget: the search goes on
    assert run.poisonous() == {"h31"}  # and is not proposed again


def test_a_lost_candidate_whose_copy_was_never_enqueued_is_enqueued_at_the_next_start(run):
    from opsearch.study import _finish, guarded_call

    record = run.start_trial({"kind": "candidate", "genome": "[7]", "hash": "h7"}, _dead_worker())
    # its reaper failed it, then stopped (killed, the storage away) before enqueueing the copy
    guarded_call(run.storage, _finish, record.trial_id, TrialState.FAIL, None,
                 {"verdict": LOST, "reason": "its worker process is gone", "worker_losses": 1,
                  "worker_lost_reasons": ["trial 0: its worker process is gone"]})
    run.sync()
    assert run.requeue_orphans() == [record.number]
    copy = run.pop_waiting(WorkerId.current())
    assert copy.user_attrs["retry_of"] == record.number and copy.user_attrs["genome"] == "[7]"
    assert copy.user_attrs["worker_losses"] == 1  # the loss still counts
    assert run.requeue_orphans() == []  # once


def test_a_worker_that_stopped_on_a_fault_of_the_storage_gets_its_candidate_handed_back(run):
    from opsearch.study import mark_stopped

    gone = _dead_worker()
    record = run.start_trial({"kind": "candidate", "genome": "[8]"}, gone)
    mark_stopped(gone, "storage unreachable for 300 s (postgresql://***@db/x: ...)")
    assert run.reap_lost(grace_s=3600) == [record.number]
    trial = _trials(run)[record.number]
    assert trial.state == TrialState.WAITING and "verdict" not in trial.user_attrs  # no failed:*
    assert trial.system_attrs["opsearch:handed_back"].startswith("its worker stopped: storage")
    again = run.pop_waiting(WorkerId.current())
    assert again.number == record.number and "worker_losses" not in again.user_attrs
    assert len(_trials(run)) == 1


def test_a_worker_stopped_on_purpose_is_no_fault_of_its_candidate(run):
    me = WorkerId.current()
    record = run.start_trial({"kind": "candidate", "genome": "[4]"}, _dead_worker())
    assert run.reap_lost(grace_s=3600) == [record.number]  # a crash: one loss
    for _ in range(3):  # preempted or interrupted three times: released, handed out again
        held = run.pop_waiting(me)
        assert held is not None and held.user_attrs["worker_losses"] == 1
        assert run.release(held, "its worker was stopped (KeyboardInterrupt)")
    held = run.pop_waiting(me)
    assert held is not None
    # a requeued SLURM job (same job id, new process) is the scheduler's doing too
    earlier = WorkerId("node7", 99, "1", job="123_4")
    run.storage.set_trial_system_attr(held.trial_id, "opsearch:worker", earlier.to_json())
    assert run.reap_lost(grace_s=3600, me=WorkerId("node7", 100, "2", job="123_4")) == [held.number]
    verdicts = [t.user_attrs.get("verdict") for t in _trials(run).values()]
    assert verdicts == [LOST] * 5 + [None] and LOST_TWICE not in verdicts


def test_a_silent_worker_counts_as_a_loss_of_its_candidate(run):
    remote = WorkerId("some-other-host", 1234, "1")
    record = run.start_trial({"kind": "candidate", "genome": "[5]"}, remote)
    assert run.reap_lost(grace_s=60, now=time.time() + 120) == [record.number]
    retry = run.pop_waiting(remote)
    assert run.reap_lost(grace_s=60, now=time.time() + 120) == [retry.number]
    assert _trials(run)[retry.number].user_attrs["verdict"] == LOST_TWICE


def test_a_candidate_hung_past_its_time_limit_stops_its_heartbeat_and_is_reaped(run):
    from opsearch.study import HEARTBEAT_KEY, HUNG_KEY, Heartbeat

    record = run.start_trial({"kind": "candidate", "genome": "[6]"}, WorkerId.current())
    with Heartbeat(run.storage, record.trial_id, 0.05, hang_after=0.3):
        time.sleep(0.15)
        beating = run.storage.get_trial(record.trial_id).system_attrs[HEARTBEAT_KEY]
        time.sleep(0.6)  # the worker is stuck where the time limit's alarm does not reach
        attrs = run.storage.get_trial(record.trial_id).system_attrs
        assert HUNG_KEY in attrs and attrs[HEARTBEAT_KEY] < time.time() - 0.3 and attrs[HEARTBEAT_KEY] >= beating
        assert run.reap_lost(grace_s=60) == []  # alive here, silent for less than the grace
        assert run.reap_lost(grace_s=60, now=time.time() + 120) == [record.number]
    lost = _trials(run)[record.number].user_attrs
    assert lost["verdict"] == LOST and lost["reason"].startswith("it hung past its time limit")


def test_incompatible_reopen_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    Run.create_or_open(url, "r", ATTRS, ["space", "archs"])
    with pytest.raises(UserError, match="archs"):
        Run.create_or_open(url, "r", {**ATTRS, "archs": ["a"]}, ["space", "archs"])
    again = Run.create_or_open(url, "r", ATTRS, ["space", "archs"])
    assert again.archs == ["a", "b"]


@pytest.mark.parametrize("url, message", [
    ("nosuchdb://x", "cannot open storage"),
    ("sqlite:////proc/forbidden/dir/x.db", "cannot create directory"),
    ("not a url", "not a storage URL"),
])
def test_bad_storage_urls_are_one_line_user_errors(url, message):
    with pytest.raises(UserError, match=message) as e:
        open_storage(url)
    assert "\n" not in str(e.value)


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "study.db"
    path.write_bytes(b"this is not sqlite at all, just text" * 10)
    with pytest.raises(UserError, match="not an SQLite database"):
        open_storage(f"sqlite:///{path}")
    assert path.read_bytes().startswith(b"this is not sqlite")


def test_open_run_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("OPSEARCH_RUNS_DIR", str(tmp_path))
    with pytest.raises(UserError, match="no study database"):
        open_run("missing")
    with pytest.raises(UserError, match="invalid run name"):
        open_run("../etc")
    url, name = resolve("myrun")
    Run.create_or_open(url, name, ATTRS, [])
    assert open_run("myrun").study_name == "myrun"
    with pytest.raises(UserError, match="no run named 'other'"):
        open_run(url, "other")


def test_worker_identity_detects_dead_process():
    assert not WorkerId.current().is_dead_here()
    assert _dead_worker().is_dead_here()
    assert not WorkerId("elsewhere", 1, "1").is_dead_here()


def _flaky_connect(monkeypatch, engine, failures: int):
    """Make the next `failures` engine.connect() calls raise a lock error (then connect)."""
    import sqlalchemy

    real = engine.connect
    calls = {"n": 0}

    def connect(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("database is locked"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "connect", connect)


def test_a_transient_error_does_not_turn_the_fast_reader_off(tmp_path, monkeypatch):
    from opsearch.study import rdb as study_mod  # the fast reader

    monkeypatch.setattr(study_mod, "_RDB_FAST_READ", True)
    run = Run.create_or_open(f"sqlite:///{tmp_path}/study.db", "s", ATTRS, ["space"])
    first = run.start_trial({"kind": "candidate"})
    run.finish_trial(first, TrialState.COMPLETE, [0.5, 0.5], {"verdict": "evaluated"})
    run._max_ids[run.study_id] = -1  # read everything again
    _flaky_connect(monkeypatch, run.storage.engine, failures=1)
    # the fast reader hits the lock; this sync falls back to Optuna's reader and still reads
    run.sync()
    assert [(r.number, r.values) for r in run.trials()] == [(0, (0.5, 0.5))]
    assert study_mod._RDB_FAST_READ, "one lock turned the fast reader off for the process"
    # and the next read takes the fast path again
    assert study_mod._read_rdb_trials(run.storage, {run.study_id: -1}, set()) is not None


def test_an_unknown_table_layout_turns_the_fast_reader_off(tmp_path, monkeypatch):
    from opsearch.study import rdb as study_mod  # the fast reader

    monkeypatch.setattr(study_mod, "_RDB_FAST_READ", True)
    run = Run.create_or_open(f"sqlite:///{tmp_path}/study.db", "s", ATTRS, ["space"])
    run.start_trial({"kind": "candidate", "formula": "x"})
    # a future Optuna that renamed a column the fast reader selects
    monkeypatch.setitem(study_mod._FAST_READ_LAYOUT, "trials",
                        study_mod._FAST_READ_LAYOUT["trials"] | {"column_of_the_future"})
    _flaky_connect(monkeypatch, run.storage.engine, failures=1)
    run._max_ids[run.study_id] = -1
    fresh = run.sync()
    assert not study_mod._RDB_FAST_READ
    assert run.trials()[0].user_attrs["formula"] == "x" and fresh == []
    assert study_mod._read_rdb_trials(run.storage, {run.study_id: -1}, set()) is None


def test_opening_a_journal_leaves_optunas_lock_name_free(tmp_path):
    """Optuna's journal backend locks with a PATH.lock symlink; a file of ours left under that
    name made each write wait 30 s for Optuna to break a lock nobody held."""
    path = tmp_path / "study.log"
    open_storage(f"journal:///{path}", create=True)
    assert not os.path.lexists(str(path) + ".lock")
    run = Run.create_or_open(f"journal:///{path}", "j", ATTRS, ["space", "archs"])
    run.start_trial({"kind": "candidate"})
    assert not os.path.lexists(str(path) + ".lock")
