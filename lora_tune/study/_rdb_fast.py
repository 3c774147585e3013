"""Fewer round trips for the hot writes and reads of running trials (PostgreSQL and SQLite).

Optuna's RDB storage spends most of a worker's CPU in SQLAlchemy ORM sessions: 50-65 SQL
statements per trial of 4 parameters and 5 reports (more with heartbeats), each on a freshly
checked-out (and, with ``pool_pre_ping``, pinged) connection inside its own BEGIN/COMMIT. Here a trial's own writes
are single prebuilt Core statements that also check, in SQL, that the trial can still be
updated (``INSERT ... SELECT ... WHERE EXISTS (trial is unfinished) ON CONFLICT ...``), sent
in autocommit mode on a connection each worker thread keeps (one round trip per write).
Trials are read with two queries instead of six. The schema is Optuna's own
(``optuna.storages._rdb.models``): plain Optuna processes, optuna-dashboard and these
workers read and write the same tables.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
import sqlalchemy as sa
from optuna import distributions
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

_UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is a lost/refused connection or a busy database.

    Connection errors, server shutdown/startup, too many clients, deadlocks and SQLite's
    "database is locked" are transient; bad SQL or bad data are not.
    """
    import sqlite3

    import sqlalchemy.exc as sa_exc

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, (sa_exc.DisconnectionError, sa_exc.TimeoutError, ConnectionError, TimeoutError)):
            return True
        if isinstance(current, sqlite3.OperationalError):
            text = str(current).lower()
            return "locked" in text or "busy" in text
        sqlstate = getattr(current, "sqlstate", None)
        if type(current).__module__.startswith("psycopg") and type(current).__name__ in (
            "OperationalError", "InterfaceError",
        ) or (sqlstate and sqlstate[:2] in ("08", "53", "57", "40")):
            # no SQLSTATE: the connection itself failed; 08 connection, 53 resources
            # (too many clients), 57 server shutdown/startup, 40 deadlock/serialization
            return sqlstate is None or sqlstate[:2] in ("08", "53", "57", "40")
        if isinstance(current, sa_exc.DBAPIError):
            if current.orig is not None and current.orig is not current:
                current = current.orig
                continue
            return isinstance(current, (sa_exc.OperationalError, sa_exc.InterfaceError))
        current = current.__cause__ or current.__context__
    return False


def supports(engine: sa.engine.Engine) -> bool:
    return engine.dialect.name in ("postgresql", "sqlite")


def _utc(moment: datetime.datetime) -> datetime.datetime:
    return moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)


