"""`opsearch status`: live and lost workers, speed, candidates left and time left, from the study."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta

from optuna.trial import FrozenTrial, TrialState

from opsearch.cli import main
from opsearch.study import HEARTBEAT_KEY, WORKER_KEY, Run, WorkerId

ARCHS = ["resnet"]


def make_run(tmp_path, budget=20, grace_s=30.0):
    url = f"sqlite:///{tmp_path}/study.db"
    attrs = {"space": "evonorm", "space_options": {}, "archs": ARCHS, "dataset": "synthetic",
             "algorithm": "regularized_evolution",
             "config": json.dumps({"budget": budget, "grace_s": grace_s})}
    return url, Run.create_or_open(url, "st", attrs, [])


def finished(run, minutes_ago: float, worker: WorkerId, verdict="evaluated"):
    end = datetime.now() - timedelta(minutes=minutes_ago)
    state = TrialState.COMPLETE if verdict == "evaluated" else TrialState.PRUNED
    run.storage.create_new_trial(run.study_id, template_trial=FrozenTrial(
        number=-1, state=state, value=None, values=[0.5] if state == TrialState.COMPLETE else None,
        datetime_start=end - timedelta(seconds=5), datetime_complete=end, params={},
        distributions={}, user_attrs={"kind": "candidate", "verdict": verdict, "formula": "x"},
        system_attrs={WORKER_KEY: worker.to_json()}, intermediate_values={}, trial_id=-1))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_status_reports_workers_speed_and_time_left(tmp_path, monkeypatch, capsys):
    url, run = make_run(tmp_path, budget=20, grace_s=30.0)
    me = WorkerId.current(device="cpu")
    remote = WorkerId("elsewhere", 4242, "1", job="77_1", device="cuda:0 (CUDA_VISIBLE_DEVICES=2)")
    gone = WorkerId(me.host, dead_pid(), f"gone-{uuid.uuid4().hex}", device="cpu")  # no marker of a reused pid
    # six candidates finished in the last 10 minutes, two long ago (outside the window)
    for minutes in (1, 2, 3, 4, 5, 9):
        finished(run, minutes, remote)
    finished(run, 30, remote)
    finished(run, 40, remote)
    # in flight: this process (alive, fresh heartbeat), a dead local pid, a silent remote worker
    live = run.start_trial({"kind": "candidate", "formula": "x*sigmoid(x)"}, me)
    run.start_trial({"kind": "candidate", "formula": "x"}, gone)
    silent = run.start_trial({"kind": "candidate", "formula": "x+1"},
                             WorkerId("far", 99, "1", job="77_0"))
    run.storage.set_trial_system_attr(silent.trial_id, HEARTBEAT_KEY, time.time() - 300)
    assert main(["status", "st", "--storage", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    for key in ("live_workers", "lost_workers", "candidates_per_minute", "candidates_left", "eta_s"):
        assert key in status
    live_ids = {(w["host"], w["pid"]) for w in status["live_workers"]}
    assert (me.host, me.pid) in live_ids
    mine = next(w for w in status["live_workers"] if w["pid"] == me.pid)
    assert mine["candidate"] == live.number and mine["device"] == "cpu"
    assert mine["last_heartbeat_s"] < 30
    lost = {(w["host"], w["pid"]): w for w in status["lost_workers"]}
    assert (gone.host, gone.pid) in lost and ("far", 99) in lost
    assert lost[("far", 99)]["job"] == "77_0"
    assert ("elsewhere", 4242) not in live_ids  # its last trial ended a minute ago, > grace_s
    # 6 in the last 10 minutes (the study is older than the window)
    assert abs(status["candidates_per_minute"] - 0.6) < 0.01
    assert status["candidates_left"] == 20 - 8
    assert abs(status["eta_s"] - 12 / 0.6 * 60) < 5

    assert main(["status", "st", "--storage", url]) == 0
    text = capsys.readouterr().out
    assert "live workers: 1" in text and "lost workers: 2" in text and "job 77_0" in text
    assert "0.60 candidates/min" in text and "12 left" in text


def test_status_of_a_finished_run_says_done(tmp_path, capsys):
    url, run = make_run(tmp_path, budget=2)
    w = WorkerId("h", 1, "1")
    finished(run, 1, w)
    finished(run, 2, w)
    assert main(["status", "st", "--storage", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["candidates_left"] == 0 and status["eta_s"] == 0.0
    assert status["live_workers"] == [] and status["lost_workers"] == []


def test_status_of_a_run_that_does_not_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["status", "nope"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    url, _ = make_run(tmp_path)
    assert main(["status", "other", "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert "no run named 'other'" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "runs")


def test_a_requeued_job_reaps_what_its_earlier_run_held(tmp_path):
    """A SLURM job requeued keeps its job id: the study must not take its old process for alive
    (on another host neither its pid nor, for grace_s, its heartbeat would tell)."""
    url, run = make_run(tmp_path, grace_s=3600.0)
    old = WorkerId("node7", 1234, "99", job="55_1")
    held = run.start_trial({"kind": "candidate", "genome": "[1, 2]", "formula": "x"}, old)
    other = run.start_trial({"kind": "candidate", "genome": "[3, 4]", "formula": "y"},
                            WorkerId("node8", 1234, "99", job="55_0"))
    run.sync()
    assert run.reap_lost(3600.0) == []  # fresh heartbeats, other hosts: nothing to say
    same_job_again = WorkerId("node3", 42, "7", job="55_1")
    assert run.reap_lost(3600.0, me=same_job_again) == [held.number]
    by_number = {r.number: r for r in run.trials()}
    assert by_number[held.number].verdict == "failed:worker_lost"
    assert by_number[other.number].state == TrialState.RUNNING  # another task of the array
    retry = [r for r in run.trials() if r.user_attrs.get("retry_of") == held.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].user_attrs["genome"] == "[1, 2]"


def test_release_hands_a_candidate_back_at_once(tmp_path):
    url, run = make_run(tmp_path)
    me = WorkerId.current()
    held = run.start_trial({"kind": "candidate", "genome": "[5]", "formula": "z"}, me)
    assert run.release(held, "its worker was stopped (SystemExit)")
    assert not run.release(held, "twice")  # already finished: nothing to give back
    retry = [r for r in run.trials() if r.user_attrs.get("retry_of") == held.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert run.pop_waiting(me).number == retry[0].number
