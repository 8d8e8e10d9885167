"""The re-ranking stage: the search's best candidates and the baselines, trained again with
several seeds on a held-out task (README "Re-ranking"; the paper's held-out step).

A proxy score from one seed on a small task is noisy, so after the budget the top K candidates
by the search's own selection rule (best mean accuracy over the architectures among evaluated
and duplicate candidates, one entry per function: a duplicate stands for the trial it equals)
and the baselines are evaluated again, S seeds each, on data that no search decision has used.

Each (layer, seed) is one trial of the run's stage study ``<run>/rerank`` (opsearch/trials.py;
in the run's own study for a run stored before stage studies), enqueued WAITING and handed out to workers
like a candidate (so N local workers and workers on other machines share them; a lost worker's
item is reaped and enqueued again). Stored user attributes (**contract**): ``kind = "rerank"``,
``stage`` (names the held-out task), ``seed``, ``of_trial`` (the candidate's or baseline's trial
number), plus ``layer`` (baselines), ``graph``, ``formula``, ``hash``, and once done ``verdict``,
``acc/<arch>``, ``elapsed_s``. The task of a stage (its evaluator settings, devices apart) is
stored as the study attribute ``rerank:<stage>``, so that any worker runs any stage's items with
the same settings.

Seeds (**contract**: ``seed`` is the seed the item trains with): the search trains every
candidate and baseline with the run's ``seed`` (0 by default), so a stage's seeds are drawn from
elsewhere: ``SEED_BASE`` (1,000,000), 1,000,001, ..., skipping the search's seed. The rule is
stored with the stage's task (``rerank_seeds = {"first": ..., "skip": [...]}``, which also makes
the stage's default name differ from one trained with the search's seeds), so every worker and
every resume draws the same seeds. A stage stored before this rule (no ``rerank_seeds``) keeps
its seeds 0, 1, 2, ...: resuming it completes what is there; its statistics say
``seeds_disjoint: false``, and re-ranking the run again with the default stage name is a new
stage with disjoint seeds.

Adaptive seeds: once a stage's items have all finished, when the best candidate and the
runner-up are not distinguishable (`opsearch.rerank_stats.contest`), both are trained with one
more seed, and so on up to ``max_seeds`` (default 8); then the contest reports a tie with the
number of seeds it took. Only those two get the extra seeds, so the default run's stage grows by
at most 2 x 5 evaluations.

Enqueueing is idempotent: an (of_trial, seed, stage) that already exists (waiting, running or
finished, a lost worker's copy apart) is never enqueued again. Workers on one machine enqueue
under the local lock; two machines may still race and enqueue the same item twice: the
statistics (`opsearch.rerank_stats`) then keep the first one that finished and ignore the other.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

from opsearch import faults, report
from opsearch.config import RERANK_DEFAULTS as DEFAULTS
from opsearch.config import DEFAULT_EVALUATOR, check_rerank_options
from opsearch.errors import UserError
from opsearch.trials import LOST, STAGE_ATTR_PREFIX, search_mean, stage_tasks  # noqa: F401
from opsearch.trials import by_number as search_by_number

KIND = "rerank"

# The first seed of a stage: far from the search's seed (the run's `seed`, 0 by default), so that
# a candidate's lucky initialisation at the search does not carry over into its held-out score.
SEED_BASE = 1_000_000
SEEDS_KEY = "rerank_seeds"  # the stage task's seed rule (not an evaluator key)
# Item attributes a reaped (lost) item keeps when it is enqueued again.
ITEM_KEYS = ("kind", "stage", "seed", "of_trial", "layer", "graph", "formula", "hash")


@dataclass
class RerankTask:
    """What the stage does: which layers, how many seeds, and the held-out task's settings."""

    stage: str
    top_k: int
    seeds: int
    baselines: list[str] | None  # None: every baseline of the run
    task: dict[str, Any]  # the evaluator's config, machine keys apart, + the seed rule (stored)
    evaluator_plugin: str = DEFAULT_EVALUATOR  # registry `evaluators`: whose config `task` is
    max_seeds: int = 8  # the contest of the two best candidates: at most this many seeds each
    correction: str = "holm"  # the table's multiple-comparison correction (rerank_stats)

    @classmethod
    def from_config(cls, config) -> "RerankTask | None":
        """The stage of a SearchConfig; None when switched off (rerank.enabled = false).

        The held-out task is the search's evaluator settings with, by default, the search's
        dataset on its held-out split (``dataset_options.split = "heldout"``: digits' 20% that the
        search never sees; the official test set of fashion_mnist and cifar10); ``dataset`` names
        another dataset instead, and any [evaluator] key in the table overrides the search's.
        """
        from opsearch import registry
        from opsearch.evaluation import make_eval_config

        plugin = registry.evaluators.get(config.evaluator_plugin)
        options = dict(config.rerank)
        check_rerank_options(options)
        own = {k: options.pop(k, default) for k, default in DEFAULTS.items()}
        if not own["enabled"]:
            return None
        task = plugin.config_to_dict(make_eval_config(config))
        fields = set(plugin.OPTIONS) | set(task)
        unknown = sorted(set(options) - fields)
        if unknown:
            raise UserError(f"unknown rerank option {unknown[0]!r}; known: "
                            f"{', '.join(sorted(set(DEFAULTS) | fields - {'archs'}))}")
        bad = sorted(set(options) & set(plugin.MACHINE_KEYS))
        if bad:
            raise UserError(f"rerank.{bad[0]} is a setting of the workers, not of the held-out "
                            "task: set it for the whole run")
        if own["dataset"] and own["dataset"] != config.dataset:
            task["dataset"] = own["dataset"]
            task["dataset_options"] = {}  # the search dataset's options do not apply
            task["data_dir"] = own["data_dir"]
        elif own["data_dir"]:
            task["data_dir"] = own["data_dir"]
        task.update(options)
        task["dataset_options"] = {"split": "heldout", **dict(task.get("dataset_options") or {})}
        task = {k: v for k, v in task.items() if k not in plugin.MACHINE_KEYS}
        task["archs"] = list(config.archs)
        task[SEEDS_KEY] = {"first": SEED_BASE, "skip": [int(config.seed)]}
        registry.datasets.get(task["dataset"])  # an unknown dataset: one line, the known ones
        baselines = None if own["baselines"] == "all" else list(own["baselines"])
        for name in baselines or ():
            registry.layers.get(name)
        stage = own["stage"] or default_stage(task)
        result = cls(stage, own["top_k"], own["seeds"], baselines, task, config.evaluator_plugin,
                     own["max_seeds"], own["correction"])
        result.eval_config(0, make_eval_config(config))  # bad values: say so now
        return result

    def eval_config(self, seed: int, machine):
        """The task's evaluator config for one seed, with the machine settings of `machine` (the
        worker's own evaluator config: accelerator, devices, threads)."""
        return task_eval_config(self.task, seed, machine, self.evaluator_plugin)

    def check_data(self, machine) -> None:
        """Load the held-out data now: a missing file or a dataset without a held-out split fails
        before anything is written."""
        from opsearch import registry

        registry.evaluators.get(self.evaluator_plugin).check(self.eval_config(0, machine))

    def describe(self) -> str:
        t = self.task
        split = (t.get("dataset_options") or {}).get("split")
        return (f"{t['dataset']}{' (held-out split)' if split == 'heldout' else ''}, "
                f"{t.get('steps')} steps, top {self.top_k} candidates + "
                f"{'every baseline' if self.baselines is None else ', '.join(self.baselines) or 'no baseline'}"
                f", {self.seeds} seeds"
                + (f" (the two best up to {self.max_seeds})" if self.max_seeds > self.seeds else ""))


