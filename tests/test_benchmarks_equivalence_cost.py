"""benchmarks/equivalence_cost.py times the fingerprints with and without the crossed output."""
from __future__ import annotations

import json

import optuna
import pytest
from benchmark_modules import benchmark_module

from opsearch import graph
from opsearch.config import SearchConfig
from opsearch.graph import GraphBuilder
from opsearch.plugins.rejection import equivalence


@pytest.fixture(scope="module")
def cost():
    with benchmark_module("equivalence_cost") as module:
        yield module


def _div_v0():
    b = GraphBuilder()
    b.div(b.x, b.v0)
    return b.plain()


def test_the_variant_without_the_crossed_output_is_the_old_fingerprint(cost):
    with_it, without = (cost.described(_div_v0(), 0, crossed) for crossed in (True, False))
    assert without.equiv_fp.size * 4 == with_it.equiv_fp.size * 3
    assert equivalence._outputs.__name__ == "_outputs"  # restored
    # the outputs they share are the same values
    n = len(equivalence.DEFAULT_SHAPES)
    assert (with_it.equiv_fp.reshape(n, 4, -1)[:, :3].ravel() == without.equiv_fp).all()


def test_it_times_a_recorded_study(cost, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="run", storage=url, directions=["maximize"] * 3)
    study.set_user_attr("config", json.dumps(SearchConfig(name="run", seed=1).to_dict()))
    trial = study.ask()
    trial.set_user_attr("graph", graph.to_json(_div_v0()))
    trial.set_user_attr("verdict", "evaluated")
    study.tell(trial, [0.9, 0.8, 0.7])
    assert cost.main([str(tmp_path / "s.db")]) == 0
    assert "1 layers: with the crossed output" in capsys.readouterr().out
