"""The study: every candidate of a search as one trial in an Optuna storage.

Why Optuna storages: SQLite for one machine, PostgreSQL (any RDB URL) for many, a journal file
where no database is at hand, and optuna-dashboard opens all of them. One trial per candidate;
the stored user attributes are a contract (README, "Stored results"):

  verdict     "evaluated" | "rejected:<filter>" | "duplicate:<trial number>" | "failed:<reason>"
  formula, graph (our own JSON schema, never pickle), elapsed_s, acc/<arch> per architecture,
  genome, hash, kind ("candidate" | "baseline" | "rerank" | "promotion"), ...

The run's study holds the search (candidates, baselines); re-ranking items and funnel
promotions go to the stage studies beside it, ``<run>/rerank`` and ``<run>/promotion``
(opsearch/trials.py says why and how readers read both layouts). `Run` hands out, reaps and
requeues the trials of all three alike; trial ids are unique in a storage, numbers per study.

Trial states: evaluated and duplicate -> COMPLETE with one value per architecture (maximised);
rejected -> PRUNED; failed -> FAIL. A candidate is written RUNNING (one transaction) before any
work on it starts, and its result in one transaction when it ends, so a crash loses at most the
candidates in flight. A RUNNING trial whose worker died is found (a dead local pid at once, a
silent heartbeat after a grace period), failed with verdict "failed:worker_lost" and its
candidate enqueued again as a WAITING trial that the next free worker pops. A candidate whose
worker is lost a second time (its process crashed or was killed, or went silent: a layer that
segfaults, exhausts memory, hangs where no time limit reaches) is not handed out a third time:
it is failed with verdict "failed:worker_lost_twice" and the reasons, and counts toward the
budget like any failed candidate, so a poisonous candidate cannot stall a search. A worker
stopped on purpose (preempted, interrupted, its SLURM job requeued) is no fault of its candidate
and does not count.

The package, one job per module (the only part of opsearch that touches Optuna's private API,
written for Optuna 4 and 5: pyproject.toml bounds it):

  paths     run names, storage URLs, the files beside a run
  guard     faults of a storage: a full disk named, an outage waited out (StorageGuard)
  storage   opening a storage (SQLite, journal, RDB) under the creation lock; opening runs
  liveness  worker identity, heartbeats, workers stopped on purpose
  records   TrialRecord, the engine's view of a stored trial
  rdb       fast paths into an RDB storage (one-transaction writes, plain-SELECT reads)
  queue     Run: the trial queue of one run (record, hand out, reap, requeue)

Everything the rest of opsearch uses is imported from here.
"""
from __future__ import annotations

import optuna

from opsearch.study.guard import (DEFAULT_STORAGE_GRACE_S, DISK_FULL_ERRNOS, STORAGE_GRACE_ENV,
                                  StorageGuard, disk_full, disk_full_error, guard_storage,
                                  guarded_call, last_outage_end, no_retry, no_space_at,
                                  set_storage_grace, share_outage_notice, storage_grace_s,
                                  unreachable)
from opsearch.study.liveness import (HANDED_BACK_KEY, HANG_MARGIN_S, HEARTBEAT_KEY, HUNG_KEY,
                                     WORKER_KEY, Heartbeat, WorkerId, mark_stopped,
                                     scheduler_job, stopped_reason)
from opsearch.study.paths import (RUNS_DIR_ENV, is_url, resolve, run_dir, run_hint, run_url,
                                  runs_dir, storage_path)
from opsearch.study.queue import (LOSSES_KEY, LOST_REASONS_KEY, LOST_TWICE, MAX_WORKER_LOSSES,
                                  REQUEUED_KEYS, STUDY_FORMAT, Run)
from opsearch.study.rdb import _finish
from opsearch.study.records import TrialRecord
from opsearch.study.storage import (CREATION_LOCK_SUFFIX, creation_lock, open_run, open_storage,
                                    run_trials, set_study_system_attr, stage_trials, trial_id)
from opsearch.trials import LOST

optuna.logging.set_verbosity(optuna.logging.WARNING)

__all__ = [
    "CREATION_LOCK_SUFFIX", "DEFAULT_STORAGE_GRACE_S", "DISK_FULL_ERRNOS", "HANDED_BACK_KEY",
    "HANG_MARGIN_S", "HEARTBEAT_KEY", "HUNG_KEY", "LOSSES_KEY", "LOST", "LOST_REASONS_KEY",
    "LOST_TWICE", "MAX_WORKER_LOSSES", "REQUEUED_KEYS", "RUNS_DIR_ENV", "STORAGE_GRACE_ENV",
    "STUDY_FORMAT", "WORKER_KEY", "Heartbeat", "Run", "StorageGuard", "TrialRecord", "WorkerId",
    "_finish", "creation_lock", "disk_full", "disk_full_error", "guard_storage", "guarded_call",
    "is_url", "last_outage_end", "mark_stopped", "no_retry", "no_space_at", "open_run",
    "open_storage", "resolve", "run_dir", "run_hint", "run_trials", "run_url", "runs_dir",
    "scheduler_job", "set_storage_grace", "share_outage_notice", "stage_trials",
    "storage_grace_s", "storage_path", "stopped_reason", "set_study_system_attr", "trial_id", "unreachable",
]
