"""The trial queue of one run: its study and stage studies, candidates recorded RUNNING before
any work, results in one write, WAITING trials handed out to workers, and trials of lost workers
failed and enqueued again (see the package's docstring)."""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from opsearch.errors import EnvironmentFault, UserError
from opsearch.trials import (LOST, STAGE_KINDS, stage_study_name, stage_study_of,
                             uses_stage_studies)

from opsearch.study.guard import StorageGuard, guarded_call, last_outage_end
from opsearch.study.liveness import (HANDED_BACK_KEY, HEARTBEAT_KEY, HUNG_KEY, WORKER_KEY, WorkerId,
                                     stopped_reason)
from opsearch.study.paths import _one_line, _redact
from opsearch.study.rdb import _claim, _create_running, _finish, _read_rdb_trials
from opsearch.study.records import TrialRecord
from opsearch.study.storage import open_storage


LOST_TWICE = "failed:worker_lost_twice"  # lost MAX_WORKER_LOSSES times: not handed out again
MAX_WORKER_LOSSES = 2
# Carried from a lost trial to its requeued copy: how often the candidate lost its worker by its
# own fault (a crash, a kill, silence), and why
LOSSES_KEY = "worker_losses"
LOST_REASONS_KEY = "worker_lost_reasons"
# What a lost trial hands to its requeued copy: the candidate, or the rerank item (stage, seed, of_trial)
REQUEUED_KEYS = ("genome", "graph", "formula", "hash", "kind", "layer", "stage", "seed", "of_trial",
                 "rung", "origin", "parent")
STUDY_FORMAT = "opsearch.study/2"  # 2: rerank items and promotions in stage studies