def task_eval_config(task: dict[str, Any], seed: int, machine, evaluator_plugin: str = DEFAULT_EVALUATOR):
    """The evaluator's config from a stored task, one seed, and a worker's machine settings."""
    from opsearch import registry

    plugin = registry.evaluators.get(evaluator_plugin)
    values = {k: v for k, v in task.items() if k not in plugin.MACHINE_KEYS and k != SEEDS_KEY}
    if machine is not None:
        own = machine if isinstance(machine, dict) else plugin.config_to_dict(machine)
        values.update({k: own[k] for k in plugin.MACHINE_KEYS if k != "seed" and k in own})
    values["seed"] = int(seed)
    try:
        return plugin.config_from_dict(values)
    except (TypeError, ValueError) as e:  # UserError included: say it is the rerank's
        raise UserError(f"rerank options: {e}") from None


def stage_seeds(task: dict[str, Any], count: int) -> list[int]:
    """The first `count` seeds of a stage, by the rule stored with its task: from ``first`` up,
    skipping the search's seeds; a stage stored without a rule: 0, 1, 2, ... (as it was trained)."""
    rule = task.get(SEEDS_KEY) if isinstance(task.get(SEEDS_KEY), dict) else {"first": 0, "skip": []}
    skip = {int(s) for s in rule.get("skip") or ()}
    out: list[int] = []
    seed = int(rule.get("first", 0))
    while len(out) < count:
        if seed not in skip:
            out.append(seed)
        seed += 1
    return out


