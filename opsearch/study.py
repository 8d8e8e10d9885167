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
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import random
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from opsearch.errors import DiskFull, EnvironmentFault, StorageUnavailable, UserError
from opsearch.trials import (LOST, STAGE_KINDS, stage_study_name, stage_study_of,
                             uses_stage_studies)

optuna.logging.set_verbosity(optuna.logging.WARNING)

RUNS_DIR_ENV = "OPSEARCH_RUNS_DIR"
WORKER_KEY = "opsearch:worker"
HEARTBEAT_KEY = "opsearch:heartbeat"
LOST_TWICE = "failed:worker_lost_twice"  # lost MAX_WORKER_LOSSES times: not handed out again
MAX_WORKER_LOSSES = 2
# Carried from a lost trial to its requeued copy: how often the candidate lost its worker by its
# own fault (a crash, a kill, silence), and why
LOSSES_KEY = "worker_losses"
LOST_REASONS_KEY = "worker_lost_reasons"
# What a lost trial hands to its requeued copy: the candidate, or the rerank item (stage, seed, of_trial)
REQUEUED_KEYS = ("genome", "graph", "formula", "hash", "kind", "layer", "stage", "seed", "of_trial",
                 "rung")
STUDY_FORMAT = "opsearch.study/2"  # 2: rerank items and promotions in stage studies


def runs_dir() -> str:
    return os.environ.get(RUNS_DIR_ENV, "runs")


def run_url(name: str) -> str:
    """The default storage of a run: an SQLite file under runs/<name>/."""
    return f"sqlite:///{os.path.join(runs_dir(), name, 'study.db')}"


def is_url(text: str) -> bool:
    return "://" in text or text.endswith((".log", ".journal"))


# --------------------------------------------------------------------------------------------
# Storages


def open_storage(url: str, *, create: bool = True) -> BaseStorage:
    """An Optuna storage for `url`; a URL that does not open raises UserError (one line).

    sqlite:///path  WAL journal, synchronous=NORMAL and a long busy timeout, so that several
                    processes share the file safely and a commit costs no fsync.
    journal:///path (or a path ending in .log / .journal)  Optuna's journal file storage.
    anything else   an SQLAlchemy URL (postgresql://, mysql://, ...) for RDBStorage.
    """
    if url.startswith("journal://") or (url.endswith((".log", ".journal")) and "://" not in url):
        path = url[len("journal://"):] if url.startswith("journal://") else url
        path = path[1:] if path.startswith("//") else path
        if not create and not os.path.exists(path):
            raise UserError(f"no journal file at {path}")
        _ensure_parent(path)
        from optuna.storages.journal import JournalStorage
        try:
            with creation_lock(path):
                storage = StorageGuard(url).call(lambda: JournalStorage(_journal_backend(path)))
            return guard_storage(storage, url)
        except EnvironmentFault:
            raise
        except Exception as e:
            if disk_full(e) is not None:
                raise disk_full_error(e, path) from None
            raise UserError(f"cannot open journal storage {path}: {_one_line(e)}") from e
    if "://" not in url:
        raise UserError(f"not a storage URL: {url!r} (expected sqlite:///FILE, postgresql://..., "
                        "journal:///FILE)")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            if not create and not os.path.exists(path):
                raise UserError(f"no study database at {path}")
            _ensure_parent(path)
            if os.path.exists(path) and not _looks_like_sqlite(path):
                raise UserError(f"{path} is not an SQLite database")
        engine_kwargs["connect_args"] = {"timeout": 120}
    else:
        engine_kwargs["pool_pre_ping"] = True
        # psycopg logs a warning of its own for a connection lost in a database restart; the
        # guard says what matters in one line (StorageGuard)
        import logging
        logging.getLogger("psycopg").setLevel(logging.ERROR)
    try:
        storage = StorageGuard(url).call(_create_rdb_storage, url, engine_kwargs)
    except EnvironmentFault:
        raise
    except ImportError as e:
        raise UserError(f"cannot open storage {_redact(url)}: a database driver is missing "
                        f"({_one_line(e.__cause__ or e)}); for PostgreSQL: pip install "
                        "'psycopg[binary]'") from e
    except Exception as e:
        if disk_full(e) is not None or _full_here(e, storage_path(url)):
            raise disk_full_error(e, storage_path(url) or _redact(url)) from None
        raise UserError(f"cannot open storage {_redact(url)}: {_one_line(e)}") from e
    if url.startswith("sqlite:"):
        _tune_sqlite(storage)
    return guard_storage(storage, url)


