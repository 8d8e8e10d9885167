"""The fast paths into an RDB storage (SQLite, PostgreSQL): a trial written with its attributes
in one transaction, a result in one, and trials read with plain SELECTs. They use Optuna's
private `_rdb` models and its documented table layout, which this package alone touches; any
surprise (another Optuna) falls back to Optuna's public storage API."""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState


from opsearch.study.records import TrialRecord


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


def _internals(storage: BaseStorage):
    """(models, session scope) of Optuna's private RDB layer for an RDB storage; None for another
    storage or an Optuna that moved them: the caller then takes the public storage API."""
    if not isinstance(storage, RDBStorage):
        return None
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
    except ImportError:
        return None
    return models, _create_scoped_session


def _create_running(storage: BaseStorage, study_id: int, template: FrozenTrial) -> tuple[int, int]:
    """(trial id, number) of a new trial written with its attributes in one transaction."""
    internals = _internals(storage)
    if internals is not None:
        models, _create_scoped_session = internals
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


def _claim(storage: BaseStorage, trial_id: int, system_attrs: dict[str, Any]) -> bool:
    """Take a WAITING trial: RUNNING, with this worker's attributes, or False when another worker
    has it. On an RDB it is one compare-and-set (``UPDATE ... WHERE state = WAITING``), attributes
    in the same transaction. Why: Optuna's own claim reads, then writes, and SQLite's driver
    starts the transaction only at the write, so two workers could both read WAITING and both
    own the trial; and until the worker's attributes were written, a reaper could take the
    RUNNING trial for a lost one (a worker crashed on UpdateFinishedTrialError there)."""
    internals = _internals(storage)
    if internals is not None:
        models, _create_scoped_session = internals
        with _create_scoped_session(storage.scoped_session) as session:
            taken = (session.query(models.TrialModel)
                     .filter(models.TrialModel.trial_id == trial_id,
                             models.TrialModel.state == TrialState.WAITING)
                     .update({models.TrialModel.state: TrialState.RUNNING},
                             synchronize_session=False))
            if taken != 1:
                return False
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
            trial.datetime_start = datetime.now()  # the model's own setter (UTC in Optuna 5)
            _upsert_attrs(storage, session, models.TrialSystemAttributeModel, trial_id, system_attrs)
        return True
    # Portable path (the journal decides a claim in its log's order): the state first, then the
    # attributes; a trial reaped in between raises UpdateFinishedTrialError to the caller.
    if not storage.set_trial_state_values(trial_id, TrialState.RUNNING):
        return False
    for key, value in system_attrs.items():
        storage.set_trial_system_attr(trial_id, key, value)
    return True


def _finish(storage: BaseStorage, trial_id: int, state: TrialState,
            values: list[float] | None, user_attrs: dict[str, Any]) -> None:
    """Attributes, values and state of a trial in one transaction where the storage allows it."""
    internals = _internals(storage)
    if internals is not None and hasattr(storage, "_set_trial_attr_without_commit"):
        models, _create_scoped_session = internals
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