class FastTrialWrites:
    """Single-statement writes for trials; raises Optuna's own errors on finished trials."""

    def __init__(self, engine: sa.engine.Engine):
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        if self.postgres:
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        self._insert = insert
        self.studies = models.StudyModel.__table__
        self.trials = models.TrialModel.__table__
        self.values = models.TrialValueModel.__table__
        self._distributions: dict[tuple[int, str], distributions.BaseDistribution] = {}
        self._study_of: dict[int, int] = {}
        self._local = threading.local()
        self._open: list[sa.Connection] = []
        self._open_lock = threading.Lock()
        t = self.trials
        tid = sa.bindparam("trial_id", type_=sa.Integer)
        unfinished = sa.exists().where(t.c.trial_id == tid, t.c.state.in_(_UNFINISHED))
        self._unfinished_where = unfinished
        self.stmt_param = self._upsert(models.TrialParamModel.__table__, unfinished,
                                       ("trial_id", "param_name", "param_value", "distribution_json"),
                                       ("trial_id", "param_name"), None)
        self.stmt_step = self._upsert(models.TrialIntermediateValueModel.__table__, unfinished,
                                      ("trial_id", "step", "intermediate_value", "intermediate_value_type"),
                                      ("trial_id", "step"), ("intermediate_value", "intermediate_value_type"))
        self.stmt_attr = {
            system: self._upsert(table, unfinished, ("trial_id", "key", "value_json"), ("trial_id", "key"),
                                 ("value_json",))
            for system, table in ((True, models.TrialSystemAttributeModel.__table__),
                                  (False, models.TrialUserAttributeModel.__table__))
        }
        h = models.TrialHeartbeatModel.__table__
        beat = self._insert(h).values(trial_id=tid, heartbeat=sa.func.current_timestamp())
        self.stmt_beat = beat.on_conflict_do_update(index_elements=["trial_id"],
                                                    set_={"heartbeat": sa.func.current_timestamp()})
        self.stmt_state = sa.select(t.c.state).where(t.c.trial_id == tid)
        self.stmt_waiting = sa.select(t.c.trial_id).where(
            t.c.study_id == sa.bindparam("study_id", type_=sa.Integer), t.c.state == TrialState.WAITING
        ).limit(1)

    def _upsert(self, table: sa.Table, where: Any, columns: Sequence[str], keys: Sequence[str],
                update: Sequence[str] | None) -> Any:
        """``INSERT row SELECT ... WHERE trial unfinished``; on a key conflict update (or keep)."""
        binds = [sa.bindparam(c, type_=table.c[c].type) for c in columns]
        stmt = self._insert(table).from_select(list(columns), sa.select(*binds).where(where))
        if update:
            stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in update})
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
        # rowcount is not reliable for INSERT ... SELECT on every driver; RETURNING is
        return stmt.returning(table.c.trial_id)

    # ------------------------------------------------------------- connections
    def connection(self) -> sa.Connection:
        """This thread's autocommit connection (opened once, replaced after an error)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.invalidated:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            if self.postgres:
                # parameters, reports and attributes do not wait for their WAL flush: a server
                # crash may lose the last fraction of a second of them, never a finished trial
                # (finishing commits synchronously, which flushes everything written before)
                conn.exec_driver_sql("SET synchronous_commit TO OFF")
            self._local.conn = conn
            with self._open_lock:
                self._open = [c for c in self._open if not c.closed] + [conn]
        return conn

    def reset(self) -> None:
        """Drop this thread's connection (after a connection error; the next call reconnects)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()

    def close(self) -> None:
        """Close every thread's connection (on dispose)."""
        with self._open_lock:
            conns, self._open = self._open, []
        for conn in conns:
            with contextlib.suppress(Exception):
                if self.postgres and not conn.closed and not conn.invalidated:
                    conn.exec_driver_sql("RESET synchronous_commit")  # back to the pool as it came
                conn.close()

    @contextlib.contextmanager
    def _using(self) -> Iterator[sa.Connection]:
        try:
            yield self.connection()
        except sa.exc.SQLAlchemyError:  # maybe a broken connection: start afresh next time
            self.reset()
            raise

    # ------------------------------------------------------------------ create
    def create_trial(self, conn: sa.Connection, study_id: int, system_attrs: dict[str, Any],
                     heartbeat: bool) -> FrozenTrial:
        """Insert a RUNNING trial (number = trials before it) in ``conn``'s transaction."""
        t = self.trials
        if self.postgres:  # the row lock Optuna's own trial creation takes: numbers stay unique
            conn.execute(sa.select(self.studies.c.study_id)
                         .where(self.studies.c.study_id == study_id).with_for_update())
        start = datetime.datetime.now()
        number = sa.select(sa.func.count()).select_from(t).where(t.c.study_id == study_id).scalar_subquery()
        row = conn.execute(
            sa.insert(t).from_select(
                ["number", "study_id", "state", "datetime_start"],
                sa.select(number, sa.literal(study_id), sa.literal(TrialState.RUNNING, t.c.state.type),
                          sa.literal(_utc(start), t.c.datetime_start.type)),
            ).returning(t.c.trial_id, t.c.number)
        ).one()
        trial_id, trial_number = int(row[0]), int(row[1])
        if system_attrs:
            conn.execute(sa.insert(models.TrialSystemAttributeModel.__table__), [
                {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in system_attrs.items()
            ])
        if heartbeat:
            conn.execute(self.stmt_beat, {"trial_id": trial_id})
        self._study_of[trial_id] = study_id
        return FrozenTrial(
            number=trial_number, state=TrialState.RUNNING, value=None, values=None,
            datetime_start=start, datetime_complete=None, params={}, distributions={},
            user_attrs={}, system_attrs=dict(system_attrs), intermediate_values={}, trial_id=trial_id,
        )

    # ------------------------------------------------------------------- writes
    def _write(self, stmt: Any, params: dict[str, Any]) -> None:
        with self._using() as conn:
            if conn.execute(stmt, params).first() is None:
                self._refused(conn, params["trial_id"])

    def _refused(self, conn: sa.Connection, trial_id: int) -> None:
        """After a write changed nothing: raise like Optuna if the trial is finished."""
        state = conn.execute(self.stmt_state, {"trial_id": trial_id}).scalar_one_or_none()
        if state is None:
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        if state.is_finished():
            raise optuna.exceptions.UpdateFinishedTrialError(
                f"Trial#{trial_id} has already finished and can not be updated."
            )
        # unfinished: the same key was written before (e.g. a retried write); nothing to do

    def set_param(self, trial_id: int, name: str, internal: float,
                  distribution: distributions.BaseDistribution) -> None:
        with self._using() as conn:
            self._check_distribution(conn, trial_id, name, distribution)
        self._write(self.stmt_param, {"trial_id": trial_id, "param_name": name, "param_value": internal,
                                      "distribution_json": distributions.distribution_to_json(distribution)})

    def _check_distribution(self, conn: sa.Connection, trial_id: int, name: str,
                            distribution: distributions.BaseDistribution) -> None:
        study_id = self._study_of.get(trial_id)
        if study_id is None:
            t = self.trials
            study_id = conn.execute(sa.select(t.c.study_id).where(t.c.trial_id == trial_id)).scalar_one()
            self._study_of[trial_id] = study_id
        known = self._distributions.get((study_id, name))
        if known is None:
            p, t = models.TrialParamModel.__table__, self.trials
            stored = conn.execute(
                sa.select(p.c.distribution_json).select_from(p.join(t, p.c.trial_id == t.c.trial_id))
                .where(t.c.study_id == study_id, p.c.param_name == name).limit(1)
            ).scalar_one_or_none()
            known = distributions.json_to_distribution(stored) if stored is not None else distribution
            self._distributions[(study_id, name)] = known
        distributions.check_distribution_compatibility(known, distribution)

    def set_intermediate(self, trial_id: int, step: int, value: float) -> None:
        stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
        self._write(self.stmt_step, {"trial_id": trial_id, "step": step, "intermediate_value": stored,
                                     "intermediate_value_type": kind})

    def set_attr(self, trial_id: int, key: str, value: Any, system: bool) -> None:
        self._write(self.stmt_attr[system], {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)})

    def finish(self, trial_id: int, state: TrialState, values: Sequence[float] | None) -> datetime.datetime:
        """Finish an unfinished trial with its values in one transaction; returns the end time."""
        t = self.trials
        end = datetime.datetime.now()
        with self.engine.begin() as conn:
            changed = conn.execute(
                sa.update(t).where(t.c.trial_id == trial_id, t.c.state.in_(_UNFINISHED))
                .values(state=state, datetime_complete=_utc(end)).returning(t.c.trial_id)
            ).first() is not None
            if not changed:
                self._refused(conn, trial_id)
            if values is not None:
                rows = []
                for objective, value in enumerate(values):
                    stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                    rows.append({"trial_id": trial_id, "objective": objective, "value": stored, "value_type": kind})
                conn.execute(sa.insert(self.values), rows)
        return end

    # -------------------------------------------------------------- heartbeats
    def record_heartbeat(self, trial_id: int) -> None:
        # Optuna starts a new heartbeat thread per trial: check a pooled connection out
        # instead of keeping one per (short-lived) thread
        with self.engine.begin() as conn:
            conn.execute(self.stmt_beat, {"trial_id": trial_id})

    def has_waiting(self, study_id: int) -> bool:
        with self._using() as conn:
            return conn.execute(self.stmt_waiting, {"study_id": study_id}).first() is not None