def storage_path(url: str) -> str | None:
    """The file of a file-backed storage (SQLite, journal); None for a database server."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        return None if path in ("", ":memory:") else path
    if url.startswith("journal://"):
        path = url[len("journal://"):]
        return path[1:] if path.startswith("//") else path
    if "://" not in url and url.endswith((".log", ".journal")):
        return url
    return None


# --------------------------------------------------------------------------------------------
# Faults of the storage's surroundings: a full disk

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SQLITE_FULL = 13
_PG_DISK_FULL = "53100"
_DISK_FULL_TEXTS = ("database or disk is full", "no space left on device", "disk quota exceeded")


def _chain(e: BaseException):
    """e, its causes and contexts, and the driver errors SQLAlchemy wraps (`.orig`)."""
    seen: set[int] = set()
    stack: list[Any] = [e]
    while stack:
        err = stack.pop()
        if not isinstance(err, BaseException) or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        stack += [err.__cause__, err.__context__, getattr(err, "orig", None)]


def disk_full(e: BaseException) -> BaseException | None:
    """The error in e's chain that says a disk (or a quota) is full, else None: an OSError
    ENOSPC/EDQUOT, SQLite's SQLITE_FULL, PostgreSQL's disk_full (53100)."""
    said = None  # a wrapper that only quotes the driver's message, if nothing better
    for err in _chain(e):
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return err
        if getattr(err, "sqlite_errorcode", None) == _SQLITE_FULL:
            return err
        if _PG_DISK_FULL in (getattr(err, "sqlstate", None), getattr(err, "pgcode", None)):
            return err
        if said is None and any(t in str(err).lower() for t in _DISK_FULL_TEXTS):
            said = err
    return said


def no_space_at(path: str | None, below: int = 1 << 16) -> bool:
    """Whether the filesystem that holds `path` (a file or folder) has less than `below` bytes
    free. SQLite on a full disk often says only "disk I/O error" (its shared-memory file
    cannot grow): with no space left where the database lives, that is a full disk too."""
    if not path:
        return False
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bfree * st.f_frsize < below


def _full_here(e: BaseException, path: str | None) -> bool:
    """A storage error (a database's or the filesystem's, not a message of ours) while the disk
    of `path` has no space left."""
    import sqlite3

    import sqlalchemy.exc

    kinds = (OSError, sqlite3.Error, sqlalchemy.exc.SQLAlchemyError,
             optuna.exceptions.StorageInternalError)
    return any(isinstance(err, kinds) for err in _chain(e)) and no_space_at(path)


def disk_full_error(e: BaseException, path: str | None = None) -> DiskFull:
    """The one-line DiskFull for `e`, naming the file that could not be written (an OSError's
    own file name if it has one, else `path`)."""
    err = disk_full(e) or e
    named = getattr(err, "filename", None) if isinstance(err, OSError) else None
    where = named or path or "a file"
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    else:
        lines = str(getattr(err, "orig", None) or err).strip().splitlines()
        reason = lines[0] if lines else type(err).__name__
    return DiskFull(f"no space left on device: cannot write {where} ({reason}); nothing was "
                    "written half: free space and run the same command again")


# --------------------------------------------------------------------------------------------
# Faults of the storage: an outage (a database restart, a fail-over, a shared filesystem away)

STORAGE_GRACE_ENV = "OPSEARCH_STORAGE_GRACE_S"
DEFAULT_STORAGE_GRACE_S = 300.0
_grace_setting: list[float | None] = [None]  # the search's storage_grace_s, once it is known
_DROPPED_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ENOTCONN,
                             errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED,
                             errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})
# Errors a database gives when it is there but says no: retrying does not help
_REFUSALS = ("password authentication failed", "authentication failed", "no pg_hba.conf entry",
             "could not translate host name", "name or service not known", "does not exist",
             "permission denied", "access denied", "unknown database", "invalid dsn",
             "readonly database", "read-only database", "no such table", "not a database")


def set_storage_grace(seconds: float | None) -> None:
    """The grace period of this process's storage calls (a search's `storage_grace_s`); None:
    $OPSEARCH_STORAGE_GRACE_S, else DEFAULT_STORAGE_GRACE_S."""
    _grace_setting[0] = seconds


def storage_grace_s() -> float:
    if _grace_setting[0] is not None:
        return float(_grace_setting[0])
    text = os.environ.get(STORAGE_GRACE_ENV, "").strip()
    if not text:
        return DEFAULT_STORAGE_GRACE_S
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{STORAGE_GRACE_ENV} must be a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise UserError(f"{STORAGE_GRACE_ENV} must be >= 0, got {text!r}")
    return value


def unreachable(e: BaseException) -> bool:
    """Whether e says the storage could not be reached (a connection refused, dropped or timed
    out; a server shutting down or starting up; a shared filesystem gone), as opposed to a
    storage that answered (a constraint, a finished trial, a wrong password or database name)."""
    import sqlalchemy.exc

    if isinstance(e, (optuna.exceptions.UpdateFinishedTrialError, optuna.exceptions.DuplicatedStudyError,
                      KeyError, EnvironmentFault, UserError)) or disk_full(e) is not None:
        return False
    for err in _chain(e):
        text = str(err).lower()
        if any(r in text for r in _REFUSALS):
            return False
        if isinstance(err, sqlalchemy.exc.DBAPIError) and getattr(err, "connection_invalidated", False):
            return True
        if isinstance(err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                            sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError)):
            return True
        if isinstance(err, OSError) and err.errno in _DROPPED_ERRNOS:
            return True
    return False


class _Outage:
    """What this process says about an outage: one line when it starts, one when it ends; and
    when the last one ended (reapers give every worker a full grace period after it)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.since: float | None = None  # time.time() of the first failed call
        self.ended = 0.0  # time.time() when the storage answered again
        self.said = False
        # shared by the local workers of one search (a multiprocessing Value: when the outage
        # was said, 0 if not), so that one of them says it, not each
        self.shared: Any = None

    def failed(self, url: str, grace: float, e: BaseException) -> None:
        with self.lock:
            if self.since is not None:
                return
            self.since = time.time()
            self.said = self._claim()
        if self.said:
            _say(f"storage unreachable, retrying for up to {grace:g} s ({_redact(url)}: "
                 f"{_one_line(_root(e))})")

    def answered(self) -> None:
        with self.lock:
            if self.since is None:
                return
            took, self.since, self.ended = time.time() - self.since, None, time.time()
            said, self.said = self.said, False
        if said:
            if self.shared is not None:
                with self.shared.get_lock():
                    self.shared.value = 0.0
            _say(f"storage reachable again after {took:.0f} s; going on")

    def _claim(self) -> bool:
        if self.shared is None:
            return True
        with self.shared.get_lock():
            if self.shared.value and time.time() - self.shared.value < 3600:
                return False  # another local worker said it
            self.shared.value = time.time()
            return True


