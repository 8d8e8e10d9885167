"""The funnel (opsearch/funnel.py): promotion by non-dominated rank within a rung, decided from the
study (idempotent, resumable), surviving SIGKILL, shared by two workers."""
from __future__ import annotations


import pytest
from optuna.trial import TrialState

from opsearch import funnel
from opsearch.config import SearchConfig
from opsearch.errors import UserError
from opsearch.pareto import nondominated_ranks
from opsearch.study import LOST, Run, open_run, run_trials
from studies import run_opsearch

ARCHS = ["resnet", "mobilenetv2"]


# --------------------------------------------------------------------------------------------
# Promotion rules (no training)


def test_nondominated_ranks_peel_fronts():
    points = [(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.1, 0.9), (0.3, 0.3), (0.5, 0.5)]
    assert nondominated_ranks(points) == [0, 0, 1, 0, 2, 0]
    assert nondominated_ranks([]) == []


def test_default_steps_divide_the_top_rung_by_eta():
    assert funnel.default_steps(900, 3) == [100, 300, 900]
    assert funnel.default_steps(2700, 3) == [100, 300, 900, 2700]
    assert funnel.default_steps(300, 3) == [100, 300]
    assert funnel.default_steps(900, 4, first=50) == [50, 56, 225, 900]


def new_run(tmp_path) -> Run:
    storage = f"sqlite:///{tmp_path}/study.db"
    return Run.create_or_open(storage, "fn", {"space": "evonorm", "space_options": {},
                                              "archs": ARCHS, "dataset": "synthetic"}, ["archs"])


def add(run: Run, attrs, values, state=TrialState.COMPLETE):
    record = run.start_trial({"graph": "{}", "formula": f"f{len(run.trials())}", **attrs})
    assert run.finish_trial(record, state, values, {})
    return record.number


def candidate(run, values):
    return add(run, {"kind": "candidate", "verdict": "evaluated", "rung": 1}, values)


def promotion(run, of, rung, values, verdict="evaluated"):
    state = TrialState.COMPLETE if values else TrialState.FAIL
    return add(run, {"kind": "promotion", "of_trial": of, "rung": rung, "verdict": verdict}, values, state)


def test_promotes_the_top_of_the_rung_by_nondominated_rank_not_by_mean(tmp_path):
    run = new_run(tmp_path)
    f = funnel.Funnel([10, 20, 40, 80], eta=3, min_candidates=3)
    a = candidate(run, [0.95, 0.05])  # on the front, mean 0.50
    b = candidate(run, [0.60, 0.60])  # on the front, mean 0.60
    c = candidate(run, [0.55, 0.58])  # dominated by b although its mean beats a's
    for v in ([0.3, 0.3], [0.2, 0.2], [0.1, 0.1]):
        candidate(run, v)
    add(run, {"kind": "candidate", "verdict": "rejected:quality"}, None, TrialState.PRUNED)
    add(run, {"kind": "candidate", "verdict": "duplicate:0", "rung": 1}, [0.95, 0.05])  # not twice
    assert funnel.due(f, run.trials()) == [(b, 2), (a, 2)]  # 6 at rung 1: the top 2
    assert c not in [n for n, _ in funnel.due(f, run.trials())]
    assert funnel.enqueue_missing(run, f) == 2
    assert funnel.enqueue_missing(run, f) == 0  # idempotent
    waiting = [r for r in run.trials() if r.state == TrialState.WAITING]
    assert sorted((r.user_attrs["of_trial"], r.user_attrs["rung"]) for r in waiting) == sorted([(a, 2), (b, 2)])
    assert all(r.user_attrs["graph"] == "{}" and r.user_attrs["kind"] == "promotion" for r in waiting)


def test_min_candidates_and_higher_rungs(tmp_path):
    run = new_run(tmp_path)
    f = funnel.Funnel([10, 20, 40, 80], eta=2, min_candidates=4)
    numbers = [candidate(run, [0.1 * i, 0.1 * i]) for i in range(1, 4)]
    assert funnel.due(f, run.trials()) == []  # 3 < min_candidates
    numbers.append(candidate(run, [0.5, 0.5]))
    assert funnel.due(f, run.trials()) == [(numbers[3], 2), (numbers[2], 2)]
    promotion(run, numbers[3], 2, [0.7, 0.7])
    promotion(run, numbers[2], 2, [0.8, 0.8])
    assert (numbers[2], 3) not in funnel.due(f, run.trials())  # rung 2 holds 2 < 4
    f.min_candidates = 2
    assert (numbers[2], 3) in funnel.due(f, run.trials()) and (numbers[3], 3) not in funnel.due(f, run.trials())