class FastTrialReads:
    """Reading trials with two Core queries instead of six ORM ones (and no ORM objects).

    Installed on an ``RDBStorage`` instance (:func:`install`) in place of its ``_get_trials``
    (what Optuna's cache and every sampler read through), ``get_trial`` and
    ``_get_stale_trial_ids``; the results are the same FrozenTrials.
    """

    def __init__(self, rdb: Any, writes: FastTrialWrites):
        self.rdb = rdb
        self.writes = writes  # whose per-thread autocommit connections the reads use too
        self.trials = models.TrialModel.__table__
        self.heartbeats = models.TrialHeartbeatModel.__table__
        self._distribution_cache: dict[str, distributions.BaseDistribution] = {}
        self._value_types = models.TrialValueModel.TrialValueType
        self._step_types = models.TrialIntermediateValueModel.TrialIntermediateValueType

    def install(self) -> None:
        self.rdb._get_trials = self.get_trials
        self.rdb.get_trial = self.get_trial
        self.rdb._get_stale_trial_ids = self.get_stale_trial_ids

    def _children(self, where: sa.ColumnElement[bool]) -> sa.CompoundSelect:
        t = self.trials
        text = sa.String()

        def part(model: Any, kind: str, key: Any, number: Any, order: Any, payload: Any) -> sa.Select:
            c = model.__table__.c
            return (
                sa.select(sa.literal(kind, text).label("kind"), c.trial_id,
                          sa.cast(key, text).label("key"), sa.cast(number, sa.Float).label("number"),
                          sa.cast(order, sa.Integer).label("ord"), sa.cast(payload, sa.Text).label("payload"))
                .select_from(model.__table__.join(t, c.trial_id == t.c.trial_id)).where(where)
            )

        p = models.TrialParamModel.__table__.c
        v = models.TrialValueModel.__table__.c
        i = models.TrialIntermediateValueModel.__table__.c
        u = models.TrialUserAttributeModel.__table__.c
        s = models.TrialSystemAttributeModel.__table__.c
        return sa.union_all(
            part(models.TrialParamModel, "p", p.param_name, p.param_value, p.param_id, p.distribution_json),
            part(models.TrialValueModel, "v", v.value_type, v.value, v.objective, sa.null()),
            part(models.TrialIntermediateValueModel, "i", i.intermediate_value_type, i.intermediate_value,
                 i.step, sa.null()),
            part(models.TrialUserAttributeModel, "u", u.key, sa.null(), sa.null(), u.value_json),
            part(models.TrialSystemAttributeModel, "s", s.key, sa.null(), sa.null(), s.value_json),
        )

    def _read(self, where: sa.ColumnElement[bool]) -> list[FrozenTrial]:
        t = self.trials
        with self.writes._using() as conn:
            rows = conn.execute(sa.select(t).where(where).order_by(t.c.trial_id)).all()
            if not rows:
                return []
            children = conn.execute(self._children(where)).all()
        parts: dict[int, dict[str, list[Any]]] = {r.trial_id: {k: [] for k in "pvius"} for r in rows}
        for child in children:
            found = parts.get(child.trial_id)
            if found is not None:  # else: a trial created between the two queries; read next time
                found[child.kind].append(child)
        return [self._frozen(row, parts[row.trial_id]) for row in rows]

    def _distribution(self, text: str) -> distributions.BaseDistribution:
        found = self._distribution_cache.get(text)
        if found is None:
            found = self._distribution_cache[text] = distributions.json_to_distribution(text)
        return found

    def _frozen(self, row: Any, parts: dict[str, list[Any]]) -> FrozenTrial:
        values = None
        if parts["v"]:
            values = [0.0] * len(parts["v"])
            for v in parts["v"]:
                values[v.ord] = models.TrialValueModel.stored_repr_to_value(v.number, self._value_types[v.key])
        params, dists = {}, {}
        for p in sorted(parts["p"], key=lambda p: p.ord):
            dist = self._distribution(p.payload)
            dists[p.key] = dist
            params[p.key] = dist.to_external_repr(p.number)
        steps = {
            i.ord: models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(
                i.number, self._step_types[i.key])
            for i in parts["i"]
        }
        return FrozenTrial(
            number=row.number, state=row.state, value=None, values=values,
            datetime_start=_local(row.datetime_start), datetime_complete=_local(row.datetime_complete),
            params=params, distributions=dists,
            user_attrs={u.key: json.loads(u.payload) for u in parts["u"]},
            system_attrs={s.key: json.loads(s.payload) for s in parts["s"]},
            intermediate_values=steps, trial_id=row.trial_id,
        )

    def get_trials(self, study_id: int, states: Any, included_trial_ids: set[int],
                   trial_id_greater_than: int) -> list[FrozenTrial]:
        t = self.trials
        included = [i for i in included_trial_ids if i <= trial_id_greater_than]
        where = t.c.study_id == study_id
        if states is not None:
            where = sa.and_(where, t.c.state.in_(list(states)))
        if included and trial_id_greater_than > -1:
            where = sa.and_(where, sa.or_(t.c.trial_id.in_(included), t.c.trial_id > trial_id_greater_than))
        elif trial_id_greater_than > -1:
            where = sa.and_(where, t.c.trial_id > trial_id_greater_than)
        trials = self._read(where)
        if not trials:
            self._check_study(study_id)
        return trials

    def _check_study(self, study_id: int) -> None:
        s = models.StudyModel.__table__
        with self.writes._using() as conn:
            if conn.execute(sa.select(s.c.study_id).where(s.c.study_id == study_id)).first() is None:
                raise KeyError(f"No study with study_id {study_id} exists.")

    def get_trial(self, trial_id: int) -> FrozenTrial:
        found = self._read(self.trials.c.trial_id == trial_id)
        if not found:
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        return found[0]

    def get_stale_trial_ids(self, study_id: int) -> list[int]:
        interval = self.rdb.heartbeat_interval
        grace = self.rdb.grace_period if self.rdb.grace_period is not None else 2 * interval
        t, h = self.trials, self.heartbeats
        with self.writes._using() as conn:
            rows = conn.execute(
                sa.select(t.c.trial_id, h.c.heartbeat, sa.func.now())
                .select_from(t.join(h, h.c.trial_id == t.c.trial_id))
                .where(t.c.study_id == study_id, t.c.state == TrialState.RUNNING)
            ).all()
        limit = datetime.timedelta(seconds=grace)
        return [r[0] for r in rows if r[2].replace(tzinfo=None) - r[1] > limit]


def _local(moment: datetime.datetime | None) -> datetime.datetime | None:
    """Naive UTC (as stored) to naive local time (as Optuna's FrozenTrial carries it)."""
    if moment is None:
        return None
    return moment.replace(tzinfo=datetime.timezone.utc).astimezone().replace(tzinfo=None)