_outage = _Outage()
_retry_state = threading.local()


def share_outage_notice(value: Any) -> None:
    """Local workers of one search share `value` (multiprocessing.Value("d")), so that an outage
    they all meet is said once."""
    _outage.shared = value


def last_outage_end() -> float:
    """time.time() when this process's storage last came back after an outage (0: never)."""
    return _outage.ended


@contextlib.contextmanager
def no_retry():
    """Storage calls in this block fail at once instead of waiting out an outage (a heartbeat:
    the next beat is as good as a retry)."""
    previous = getattr(_retry_state, "off", False)
    _retry_state.off = True
    try:
        yield
    finally:
        _retry_state.off = previous


def _say(message: str) -> None:
    import sys

    print(f"opsearch: {message}", file=sys.stderr, flush=True)


def _root(e: BaseException) -> BaseException:
    """The driver's own error under SQLAlchemy's and Optuna's wrappers."""
    deepest = e
    for err in _chain(e):
        if not isinstance(err, (optuna.exceptions.StorageInternalError,)):
            deepest = getattr(err, "orig", None) or err
            break
    return deepest


class StorageGuard:
    """The one policy every storage call of a worker and of the commands goes through.

    - The storage cannot be reached (`unreachable`): the call is tried again with exponential
      backoff (0.5 s doubling to 10 s, with jitter) for up to the storage grace period
      (`storage_grace_s`: a search's --storage-grace, else $OPSEARCH_STORAGE_GRACE_S, else
      300 s); stderr says so once, and again when the storage is back. Past it: StorageUnavailable
      (exit status 3), the study as the last successful write left it.
    - A full disk: DiskFull naming the storage's file (exit status 4).
    Each guarded call is one Optuna storage call or one of our own one-transaction writes, so a
    retried call repeats one transaction. Calls nest (one of our transactions, then the storage
    methods it calls): only the outermost retries, the inner ones pass their errors up. Known
    limits: a commit whose answer the outage swallowed is tried again (a result then found
    already written is kept, its worker just does not count it; a new trial may be written
    twice, the copy reaped later as lost); a lost trial and its requeued copy are two writes
    (`Run.requeue_orphans` repairs a pair cut in two)."""

    def __init__(self, url: str):
        self.url = url

    def call(self, fn, *args, **kwargs):
        if getattr(_retry_state, "active", False) or getattr(_retry_state, "off", False):
            return self._named(fn, *args, **kwargs)
        _retry_state.active = True
        try:
            return self._retrying(fn, *args, **kwargs)
        finally:
            _retry_state.active = False

    def _named(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EnvironmentFault:
            raise
        except Exception as e:
            path = storage_path(self.url)
            if disk_full(e) is not None or _full_here(e, path):
                raise disk_full_error(e, path or _redact(self.url)) from None
            raise

    def _retrying(self, fn, *args, **kwargs):
        deadline, delay = None, 0.5
        while True:
            try:
                result = self._named(fn, *args, **kwargs)
            except Exception as e:
                if not unreachable(e):
                    raise
                grace = storage_grace_s()
                now = time.monotonic()
                if deadline is None:
                    deadline = now + grace
                    _outage.failed(self.url, grace, e)
                if now >= deadline:
                    raise StorageUnavailable(
                        f"storage unreachable for {grace:g} s ({_redact(self.url)}: "
                        f"{_one_line(_root(e))}); the study is as its last write left it: run "
                        "the same command again once the storage answers") from None
                time.sleep(min(delay * (0.75 + 0.5 * random.random()), max(0.0, deadline - now)))
                delay = min(delay * 2, 10.0)
                continue
            _outage.answered()
            return result

    def wrap(self, method):
        @functools.wraps(method)
        def guarded(*args, **kwargs):
            return self.call(method, *args, **kwargs)
        return guarded


# The storage API that Optuna's Study and our Run call: each goes through the storage's guard.
_STORAGE_METHODS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies", "create_new_trial",
    "set_trial_param", "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials",
    "get_n_trials", "get_best_trial", "get_trial_params", "get_trial_user_attrs",
    "get_trial_system_attrs", "record_heartbeat", "fail_stale_trials", "check_trial_is_updatable")