def test_a_lost_promotion_is_not_taken_for_done_and_a_requeued_one_keeps_its_rung(tmp_path):
    from opsearch.study import WorkerId

    run = new_run(tmp_path)
    f = funnel.Funnel([10, 20, 40], eta=2, min_candidates=2)
    best = candidate(run, [0.9, 0.9])
    candidate(run, [0.1, 0.1])
    assert funnel.enqueue_missing(run, f) == 1
    record = run.pop_waiting(WorkerId.current())
    assert run.release(record, "stopped")  # lost: failed as worker_lost, enqueued again
    copies = [r for r in run.trials() if r.kind == "promotion"]
    assert [r.verdict for r in copies] == [LOST, None]
    assert copies[1].user_attrs["rung"] == 2 and copies[1].user_attrs["of_trial"] == best
    assert funnel.enqueue_missing(run, f) == 0  # the requeued copy stands for it


def test_leaderboard_and_best_trial_see_the_highest_rung(tmp_path):
    from opsearch import report

    run = new_run(tmp_path)
    low = candidate(run, [0.80, 0.80])  # best at rung 1 but never promoted
    high = candidate(run, [0.70, 0.70])
    promotion(run, high, 2, [0.90, 0.92])
    promotion(run, high, 3, None, verdict="failed:RuntimeError")  # a failed rung changes nothing
    study = open_run(run.url, "fn")
    trials = run_trials(study)
    rows = report.scored_rows(trials, ARCHS)
    assert [(r.trial, r.rung) for r in rows] == [(high, 2), (low, 1)]
    assert rows[0].accuracies == {"resnet": 0.90, "mobilenetv2": 0.92}
    assert report.best_trial(trials, ARCHS).number == high
    assert all(report.kind(t) != "promotion" for t in report.search_trials(trials))
    from opsearch import rerank
    chosen = rerank.select(funnel.at_highest_rung(trials), ARCHS, top_k=1)
    assert [c.of_trial for c in chosen] == [high]


def test_bad_funnel_options_are_one_clear_error():
    with pytest.raises(UserError, match="eta must be an integer >= 2"):
        SearchConfig.from_dict({"funnel": {"eta": 1}})
    with pytest.raises(UserError, match="steps must be a list"):
        SearchConfig.from_dict({"funnel": {"steps": [300, 100]}})
    with pytest.raises(UserError, match="not a funnel option"):
        SearchConfig.from_dict({"funnel": {"rungs": [1, 2]}})
    with pytest.raises(UserError, match="rung 0 is the quality filter"):
        funnel.Funnel.from_config(SearchConfig(funnel={"enabled": True, "steps": [50, 100]},
                                               filter_options={"quality": {"steps": 100}}))
    assert funnel.Funnel.from_config(SearchConfig()) is None  # off by default
    on = funnel.Funnel.from_config(SearchConfig(funnel={"enabled": True}, evaluator={"steps": 900}))
    assert on.steps == [100, 300, 900] and on.filter_options({})["quality"]["steps"] == 100
    assert on.baseline_rung == 2  # baselines at the top rung unless asked
    first = funnel.Funnel.from_config(SearchConfig(funnel={"enabled": True, "baselines": "first"},
                                                   evaluator={"steps": 900}))
    assert first.baseline_rung == 1
    with pytest.raises(UserError, match="baselines must be one of 'top', 'first'"):
        SearchConfig.from_dict({"funnel": {"baselines": "bottom"}})


def test_funnel_option_from_the_command_line():
    from opsearch.config import build_config

    config = build_config(None, {}, ["funnel.enabled=true", "funnel.steps=[100, 200, 800]"])
    assert config.funnel == {"enabled": True, "steps": [100, 200, 800]}


# --------------------------------------------------------------------------------------------
# End to end: real (tiny) training, SIGKILL and resume, two workers

TINY = """
name = "fn"
space = "activation"   # element-wise layers: most pass the filters, so rungs fill fast
budget = {budget}
dataset = "synthetic"
archs = ["resnet", "mobilenetv2"]
filters = ["validity", "numerics", "equivalence", "quality"]
baselines = ["bn_relu"]
storage = "{storage}"
workers = {workers}
plots = false
seed = 2

[algorithm_options]
population_size = 4
tournament_size = 2

[evaluator]
steps = 8
batch_size = 16
val_batch_size = 128
warmup_steps = 1
arch_options = {{ width = 4, depth = 1 }}

[filter_options.quality]
min_accuracy = 0.0

[funnel]
enabled = true
eta = 2
steps = [2, 4, 8]
min_candidates = 2
baselines = "{baselines}"

[rerank]
enabled = {rerank}
top_k = 2
seeds = 1
"""


def tiny(tmp_path, budget=10, workers=1, rerank=False, baselines="top"):
    storage = f"sqlite:///{tmp_path}/study.db"
    path = tmp_path / "run.toml"
    path.write_text(TINY.format(budget=budget, storage=storage, workers=workers,
                                rerank=str(rerank).lower(), baselines=baselines))
    return path, storage


