"""Crash safety and many workers: SIGKILL at chosen moments, resume; 4 workers on one study."""
from __future__ import annotations

import json

import optuna
import pytest

from opsearch.study import open_run, run_trials

import contract
import resources
from studies import TINY_PROXY_TOML, run_opsearch

pytestmark = pytest.mark.slow

CONFIG = """
name = "crash"
space = "evonorm"
algorithm = "regularized_evolution"
budget = {budget}
dataset = "synthetic"
archs = ["resnet"]
filters = ["validity", "numerics", "equivalence"]
baselines = {baselines}
storage = "{storage}"
workers = {workers}
plots = false
seed = 1
""" + TINY_PROXY_TOML


ARCHS = ["resnet"]
FILTERS = ["validity", "numerics", "equivalence"]


def write_config(tmp_path, storage, budget=6, workers=1, baselines='["bn_relu"]'):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG.format(budget=budget, storage=storage, workers=workers,
                                  baselines=baselines))
    return path


def search(config_path, fault=None, timeout=300):
    return run_opsearch(["search", "--config", str(config_path), "--quiet"], config_path.parent,
                        fault, timeout)


def all_trials(storage):
    return run_trials(open_run(storage, "crash"))


def study_of(t) -> str:
    """Which study holds a trial: the run's, or a stage study (numbers count per study)."""
    kind = t.user_attrs.get("kind")
    return kind if kind in ("rerank", "promotion") else "run"


def numbered(trials) -> dict:
    return {(study_of(t), t.number): t for t in trials}


def numbers_per_study(trials) -> dict:
    out: dict = {}
    for t in trials:
        out.setdefault(study_of(t), []).append(t.number)
    return out


