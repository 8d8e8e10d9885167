"""Opening an Optuna storage: SQLite (tuned for several processes), a journal file (appends that
leave nothing written half) or any RDB URL, safe when many workers create it at once (the
creation lock), and opening the runs it holds."""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial

from opsearch.errors import EnvironmentFault, UserError
from opsearch.trials import (STAGE_KINDS, stage_study_name, stage_study_of)

from opsearch.study.guard import (DISK_FULL_ERRNOS, StorageGuard, _full_here, disk_full, disk_full_error,
                                  guard_storage)
from opsearch.study.paths import _one_line, _redact, resolve, storage_path


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


def trial_id(trial: FrozenTrial) -> int:
    """A FrozenTrial's id in its storage (unique there; numbers count per study)."""
    return trial._trial_id


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    """Write a study's system attribute: where a sampler keeps its state (BaseGASampler's parent
    cache, which the nsga2 plugin presets); Optuna 4 took `Study.set_system_attr` away."""
    study._storage.set_study_system_attr(study._study_id, key, value)
