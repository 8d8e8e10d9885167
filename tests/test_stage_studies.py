"""Optuna's own tools see the search: the run's study holds candidates and baselines only, and
the re-ranking items and funnel promotions live in stage studies beside it (``<run>/rerank``,
``<run>/promotion``: opsearch/trials.py), handed out, reaped and resumed like candidates. Runs
stored before (their items in the run's own study) still read and resume as they were."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from opsearch import cli, report
from opsearch import study as study_mod
from opsearch.study import queue, rdb
from opsearch.config import SearchConfig
from opsearch.local_run import run_search
from opsearch.study import Run, WorkerId, open_run, run_trials

SURROGATE = str(Path(__file__).resolve().parent.parent / "benchmarks" / "surrogate.py")
ARCHS = ["resnet", "mobilenetv2"]
RERANK = {"top_k": 2, "seeds": 2, "max_seeds": 2, "dataset": "synthetic"}


def surrogate_search(tmp_path, budget=10, **overrides) -> SearchConfig:
    """A search scored by the surrogate of benchmarks/surrogate.py (no training), with a stage."""
    values = dict(name="s", space="evonorm", space_options={"num_nodes": 8}, budget=budget,
                  archs=ARCHS, dataset="synthetic", filters=["validity", "numerics", "equivalence"],
                  algorithm_options={"population_size": 4, "tournament_size": 2},
                  baselines=["bn_relu", "evonorm_s0"], evaluator_plugin="surrogate",
                  evaluator={"channels": 6}, plugins=[SURROGATE],
                  storage=f"sqlite:///{tmp_path}/study.db", plots=False, seed=1, rerank=RERANK)
    values.update(overrides)
    return SearchConfig.from_dict(values)


def show_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert cli.main(["show", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_optunas_tools_see_only_the_search(tmp_path, capsys):
    cfg = surrogate_search(tmp_path)
    run_search(cfg)
    study = optuna.load_study(study_name="s", storage=cfg.storage)
    assert len(study.trials) == cfg.budget + len(cfg.baselines)
    assert {t.user_attrs["kind"] for t in study.trials} == {"candidate", "baseline"}
    assert study.best_trials and all(t.user_attrs["kind"] in ("candidate", "baseline")
                                     for t in study.best_trials)
    # the stage's items: in their own study, pointing at trials of the run's study
    stage = optuna.load_study(study_name="s/rerank", storage=cfg.storage)
    items = stage.trials
    assert items and {t.user_attrs["kind"] for t in items} == {"rerank"}
    assert all(t.state == TrialState.COMPLETE for t in items)
    search = {t.number: t for t in study.trials}
    for t in items:
        of = search[t.user_attrs["of_trial"]]
        assert of.user_attrs["verdict"] == "evaluated"
        assert t.user_attrs.get("layer") == of.user_attrs.get("layer")
    assert {s.study_name for s in optuna.get_all_study_summaries(cfg.storage)} == {"s", "s/rerank"}

    # what a person sees: the stage's table from the stage study; export its best
    shown = show_json(capsys, "s", "--storage", cfg.storage)
    assert shown["rerank"]["complete"] and shown["rerank"]["best_trial"] in search
    assert [t["number"] for t in shown["trials"] if t["user_attrs"]["kind"] == "rerank"] \
        == [t.number for t in items]
    assert cli.main(["export", "s", "--storage", cfg.storage, "-o", str(tmp_path / "l.py")]) == 0
    assert f"trial {shown['rerank']['best_trial']}, the best candidate after re-ranking" \
        in capsys.readouterr().err
    # a storage URL alone names its one run, not the run's stage studies
    assert show_json(capsys, cfg.storage)["study"] == "s"
    capsys.readouterr()
    assert cli.main(["show", "s/rerank", "--storage", cfg.storage]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds the rerank evaluations of run 's'" in err
    # the same command again: nothing to do, nothing added to either study
    run_search(cfg)
    assert len(run_trials(open_run(cfg.storage, "s"))) == len(study.trials) + len(items)


def test_an_old_layout_run_reads_and_resumes_as_it_was(tmp_path, monkeypatch, capsys):
    """A run stored before the stage studies (format opsearch.study/1: its rerank items in its
    own study) shows its stage, and resuming it keeps its layout: no stage study appears."""
    cfg = surrogate_search(tmp_path, budget=6)
    monkeypatch.setattr(queue, "STUDY_FORMAT", "opsearch.study/1")  # as the old version wrote
    run_search(cfg)
    monkeypatch.undo()
    old = optuna.load_study(study_name="s", storage=cfg.storage)
    kinds = [t.user_attrs["kind"] for t in old.trials]
    assert "rerank" in kinds and old.user_attrs["format"] == "opsearch.study/1"
    before = show_json(capsys, "s", "--storage", cfg.storage)["rerank"]
    assert before["complete"] and before["best_trial"] is not None

    bigger = surrogate_search(tmp_path, budget=9, rerank={**RERANK, "seeds": 3, "max_seeds": 3})
    run_search(bigger)  # this version resumes it: more candidates, a third seed
    assert [s.study_name for s in optuna.get_all_study_summaries(cfg.storage)] == ["s"]
    trials = optuna.load_study(study_name="s", storage=cfg.storage).trials
    assert sum(t.user_attrs["kind"] == "candidate" for t in trials) == 9
    items = [t for t in trials if t.user_attrs["kind"] == "rerank"]
    assert {t.user_attrs["seed"] for t in items} == {1_000_000, 1_000_001, 1_000_002}
    after = show_json(capsys, "s", "--storage", cfg.storage)["rerank"]
    assert after["complete"] and after["stage"] == before["stage"]
    assert max(len(r["seeds"]) for r in after["layers"]) == 3
    assert report.best_trial(trials, ARCHS) is not None


@pytest.mark.parametrize("kind", ["sqlite", "journal", "sqlite-optuna-reader"])
def test_stage_items_are_handed_out_reaped_and_requeued_across_workers(tmp_path, monkeypatch, kind):
    if kind == "sqlite-optuna-reader":
        monkeypatch.setattr(rdb, "_RDB_FAST_READ", False)
    url = (f"journal:///{tmp_path}/study.log" if kind == "journal"
           else f"sqlite:///{tmp_path}/study.db")
    attrs = {"space": "evonorm", "archs": ARCHS, "dataset": "synthetic"}
    one = Run.create_or_open(url, "r", attrs, ["archs"])
    other = Run.create_or_open(url, "r", attrs, ["archs"])  # another worker
    cand = one.start_trial({"kind": "candidate", "formula": "x"})
    one.finish_trial(cand, TrialState.COMPLETE, [0.5, 0.6], {"verdict": "evaluated"})
    one.enqueue({"kind": "promotion", "of_trial": cand.number, "rung": 2, "formula": "x"})
    one.enqueue({"kind": "rerank", "stage": "t", "seed": 7, "of_trial": cand.number, "formula": "x"})
    storage = study_mod.open_storage(url)  # a journal URL is ours, not Optuna's
    assert [t.user_attrs["kind"] for t in optuna.load_study(study_name="r", storage=storage).trials] \
        == ["candidate"]
    other.sync()  # finds the stage studies another worker created
    assert [(r.kind, r.number) for r in other.trials()] == [("candidate", 0), ("rerank", 0),
                                                            ("promotion", 0)]
    me = WorkerId.current()
    assert other.pop_waiting(me, skip_kinds=("rerank",)).kind == "promotion"  # --no-rerank
    assert other.pop_waiting(me, skip_kinds=("rerank",)) is None
    gone = WorkerId(me.host, 2 ** 22 + 7, "1")  # a worker of this host whose process is gone
    item = other.pop_waiting(gone)
    assert item.kind == "rerank" and item.state == TrialState.RUNNING
    one.sync()  # learns that the item is RUNNING, then that its worker is gone
    assert one.reap_lost(grace_s=3600.0) == [0]
    items = [r for r in one.trials() if r.kind == "rerank"]
    assert [(r.number, r.verdict, r.state) for r in items] == [
        (0, study_mod.LOST, TrialState.FAIL), (1, None, TrialState.WAITING)]
    assert items[1].user_attrs["retry_of"] == 0 and items[1].user_attrs["of_trial"] == cand.number
    again = one.pop_waiting(me)
    assert again.trial_id == items[1].trial_id
    assert one.finish_trial(again, TrialState.COMPLETE, [0.7, 0.8], {"verdict": "evaluated"})
    other.sync()
    assert {r.trial_id: r.state for r in other.trials()}[again.trial_id] == TrialState.COMPLETE
    stage = optuna.load_study(study_name="r/rerank", storage=storage)
    assert [t.state for t in stage.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert stage.best_trials[0].values == [0.7, 0.8]
