"""Faults of a storage and its surroundings, and the one policy every storage call goes through:
a full disk is named (DiskFull, exit 4), an outage (a database restart, a fail-over, a shared
filesystem away) is waited out for the storage grace period, then StorageUnavailable (exit 3)."""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import threading
import time
from typing import Any

import optuna
from optuna.storages import BaseStorage

from opsearch.errors import DiskFull, EnvironmentFault, StorageUnavailable, UserError

from opsearch.study.paths import _one_line, _redact, storage_path


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