def promotions_done_once(storage):
    """Every promotion the rungs call for, finished exactly once (lost copies apart)."""
    trials = run_trials(open_run(storage, "fn"))
    f = funnel.Funnel([2, 4, 8], eta=2, min_candidates=2)
    done = [t for t in trials if t.user_attrs.get("kind") == "promotion"
            and t.user_attrs.get("verdict") != LOST]
    assert all(t.state == TrialState.COMPLETE for t in done), [(t.state, t.user_attrs) for t in done]
    keys = [(t.user_attrs["of_trial"], t.user_attrs["rung"]) for t in done]
    assert len(keys) == len(set(keys)), "a promotion was trained twice"
    # promotions are never revoked (ASHA): every one due now is done, plus any that was due when
    # its rung held fewer results; each of a candidate evaluated at the rung below
    assert set(funnel.due(f, trials)) <= set(keys), "a promotion is missing"
    below = funnel.rung_results(trials)
    assert all(of in below.get(rung - 1, {}) for of, rung in keys), "an unwarranted promotion"
    assert all(t.user_attrs["rung_steps"] == [2, 4, 8][t.user_attrs["rung"]] for t in done)
    return trials, set(keys)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["promotion:1", "promotion_enqueue:1"])
def test_funnel_killed_and_resumed_loses_and_repeats_no_promotion(tmp_path, fault):
    config, storage = tiny(tmp_path, baselines="first")
    killed = run_opsearch(["search", "--config", str(config), "--quiet"], tmp_path, fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # numbers are per study (the run's, its stage studies'): a trial is its kind and number
    before = {(t.user_attrs.get("kind"), t.number): t for t in run_trials(open_run(storage, "fn"))
              if t.state.is_finished()}
    resumed = run_opsearch(["search", "--config", str(config), "--quiet"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    trials, keys = promotions_done_once(storage)
    assert keys
    after = {(t.user_attrs.get("kind"), t.number): t for t in trials}
    for n, t in before.items():  # finished before the kill: intact
        assert after[n].state == t.state and after[n].user_attrs == t.user_attrs
    assert all(t.state.is_finished() for t in trials)
    counted = [t for t in trials if t.user_attrs.get("kind") == "candidate"
               and t.user_attrs.get("verdict") != LOST]
    assert len(counted) == 10, "promotions must not count toward the budget"
    # baselines = "first": references at rung 1, never promoted
    baselines = [t for t in trials if t.user_attrs.get("kind") == "baseline"]
    assert baselines and all(t.user_attrs["rung"] == 1 and t.user_attrs["rung_steps"] == 4
                             and t.state == TrialState.COMPLETE for t in baselines)
    assert not {t.number for t in baselines} & {of for of, _ in keys}
    # ... and trained to rung 1's steps, not only labelled so: the same accuracies as bn_relu
    # trained for 4 steps with this search's evaluator
    from opsearch.config import build_config
    from opsearch.engine import make_eval_config
    from opsearch.rejection import FilterContext

    search = build_config(str(config), {}, ["evaluator.steps=4"])
    at_rung_1 = FilterContext(eval_config=make_eval_config(search)).get_evaluator().evaluate("bn_relu")
    (bn,) = [t for t in baselines if t.user_attrs["layer"] == "bn_relu"]
    assert bn.values == pytest.approx([at_rung_1.accuracies[a] for a in search.archs])
    if fault.startswith("promotion:"):  # the promotion in flight was handed out again
        lost = [t for t in trials if t.user_attrs.get("verdict") == LOST]
        assert len(lost) == 1 and lost[0].user_attrs["kind"] == "promotion"
        retry = [t for t in trials if t.user_attrs.get("retry_of") == lost[0].number]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
        assert retry[0].user_attrs["rung"] == lost[0].user_attrs["rung"]


@pytest.mark.slow
def test_funnel_with_two_workers_does_every_promotion_once_before_the_rerank(tmp_path):
    config, storage = tiny(tmp_path, budget=12, workers=2, rerank=True)
    result = run_opsearch(["search", "--config", str(config), "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials, keys = promotions_done_once(storage)
    assert keys
    assert all(t.state.is_finished() for t in trials)
    assert not [t for t in trials if t.user_attrs.get("verdict") == LOST]
    promotions = [t.datetime_complete for t in trials if t.user_attrs.get("kind") == "promotion"]
    reranks = [t.datetime_start for t in trials if t.user_attrs.get("kind") == "rerank"]
    assert reranks and max(promotions) <= min(reranks), "the re-ranking started before the funnel ended"
    # the baselines stand at the top rung, the candidates' own trials at rung 1
    assert {t.user_attrs["rung"] for t in trials if t.user_attrs.get("kind") == "baseline"} == {2}
    assert {t.user_attrs.get("rung") for t in trials if t.user_attrs.get("kind") == "candidate"
            and t.user_attrs.get("verdict") == "evaluated"} == {1}
    again = run_opsearch(["search", "--config", str(config), "--quiet"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(run_trials(open_run(storage, "fn"))) == len(trials)
