"""The re-ranking stage end to end: statistics from real training, SIGKILL and resume, two workers,
and `opsearch rerank` refusing bad input without touching the study."""
from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState

from opsearch.study import open_run, run_trials
from studies import TINY_PROXY_TOML, add_finished, run_opsearch

TINY = """
name = "rr"
space = "evonorm"
budget = {budget}
dataset = "synthetic"
archs = ["resnet", "mobilenetv2"]
filters = ["validity", "numerics", "equivalence"]
baselines = ["bn_relu", "identity"]
storage = "{storage}"
workers = {workers}
plots = false
seed = 1
""" + TINY_PROXY_TOML + """
[rerank]
top_k = 2
seeds = 3
"""

# bn_relu written again under another name: trained identically, so its results equal bn_relu's
COPY_PLUGIN = """
from opsearch.layers import declare_no_act, get_graph
from opsearch.registry import register_layer

register_layer("bn_relu_copy")(get_graph("bn_relu"))
declare_no_act("bn_relu_copy", "bn")
"""

# Real training on digits, small enough for a test: bn_relu, its copy and identity, 3 seeds x 2
# architectures, 50 steps on the held-out split.
DIGITS = """
name = "rr"
budget = 2
dataset = "digits"
archs = ["resnet", "mobilenetv2"]
filters = ["validity", "numerics"]
baselines = ["bn_relu", "bn_relu_copy", "identity"]
storage = "{storage}"
plugins = ["{plugin}"]
plots = false

[evaluator]                     # the search's proxy: next to nothing (only the stage matters here)
steps = 2
warmup_steps = 1

[rerank]                        # the held-out task: enough steps for bn_relu to learn
top_k = 1
seeds = 3
steps = 50
warmup_steps = 5
"""


def tiny(tmp_path, budget=5, workers=1):
    storage = f"sqlite:///{tmp_path}/study.db"
    path = tmp_path / "run.toml"
    path.write_text(TINY.format(budget=budget, storage=storage, workers=workers))
    return path, storage


def items(storage):
    return [t for t in run_trials(open_run(storage, "rr")) if t.user_attrs.get("kind") == "rerank"]


def expected_items(storage):
    """(of_trial, seed) the stage should hold: the selection times its first 3 seeds (none of
    them the search's), plus the adaptive seeds of the two candidates, which end settled."""
    from opsearch import report, rerank, rerank_stats

    study = open_run(storage, "rr")
    trials = run_trials(study)
    archs = report.archs_of(trials, study.user_attrs)
    chosen = rerank.select(trials, archs, top_k=2)
    (task,) = rerank.stage_tasks(study.user_attrs).values()
    seeds = rerank.stage_seeds(task, 8)
    assert 1 not in seeds  # the search's seed (TINY: seed = 1)
    expected = {(c.of_trial, seed) for c in chosen for seed in seeds[:3]}
    contest = rerank_stats.summarize(trials, archs, study.user_attrs)["contest"]
    if contest is not None:
        assert contest["status"] in ("distinguishable", "tie"), contest
        expected |= {(o, seed) for o in (contest["best"], contest["runner_up"])
                     for seed in seeds[:contest["seeds"]]}
    return expected