def guard_storage(storage: BaseStorage, url: str) -> BaseStorage:
    """Route the storage's API through a StorageGuard for `url` (on the instance: it stays an
    RDBStorage or JournalStorage for whoever checks)."""
    if getattr(storage, "_opsearch_guard", None) is not None:
        return storage
    guard = StorageGuard(url)
    for name in _STORAGE_METHODS:
        method = getattr(storage, name, None)
        if callable(method):
            setattr(storage, name, guard.wrap(method))
    storage._opsearch_guard = guard
    return storage


def guarded_call(storage: BaseStorage, fn, *args, **kwargs):
    """fn(storage, ...) (one of our own transactions) through the storage's guard, if any."""
    guard = getattr(storage, "_opsearch_guard", None)
    if guard is None:
        return fn(storage, *args, **kwargs)
    return guard.call(fn, storage, *args, **kwargs)


def _guarded(method):
    """A Run method: its storage calls go through the run's guard (a full disk named)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return self.guard._named(method, self, *args, **kwargs)
    return wrapper


def _journal_backend(path: str):
    """Optuna's journal file backend, with appends that leave nothing written half."""
    from optuna.storages.journal import JournalFileBackend

    try:
        from optuna.storages.journal._file import get_lock_file
    except ImportError:  # a future Optuna moved it: its own append then
        return JournalFileBackend(path)

    class WholeLinesJournalFileBackend(JournalFileBackend):
        """An append that cannot be completed (a full disk) is cut off again, under the
        journal's lock; a partial last line left by a writer killed mid-append is cut off before
        the next append. Without this, the next line was glued to the partial one and every
        reader of the journal failed from there on ("Invalid log format")."""

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs)
                    + "\n").encode("utf-8")
            with get_lock_file(self._lock):
                fd = os.open(self._file_path, os.O_RDWR)
                try:
                    end = os.lseek(fd, 0, os.SEEK_END)
                    keep = _whole_lines_end(fd, end)
                    if keep != end:
                        os.ftruncate(fd, keep)
                    try:
                        written = 0
                        while written < len(data):
                            written += os.pwrite(fd, data[written:], keep + written)
                        os.fsync(fd)
                    except BaseException:
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, keep)
                        raise
                finally:
                    os.close(fd)

    return WholeLinesJournalFileBackend(path)


def _whole_lines_end(fd: int, end: int, chunk: int = 65536) -> int:
    """The offset just after the file's last newline (0 if it has none)."""
    if end == 0 or os.pread(fd, 1, end - 1) == b"\n":
        return end
    pos = end
    while pos > 0:
        start = max(0, pos - chunk)
        block = os.pread(fd, pos - start, start)
        i = block.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


CREATION_LOCK_SUFFIX = ".create-lock"


@contextlib.contextmanager
def creation_lock(path: str):
    """Hold an exclusive lock beside a storage file while it is opened (and maybe created).

    Why: workers of a job array start at the same instant on a brand-new study; each would create
    the schema, and all but one died with `UNIQUE constraint failed: alembic_version`. The lock
    file (PATH.create-lock) is left in place: removing it would reopen the race. Its name must
    not be PATH.lock: Optuna's journal file backend takes that name for its own lock, and a file
    left there made every journal write wait 30 s before Optuna broke the "stale" lock."""
    import fcntl

    _ensure_parent(path)
    try:
        fd = os.open(path + CREATION_LOCK_SUFFIX, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only folder: nobody can create the storage there anyway
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _create_rdb_storage(url: str, engine_kwargs: dict[str, Any], attempts: int = 8) -> RDBStorage:
    """RDBStorage(url), safe when several processes create the same new database at once: an
    SQLite file under a file lock; a database server (PostgreSQL, MySQL) by retrying when another
    process created the tables or the schema version row first."""
    import sqlalchemy.exc

    path = url.split(":///", 1)[1] if url.startswith("sqlite:") and ":///" in url else ""
    if path and path != ":memory:":
        with creation_lock(path):
            return RDBStorage(url, engine_kwargs=engine_kwargs)
    for attempt in range(attempts):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # a concurrent CREATE TABLE or alembic_version insert won: the next try finds them
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1) + random.random() * 0.1)
    raise AssertionError("unreachable")


def _tune_sqlite(storage: RDBStorage) -> None:
    import sqlalchemy

    def on_connect(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened before the listener get the pragmas too


def _looks_like_sqlite(path: str) -> bool:
    """Asked through SQLite, never a plain open(): closing any descriptor of the file drops every
    POSIX lock this process holds on it, those of its open storages too, and another process's
    writes then read back as 'disk I/O error' or 'malformed' (sqlite.org/howtocorrupt.html 2.2)."""
    import sqlite3
    from urllib.parse import quote

    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read {path}: permission denied")
    connection = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)
    try:
        connection.execute("PRAGMA schema_version")  # an empty file is an empty database
        return True
    except sqlite3.DatabaseError as e:  # "file is not a database"
        if "not a database" in str(e):
            return False
        if disk_full(e) is not None or _full_here(e, path):  # a full disk: exit 4, not 2
            raise disk_full_error(e, path) from None
        raise UserError(f"cannot read {path}: {e}") from e
    finally:
        connection.close()


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(e, parent) from None
        raise UserError(f"cannot create directory {parent}: {e.strerror}") from e


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