@pytest.mark.parametrize("fault", ["propose:3", "train:2", "record:4", "recorded:2"])
def test_sigkill_then_resume_reaches_the_budget(tmp_path, fault):
    storage = f"sqlite:///{tmp_path}/study.db"
    config = write_config(tmp_path, storage)
    killed = search(config, fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = numbered(all_trials(storage))
    finished_before = {n: t for n, t in before.items() if t.state.is_finished()}

    resumed = search(config)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = all_trials(storage)
    for numbers in numbers_per_study(after).values():
        assert numbers == sorted(set(numbers)), "a trial number repeats"
    by_number = numbered(after)
    for n, t in finished_before.items():  # every trial finished before the kill is intact
        assert by_number[n].state == t.state and by_number[n].user_attrs == t.user_attrs
        assert by_number[n].values == t.values
    assert not [t for t in after if not t.state.is_finished()], "a trial stayed RUNNING/WAITING"
    counted = [t for t in after if t.user_attrs.get("kind") == "candidate"
               and t.user_attrs.get("verdict") != "failed:worker_lost"]
    assert len(counted) == 6
    # and the resumed search did its job: trained candidates, the baseline, no other failure
    contract.check_contract(after, ARCHS, FILTERS, allowed_failures={"failed:worker_lost"})
    lost = [t for t in after if t.user_attrs.get("verdict") == "failed:worker_lost"]
    if fault.split(":")[0] in ("train", "record"):
        # the candidate in flight was handed out again, not forgotten
        assert len(lost) == 1
        retry = [t for t in after if t.user_attrs.get("retry_of") == lost[0].number
                 and study_of(t) == study_of(lost[0])]
        assert len(retry) == 1 and retry[0].user_attrs["genome"] == lost[0].user_attrs.get("genome")


@pytest.mark.parametrize("kind", ["sqlite", "journal", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_four_workers_share_one_study(tmp_path, kind):
    if kind == "sqlite":
        storage = f"sqlite:///{tmp_path}/study.db"
    elif kind == "journal":
        storage = f"journal:///{tmp_path}/study.log"
    else:
        storage = resources.postgres_url()
        _drop_study(storage, "crash")
    config = write_config(tmp_path, storage, budget=12, workers=4,
                          baselines='["bn_relu", "relu_only"]')
    result = search(config, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = all_trials(storage)
    assert set(numbers_per_study(trials)) <= {"run", "rerank"}
    for numbers in numbers_per_study(trials).values():
        assert numbers == list(range(len(numbers)))
    assert all(t.state.is_finished() for t in trials)
    counts = contract.check_contract(trials, ARCHS, FILTERS, min_evaluated=2)
    candidates = [t for t in trials if t.user_attrs["kind"] == "candidate"]
    assert len(candidates) == 12 and sum(v for k, v in counts.items() if k.startswith("candidate")) == 12
    assert sorted(t.user_attrs["layer"] for t in trials if t.user_attrs["kind"] == "baseline") == \
        ["bn_relu", "relu_only"]
    workers = {t.system_attrs.get("opsearch:worker", {}).get("pid") for t in candidates}
    assert len(workers) >= 2, "the candidates were not shared among workers"
    # no function was evaluated twice at the same time
    spans: dict[str, list] = {}
    for t in candidates:
        spans.setdefault(t.user_attrs.get("hash"), []).append((t.datetime_start, t.datetime_complete))
    for h, intervals in spans.items():
        intervals.sort()
        for (s1, e1), (s2, e2) in zip(intervals, intervals[1:]):
            assert s2 >= e1, f"candidate {h} evaluated twice at once"


def _drop_study(url, name):
    storage = optuna.storages.RDBStorage(url)
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass
    for stage in ("rerank", "promotion"):  # the run's stage studies
        try:
            optuna.delete_study(study_name=f"{name}/{stage}", storage=storage)
        except KeyError:
            pass


def test_a_candidate_that_kills_its_worker_every_time_is_tried_twice_then_failed(tmp_path):
    """A poisonous candidate (the first one trained SIGKILLs whichever worker trains it, every
    time: opsearch/faults.py) is handed out again once, then recorded failed with the reasons;
    the search goes on and reaches its budget."""
    storage = f"sqlite:///{tmp_path}/study.db"
    config = write_config(tmp_path, storage)
    env = {"OPSEARCH_FAULT_STATE": str(tmp_path / "poison")}
    first = run_opsearch(["search", "--config", str(config), "--quiet"], tmp_path, "train:poison",
                         env=env)
    assert first.returncode == -9, first.stderr[-2000:]
    second = run_opsearch(["search", "--config", str(config), "--quiet"], tmp_path, "train:poison",
                          env=env)  # the resumed search hands the candidate out again: killed
    assert second.returncode == -9, second.stderr[-2000:]
    third = run_opsearch(["search", "--config", str(config), "--quiet"], tmp_path, "train:poison",
                         env=env)  # the fault is still armed: the candidate is never trained again
    assert third.returncode == 0, third.stderr[-2000:]
    trials = all_trials(storage)
    poison = (tmp_path / "poison").read_text()
    tried = [t for t in trials if t.user_attrs.get("kind") == "candidate"
             and str(json.loads(t.user_attrs["genome"])) == poison]
    assert [t.user_attrs["verdict"] for t in tried] == ["failed:worker_lost",
                                                         "failed:worker_lost_twice"]
    assert tried[1].user_attrs["retry_of"] == tried[0].number and tried[1].state.name == "FAIL"
    assert "lost its worker 2 times" in tried[1].user_attrs["reason"]
    assert not [t for t in trials if not t.state.is_finished()], "a trial stayed RUNNING/WAITING"
    counted = [t for t in trials if t.user_attrs.get("kind") == "candidate"
               and t.user_attrs.get("verdict") != "failed:worker_lost"]
    assert len(counted) == 6  # the budget, the poisonous candidate among them
    contract.check_contract(trials, ARCHS, FILTERS,
                            allowed_failures={"failed:worker_lost", "failed:worker_lost_twice"})