def default_stage(task: dict[str, Any]) -> str:
    """A stage name that changes with the task: the same task resumes, another one is new."""
    digest = hashlib.sha1(json.dumps(task, sort_keys=True, default=str).encode()).hexdigest()[:6]
    split = (task.get("dataset_options") or {}).get("split")
    return f"{task['dataset']}{'-heldout' if split == 'heldout' else ''}-{digest}"


# --------------------------------------------------------------------------------------------
# Selection


@dataclass
class Selected:
    """One layer to re-rank: a candidate (by the search's rule) or a baseline."""

    of_trial: int
    kind: str  # candidate | baseline
    name: str
    search_mean: float
    attrs: dict[str, Any]


def duplicate_root(trial: Any, by_number: dict[int, Any]) -> Any:
    """The trial a duplicate stands for (following chains); the trial itself otherwise."""
    seen = set()
    while True:
        v = str(trial.user_attrs.get("verdict") or "")
        if not v.startswith("duplicate:") or trial.number in seen:
            return trial
        seen.add(trial.number)
        try:
            original = by_number.get(int(v.split(":", 1)[1]))
        except ValueError:
            return trial
        if original is None:
            return trial
        trial = original


def select(trials: Sequence[Any], archs: Sequence[str], top_k: int,
           baselines: Sequence[str] | None = None) -> list[Selected]:
    """The top `top_k` candidates by mean accuracy (ties: the earlier trial), one per function,
    then the baselines (all, or those named), in the run's order."""
    by_number = search_by_number(trials)
    ranked = []
    for t in trials:
        if report.kind(t) != "candidate" or report.category(t) not in ("evaluated", "duplicate"):
            continue
        mean = search_mean(t, archs)
        if mean is not None:
            ranked.append((-mean, t.number, t))
    ranked.sort(key=lambda item: item[:2])
    chosen: list[Selected] = []
    seen_roots: set[int] = set()
    seen_hashes: set[str] = set()
    for neg_mean, _, t in ranked:
        if len(chosen) >= top_k:
            break
        root = duplicate_root(t, by_number)
        h = root.user_attrs.get("hash")
        if root.number in seen_roots or (h and h in seen_hashes):
            continue
        seen_roots.add(root.number)
        if h:
            seen_hashes.add(h)
        chosen.append(Selected(root.number, "candidate", report.name_of(root), -neg_mean,
                               _item_attrs(root)))
    wanted = None if baselines is None else set(baselines)
    seen_layers: set[str] = set()
    for t in trials:
        if report.kind(t) != "baseline" or t.state.name != "COMPLETE":
            continue
        layer = str(t.user_attrs.get("layer"))
        if layer in seen_layers or (wanted is not None and layer not in wanted):
            continue
        mean = search_mean(t, archs)
        if mean is None:
            continue
        seen_layers.add(layer)
        chosen.append(Selected(t.number, "baseline", layer, mean, _item_attrs(t)))
    return chosen


def _item_attrs(trial: Any) -> dict[str, Any]:
    attrs = {k: trial.user_attrs[k] for k in ("layer", "graph", "formula", "hash")
             if k in trial.user_attrs}
    if report.kind(trial) != "baseline":
        attrs.pop("layer", None)
    return attrs


# --------------------------------------------------------------------------------------------
# Enqueueing (idempotent)


def search_pending(run) -> list[Any]:
    """Candidates and baselines still waiting or running: the top K is chosen after them."""
    return [r for r in run.unfinished() if r.kind in ("candidate", "baseline", "promotion")]