# --------------------------------------------------------------------------------------------
# Opening runs


def resolve(run_or_url: str, name: str | None = None) -> tuple[str, str]:
    """(storage URL, study name) for a run name or a storage URL."""
    if is_url(run_or_url):
        return run_or_url, name or "default"
    if not run_or_url or "/" in run_or_url or run_or_url.startswith("."):
        raise UserError(f"invalid run name {run_or_url!r}: use letters, digits, '-' and '_'")
    return run_url(run_or_url), name or run_or_url


def run_hint(url: str, study_name: str, default_url: str | None = None) -> str:
    """The RUN arguments that select this study again, quoted for a shell.

    A run under runs/ is named by its name alone; any other storage by ``NAME --storage URL``,
    which works whatever else that storage holds."""
    if default_url is not None and url == default_url:
        return shlex.quote(study_name)
    return f"{shlex.quote(study_name)} --storage {shlex.quote(url)}"


def run_dir(url: str, study_name: str) -> str:
    """Where files of a run go by default (plots, logs): beside its SQLite or journal file, in a
    folder named after the study; runs/<study> for a database server."""
    path = None
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
    elif url.startswith("journal:///"):
        path = url[len("journal://"):]
    elif "://" not in url:
        path = url
    if path and path != ":memory:":
        base = os.path.dirname(os.path.abspath(path))
        if os.path.basename(path) == "study.db" and os.path.basename(base) == study_name:
            return base  # runs/<name>/study.db: the run's own folder
        return os.path.join(base, study_name)
    return os.path.join(runs_dir(), study_name)


def open_run(run_or_url: str, name: str | None = None) -> optuna.Study:
    """Open an existing run (a name under runs/ or a storage URL); UserError if there is none."""
    url, study_name = resolve(run_or_url, name)
    storage = open_storage(url, create=False)
    try:
        summaries = storage.get_all_studies()
    except EnvironmentFault:
        raise
    except Exception as e:
        if disk_full(e) is not None or _full_here(e, storage_path(url)):
            raise disk_full_error(e, storage_path(url) or _redact(url)) from None
        raise UserError(f"cannot read study storage {_redact(url)}: {_one_line(e)}") from e
    every = [s.study_name for s in summaries]
    names = [n for n in every if stage_study_of(n, every) is None]  # the runs, not their stages
    stage = stage_study_of(study_name, every)
    if stage is not None:
        raise UserError(f"study {study_name!r} holds the {stage[1]} evaluations of run "
                        f"{stage[0]!r}: open the run itself")
    if study_name not in names:
        if len(names) == 1 and name is None:
            study_name = names[0]
        else:
            raise UserError(f"no run named {study_name!r} in {_redact(url)}"
                            + (f"; it holds: {', '.join(names)}" if names else " (it is empty)"))
    return optuna.load_study(study_name=study_name, storage=storage)


def stage_trials(storage: BaseStorage, run_study: str) -> list[FrozenTrial]:
    """The trials of a run's stage studies (rerank items, then promotions); none for a run
    stored before them, whose own study holds those kinds."""
    out: list[FrozenTrial] = []
    for kind in STAGE_KINDS:
        try:
            study_id = storage.get_study_id_from_name(stage_study_name(run_study, kind))
        except KeyError:
            continue
        out += storage.get_all_trials(study_id, deepcopy=False)
    return out


def run_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Every trial of a run, as every reader takes them: the run's study's (the search), then its
    stage studies' (opsearch/trials.py)."""
    return study.get_trials(deepcopy=False) + stage_trials(study._storage, study.study_name)


# --------------------------------------------------------------------------------------------
# Worker identity and liveness


@dataclass(frozen=True)
class WorkerId:
    host: str
    pid: int
    started: str  # the process's start time as the kernel counts it: guards against pid reuse
    job: str = ""  # the scheduler's job ("1234_5": SLURM array job 1234, task 5); "" if none
    device: str = ""  # what the worker trains on ("cpu", "cuda:0 (CUDA_VISIBLE_DEVICES=3)")

    @classmethod
    def current(cls, device: str = "") -> "WorkerId":
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()) or "",
                   scheduler_job(), device)

    @classmethod
    def from_json(cls, data: Any) -> "WorkerId | None":
        if not isinstance(data, dict):
            return None
        try:
            pid = int(data.get("pid", -1))
        except (TypeError, ValueError):
            pid = -1
        return cls(str(data.get("host", "")), pid, str(data.get("started", "")),
                   str(data.get("job", "") or ""), str(data.get("device", "") or ""))

    def to_json(self) -> dict:
        out: dict[str, Any] = {"host": self.host, "pid": self.pid, "started": self.started}
        if self.job:
            out["job"] = self.job
        if self.device:
            out["device"] = self.device
        return out

    def same_process(self, other: "WorkerId") -> bool:
        return (self.host, self.pid, self.started) == (other.host, other.pid, other.started)

    def is_dead_here(self) -> bool:
        """True when this worker ran on this host and its process is gone."""
        if self.host != socket.gethostname():
            return False
        started = _process_start(self.pid)
        return started is None or (bool(self.started) and started != self.started)

    def supersedes(self, other: "WorkerId") -> bool:
        """True when `other` is an earlier run of this worker's own scheduler job (a requeued
        SLURM job keeps its job id; one job runs one worker): `other` is then certainly gone,
        wherever it ran, even though its job id is alive again."""
        return bool(self.job) and self.job == other.job and not self.same_process(other)