def _guarded(method):
    """A Run method: its storage calls go through the run's guard (a full disk named)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return self.guard._named(method, self, *args, **kwargs)
    return wrapper


class Run:
    """One search's study and its stage studies: writes candidates, stage items and results,
    keeps an incremental view of the trials of all of them (`trials()`: the run's study's first)."""

    def __init__(self, storage: BaseStorage, study_name: str, url: str = ""):
        self.storage = storage
        self.url = url
        self.study_name = study_name
        self.guard = StorageGuard(url)
        self.guard._named(self._load)

    def _load(self) -> None:
        storage, study_name, url = self.storage, self.study_name, self.url
        try:
            self.study_id = storage.get_study_id_from_name(study_name)
        except KeyError:
            raise UserError(f"no run named {study_name!r} in {_redact(url)}") from None
        self.attrs = storage.get_study_user_attrs(self.study_id)
        self.archs: list[str] = list(self.attrs.get("archs", []))
        self._trials: dict[int, TrialRecord] = {}  # by trial_id
        self._unfinished: set[int] = set()
        self._waiting: set[int] = set()
        self._counted: set[int] = set()  # trials that count toward the budget
        self._poisonous: set[str] = set()  # hashes of candidates that lost their worker twice
        self._stage_ids: dict[str, int] = {}  # kind -> id of its stage study, once it exists
        self._max_ids: dict[int, int] = {self.study_id: -1}  # per study: the newest trial read

    @property
    def stage_studies(self) -> bool:
        """Whether this run keeps rerank items and promotions in stage studies (a run created
        before them keeps them in its own study)."""
        return uses_stage_studies(self.attrs)

    def _study_for(self, kind: str) -> int:
        """The study a new trial of `kind` goes into: the run's, or its stage study (created on
        first use; another worker creating it at once is fine)."""
        if kind not in STAGE_KINDS or not self.stage_studies:
            return self.study_id
        if kind not in self._stage_ids:
            name = stage_study_name(self.study_name, kind)
            try:
                study_id = self.storage.get_study_id_from_name(name)
            except KeyError:
                directions = self.storage.get_study_directions(self.study_id)
                try:
                    study_id = self.storage.create_new_study(list(directions), name)
                except optuna.exceptions.DuplicatedStudyError:
                    study_id = self.storage.get_study_id_from_name(name)
                else:
                    self.storage.set_study_user_attr(study_id, "stage_of", self.study_name)
                    self.storage.set_study_user_attr(study_id, "kind", kind)
                    self.storage.set_study_user_attr(study_id, "archs", self.archs)
            self._found_stage(kind, study_id)
        return self._stage_ids[kind]

    def _found_stage(self, kind: str, study_id: int) -> None:
        self._stage_ids[kind] = study_id
        self._max_ids.setdefault(study_id, -1)

    def _find_stage_studies(self) -> None:
        """Stage studies another worker created since the last look."""
        if not self.stage_studies:
            return
        for kind in STAGE_KINDS:
            if kind not in self._stage_ids:
                try:
                    self._found_stage(kind, self.storage.get_study_id_from_name(
                        stage_study_name(self.study_name, kind)))
                except KeyError:
                    pass

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def create_or_open(cls, url: str, study_name: str, attrs: dict[str, Any],
                       compatible_keys: Sequence[str]) -> "Run":
        """Open the run, creating it if needed; refuse to mix incompatible searches in one study."""
        return StorageGuard(url)._named(cls._create_or_open, url, study_name, attrs, compatible_keys)

    @classmethod
    def _create_or_open(cls, url: str, study_name: str, attrs: dict[str, Any],
                        compatible_keys: Sequence[str]) -> "Run":
        storage = open_storage(url)
        directions = [optuna.study.StudyDirection.MAXIMIZE] * len(attrs["archs"])
        try:
            existing = {s.study_name for s in storage.get_all_studies()}
        except EnvironmentFault:
            raise
        except Exception as e:
            raise UserError(f"cannot read study storage {_redact(url)}: {_one_line(e)}") from e
        if study_name not in existing:
            try:
                study_id = storage.create_new_study(directions, study_name)
            except optuna.exceptions.DuplicatedStudyError:
                study_id = storage.get_study_id_from_name(study_name)  # another worker won
            else:  # "archs", the attribute other workers wait for, last
                for key, value in sorted({"format": STUDY_FORMAT, **attrs}.items(),
                                         key=lambda kv: kv[0] == "archs"):
                    storage.set_study_user_attr(study_id, key, value)
        run = cls(storage, study_name, url)
        run._wait_for_attrs(attrs)
        for key in compatible_keys:
            if key in run.attrs and run.attrs[key] != attrs.get(key):
                raise UserError(
                    f"run {study_name!r} was created with {key}={run.attrs[key]!r}, not "
                    f"{attrs.get(key)!r}; use another --name for a different search")
        return run

    def _wait_for_attrs(self, attrs: dict[str, Any], timeout: float = 30.0) -> None:
        """A study just created by another worker may not have its attributes yet."""
        deadline = time.time() + timeout
        while "archs" not in self.attrs and time.time() < deadline:
            time.sleep(0.2)
            self.attrs = self.storage.get_study_user_attrs(self.study_id)
        if "archs" not in self.attrs and set(self.attrs) <= {"format", *attrs} \
                and not self.storage.get_n_trials(self.study_id):
            # its creation was cut off (a full disk, an outage) after the study and before all
            # its attributes: complete it ("archs", the one waited for, last)
            for key, value in {"format": STUDY_FORMAT, **attrs}.items():
                if key != "archs":
                    self.storage.set_study_user_attr(self.study_id, key, value)
            self.storage.set_study_user_attr(self.study_id, "archs", attrs["archs"])
            self.attrs = self.storage.get_study_user_attrs(self.study_id)
        if "archs" not in self.attrs:
            raise UserError(f"study {self.study_name!r} in {_redact(self.url)} is not an opsearch "
                            "run (no 'archs' attribute)")
        self.archs = list(self.attrs["archs"])

    # -- writes -----------------------------------------------------------------------------

    @_guarded
    def start_trial(self, user_attrs: dict[str, Any], worker: WorkerId | None = None) -> TrialRecord:
        """Record a candidate RUNNING, with its attributes, in one write."""
        system_attrs = {}
        if worker is not None:
            system_attrs = {WORKER_KEY: worker.to_json(), HEARTBEAT_KEY: time.time()}
        template = FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
            datetime_complete=None, params={}, distributions={}, user_attrs=dict(user_attrs),
            system_attrs=system_attrs, intermediate_values={}, trial_id=-1)
        trial_id, number = guarded_call(self.storage, _create_running, self.study_id, template)
        record = TrialRecord(number, trial_id, TrialState.RUNNING, None, dict(user_attrs),
                             system_attrs, template.datetime_start, self.study_id)
        self._remember(record)
        return record

    @_guarded
    def enqueue(self, user_attrs: dict[str, Any]) -> int:
        """A WAITING trial holding a candidate (a baseline, a rerank item, a promotion: in the
        study of its kind) that some worker will pop and evaluate."""
        template = FrozenTrial(
            number=-1, state=TrialState.WAITING, value=None, datetime_start=None,
            datetime_complete=None, params={}, distributions={}, user_attrs=dict(user_attrs),
            system_attrs={}, intermediate_values={}, trial_id=-1)
        study_id = self._study_for(str(user_attrs.get("kind", "candidate")))
        trial_id = self.storage.create_new_trial(study_id, template_trial=template)
        number = self.storage.get_trial_number_from_id(trial_id)
        self._remember(TrialRecord(number, trial_id, TrialState.WAITING, None, dict(user_attrs), {},
                                   None, study_id))
        return trial_id

    @_guarded
    def pop_waiting(self, worker: WorkerId, skip_kinds: Sequence[str] = ()) -> TrialRecord | None:
        """Take a WAITING trial (a requeued candidate, a baseline) known since the last sync;
        trials of `skip_kinds` stay waiting (rerank items when the stage is switched off)."""
        for trial_id in sorted(self._waiting):
            record = self._trials[trial_id]
            if record.kind in skip_kinds:
                continue
            mine = {WORKER_KEY: worker.to_json(), HEARTBEAT_KEY: time.time()}
            try:
                owned = guarded_call(self.storage, _claim, record.trial_id, mine)
            except optuna.exceptions.UpdateFinishedTrialError:
                owned = False  # finished by another worker, or reaped while we claimed it
            except EnvironmentFault:  # the storage stayed away past its grace period, a full disk
                raise
            except Exception:
                owned = False  # lost a race on the database lock: another worker has it
            self._waiting.discard(trial_id)
            if not owned:
                continue  # another worker took it
            record.system_attrs.update(mine)
            record.state = TrialState.RUNNING
            record.datetime_start = datetime.now()
            return record
        return None

    @_guarded
    def finish_trial(self, record: TrialRecord, state: TrialState,
                     values: Sequence[float] | None, user_attrs: dict[str, Any]) -> bool:
        """Write a candidate's result, values and final state in one transaction.

        Returns False when the trial was already finished by someone else (a reaper that took it
        for lost): the result is then dropped, the requeued copy will produce it again.
        """
        values = list(values) if values is not None else None
        if state == TrialState.COMPLETE and (values is None or any(math.isnan(v) for v in values)):
            raise ValueError("a COMPLETE trial needs one finite value per architecture")
        try:
            guarded_call(self.storage, _finish, record.trial_id, state, values, user_attrs)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        record.state = state
        record.values = tuple(values) if values is not None else None
        record.user_attrs.update(user_attrs)
        self._remember(record)
        return True

    # -- reading ----------------------------------------------------------------------------

    @_guarded
    def sync(self) -> list[TrialRecord]:
        """Fetch trials created or finished since the last sync (in the run's study and its stage
        studies); returns those newly finished."""
        storage = self.storage
        fresh: list[TrialRecord] | None = None
        if isinstance(storage, RDBStorage):  # stage studies new to this run found in passing
            missing = [stage_study_name(self.study_name, kind) for kind in STAGE_KINDS
                       if self.stage_studies and kind not in self._stage_ids]
            fresh = _read_rdb_trials(storage, dict(self._max_ids), self._unfinished, missing)
            for study_id in sorted({r.study_id for r in fresh or ()} - set(self._max_ids)):
                stage = stage_study_of(storage.get_study_name_from_id(study_id), [self.study_name])
                if stage is not None:
                    self._found_stage(stage[1], study_id)
        if fresh is None:
            self._find_stage_studies()
            after = dict(self._max_ids)
            fresh = [TrialRecord.from_frozen(t, study_id)
                     for study_id, after_id in after.items()
                     for t in storage.get_all_trials(study_id, deepcopy=False)
                     if t._trial_id > after_id or t._trial_id in self._unfinished]
        newly_finished = []
        for record in fresh:
            # "read up to here" moves only with what a sync read: a trial this worker created
            # can have a higher id than another worker's that it has not read yet
            if record.study_id in self._max_ids:
                self._max_ids[record.study_id] = max(self._max_ids[record.study_id], record.trial_id)
            known = self._trials.get(record.trial_id)
            if record.state.is_finished() and (known is None or not known.state.is_finished()):
                newly_finished.append(record)
            self._remember(record)
        newly_finished.sort(key=lambda r: r.number)
        return newly_finished

    def _remember(self, record: TrialRecord) -> None:
        self._trials[record.trial_id] = record
        if record.state.is_finished():
            self._unfinished.discard(record.trial_id)
        else:
            self._unfinished.add(record.trial_id)
        if record.counts_toward_budget:
            self._counted.add(record.trial_id)
        else:
            self._counted.discard(record.trial_id)
        if record.state == TrialState.WAITING:
            self._waiting.add(record.trial_id)
        else:
            self._waiting.discard(record.trial_id)
        if record.verdict == LOST_TWICE and isinstance(record.user_attrs.get("hash"), str):
            self._poisonous.add(record.user_attrs["hash"])

    def trials(self) -> list[TrialRecord]:
        """The run's study's trials by number, then each stage study's."""
        rank = {study_id: 1 + STAGE_KINDS.index(kind) for kind, study_id in self._stage_ids.items()}
        return sorted(self._trials.values(), key=lambda r: (rank.get(r.study_id, 0), r.number))

    def frozen_trials(self) -> list[FrozenTrial]:
        """Every trial as Optuna's FrozenTrial (what the reports read), as `run_trials` gives."""
        self._find_stage_studies()
        out = self.storage.get_all_trials(self.study_id, deepcopy=False)
        for kind in STAGE_KINDS:
            if kind in self._stage_ids:
                out += self.storage.get_all_trials(self._stage_ids[kind], deepcopy=False)
        return out

    def candidates_counted(self) -> int:
        return len(self._counted)

    def poisonous(self) -> set[str]:
        """Hashes of the functions that lost their worker twice (verdict failed:worker_lost_twice):
        proposing one again would kill workers again."""
        return set(self._poisonous)

    def unfinished(self) -> list[TrialRecord]:
        return [self._trials[i] for i in self._unfinished]

    def baselines(self) -> dict[str, TrialRecord]:
        return {r.user_attrs.get("layer"): r for r in self._trials.values()
                if r.kind == "baseline" and r.state == TrialState.COMPLETE}

    # -- lost workers -----------------------------------------------------------------------

    @_guarded
    def reap_lost(self, grace_s: float, now: float | None = None,
                  me: WorkerId | None = None) -> list[int]:
        """Fail RUNNING trials whose worker is gone and enqueue their candidates again.

        A local worker is lost as soon as its process is gone; a worker whose scheduler job is
        `me`'s own job (a requeued SLURM job: same job id, new process) at once; any worker when
        its heartbeat is older than `grace_s` (the only sign for another host). Returns the
        numbers of the trials reaped.
        """
        now = time.time() if now is None else now
        reaped = []
        for record in list(self._trials.values()):
            if record.state != TrialState.RUNNING:
                continue
            fresh = self.storage.get_trial(record.trial_id)
            if fresh.state != TrialState.RUNNING:
                self._remember(TrialRecord.from_frozen(fresh, record.study_id))
                continue
            worker = WorkerId.from_json(fresh.system_attrs.get(WORKER_KEY))
            beat = fresh.system_attrs.get(HEARTBEAT_KEY)
            dead = worker is not None and worker.is_dead_here()
            superseded = worker is not None and me is not None and me.supersedes(worker)
            # a worker cannot beat while the storage is away: silence counts from its return
            silent = isinstance(beat, (int, float)) and now - max(beat, last_outage_end()) > grace_s
            if not (dead or superseded or silent):
                continue
            stopped = stopped_reason(worker) if dead else None
            if stopped is not None:  # it stopped on purpose: its candidate back, as it was
                if self._hand_back(record.trial_id, f"its worker stopped: {stopped}"):
                    reaped.append(record.number)
                continue
            reason = ("its worker process is gone" if dead else
                      f"its job {worker.job} was requeued" if superseded else
                      f"no heartbeat for {now - beat:.0f} s")
            if HUNG_KEY in fresh.system_attrs and not superseded:
                reason = f"it hung past its time limit ({reason})"
            # a requeued SLURM job was preempted or timed out: the scheduler's doing, not the
            # candidate's; a dead or silent worker may have been killed by its candidate
            if self._requeue(record.trial_id, record.number, fresh.user_attrs, reason,
                             candidate_fault=not superseded):
                reaped.append(record.number)
        if reaped:
            self.sync()
        return reaped

    def _hand_back(self, trial_id: int, reason: str) -> bool:
        """A RUNNING trial back to WAITING, the same trial (no failed:* verdict, no copy)."""
        try:
            self.storage.set_trial_system_attr(trial_id, HANDED_BACK_KEY, reason)
            return bool(self.storage.set_trial_state_values(trial_id, TrialState.WAITING))
        except optuna.exceptions.UpdateFinishedTrialError:
            return False

    @_guarded
    def release(self, record: TrialRecord, reason: str) -> bool:
        """Give back a candidate this worker holds but will not finish (it is being stopped:
        preempted, timed out, interrupted): failed as lost and enqueued again at once, so another
        worker (or this job, requeued) takes it without waiting for a grace period."""
        ok = self._requeue(record.trial_id, record.number, record.user_attrs, reason)
        if ok:
            self.sync()
        return ok

    def _requeue(self, trial_id: int, number: int, user_attrs: dict[str, Any], reason: str,
                 candidate_fault: bool = False) -> bool:
        """Fail a trial as lost and enqueue its candidate again; or, when the candidate lost its
        worker by its own fault for the MAX_WORKER_LOSSES-th time, fail it for good."""
        losses = _int(user_attrs.get(LOSSES_KEY)) + (1 if candidate_fault else 0)
        earlier = user_attrs.get(LOST_REASONS_KEY)
        reasons = [str(r) for r in earlier] if isinstance(earlier, list) else []
        if candidate_fault:
            reasons.append(f"trial {number}: {reason}")
        if candidate_fault and losses >= MAX_WORKER_LOSSES:
            attrs = {"verdict": LOST_TWICE, LOSSES_KEY: losses, LOST_REASONS_KEY: reasons,
                     "reason": f"lost its worker {losses} times, not handed out again "
                               f"({'; '.join(reasons)})"}
            try:
                guarded_call(self.storage, _finish, trial_id, TrialState.FAIL, None, attrs)
            except optuna.exceptions.UpdateFinishedTrialError:
                return False
            return True
        lost = {"verdict": LOST, "reason": reason}
        if losses:  # on the lost trial too: what a repair (requeue_orphans) hands on
            lost.update({LOSSES_KEY: losses, LOST_REASONS_KEY: reasons})
        try:
            guarded_call(self.storage, _finish, trial_id, TrialState.FAIL, None, lost)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False  # finished meanwhile (by its worker or another reaper)
        self.enqueue(_copy_attrs(number, {**user_attrs, **lost}))
        return True

    @_guarded
    def requeue_orphans(self) -> list[int]:
        """Enqueue the candidates of lost trials that have no copy: their reaper stopped between
        failing the trial and enqueueing its copy (killed, or the storage went away for longer
        than its grace period), which would have left the candidate out of the search. Returns
        the numbers of the lost trials repaired. (Baselines, rerank items and promotions are
        enqueued again by their own stages when missing.)"""
        copies = {r.user_attrs.get("retry_of") for r in self._trials.values()}
        orphans = [r for r in self.trials() if r.verdict == LOST and r.kind == "candidate"
                   and r.number not in copies]
        for record in orphans:
            self.enqueue(_copy_attrs(record.number, record.user_attrs))
        if orphans:
            self.sync()
        return [r.number for r in orphans]


def _copy_attrs(number: int, user_attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes of the requeued copy of lost trial `number`."""
    attrs = {k: v for k, v in user_attrs.items() if k in REQUEUED_KEYS}
    attrs["retry_of"] = number
    if _int(user_attrs.get(LOSSES_KEY)):
        attrs[LOSSES_KEY] = user_attrs[LOSSES_KEY]
        attrs[LOST_REASONS_KEY] = user_attrs.get(LOST_REASONS_KEY) or []
    return attrs


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
