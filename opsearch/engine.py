"""The search engine: symmetric, stateless workers around one study.

Each worker recovers the algorithm from the study, then repeats: take a requeued candidate or
propose a new one, record it RUNNING, run the rejection pipeline, train the survivors on the K
proxy architectures, record the verdict and objectives in one write, feed the result back. N
workers on one machine (processes) or on many (the same command against one storage URL) share
the study; a crash loses at most the candidates in flight, and the same command resumes.

Every failure a candidate can cause becomes a verdict and the search goes on: an exception
(`failed:<type>`), a time limit (`failed:timeout`), running out of memory (`failed:oom`).
"""
from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from optuna.trial import TrialState

from opsearch import devices, faults, registry
from opsearch.config import SearchConfig
from opsearch.evaluation import make_eval_config
from opsearch.errors import EnvironmentFault, InvalidCandidate
from opsearch.lineage import Lineage
from opsearch.study import (HANG_MARGIN_S, LOST, Heartbeat, Run, TrialRecord, WorkerId, disk_full,
                            disk_full_error, mark_stopped, no_retry, resolve,
                            set_storage_grace)
from opsearch.trial_handlers import (HANDLERS, CandidateHandler, Outcome, TrialHandler,
                                     built_like_candidates)

COMPATIBLE_KEYS = ("space", "space_options", "archs", "dataset", "evaluator_plugin", "surround")
MAX_REPROPOSALS = 20
RERANK_POLL_S = 1.0  # how often a worker at the budget looks whether the last candidates ended