def scheduler_job() -> str:
    """This process's scheduler job: SLURM's array job and task ('1234_5'), or its job id."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def _process_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""
    fields = stat.rsplit(")", 1)[1].split()
    if fields and fields[0] == "Z":  # a zombie has finished running
        return None
    return fields[19] if len(fields) > 19 else ""


HUNG_KEY = "opsearch:hung"
HANDED_BACK_KEY = "opsearch:handed_back"  # why a RUNNING trial went back to WAITING


def _stopped_path(worker: WorkerId) -> str:
    import tempfile

    name = f"{worker.host}_{worker.pid}_{worker.started}".replace(os.sep, "_")
    return os.path.join(tempfile.gettempdir(), f"opsearch-stopped-{os.getuid()}", name)


def mark_stopped(worker: WorkerId, reason: str) -> None:
    """Note on this host that `worker` stopped on purpose (its storage unreachable past the
    grace period, a full disk), which it cannot write into the storage: a reaper here then hands
    its candidate back as it was (WAITING again), instead of failing it as lost by a crash and
    counting that against the candidate."""
    path = _stopped_path(worker)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(" ".join(reason.split())[:500])
    except OSError:  # no room here either: the candidate is then taken for lost, as before
        pass


def stopped_reason(worker: WorkerId | None) -> str | None:
    """Why a gone worker of this host stopped on purpose (mark_stopped), or None."""
    if worker is None or worker.host != socket.gethostname():
        return None
    try:
        with open(_stopped_path(worker)) as f:
            return f.read() or "stopped"
    except OSError:
        return None
HANG_MARGIN_S = 60.0  # past the time limit by this much, a candidate that is still running hangs


class Heartbeat:
    """Writes a timestamp on a RUNNING trial every `interval` seconds from a daemon thread.

    Past `hang_after` seconds (the time limit and a margin: the limit's alarm did not get
    through, the candidate is stuck where no signal reaches) it marks the trial hung and stops
    beating, so that reapers take the worker for lost after the grace period, instead of a live
    heartbeat holding the candidate, and the end of the search, forever."""

    def __init__(self, storage: BaseStorage, trial_id: int, interval: float,
                 hang_after: float | None = None):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.hang_after = hang_after
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="opsearch-heartbeat")

    def __enter__(self) -> "Heartbeat":
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if self.hang_after is not None and time.monotonic() - self._started > self.hang_after:
                with contextlib.suppress(Exception), no_retry():
                    self.storage.set_trial_system_attr(self.trial_id, HUNG_KEY, time.time())
                return
            try:
                with no_retry():  # an outage: the next beat is the retry
                    self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_KEY, time.time())
            except Exception:  # finished meanwhile, or the database hiccuped: try next beat
                pass


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class TrialRecord:
    """What the engine needs of a stored trial (a light view of a FrozenTrial)."""

    number: int
    trial_id: int
    state: TrialState
    values: tuple[float, ...] | None
    user_attrs: dict[str, Any]
    system_attrs: dict[str, Any]
    datetime_start: datetime | None = None
    study_id: int = -1  # the run's study or one of its stage studies

    @property
    def kind(self) -> str:
        return self.user_attrs.get("kind", "candidate")

    @property
    def verdict(self) -> str | None:
        return self.user_attrs.get("verdict")

    @property
    def genome(self) -> tuple[int, ...] | None:
        g = self.user_attrs.get("genome")
        return tuple(int(v) for v in json.loads(g)) if isinstance(g, str) else None

    @property
    def counts_toward_budget(self) -> bool:
        return self.kind == "candidate" and self.verdict != LOST

    @classmethod
    def from_frozen(cls, t: FrozenTrial, study_id: int = -1) -> "TrialRecord":
        return cls(t.number, t._trial_id, t.state, tuple(t.values) if t.values else None,
                   dict(t.user_attrs), dict(t.system_attrs), t.datetime_start, study_id)


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
            try:
                owned = self.storage.set_trial_state_values(record.trial_id, TrialState.RUNNING)
            except optuna.exceptions.UpdateFinishedTrialError:
                owned = False
            except EnvironmentFault:  # the storage stayed away past its grace period, a full disk
                raise
            except Exception:
                owned = False  # lost a race on the database lock: another worker has it
            if not owned:
                self._waiting.discard(trial_id)  # another worker took it
                continue
            self._waiting.discard(trial_id)
            self.storage.set_trial_system_attr(record.trial_id, WORKER_KEY, worker.to_json())
            self.storage.set_trial_system_attr(record.trial_id, HEARTBEAT_KEY, time.time())
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
            known = self._trials.get(record.trial_id)
            if record.state.is_finished() and (known is None or not known.state.is_finished()):
                newly_finished.append(record)
            self._remember(record)
        newly_finished.sort(key=lambda r: r.number)
        return newly_finished

    def _remember(self, record: TrialRecord) -> None:
        self._trials[record.trial_id] = record
        if record.study_id in self._max_ids:
            self._max_ids[record.study_id] = max(self._max_ids[record.study_id], record.trial_id)
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


def _upsert_attrs(storage: RDBStorage, session, model_cls, trial_id: int,
                  attrs: dict[str, Any]) -> None:
    """All attributes of a trial in one upsert statement executed for many rows (Optuna writes
    one row per statement, with a SELECT before each: about 1 ms per attribute here). The
    statement is built once per table and dialect, so SQLAlchemy compiles it once: a statement
    built with the rows inline (``.values(rows)``) was compiled anew on every write, ~0.4 ms
    each, three writes per candidate."""
    if not attrs:
        return
    rows = [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
    stmt = _upsert_statement(storage.engine.name, model_cls)
    if stmt is not None:
        session.execute(stmt, rows)
        return
    for key, value in attrs.items():
        storage._set_trial_attr_without_commit(session, model_cls, trial_id, key, value)


@functools.lru_cache(maxsize=None)
def _upsert_statement(dialect: str, model_cls, keys: tuple[str, ...] = ("trial_id", "key"),
                      updated: tuple[str, ...] = ("value_json",)):
    """INSERT ... ON CONFLICT (keys) DO UPDATE (updated columns) for SQLite and PostgreSQL;
    None for other databases (they take Optuna's row-by-row path)."""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        return None
    stmt = insert(model_cls)
    return stmt.on_conflict_do_update(index_elements=[getattr(model_cls, k) for k in keys],
                                      set_={c: getattr(stmt.excluded, c) for c in updated})


def _upsert_values(storage: RDBStorage, session, models, trial, values: Sequence[float]) -> None:
    """A trial's objective values in one statement (Optuna's path reads, then writes, each)."""
    stmt = _upsert_statement(storage.engine.name, models.TrialValueModel, ("trial_id", "objective"),
                             ("value", "value_type"))
    if stmt is None:
        for objective, value in enumerate(values):
            storage._set_trial_value_without_commit(session, trial, objective, value)
        return
    rows = []
    for objective, value in enumerate(values):
        stored, value_type = models.TrialValueModel.value_to_stored_repr(value)
        rows.append({"trial_id": trial.trial_id, "objective": objective, "value": stored,
                     "value_type": value_type})
    if rows:
        session.execute(stmt, rows)


def _create_running(storage: BaseStorage, study_id: int, template: FrozenTrial) -> tuple[int, int]:
    """(trial id, number) of a new trial written with its attributes in one transaction."""
    if isinstance(storage, RDBStorage):
        try:
            from optuna.storages._rdb import models
            from optuna.storages._rdb.storage import _create_scoped_session
        except ImportError:
            pass
        else:
            with _create_scoped_session(storage.scoped_session) as session:
                # the study row lock serialises trial numbering, as Optuna's own create does
                models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                trial = models.TrialModel(study_id=study_id, number=None, state=template.state,
                                          datetime_start=template.datetime_start)
                session.add(trial)
                session.flush()
                _upsert_attrs(storage, session, models.TrialUserAttributeModel, trial.trial_id,
                              template.user_attrs)
                _upsert_attrs(storage, session, models.TrialSystemAttributeModel, trial.trial_id,
                              template.system_attrs)
                trial.number = trial.count_past_trials(session)
                session.add(trial)
                session.flush()
                return trial.trial_id, trial.number
    trial_id = storage.create_new_trial(study_id, template_trial=template)
    return trial_id, storage.get_trial_number_from_id(trial_id)


def _finish(storage: BaseStorage, trial_id: int, state: TrialState,
            values: list[float] | None, user_attrs: dict[str, Any]) -> None:
    """Attributes, values and state of a trial in one transaction where the storage allows it."""
    if isinstance(storage, RDBStorage) and hasattr(storage, "_set_trial_attr_without_commit"):
        try:
            from optuna.storages._rdb import models
            from optuna.storages._rdb.storage import _create_scoped_session
        except ImportError:  # a future Optuna moved its internals: take the portable path
            pass
        else:
            with _create_scoped_session(storage.scoped_session, True) as session:
                trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
                storage.check_trial_is_updatable(trial_id, trial.state)
                _upsert_attrs(storage, session, models.TrialUserAttributeModel, trial_id, user_attrs)
                _upsert_values(storage, session, models, trial, values or ())
                trial.state = state
                trial.datetime_complete = datetime.now()
            return
    # Portable path: the state change is written last, so a reader never sees a finished trial
    # without its attributes.
    current = storage.get_trial(trial_id)
    storage.check_trial_is_updatable(trial_id, current.state)
    for key, value in user_attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
    storage.set_trial_state_values(trial_id, state, values)


_RDB_FAST_READ = True  # False once a storage showed a table layout we do not know

# The tables and columns the fast reader selects (Optuna's documented RDB layout).
_FAST_READ_LAYOUT = {
    "studies": {"study_id", "study_name"},
    "trials": {"trial_id", "number", "study_id", "state", "datetime_start"},
    "trial_user_attributes": {"trial_id", "key", "value_json"},
    "trial_system_attributes": {"trial_id", "key", "value_json"},
    "trial_values": {"trial_id", "objective", "value", "value_type"},
}


class _UnknownLayout(Exception):
    """The fast reader met rows it does not understand (a newer Optuna schema)."""


def _layout_differs(storage: RDBStorage) -> bool:
    """Whether the database lacks a table or column the fast reader selects. False when that
    cannot be told now (the inspection itself failed: a lock, a lost connection)."""
    import sqlalchemy

    try:
        inspector = sqlalchemy.inspect(storage.engine)
        tables = set(inspector.get_table_names())
        for table, columns in _FAST_READ_LAYOUT.items():
            if table not in tables:
                return True
            if not columns <= {c["name"] for c in inspector.get_columns(table)}:
                return True
    except Exception:
        return False
    return False


def _read_rdb_trials(storage: RDBStorage, after: dict[int, int], also: set[int],
                     find: Sequence[str] = ()) -> list[TrialRecord] | None:
    """Trials of the studies in `after` (study id -> trial id) with an id above their study's
    entry, or in `also`, and every trial of the studies named in `find` (stage studies not
    known yet), read with four plain SELECTs.

    Optuna's own reader builds ORM objects for every attribute row: about 3 s for a
    10,000-trial study here, against a few hundred ms for this. It reads Optuna's documented
    table layout; on any surprise (a future schema) it returns None and the caller takes
    Optuna's public API instead. A transient error (a lock, a dropped connection) falls back
    for this call only; only a table layout we do not know turns the fast reader off for good.
    """
    global _RDB_FAST_READ
    if not _RDB_FAST_READ:
        return None
    import sqlalchemy

    params: dict[str, Any] = {}
    clauses = []
    for i, (study_id, after_id) in enumerate(sorted(after.items())):
        clauses.append(f"(t.study_id = :study{i} AND t.trial_id > :after{i})")
        params.update({f"study{i}": int(study_id), f"after{i}": int(after_id)})
    if not clauses:
        return []
    if also:
        clauses.append("(t.study_id IN (" + ",".join(str(int(s)) for s in sorted(after)) + ") AND "
                       "t.trial_id IN (" + ",".join(str(int(i)) for i in sorted(also)) + "))")
    if find:
        params.update({f"find{i}": name for i, name in enumerate(find)})
        clauses.append("t.study_id IN (SELECT s.study_id FROM studies s WHERE s.study_name IN ("
                       + ",".join(f":find{i}" for i in range(len(find))) + "))")
    where = " OR ".join(clauses)
    try:
        with storage.engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text(
                "SELECT t.trial_id, t.number, t.state, t.datetime_start, t.study_id FROM trials t "
                f"WHERE {where}"), params).all()
            records: dict[int, TrialRecord] = {}
            for trial_id, number, state, start, study_id in rows:
                state_name = state.name if hasattr(state, "name") else str(state)
                if state_name not in TrialState.__members__:
                    raise _UnknownLayout(f"trial state {state_name!r}")
                records[trial_id] = TrialRecord(int(number), int(trial_id), TrialState[state_name],
                                                None, {}, {}, _as_datetime(start), int(study_id))
            if not records:
                return []
            for table, target in (("trial_user_attributes", "user_attrs"),
                                  ("trial_system_attributes", "system_attrs")):
                for trial_id, key, value_json in conn.execute(sqlalchemy.text(
                        f"SELECT a.trial_id, a.key, a.value_json FROM {table} a "
                        f"WHERE a.trial_id IN (SELECT t.trial_id FROM trials t WHERE {where})"),
                        params):
                    if trial_id in records:  # else created after the first SELECT: next sync
                        getattr(records[trial_id], target)[key] = json.loads(value_json)
            values: dict[int, dict[int, float]] = {}
            for trial_id, objective, value, value_type in conn.execute(sqlalchemy.text(
                    "SELECT v.trial_id, v.objective, v.value, v.value_type FROM trial_values v "
                    f"WHERE v.trial_id IN (SELECT t.trial_id FROM trials t WHERE {where})"),
                    params):
                kind = value_type.name if hasattr(value_type, "name") else str(value_type)
                number = {"INF_POS": math.inf, "INF_NEG": -math.inf}.get(kind, value)
                if trial_id in records:
                    values.setdefault(trial_id, {})[int(objective)] = float(number)
    except _UnknownLayout:
        _RDB_FAST_READ = False  # rows we cannot read (a trial state Optuna did not have)
        return None
    except Exception:
        if _layout_differs(storage):
            _RDB_FAST_READ = False  # not the layout we know: use Optuna's reader from now on
        return None
    for trial_id, by_objective in values.items():
        records[trial_id].values = tuple(by_objective[k] for k in sorted(by_objective))
    return sorted(records.values(), key=lambda r: r.trial_id)


def _as_datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None
