"""benchmarks/equivalence_replay.py: a change to the equivalence, replayed over a recorded study,
counts the repeats it saves and the pairs training separated that it would merge."""
from __future__ import annotations

import json

import optuna
import pytest
from benchmark_modules import benchmark_module

from opsearch import graph
from opsearch.config import SearchConfig
from opsearch.graph import GraphBuilder


@pytest.fixture(scope="module")
def replay():
    with benchmark_module("equivalence_replay") as module:
        yield module


def _graph(fn) -> str:
    b = GraphBuilder()
    fn(b)
    return graph.to_json(b.plain())


def _study(path, layers, v0_ranges=(), duplicates=(), seed=3) -> str:
    """A search study whose trained trials are `layers` [(graph JSON, values)], then one
    rejected, then the candidates `duplicates` [(graph JSON, trial)] the run called duplicates of
    those trials; `v0_ranges[i]` is trial i's recorded v0_range."""
    url = f"sqlite:///{path}"
    study = optuna.create_study(study_name="run", storage=url, directions=["maximize"] * 3)
    study.set_user_attr("config", json.dumps(SearchConfig(name="run", seed=seed).to_dict()))
    for i, (plain, values) in enumerate(layers + [(_graph(lambda b: b.neg(b.x)), None)]):
        trial = study.ask()
        if i < len(v0_ranges):
            trial.set_user_attr("v0_range", v0_ranges[i])
        trial.set_user_attr("graph", plain)
        trial.set_user_attr("verdict", "evaluated" if values else "rejected:quality")
        study.tell(trial, values if values else [0.0] * 3)
    for plain, same_as in duplicates:
        trial = study.ask()
        trial.set_user_attr("graph", plain)
        trial.set_user_attr("verdict", f"duplicate:{same_as}")
        study.tell(trial, [0.5] * 3)
    return url


SQRT_V0 = _graph(lambda b: b.sqrt(b.mul(b.x, b.v0)))
SQRT_CLIPPED_V0 = _graph(lambda b: b.sqrt(b.mul(b.x, b.max(b.zero, b.v0))))


def test_the_rule_as_it_is_merges_nothing_its_runs_trained(replay, tmp_path):
    r = replay.replay(_study(tmp_path / "a.db", [(SQRT_V0, [0.9, 0.8, 0.7]), (SQRT_CLIPPED_V0, [0.9, 0.8, 0.7])]))
    assert (r["seed"], r["trained"], r["recorded_repeats"], r["merged"]) == (3, 2, 1, [])


def test_a_bounded_reach_saves_the_repeat_and_flags_a_pair_training_separated(replay, tmp_path, monkeypatch):
    """A variant that merges ``max(0, v0)`` with v0: the reach bounded and no crossed output (the
    fingerprint never sees v0 below 0; today's rule always does)."""
    from opsearch.plugins.rejection import _reach, equivalence

    monkeypatch.setattr(_reach, "MAX_ENTRY_STEP", 0.5)
    monkeypatch.setattr(equivalence, "_crossed", lambda reached: reached)
    same = replay.replay(_study(tmp_path / "b.db", [(SQRT_V0, [0.9, 0.8, 0.7]), (SQRT_CLIPPED_V0, [0.9, 0.8, 0.7])]))
    [m] = same["merged"]
    assert m["same_as"] == 0 and m["scores_equal"] and m["how"] == "exact"
    apart = replay.replay(_study(tmp_path / "c.db", [(SQRT_V0, [0.9, 0.8, 0.7]), (SQRT_CLIPPED_V0, [0.9, 0.8, 0.6])]))
    assert [m["scores_equal"] for m in apart["merged"]] == [False]
    # the command line: exit 1 when it would merge a pair training separated
    assert replay.main(["--max-entry-step", "0.5", str(tmp_path / "c.db")]) == 1
    assert replay.main([str(tmp_path / "b.db")]) == 0


def test_the_band_rule_merges_where_the_earlier_training_kept_v0_in_the_band(replay, tmp_path):
    layers = [(SQRT_V0, [0.9, 0.8, 0.7]), (SQRT_CLIPPED_V0, [0.9, 0.8, 0.7])]
    [m] = replay.replay(_study(tmp_path / "d.db", layers, v0_ranges=[[0.4, 2.0]]))["merged"]
    assert m["same_as"] == 0 and m["scores_equal"] and m["how"] == "on the v0 band"
    assert replay.replay(_study(tmp_path / "e.db", layers, v0_ranges=[[-0.2, 2.0]]))["merged"] == []
    assert replay.replay(_study(tmp_path / "f.db", layers))["merged"] == []  # no range, no --retrain


def test_recorded_duplicates_the_rule_no_longer_merges_are_counted(replay, tmp_path, monkeypatch):
    """A run of seed 0 merged ``x / rms_b(v0)`` into ``x / v0`` (its probes never took v0 below
    0); the rule as it is keeps them apart, a training the change adds. A copy of the same graph
    stays merged."""
    from opsearch.plugins.rejection import equivalence

    div = _graph(lambda b: b.div(b.x, b.v0))
    duplicates = [(_graph(lambda b: b.div(b.x, b.rms_b(b.v0))), 0), (div, 0)]
    url = _study(tmp_path / "g.db", [(div, [0.9, 0.8, 0.7])], duplicates=duplicates, seed=0)
    r = replay.replay(url)
    assert r["duplicates"] == 2
    assert [(k["formula"], k["same_as"]) for k in r["kept_apart"]] == [("x / rms_b(v0)", 0)]
    monkeypatch.setattr(equivalence, "_crossed", lambda reached: reached)  # the rule those runs used
    assert replay.replay(url)["kept_apart"] == []