class CandidateTimeout(Exception):
    """Raised inside a candidate's evaluation when its time limit passes."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Interrupt the block after `seconds` (SIGALRM; only in a main thread, else no limit)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise CandidateTimeout(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------
# What a worker needs, built from the config (in each process)


@dataclass
class Setup:
    """The pluggable parts of a search, resolved by name from the registries."""

    config: SearchConfig
    space: Any
    algorithm_cls: Any
    pipeline: Any
    eval_config: Any
    url: str
    study_name: str
    evaluator_cls: Any = None  # the evaluator plugin (opsearch.evaluation.Evaluator subclass)
    rerank: Any = None  # opsearch.rerank.RerankTask, or None when the stage is off
    funnel: Any = None  # opsearch.funnel.Funnel, or None when off (the default)

    @classmethod
    def from_config(cls, config: SearchConfig) -> "Setup":
        """Resolve and check every part before anything is written: bad input loses nothing."""
        set_storage_grace(config.storage_grace_s)  # every storage call of this process
        for path in config.plugins:
            registry.load_plugin_file(path)
        from opsearch import surround
        config = surround.configured(  # the space's surround, into the stored config
            config, registry.space_surround(config.space),
            "layer_options" in registry.evaluators.options(config.evaluator_plugin))
        from opsearch.rejection import RejectionPipeline
        from opsearch.space import SearchSpace

        space = SearchSpace.from_name(config.space, **config.space_options)
        algorithm_cls = registry.algorithms.get(config.algorithm)
        for arch in config.archs:
            registry.architectures.get(arch)
        registry.datasets.get(config.dataset)
        for layer in config.baselines:
            registry.layers.get(layer)
        from opsearch.funnel import Funnel
        funnel = Funnel.from_config(config)
        pipeline = RejectionPipeline.from_spec(
            config.filters, funnel.filter_options(config.filter_options) if funnel else config.filter_options)
        evaluator_cls = registry.evaluators.get(config.evaluator_plugin)
        eval_config = make_eval_config(config)
        devices.gpu_ids(config.accelerator, config.devices)  # no such device: say so now
        evaluator_cls.check(eval_config)  # e.g. a missing or unreadable data directory
        if config.storage:
            url, study_name = config.storage, config.name
        else:
            url, study_name = resolve(config.name)
        from opsearch.rerank import RerankTask
        rerank = RerankTask.from_config(config)
        if rerank is not None:
            rerank.check_data(eval_config)  # no held-out data: say so before the search starts
        setup = cls(config, space, algorithm_cls, pipeline, eval_config, url, study_name,
                    evaluator_cls, rerank, funnel)
        setup.new_algorithm(config.seed)  # unknown or bad algorithm options: say so now
        return setup

    def new_algorithm(self, seed: int):
        algorithm = registry.algorithms.create(self.config.algorithm, self.space, len(self.config.archs),
                                               seed, **self.config.algorithm_options)
        algorithm.from_known_layers = self.config.seed_with_baselines
        return algorithm

    def study_attrs(self) -> dict[str, Any]:
        from opsearch import surround

        c = self.config
        return {"space": c.space, "space_options": c.space_options, "algorithm": c.algorithm,
                "archs": list(c.archs), "dataset": c.dataset, "evaluator_plugin": c.evaluator_plugin,
                "surround": surround.of_config(c), "config": json.dumps(c.to_dict())}

    def open_run(self) -> Run:
        return Run.create_or_open(self.url, self.study_name, self.study_attrs(), COMPATIBLE_KEYS)


# --------------------------------------------------------------------------------------------
# The worker


class Worker:
    """One stateless worker: recover, then propose / filter / evaluate / record until the budget."""

    def __init__(self, setup: Setup, run: Run | None = None, lock: Any = None,
                 on_result: Callable[[TrialRecord, Outcome], None] | None = None,
                 device_index: int | None = None, worker_index: int = 0,
                 on_other: Callable[[TrialRecord], None] | None = None,
                 start_line: Any = None):  # local_run.StartLine
        from opsearch.rejection import EquivalenceCache, FilterContext

        self.setup = setup
        self.config = setup.config
        self.run = run or setup.open_run()
        self.lock = lock or contextlib.nullcontext()
        self.on_result = on_result
        self.on_other = on_other  # trials other workers finished, as this one learns of them
        self.start_line = start_line
        self.archs = list(self.config.archs)
        self.eval_config = (make_eval_config(self.config, device_index) if device_index is not None
                            else setup.eval_config)
        self.identity = WorkerId.current(device=devices.describe(device_index))
        # Workers that recover the same history with the same seed would propose the same
        # genomes: local worker i adds i to the seed (worker 0 keeps the user's seed, so a
        # one-worker search is reproducible); a worker joining a study that other live workers
        # are filling (another machine) also mixes in its identity.
        seed = self.config.seed + worker_index
        if worker_index == 0 and self._others_running():
            seed += hash((self.identity.host, self.identity.pid)) % 1_000_003
        self.algorithm = setup.new_algorithm(seed)
        threads = registry.evaluators.get(self.config.evaluator_plugin).threads(self.eval_config)
        if threads:
            import torch
            torch.set_num_threads(threads)  # the filters train too
        funnel = setup.funnel  # candidates train to rung 1; the quality filter's session too
        self.context = FilterContext(eval_config=(self.eval_config if funnel is None else funnel.eval_config(
                                         self.eval_config, 1, self.config.evaluator_plugin)),
                                     equivalence=EquivalenceCache(),
                                     seed=self.config.seed, evaluator_plugin=self.config.evaluator_plugin)
        self._last_reap = 0.0
        self._derived_evaluators: dict[tuple, Any] = {}  # (what, ...) -> evaluator, built once
        self._handlers: dict[str, TrialHandler] = {}  # kind -> its handler (trial_handlers.py)
        self._recovered = False
        self._encoded: dict[str, tuple[int, ...] | None] = {}
        self._fed: set[int] = set()  # trial ids already fed back (own and other workers')
        self.lineage = Lineage()  # parents of proposals, and their early accuracies

    def _others_running(self) -> bool:
        self.run.sync()
        return any(r.state == TrialState.RUNNING for r in self.run.trials())

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> int:
        """Rebuild the algorithm and the equivalence cache from the finished trials."""
        from opsearch.rejection import EquivalenceCache

        self.run.sync()
        finished = [r for r in self.run.trials() if r.state.is_finished()]
        self._fed = {r.trial_id for r in finished}
        for r in finished:
            self._note_lineage(r)
        self.context.equivalence = EquivalenceCache.from_trials(
            [r for r in finished if r.kind in _CACHED_KINDS])
        history = [(g, self._objectives(r), _is_duplicate(r), _grade(r)) for r in finished
                   if (g := self._history_genome(r)) is not None]
        self.algorithm.recover(history)
        self._recovered = True
        return len(history)

    def _note_lineage(self, record: TrialRecord) -> None:
        if record.kind == "candidate" and record.state.is_finished() and record.verdict != LOST:
            self.lineage.add(record.number, record.genome, record.user_attrs)

    def _history_genome(self, record: TrialRecord) -> tuple[int, ...] | None:
        """The genome a finished trial feeds back: a candidate's own; with seed_with_baselines,
        an evaluated baseline's layer written in the space (so evolution starts from the known
        layers instead of waiting for random graphs to survive the filters)."""
        if record.verdict == LOST or not record.state.is_finished():
            return None
        if record.kind == "candidate":
            return record.genome
        if record.kind != "baseline" or not self.config.seed_with_baselines \
                or record.state != TrialState.COMPLETE or not built_like_candidates(self.config, record):
            return None
        key = record.user_attrs.get("graph")
        if key not in self._encoded:
            from opsearch import graph as graph_mod
            try:
                self._encoded[key] = self.setup.space.encode(graph_mod.from_json(key))
            except Exception:
                self._encoded[key] = None
        return self._encoded[key]

    def _objectives(self, record: TrialRecord) -> tuple[float, ...] | None:
        return tuple(record.values) if record.state == TrialState.COMPLETE and record.values else None

    def _absorb(self, records: list[TrialRecord]) -> None:
        """Feed back trials other workers finished since the last sync (each trial once)."""
        for r in records:
            if r.trial_id in self._fed:
                continue
            self._fed.add(r.trial_id)
            self._note_lineage(r)
            genome = self._history_genome(r)
            if genome is not None:
                self.algorithm.feedback(genome, self._objectives(r), _is_duplicate(r), _grade(r))
            if r.kind in _CACHED_KINDS and r.verdict != LOST:
                self.context.equivalence.add_trial(r)
            if self.on_other is not None:
                self.on_other(r)

    # -- the loop ---------------------------------------------------------------------------

    def run_loop(self, max_candidates: int | None = None) -> int:
        """Work until the budget is reached; returns the number of trials this worker finished."""
        if not self._recovered:
            self.recover()
        self._warm_up()
        if self.start_line is not None:
            self.start_line.wait()
        self._enqueue_promotions()  # a resumed search: what the rungs call for now
        try:
            return self._loop(max_candidates)
        except EnvironmentFault as e:  # the storage away, a full disk: stopping on purpose
            mark_stopped(self.identity, str(e))
            raise

    def _loop(self, max_candidates: int | None) -> int:
        done = 0
        while max_candidates is None or done < max_candidates:
            self._maybe_reap()
            # a requeued candidate first; else a new one (which syncs with the study under the
            # lock); at the budget, one more look for candidates that sync just revealed
            skip = () if self.setup.rerank is not None else ("rerank",)  # --no-rerank: leave them
            record = (self.run.pop_waiting(self.identity, skip) or self._new_candidate()
                      or self.run.pop_waiting(self.identity, skip) or self._next_rerank())
            if record is None:
                # At the budget. Candidates still held by other workers may yet be lost (a
                # killed job, a preempted node): wait for them to finish or to come back
                # requeued, so that no candidate is left RUNNING when the last worker leaves.
                if not self._others_in_flight():
                    break
                time.sleep(min(self.config.heartbeat_s, 5.0))
                self._maybe_reap(force=True)
                continue
            try:
                outcome = self.process(record)
            except BaseException as e:  # stopped (SIGTERM/USR2 from the scheduler, Ctrl-C):
                self._release(record, e)  # hand the candidate back at once, then stop
                raise
            faults.point("record")
            if not self.run.finish_trial(record, outcome.state, outcome.values, outcome.attrs):
                continue  # reaped as lost meanwhile; its requeued copy carries on
            done += 1
            self._fed.add(record.trial_id)
            self._note_lineage(record)
            genome = self._history_genome(record)
            if genome is not None:
                self.algorithm.feedback(genome, self._objectives(record), _is_duplicate(record),
                                        _grade(record))
            if record.kind in _CACHED_KINDS:
                self._record_equivalence(record)
            faults.point("recorded")
            if record.kind in ("candidate", "promotion"):
                self._enqueue_promotions()
            if self.on_result is not None:
                self.on_result(record, outcome)
        return done

    def _warm_up(self) -> None:
        """Build the evaluator (Lightning's import, the data, a first Trainer) before taking a
        candidate. Lazily, inside the first candidate, it held that candidate for the whole
        start-up (~3 s on a quiet 2-core box, 25-35 s on a busy one): with several workers, the
        others reached the budget and then waited for a worker that had just started."""
        try:
            self.context.get_evaluator()
        except Exception:  # the first candidate meets the same error and records it
            pass

    def _others_in_flight(self) -> bool:
        """Whether the study holds candidates another worker is on (with a heartbeat, so a
        reaper can tell when it is lost) or that wait to be taken."""
        from opsearch.study import HEARTBEAT_KEY

        self._absorb(self.run.sync())
        return any(r.state == TrialState.WAITING or HEARTBEAT_KEY in r.system_attrs
                   for r in self.run.unfinished())

    def _maybe_reap(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self._last_reap > min(self.config.heartbeat_s, 30.0):
            self._last_reap = now
            self._absorb(self.run.sync())  # what others finished feeds the algorithm too
            self.run.reap_lost(self.config.grace_s, me=self.identity)
            # reap_lost reads trials that finished meanwhile without reporting them: feed back
            # whatever finished and was not fed yet (else other workers' results are lost to
            # this worker's algorithm)
            self._absorb([r for r in self.run.trials()
                          if r.state.is_finished() and r.trial_id not in self._fed])

    def _release(self, record: TrialRecord, error: BaseException) -> None:
        try:
            with no_retry():  # being stopped: no time to wait out an outage
                self.run.release(record, f"its worker was stopped ({type(error).__name__})")
        except Exception:  # the storage is unreachable: the reapers will find it by heartbeat
            pass

    def _new_candidate(self) -> TrialRecord | None:
        with self.lock:
            self._absorb(self.run.sync())
            if self.run.candidates_counted() >= self.config.budget:
                return None
            # never evaluate one function twice at once, nor one that killed its worker twice
            avoid = {r.user_attrs.get("hash") for r in self.run.unfinished()} | self.run.poisonous()
            for _ in range(MAX_REPROPOSALS):
                genome = tuple(int(g) for g in self.algorithm.propose())
                faults.point("propose")
                attrs = {"kind": "candidate", "genome": json.dumps(list(genome))}
                if self.algorithm.origin:
                    attrs["origin"] = self.algorithm.origin
                if (parent := self.lineage.trial_of(self.algorithm.parent)) is not None:
                    attrs["parent"] = parent
                attrs.update(describe_graph(self.setup.space.decode(genome)))
                if attrs.get("hash") not in avoid:
                    break
            return self.run.start_trial(attrs, self.identity)

    # -- one candidate ----------------------------------------------------------------------

    def handler(self, kind: str) -> TrialHandler:
        """The handler of a trial kind (trial_handlers.py), built once; a trial without a known
        kind is a candidate, as trials stored before kinds existed are."""
        if kind not in HANDLERS:
            kind = CandidateHandler.kind
        if kind not in self._handlers:
            self._handlers[kind] = HANDLERS[kind](self)
        return self._handlers[kind]

    def process(self, record: TrialRecord) -> Outcome:
        """Evaluate one trial with its kind's handler; every failure becomes a verdict."""
        from opsearch.denormals import flush_denormals

        start = time.perf_counter()
        try:
            # bad candidates drive values into denormal floats, which the CPU handles up to
            # 25x slower; flushing them to zero changes no decision (see opsearch/denormals.py)
            hang_after = self.config.timeout_s + HANG_MARGIN_S if self.config.timeout_s > 0 else None
            with Heartbeat(self.run.storage, record.trial_id, self.config.heartbeat_s, hang_after), \
                    time_limit(self.config.timeout_s), flush_denormals():
                outcome = self.handler(record.kind).evaluate(record)
        except CandidateTimeout as e:
            outcome = Outcome(TrialState.FAIL, None, {"verdict": "failed:timeout", "reason": str(e)})
        except (MemoryError, _cuda_oom()) as e:
            _free_memory()
            outcome = Outcome(TrialState.FAIL, None, {"verdict": "failed:oom", "reason": _short(e)})
        except (KeyboardInterrupt, EnvironmentFault):
            raise
        except Exception as e:  # a bad candidate never takes the search down
            if disk_full(e) is not None:  # the disk's fault, not the candidate's: stop, exit 4
                raise disk_full_error(e) from None
            outcome = Outcome(TrialState.FAIL, None, {
                "verdict": f"failed:{type(e).__name__}", "reason": _short(e),
                "traceback": traceback.format_exc(limit=6)[-2000:]})
        outcome.attrs["elapsed_s"] = round(time.perf_counter() - start, 4)
        return outcome

    def derived_evaluator(self, key: tuple, make_config: Callable[[], Any]):
        """An evaluator for another config than the search's (a rung's steps, a re-ranking
        task), built on first use and kept: building one loads its data."""
        evaluator = self._derived_evaluators.get(key)
        if evaluator is None:
            from opsearch.rejection import FilterContext

            evaluator = FilterContext(eval_config=make_config(),
                                      evaluator_plugin=self.config.evaluator_plugin).get_evaluator()
            self._derived_evaluators[key] = evaluator
        return evaluator

    # -- the re-ranking stage (opsearch/rerank.py) ---------------------------------------------

    def _next_rerank(self) -> TrialRecord | None:
        """At the budget: wait until every candidate has finished (other workers may still train
        the last ones), enqueue the stage's missing items under the lock, then take one.
        None when the stage is off or every item is taken."""
        from opsearch import rerank

        if self.setup.rerank is None:
            return None
        while True:
            self._maybe_reap()
            record = self.run.pop_waiting(self.identity)  # a requeued candidate, or an item
            if record is not None:
                return record
            with self.lock:
                self._absorb(self.run.sync())
                if self.setup.funnel is not None:  # promotions due from the last results first
                    from opsearch import funnel
                    funnel.enqueue_missing(self.run, self.setup.funnel)
                pending = rerank.search_pending(self.run)
                if not pending:
                    rerank.enqueue_missing(self.run, self.setup.rerank)
            if not pending:
                return self.run.pop_waiting(self.identity)
            time.sleep(RERANK_POLL_S)

    # -- the funnel (opsearch/funnel.py) --------------------------------------------------------

    def _enqueue_promotions(self) -> None:
        """Enqueue the promotions the study's rungs call for (idempotent, under the lock)."""
        from opsearch import funnel

        if self.setup.funnel is None:
            return
        with self.lock:
            self._absorb(self.run.sync())
            funnel.enqueue_missing(self.run, self.setup.funnel)

    def _record_equivalence(self, record: TrialRecord) -> None:
        """After finish_trial, the record carries its verdict, values and equivalence attrs."""
        self.context.equivalence.add_trial(record)


# Trials whose function enters the equivalence cache: candidates, and the known layers, so that
# a candidate that rediscovers one is `duplicate:<baseline trial>` instead of trained again.
_CACHED_KINDS = ("candidate", "baseline")


def _is_duplicate(record: TrialRecord) -> bool:
    """Whether a finished trial repeated an earlier trial's function (verdict duplicate:<n>)."""
    verdict = record.user_attrs.get("verdict")
    return isinstance(verdict, str) and verdict.startswith("duplicate:")


def _grade(record: TrialRecord) -> float | None:
    """A rejected trial's grade (`RejectionPipeline.run`); None for anything else."""
    grade = record.user_attrs.get("grade")
    return float(grade) if isinstance(grade, (int, float)) and not isinstance(grade, bool) else None


def describe_graph(plain) -> dict[str, Any]:
    """The graph attributes stored with every candidate (contract: graph, formula; plus hash)."""
    from opsearch import graph as graph_mod

    attrs: dict[str, Any] = {"graph": graph_mod.to_json(plain)}
    try:
        attrs["formula"] = graph_mod.formula(plain)
        attrs["hash"] = graph_mod.canonical_hash(plain)
    except InvalidCandidate as e:  # still recorded; the validity filter will reject it
        attrs["formula"] = f"<invalid: {e}>"
    return attrs


def _cuda_oom():
    try:
        import torch
        return torch.cuda.OutOfMemoryError
    except (ImportError, AttributeError):  # pragma: no cover
        return MemoryError


def _free_memory() -> None:
    import gc
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (f"{type(e).__name__}: {text}" if text else type(e).__name__)[:300]


# --------------------------------------------------------------------------------------------
# The known layers in the queue (local_run.py runs the workers)


def enqueue_baselines(run: Run, setup: Setup) -> list[str]:
    """Queue the known layers not yet in the study; workers evaluate them like candidates."""
    from opsearch import layers

    run.sync()
    present = {r.user_attrs.get("layer") for r in run.trials()
               if r.kind == "baseline" and r.verdict != LOST}
    queued = []
    for name in setup.config.baselines:
        if name in present:
            continue
        attrs = {"kind": "baseline", "layer": name}
        attrs.update(describe_graph(layers.get_graph(name)))
        if not layers.built_like_candidates(name, setup.config):
            attrs.pop("hash", None)  # the equivalence's key: a layer built unlike the candidates
        run.enqueue(attrs)
        queued.append(name)
    if queued:
        run.sync()
    return queued