def existing_items(trials: Sequence[Any]) -> set[tuple[int, int, str]]:
    """(of_trial, seed, stage) of every rerank item in the study, lost workers' copies apart."""
    out = set()
    for t in trials:
        if t.user_attrs.get("kind") != KIND or t.user_attrs.get("verdict") == LOST:
            continue
        try:
            out.add((int(t.user_attrs["of_trial"]), int(t.user_attrs["seed"]), str(t.user_attrs["stage"])))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def enqueue_missing(run, task: RerankTask) -> int:
    """Enqueue the stage's items that do not exist yet; returns how many were enqueued.

    Call after `run.sync()` under the workers' lock, once `search_pending(run)` is empty. Items
    go in seed-major order, so every layer has its first seed before any has its second."""
    from opsearch.funnel import at_highest_rung

    trials = run.trials()
    chosen = select(at_highest_rung(trials), run.archs, task.top_k, task.baselines)
    if not chosen:
        return 0
    present = existing_items(trials)
    key = STAGE_ATTR_PREFIX + task.stage
    stored = run.attrs.get(key)
    if stored is None:
        stored = run.storage.get_study_user_attrs(run.study_id).get(key)
    if stored is None:  # the task first, so that a worker popping an item can read it
        stored = json.dumps(task.task, sort_keys=True)
        run.storage.set_study_user_attr(run.study_id, key, stored)
        run.attrs[key] = stored
    try:  # the stored task's seed rule, not this process's: a stage keeps its seeds
        stored_task = json.loads(stored) if isinstance(stored, str) else task.task
    except ValueError:
        stored_task = task.task
    if not isinstance(stored_task, dict):
        stored_task = task.task
    seeds = stage_seeds(stored_task, max(task.seeds, task.max_seeds))
    queued = 0
    for seed in seeds[:task.seeds]:
        for s in chosen:
            queued += _enqueue_item(run, task.stage, seed, s, present)
    if queued:
        return queued
    due = extra_seeds_due(trials, run.archs, task.stage, chosen, task.max_seeds)
    if due is not None:
        layers, want = due
        by_trial = {s.of_trial: s for s in chosen}
        for of_trial in layers:
            for seed in seeds[:want]:
                queued += _enqueue_item(run, task.stage, seed, by_trial[of_trial], present)
    return queued


def extra_seeds_due(trials: Sequence[Any], archs: Sequence[str], stage: str,
                    chosen: Sequence[Selected], max_seeds: int) -> tuple[list[int], int] | None:
    """The adaptive seeds: ((best, runner-up), seeds each should have) when the stage's items
    have all finished and the two best candidates are not distinguishable yet with fewer than
    `max_seeds` seeds; None otherwise (still training, decided, a tie, or fewer than two
    candidates)."""
    from opsearch import rerank_stats

    items = rerank_stats.collect(trials, archs).get(stage)
    if items is None or items.pending:
        return None
    candidates = [s.of_trial for s in chosen if s.kind == "candidate"]
    c = rerank_stats.contest(items.results, candidates, max_seeds)
    if c is None or c["status"] != "undecided":
        return None
    return [c["best"], c["runner_up"]], c["want"]


def _enqueue_item(run, stage: str, seed: int, s: Selected, present: set) -> int:
    if (s.of_trial, seed, stage) in present:
        return 0
    run.enqueue({"kind": KIND, "stage": stage, "seed": seed, "of_trial": s.of_trial, **s.attrs})
    present.add((s.of_trial, seed, stage))
    faults.point("rerank_enqueue")
    return 1


def stage_task(run, stage: str) -> dict[str, Any]:
    """The stored task of a stage (plain JSON of the evaluator's config; never unpickled)."""
    key = STAGE_ATTR_PREFIX + stage
    text = run.attrs.get(key)
    if text is None:
        run.attrs = run.storage.get_study_user_attrs(run.study_id)
        text = run.attrs.get(key)
    if not isinstance(text, str):
        raise ValueError(f"no task stored for rerank stage {stage!r}")
    task = json.loads(text)
    if not isinstance(task, dict):
        raise ValueError(f"the task of rerank stage {stage!r} is not a table")
    return task