def finished_once(storage):
    """Every rerank item finished exactly once (a lost worker's copy apart)."""
    done = [t for t in items(storage) if t.user_attrs.get("verdict") != "failed:worker_lost"]
    assert all(t.state == TrialState.COMPLETE for t in done), [t.state for t in done]
    keys = [(t.user_attrs["of_trial"], t.user_attrs["seed"]) for t in done]
    assert len(keys) == len(set(keys)), "a rerank item was evaluated twice"
    return set(keys)


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~1 min on a quiet 2-core box; much more on a loaded one
def test_identity_is_worse_than_bn_relu_and_a_copy_is_not_distinguishable(tmp_path):
    plugin = tmp_path / "layer_copy_plugin.py"
    plugin.write_text(COPY_PLUGIN)
    storage = f"sqlite:///{tmp_path}/study.db"
    config = tmp_path / "run.toml"
    config.write_text(DIGITS.format(storage=storage, plugin=plugin))
    result = run_opsearch(["search", "--config", str(config)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Re-ranked on digits held-out split" in result.stdout
    shown = run_opsearch(["show", storage, "--json"], tmp_path)
    rerank = json.loads(shown.stdout)["rerank"]
    assert rerank["complete"] and rerank["task"]["dataset_options"]["split"] == "heldout"
    layers = {r["name"]: r for r in rerank["layers"]}
    assert all(len(layers[n]["seeds"]) == 3 for n in ("bn_relu", "bn_relu_copy", "identity"))
    worse = layers["identity"]["vs"]["bn_relu"]  # the unit is the seed: 3, df 2; Holm-corrected
    assert worse["word"] == "worse" and worse["p_corrected"] < 0.05 and worse["n"] == 3
    assert rerank["unit"] == "seed" and rerank["correction"] == "holm" and rerank["seeds_disjoint"]
    same = layers["bn_relu_copy"]["vs"]["bn_relu"]
    assert same["word"] == "not distinguishable" and same["p"] == 1.0
    assert layers["bn_relu"]["overall"]["mean"] > 0.5  # trained, not at chance
    assert layers["bn_relu"]["heldout_rank"] < layers["identity"]["heldout_rank"]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["rerank:3", "rerank_enqueue:4"])
def test_rerank_killed_and_resumed_loses_and_repeats_nothing(tmp_path, fault):
    config, storage = tiny(tmp_path)
    killed = run_opsearch(["search", "--config", str(config), "--quiet"], tmp_path, fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = {t.number: t for t in items(storage) if t.state.is_finished()}
    assert before or fault.startswith("rerank_enqueue")
    resumed = run_opsearch(["search", "--config", str(config), "--quiet"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = {t.number: t for t in items(storage)}
    for n, t in before.items():  # finished before the kill: intact
        assert after[n].state == t.state and after[n].user_attrs == t.user_attrs
        assert after[n].values == t.values
    assert finished_once(storage) == expected_items(storage)
    trials = run_trials(open_run(storage, "rr"))
    assert all(t.state.is_finished() for t in trials)
    counted = [t for t in trials if t.user_attrs.get("kind") == "candidate"
               and t.user_attrs.get("verdict") != "failed:worker_lost"]
    assert len(counted) == 5, "rerank items must not count toward the budget"
    if fault.startswith("rerank:"):  # the item in flight was handed out again
        lost = [t for t in items(storage) if t.user_attrs.get("verdict") == "failed:worker_lost"]
        assert len(lost) == 1


@pytest.mark.slow
def test_rerank_with_two_workers_accounts_for_every_trial(tmp_path):
    config, storage = tiny(tmp_path, budget=8, workers=2)
    result = run_opsearch(["search", "--config", str(config), "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = open_run(storage, "rr")
    trials = run_trials(study)
    # the run's study holds the search (what Optuna's tools read), the stage study the items;
    # each numbered from 0 without a gap
    search = study.get_trials()
    stage = optuna.load_study(study_name="rr/rerank", storage=storage).get_trials()
    assert {t.user_attrs["kind"] for t in search} == {"candidate", "baseline"}
    assert {t.user_attrs["kind"] for t in stage} == {"rerank"} and trials == search + stage
    for part in (search, stage):
        assert [t.number for t in part] == list(range(len(part)))
    assert all(t.state.is_finished() for t in trials)
    assert finished_once(storage) == expected_items(storage)
    kinds = {}
    for t in trials:
        kinds[t.user_attrs["kind"]] = kinds.get(t.user_attrs["kind"], 0) + 1
    assert kinds == {"candidate": 8, "baseline": 2, "rerank": len(expected_items(storage))}
    # run again: nothing new to do, nothing added
    again = run_opsearch(["search", "--config", str(config), "--quiet"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(run_trials(open_run(storage, "rr"))) == len(trials)


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, the study unchanged (no training: hand-made studies)


def hand_made_study(tmp_path, evaluated=True):
    from opsearch.config import SearchConfig
    from opsearch.study import Run

    storage = f"sqlite:///{tmp_path}/study.db"
    config = SearchConfig(name="rr", dataset="synthetic", archs=["resnet"], storage=storage,
                          baselines=["bn_relu"])
    attrs = {"space": config.space, "space_options": {}, "algorithm": config.algorithm,
             "archs": ["resnet"], "dataset": "synthetic", "config": json.dumps(config.to_dict())}
    run = Run.create_or_open(storage, "rr", attrs, ("archs",))
    add_finished(run, {"kind": "baseline", "layer": "bn_relu", "verdict": "evaluated",
                      "acc/resnet": 0.9}, TrialState.COMPLETE, [0.9])
    if evaluated:
        add_finished(run, {"kind": "candidate", "verdict": "evaluated", "acc/resnet": 0.8,
                          "formula": "x", "graph": "{}"}, TrialState.COMPLETE, [0.8])
    else:
        add_finished(run, {"kind": "candidate", "verdict": "rejected:numerics"}, TrialState.PRUNED, None)
    return storage


def snapshot(storage):
    study = open_run(storage, "rr")
    return ([(t.number, t.state, t.values, t.user_attrs) for t in run_trials(study)],
            dict(study.user_attrs))


@pytest.mark.parametrize("args, message", [
    (["--top", "0"], "--top must be positive"),
    (["--seeds", "-1"], "--seeds must be positive"),
    (["--rerank-dataset", "mnits"], "unknown dataset 'mnits'"),
    (["-O", "rerank.seeds=0"], "seeds must be a positive integer"),
    (["-O", "rerank.stepz=10"], "unknown rerank option 'stepz'"),
    (["--max-seeds", "0"], "--max-seeds must be positive"),
    (["-O", "rerank.correction=\"bonferroni\""], "correction must be one of holm, bh, none"),
])
def test_rerank_bad_input_is_one_line_and_leaves_the_study(tmp_path, capsys, args, message):
    from opsearch.cli import main

    storage = hand_made_study(tmp_path)
    before = snapshot(storage)
    assert main(["rerank", "rr", "--storage", storage, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(storage) == before


def test_rerank_without_an_evaluated_candidate(tmp_path, capsys):
    from opsearch.cli import main

    storage = hand_made_study(tmp_path, evaluated=False)
    before = snapshot(storage)
    assert main(["rerank", "rr", "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert "no evaluated candidate" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(storage) == before


def test_search_rerank_flags_reach_the_config():
    from opsearch.cli import build_parser
    from opsearch.commands.search import _rerank_options
    from opsearch.config import build_config
    from opsearch.errors import UserError

    args = build_parser().parse_args(["search", "--rerank-top", "7", "--rerank-seeds", "2",
                                      "--rerank-dataset", "fashion_mnist"])
    config = build_config(None, {}, _rerank_options(args))
    assert config.rerank == {"top_k": 7, "seeds": 2, "dataset": "fashion_mnist"}
    off = build_config(None, {}, _rerank_options(build_parser().parse_args(["search", "--no-rerank"])))
    assert off.rerank == {"enabled": False}
    with pytest.raises(UserError, match="rerank-top must be positive"):
        _rerank_options(build_parser().parse_args(["search", "--rerank-top", "0"]))


def test_rerank_task_defaults_and_stage_names():
    from opsearch.config import SearchConfig
    from opsearch.errors import UserError
    from opsearch.rerank import RerankTask

    task = RerankTask.from_config(SearchConfig())
    assert (task.top_k, task.seeds, task.baselines) == (5, 3, None)
    assert task.task["dataset"] == "digits" and task.task["dataset_options"] == {"split": "heldout"}
    assert "seed" not in task.task and "accelerator" not in task.task
    longer = RerankTask.from_config(SearchConfig(rerank={"steps": 900}))
    assert longer.task["steps"] == 900 and longer.stage != task.stage  # another task, another stage
    assert RerankTask.from_config(SearchConfig(rerank={"enabled": False})) is None
    other = RerankTask.from_config(SearchConfig(rerank={"dataset": "synthetic"}))
    assert other.task["dataset"] == "synthetic" and other.stage.startswith("synthetic-heldout-")
    with pytest.raises(UserError, match="workers"):
        RerankTask.from_config(SearchConfig(rerank={"accelerator": "gpu"}))
    with pytest.raises(UserError, match="archs"):
        SearchConfig.from_dict({"rerank": {"archs": ["resnet"]}})


def test_switched_off_stage_leaves_waiting_items_alone(tmp_path):
    from opsearch.study import Run, WorkerId

    storage = hand_made_study(tmp_path)
    run = Run(open_run(storage, "rr")._storage, "rr", storage)
    run.enqueue({"kind": "rerank", "stage": "s", "seed": 0, "of_trial": 1})
    run.enqueue({"kind": "baseline", "layer": "identity"})
    run.sync()
    me = WorkerId.current()
    taken = run.pop_waiting(me, skip_kinds=("rerank",))
    assert taken.kind == "baseline" and run.pop_waiting(me, skip_kinds=("rerank",)) is None
    assert run.pop_waiting(me).kind == "rerank"


# --------------------------------------------------------------------------------------------
# Seeds: disjoint from the search's, kept by a resumed stage; adaptive seeds for the two best
# (hand-made studies: items are "trained" by writing their results)


def two_candidate_study(tmp_path, seed=0, rerank_options=None):
    """A finished search of 2 candidates and bn_relu on one architecture, and its RerankTask."""
    from opsearch.config import SearchConfig
    from opsearch.rerank import RerankTask
    from opsearch.study import Run

    storage = f"sqlite:///{tmp_path}/study.db"
    config = SearchConfig(name="rr", dataset="synthetic", archs=["resnet"], storage=storage,
                          baselines=["bn_relu"], seed=seed, rerank=dict(rerank_options or {}))
    attrs = {"space": config.space, "space_options": {}, "algorithm": config.algorithm,
             "archs": ["resnet"], "dataset": "synthetic", "config": json.dumps(config.to_dict())}
    run = Run.create_or_open(storage, "rr", attrs, ("archs",))
    add_finished(run, {"kind": "baseline", "layer": "bn_relu", "verdict": "evaluated",
                       "acc/resnet": 0.9}, TrialState.COMPLETE, [0.9])
    for n, acc in ((1, 0.95), (2, 0.94)):
        add_finished(run, {"kind": "candidate", "verdict": "evaluated", "acc/resnet": acc,
                           "formula": f"f{n}", "hash": f"h{n}", "graph": "{}"}, TrialState.COMPLETE, [acc])
    run.sync()
    return run, RerankTask.from_config(config)


def train_waiting(run, accuracy, hold=None, held=()):
    """Take every waiting item and finish it with accuracy(of_trial, seed), but leave those of
    the trials in `hold` running (appended to `held`); finish the records in `held` too.
    Returns the (of_trial, seed) finished."""
    from opsearch.study import WorkerId

    run.sync()
    me, done = WorkerId.current(), []
    records = list(held)
    while (record := run.pop_waiting(me)) is not None:
        if hold is not None and record.user_attrs["of_trial"] in hold[0]:
            hold[1].append(record)  # still training
        else:
            records.append(record)
    for record in records:
        key = (record.user_attrs["of_trial"], record.user_attrs["seed"])
        acc = accuracy(*key)
        assert run.finish_trial(record, TrialState.COMPLETE, [acc],
                                {"acc/resnet": acc, "verdict": "evaluated"})
        done.append(key)
    run.sync()
    return done


@pytest.mark.parametrize("search_seed", [0, 7, 1_000_000, 1_000_002])
def test_rerank_seeds_never_equal_a_search_seed(tmp_path, search_seed):
    from opsearch import rerank

    run, task = two_candidate_study(tmp_path, seed=search_seed, rerank_options={"max_seeds": 8})
    seeds = rerank.stage_seeds(task.task, 8)
    assert search_seed not in seeds and len(set(seeds)) == 8
    assert rerank.enqueue_missing(run, task) == 3 * 3  # 2 candidates + bn_relu, 3 seeds each
    enqueued = [t.user_attrs for t in run.trials() if t.user_attrs.get("kind") == "rerank"]
    assert {a["seed"] for a in enqueued} == set(seeds[:3])
    assert all(a["seed"] != search_seed for a in enqueued)
    assert all(a["stage"] == task.stage and a["kind"] == "rerank" for a in enqueued)
    # the items train with the seed they carry: the evaluator config gets exactly it
    assert task.eval_config(seeds[0], None).seed == seeds[0] != search_seed
    # a stage trained with the search's seeds would have another default name
    old_style = {k: v for k, v in task.task.items() if k != rerank.SEEDS_KEY}
    assert rerank.default_stage(old_style) != task.stage


def test_a_stage_stored_before_disjoint_seeds_resumes_with_its_own_seeds(tmp_path):
    from opsearch import rerank, rerank_stats

    run, task = two_candidate_study(tmp_path, rerank_options={"stage": "old", "max_seeds": 3})
    old_task = {k: v for k, v in task.task.items() if k != rerank.SEEDS_KEY}
    run.storage.set_study_user_attr(run.study_id, "rerank:old", json.dumps(old_task))
    run.attrs = run.storage.get_study_user_attrs(run.study_id)
    run.enqueue({"kind": "rerank", "stage": "old", "seed": 0, "of_trial": 1, "formula": "f1", "hash": "h1"})
    train_waiting(run, lambda of_trial, seed: 0.9)
    assert rerank.enqueue_missing(run, task) == 3 * 3 - 1  # what was missing, seeds 0, 1, 2
    train_waiting(run, lambda of_trial, seed: 0.9 + 0.01 * of_trial)
    keys = {(t.user_attrs["of_trial"], t.user_attrs["seed"]) for t in run.trials()
            if t.user_attrs.get("kind") == "rerank"}
    assert keys == {(o, s) for o in (0, 1, 2) for s in (0, 1, 2)}
    out = rerank_stats.summarize(run.trials(), ["resnet"], run.attrs)
    assert out["stage"] == "old" and out["complete"]
    assert out["seeds_disjoint"] is False and out["search_seeds"] == [0]


def test_adaptive_seeds_for_the_two_best_until_a_tie(tmp_path):
    from opsearch import rerank, rerank_stats

    run, task = two_candidate_study(tmp_path, rerank_options={"max_seeds": 6})
    seeds = rerank.stage_seeds(task.task, 6)

    def tied(of_trial, seed):  # the two candidates differ by +-0.01, alternating over the seeds
        k = seeds.index(seed)
        return {0: 0.5, 1: 0.9 + 0.005 * (-1) ** k, 2: 0.9 - 0.005 * (-1) ** k}[of_trial]

    assert rerank.enqueue_missing(run, task) == 9
    assert rerank.enqueue_missing(run, task) == 0  # idempotent
    running = []
    train_waiting(run, tied, hold=({0}, running))  # the candidates' items done, bn_relu's not
    assert rerank.enqueue_missing(run, task) == 0  # the stage first: who is best is not known yet
    train_waiting(run, tied, held=running)
    rounds = []
    while rerank.enqueue_missing(run, task):
        assert rerank.enqueue_missing(run, task) == 0  # nothing more while those train
        rounds.append(sorted(train_waiting(run, tied)))
    # one more seed for the best and the runner-up each round, never for the baseline
    assert rounds == [[(1, seeds[k]), (2, seeds[k])] for k in range(3, 6)]
    out = rerank_stats.summarize(run.trials(), ["resnet"], run.attrs)
    c = out["contest"]
    assert c["status"] == "tie" and c["seeds"] == 6 and c["max_seeds"] == 6
    assert {c["best"], c["runner_up"]} == {1, 2}
    assert out["seeds_disjoint"] and 0 not in out["seeds_used"]
    layers = {r["of_trial"]: r for r in out["layers"]}
    assert len(layers[0]["seeds"]) == 3 and len(layers[1]["seeds"]) == len(layers[2]["seeds"]) == 6


def test_adaptive_seeds_stop_when_the_two_best_are_distinguishable(tmp_path):
    from opsearch import rerank, rerank_stats

    run, task = two_candidate_study(tmp_path)
    assert task.max_seeds == 8  # the default
    noise = {0: 0.0, 1: 0.004, 2: -0.003}

    def apart(of_trial, seed):
        return {0: 0.5, 1: 0.95, 2: 0.90}[of_trial] + noise[seed - rerank.SEED_BASE] * (of_trial == 1)

    rerank.enqueue_missing(run, task)
    train_waiting(run, apart)
    assert rerank.enqueue_missing(run, task) == 0
    c = rerank_stats.summarize(run.trials(), ["resnet"], run.attrs)["contest"]
    assert c["status"] == "distinguishable" and c["seeds"] == 3 and c["best"] == 1
