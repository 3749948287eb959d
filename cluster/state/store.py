"""`StateStore`: the platform's source of truth, on SQLite or PostgreSQL.

One class, the same SQL for both; the URL picks (`sqlite:////var/lib/proctor/state.db`,
`postgresql+psycopg://user:pw@host/db`). Opening a store migrates its database to the
newest schema. Methods return frozen records (`models.Evaluation`, …), never ORM objects,
and raise `StateError` (or a subclass) for every failure, SQLAlchemy's included.

Status changes are compare-and-set: one `UPDATE … WHERE status IN (allowed sources)`, so
of two actors racing for the same change exactly one gets `True`. The allowed changes are
`models.TRANSITIONS`, the one table. On SQLite every write transaction is `BEGIN
IMMEDIATE` (writers queue on the busy timeout instead of failing mid-transaction).

A store opened with `retry_s` rides out a database restart: its calls run again while the
database is unreachable, for up to that long, and each write is idempotent across those
runs (`reconnect`: a call's writes carry one stamp, and a write that finds its stamp in
place was made by an earlier run of the same call). The engine pre-pings pooled
connections, so one that a restart broke is replaced before it is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (Connection, Engine, and_, create_engine, event, func, insert, literal, or_, select,
                        update)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from . import migrations
from .reconnect import StateUnavailable, is_unreachable, retried, stamp
from .models import (
    EVALUATION_STATUSES,
    ROLES,
    SHARD_STATUSES,
    TERMINAL,
    TRANSITIONS,
    ConflictError,
    Evaluation,
    EvaluationRow,
    Incident,
    IncidentRow,
    NewShard,
    NotFoundError,
    RetriesExhaustedError,
    Shard,
    ShardRow,
    StateError,
    Token,
    TokenRow,
    User,
    UserRow,
    UTCDateTime,
    allowed_from,
    check_transition,
)

E, S, I = EvaluationRow.__table__, ShardRow.__table__, IncidentRow.__table__
U, T = UserRow.__table__, TokenRow.__table__

BUSY_TIMEOUT_S = 30
MIGRATION_LOCK = 0x70726F63  # pg_advisory_xact_lock key: several processes open one database
TOKEN_TOUCH = timedelta(minutes=1)  # last_used_at is written at most this often
EVAL_FIELDS = frozenset({"wait_reason", "error", "summary", "results_uri", "done_units"})
EVAL_UPDATE_FIELDS = EVAL_FIELDS | {"priority", "labels"}
SHARD_FIELDS = frozenset({"sandbox_id", "supervisor", "placement", "error"})
LISTED_SPEC = (("sandbox", "gpu"), ("dataset", "path"))  # the parts of a spec that a listing reads


def _now() -> datetime:
    return stamp()


def _fields(given: dict[str, Any], allowed: frozenset[str], where: str) -> dict[str, Any]:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise TypeError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    for name in {"summary", "labels"} & set(given):
        _jsonable(f"{where}: {name}", given[name])
    return dict(given)


def _jsonable(what: str, value: Any) -> Any:
    """`value`, if JSON can store it (drivers fail differently, and later, otherwise)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StateError(f"{what} cannot be stored as JSON: {exc}") from exc
    return value


def open_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys, a busy timeout and our BEGINs."""
    try:
        u = make_url(url)
    except ArgumentError as exc:
        raise StateError(f"state URL {url!r} is not a database URL; use sqlite:////path/state.db "
                         "or postgresql+psycopg://user:password@host/db") from exc
    backend = u.get_backend_name()
    if backend == "postgresql":
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        return create_engine(u, pool_pre_ping=True)
    if backend != "sqlite":
        raise StateError(f"state URL {u.render_as_string()}: {backend!r} is not supported; use sqlite or postgresql")
    memory = u.database in (None, "", ":memory:")
    if not memory:
        folder = Path(u.database).expanduser().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"state URL {url}: cannot create {folder} ({exc.strerror}); "
                             "choose a writable path") from exc
    kw: dict[str, Any] = {"poolclass": StaticPool} if memory else {}
    engine = create_engine(u, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S}, **kw)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # the driver's own BEGINs are off: _sqlite_begin issues them
    cur = dbapi_conn.cursor()
    for pragma in (f"busy_timeout={BUSY_TIMEOUT_S * 1000}", "foreign_keys=ON", "synchronous=NORMAL"):
        cur.execute(f"PRAGMA {pragma}")
    _wal(cur)
    cur.close()


def _wal(cur: Any) -> None:
    """Put the database in WAL mode. SQLite answers "database is locked" at once, without
    its busy timeout, when several connections make a new database WAL together; retried."""
    give_up = time.monotonic() + BUSY_TIMEOUT_S
    pause = 0.005
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= give_up:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _sqlite_begin(conn: Connection) -> None:
    write = conn.get_execution_options().get("proctor_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class StateStore:
    """The durable state: evaluations, shards, incidents, users and tokens.

    Thread-safe (a connection pool); close it (or use `with`) when done. It pickles as
    its URL and `retry_s`, so it can be handed to a Ray actor, which reopens it without
    migrating. `retry_s`: how long a call retries while the database is unreachable
    before it raises `StateUnavailable` (0, the default: at once, as the API wants).
    """

    def __init__(self, url: str, *, migrate: bool = True, retry_s: float = 0.0):
        self._url = url
        self.retry_s = retry_s
        self._engine = open_engine(url)
        self.dialect = self._engine.dialect.name
        self.safe_url = self._engine.url.render_as_string(hide_password=True)
        if migrate:
            try:
                self._migrate()
            except BaseException:
                self._engine.dispose()
                raise

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (self._url, self.retry_s))

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateStore({self.safe_url!r})"

    # ------------------------------------------------------------ plumbing

    @retried
    def _migrate(self) -> None:
        try:
            with self._tx(write=True) as conn:
                if self.dialect == "postgresql":
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                migrations.upgrade(conn)
        except migrations.MigrationError as exc:
            raise StateError(f"state store {self.safe_url}: cannot migrate its schema ({exc}); a newer "
                             "Proctor may have written it: upgrade Proctor") from exc

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[Connection]:
        """One transaction; SQLAlchemy's errors leave as `StateError` (`StateUnavailable`
        where the database is away)."""
        committing = False
        try:
            with self._engine.connect() as conn:
                conn.execution_options(proctor_write=write)
                with conn.begin():
                    yield conn
                    committing = True
        except IntegrityError as exc:
            raise ConflictError(f"state store {self.safe_url}: the change conflicts with stored data: "
                                f"{exc.orig}") from exc
        except (OperationalError, InterfaceError) as exc:
            if is_unreachable(exc):
                raise StateUnavailable(f"state store {self.safe_url} is unreachable: {exc.orig}; retry in a "
                                       "moment", ambiguous=committing and write) from exc
            raise StateError(f"state store {self.safe_url}: {exc.orig}; check that the database is "
                             "reachable and writable") from exc
        except SQLAlchemyError as exc:
            raise StateError(f"state store {self.safe_url}: {getattr(exc, 'orig', None) or exc}") from exc

    def _transition(self, kind: str, table: Any, key: list[Any], what: str, to: str,
                    expect: str | Iterable[str] | None, values: dict[str, Any], guard: list[Any],
                    also: Any = None) -> bool:
        """The compare-and-set; `also(conn)` runs in its transaction if it made the change. A
        row at `to` that carries this call's stamp was changed by an earlier run of the call
        (its commit's answer was lost): True, and `also` is not run twice."""
        if to not in TRANSITIONS[kind]:
            raise StateError(f"{what}: {to!r} is not a {kind} status; known: {', '.join(TRANSITIONS[kind])}")
        if expect is None:
            sources = allowed_from(kind, to)
        else:
            sources = frozenset([expect] if isinstance(expect, str) else expect)
            for source in sources:
                check_transition(kind, what, source, to)
        with self._tx(write=True) as conn:
            stmt = update(table).where(*key, table.c.status.in_(sorted(sources)), *guard)
            if conn.execute(stmt.values(status=to, **values)).rowcount:
                if also is not None:
                    also(conn)
                return True
            row = conn.execute(select(table).where(*key)).first()
        if row is None:
            raise NotFoundError(f"{what} does not exist")
        if row.status == to and row.updated_at == values["updated_at"]:
            return True  # made by an earlier run of this call
        if guard and row.status in sources:
            raise RetriesExhaustedError(f"{what} has used {row.attempt + 1} of its {row.max_attempts} "
                                        "attempts; move it to failed instead of queued")
        if expect is None and row.status not in sources and row.status != to:
            check_transition(kind, what, row.status, to)  # raises: illegal from where it is now
        return False  # another actor changed it first

    # ------------------------------------------------------------ evaluations

    @retried
    def create_evaluation(self, id: str, *, owner: str, name: str, spec: dict[str, Any], model: str,
                          runtime: str, shards: list[NewShard], priority: int = 0,
                          labels: dict[str, str] | None = None,
                          trace_context: dict[str, str] | None = None) -> Evaluation:
        """Store a `queued` evaluation and its `queued` shards in one transaction.

        Raises `ConflictError` if the id exists, `StateError` for a bad id, shard list or
        labels (strings to strings), or a spec that is not JSON."""
        ids = [s.shard_id for s in shards]
        if len(set(ids)) != len(ids):
            raise StateError(f"evaluation {id}: shard ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
        if not id or len(id) > 64:
            raise StateError(f"evaluation id {id!r} must be 1 to 64 characters")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in (labels or {}).items()):
            raise StateError(f"evaluation {id}: labels must map strings to strings, got {labels!r}")
        _jsonable(f"evaluation {id}: spec", spec)
        _jsonable(f"evaluation {id}: shard resources", [s.resources for s in shards])
        now = _now()
        row = dict(id=id, owner=owner, name=name, status="queued", priority=priority, labels=dict(labels or {}),
                   spec=spec, model=model, runtime=runtime, total_shards=len(shards),
                   total_units=sum(s.units for s in shards), done_units=0, created_at=now, updated_at=now,
                   version=1, trace_context=trace_context)
        with self._tx(write=True) as conn:
            stored = conn.execute(select(E).where(E.c.id == id)).first()
            if stored is not None and stored.created_at == now and stored.owner == owner:
                return Evaluation.from_row(stored)  # stored by an earlier run of this call
            if stored is not None:
                raise ConflictError(f"evaluation {id} already exists; submit it under a new id")
            conn.execute(insert(E), [row])
            if shards:
                conn.execute(insert(S), [
                    dict(eval_id=id, shard_id=s.shard_id, status="queued", sample_ids=list(s.sample_ids),
                         units=s.units, resources=s.resources, attempt=0, max_attempts=s.max_attempts,
                         created_at=now, updated_at=now) for s in shards])
            return Evaluation.from_row(conn.execute(select(E).where(E.c.id == id)).one())

    @retried
    def get_evaluation(self, id: str) -> Evaluation | None:
        with self._tx() as conn:
            row = conn.execute(select(E).where(E.c.id == id)).first()
        return Evaluation.from_row(row) if row else None

    @retried
    def list_evaluations(self, *, status: str | Iterable[str] | None = None, owner: str | None = None,
                         label: tuple[str, str] | None = None, text: str | None = None, model: str | None = None,
                         sort: str = "-created_at", limit: int = 50,
                         cursor: str | None = None) -> tuple[list[Evaluation], str | None]:
        """A page of evaluations and the cursor of the next page (None at the end).

        Filters combine with AND; `text` matches name or model, case-insensitively; `model`
        is the model's label exactly. `sort` is one of `SORTS` (`-` for descending; ties by
        id). Pages are keyed on (sort value, id), so rows inserted between pages never
        shift later pages. Raises `StateError` for a bad sort, limit or cursor.

        A listed evaluation's `spec` holds only what a listing shows (`LISTED_SPEC`: the
        GPU request and the dataset's path), not its samples: `get_evaluation` has it whole."""
        if not 1 <= limit <= 1000:
            raise StateError(f"limit {limit} is out of range; use 1 to 1000")
        if sort not in SORTS:
            raise StateError(f"sort {sort!r} is not known; known: {', '.join(SORTS)}")
        column = E.c[sort.lstrip("-")]
        descending = sort.startswith("-")
        listed = [E.c.spec[path].label(f"spec_{i}") for i, path in enumerate(LISTED_SPEC)]
        q = select(*[c for c in E.c if c.name != "spec"], *listed)
        if status is not None:
            q = q.where(E.c.status.in_([status] if isinstance(status, str) else list(status)))
        if owner is not None:
            q = q.where(E.c.owner == owner)
        if label is not None:
            q = q.where(E.c.labels[label[0]].as_string() == label[1])
        if text:
            q = q.where(or_(E.c.name.icontains(text, autoescape=True), E.c.model.icontains(text, autoescape=True)))
        if model:
            q = q.where(E.c.model == model)
        if cursor:
            value, after = _decode_cursor(cursor, sort)
            if descending:
                q = q.where(or_(column < value, and_(column == value, E.c.id < after)))
            else:
                q = q.where(or_(column > value, and_(column == value, E.c.id > after)))
        order = (column.desc(), E.c.id.desc()) if descending else (column.asc(), E.c.id.asc())
        with self._tx() as conn:
            rows = conn.execute(q.order_by(*order).limit(limit + 1)).all()
        items = [Evaluation.from_row(r, spec=_listed_spec(r)) for r in rows[:limit]]
        return items, (_encode_cursor(items[-1], sort) if len(rows) > limit else None)

    @retried
    def transition_evaluation(self, id: str, to: str, *, expect: str | Iterable[str] | None = None,
                              **fields: Any) -> bool:
        """Move an evaluation to `to`; True if this call made the change.

        Fields: wait_reason, error, summary, results_uri, done_units. Sets scheduled_at and
        started_at the first time it reaches scheduled / running, finished_at on a terminal
        status, and clears wait_reason on leaving queued. With `expect` (a status or several),
        it changes only from those, returns False otherwise, and raises `ConflictError` if
        one of them may never go to `to`. Without it: False when another actor already made
        the change; `ConflictError` naming both states when the change is illegal from where
        the evaluation is now. `NotFoundError` for an unknown id."""
        values = _fields(fields, EVAL_FIELDS, "transition_evaluation")
        now = _now()
        values.update(updated_at=now, version=E.c.version + 1)
        if to == "scheduled":
            values["scheduled_at"] = func.coalesce(E.c.scheduled_at, literal(now, UTCDateTime()))
        elif to == "running":
            values["started_at"] = func.coalesce(E.c.started_at, literal(now, UTCDateTime()))
        elif to in TERMINAL:
            values["finished_at"] = now
        if to != "queued":
            values.setdefault("wait_reason", None)
        return self._transition("evaluation", E, [E.c.id == id], f"evaluation {id}", to, expect, values, [])

    @retried
    def update_evaluation(self, id: str, *, expected_version: int | None = None, **fields: Any) -> bool:
        """Change fields without a status change, in one UPDATE (it bumps `version`).

        Fields: wait_reason, error, summary, results_uri, done_units, priority, labels. With
        `expected_version`, False when another writer changed it since. `NotFoundError` for an
        unknown id."""
        values = _fields(fields, EVAL_UPDATE_FIELDS, "update_evaluation")
        now = _now()
        stmt = update(E).where(E.c.id == id).values(**values, updated_at=now, version=E.c.version + 1)
        if expected_version is not None:
            stmt = stmt.where(E.c.version == expected_version, E.c.updated_at != now)
        with self._tx(write=True) as conn:
            if conn.execute(stmt).rowcount:
                return True
            row = conn.execute(select(E.c.updated_at).where(E.c.id == id)).first()
        if not row:
            raise NotFoundError(f"evaluation {id} does not exist")
        return row.updated_at == now  # True: made by an earlier run of this call

    @retried
    def add_done_units(self, id: str, units: int) -> None:
        """Add to done_units atomically (several supervisors report one evaluation). Run
        again after a lost commit it adds nothing (the evaluation carries the call's stamp);
        `transition_shard(done_units=)` is exact even when another write came in between."""
        with self._tx(write=True) as conn:
            if not conn.execute(select(E.c.id).where(E.c.id == id)).first():
                raise NotFoundError(f"evaluation {id} does not exist")
            self._add_units(conn, id, units, once=[E.c.updated_at != _now()])

    def _add_units(self, conn: Connection, id: str, units: int, once: list[Any]) -> None:
        conn.execute(update(E).where(E.c.id == id, *once).values(
            done_units=E.c.done_units + units, updated_at=_now(), version=E.c.version + 1))

    @retried
    def active_evaluations(self) -> list[Evaluation]:
        """Evaluations not in a terminal status, oldest first: what recovery reconciles."""
        with self._tx() as conn:
            rows = conn.execute(select(E).where(E.c.status.not_in(sorted(TERMINAL)))
                                .order_by(E.c.created_at, E.c.id)).all()
        return [Evaluation.from_row(r) for r in rows]

    @retried
    def counts_by_status(self, kind: str = "evaluation") -> dict[str, int]:
        """{status: count} for every status of `kind` ("evaluation" or "shard"), zeros included."""
        if kind not in ("evaluation", "shard"):
            raise StateError(f"kind {kind!r} is not 'evaluation' or 'shard'")
        table, statuses = (E, EVALUATION_STATUSES) if kind == "evaluation" else (S, SHARD_STATUSES)
        with self._tx() as conn:
            rows = conn.execute(select(table.c.status, func.count()).group_by(table.c.status)).all()
        return {s: 0 for s in statuses} | {r[0]: r[1] for r in rows}

    # ------------------------------------------------------------ shards

    @retried
    def shards(self, eval_id: str) -> list[Shard]:
        with self._tx() as conn:
            rows = conn.execute(select(S).where(S.c.eval_id == eval_id).order_by(S.c.shard_id)).all()
        return [Shard.from_row(r) for r in rows]

    @retried
    def shard(self, eval_id: str, shard_id: str) -> Shard | None:
        """One shard by its id (its primary key: one row read), or None."""
        with self._tx() as conn:
            row = conn.execute(select(S).where(S.c.eval_id == eval_id, S.c.shard_id == shard_id)).first()
        return None if row is None else Shard.from_row(row)

    @retried
    def shards_by_status(self, statuses: str | Iterable[str]) -> list[Shard]:
        """Shards of every evaluation in these statuses, oldest first."""
        wanted = [statuses] if isinstance(statuses, str) else list(statuses)
        with self._tx() as conn:
            rows = conn.execute(select(S).where(S.c.status.in_(wanted))
                                .order_by(S.c.created_at, S.c.eval_id, S.c.shard_id)).all()
        return [Shard.from_row(r) for r in rows]

    @retried
    def transition_shard(self, eval_id: str, shard_id: str, to: str, *,
                         expect: str | Iterable[str] | None = None, done_units: int = 0, **fields: Any) -> bool:
        """Move a shard to `to`; True if this call made the change (rules as
        `transition_evaluation`). Fields: sandbox_id, supervisor, placement, error.
        `done_units`: added to the evaluation's in the same transaction, if the change is made.

        running sets started_at, a terminal status finished_at. `to="queued"` from
        scheduled/running is a retry: attempt grows by one and started_at, sandbox_id,
        supervisor and placement are cleared (unless given); when no attempt is left
        (attempt + 1 >= max_attempts) it changes nothing and raises `RetriesExhaustedError`."""
        values = _fields(fields, SHARD_FIELDS, "transition_shard")
        now = _now()
        values["updated_at"] = now
        guard = []
        if to == "running":
            values["started_at"] = now
        elif to in TERMINAL:
            values["finished_at"] = now
        elif to == "queued":
            values = {"sandbox_id": None, "supervisor": None, "placement": None, "started_at": None} | values
            values["attempt"] = S.c.attempt + 1
            guard = [S.c.attempt + 1 < S.c.max_attempts]
        key = [S.c.eval_id == eval_id, S.c.shard_id == shard_id]
        also = (lambda conn: self._add_units(conn, eval_id, done_units, once=[])) if done_units else None
        return self._transition("shard", S, key, f"shard {eval_id}/{shard_id}", to, expect, values, guard, also)

    @retried
    def update_shard(self, eval_id: str, shard_id: str, **fields: Any) -> None:
        """Change sandbox_id, supervisor, placement or error without a status change."""
        values = _fields(fields, SHARD_FIELDS, "update_shard")
        with self._tx(write=True) as conn:
            stmt = update(S).where(S.c.eval_id == eval_id, S.c.shard_id == shard_id)
            if not conn.execute(stmt.values(**values, updated_at=_now())).rowcount:
                raise NotFoundError(f"shard {eval_id}/{shard_id} does not exist")

    # ------------------------------------------------------------ incidents

    @retried
    def add_incident(self, eval_id: str, *, rule: str, severity: str, action: str,
                     evidence: dict[str, Any], shard_id: str | None = None) -> Incident:
        _jsonable(f"incident of evaluation {eval_id}: evidence", evidence)
        row = dict(eval_id=eval_id, shard_id=shard_id, rule=rule, severity=severity, action=action,
                   evidence=evidence, created_at=_now())
        with self._tx(write=True) as conn:
            if not conn.execute(select(E.c.id).where(E.c.id == eval_id)).first():
                raise NotFoundError(f"evaluation {eval_id} does not exist; an incident needs its evaluation")
            earlier = conn.execute(select(I.c.id).where(  # stored by an earlier run of this call
                I.c.eval_id == eval_id, I.c.rule == rule, I.c.created_at == row["created_at"])).first()
            new_id = earlier.id if earlier else conn.execute(insert(I).values(**row)).inserted_primary_key[0]
        return Incident(id=new_id, **row)

    @retried
    def incidents(self, eval_id: str | None = None, limit: int = 100, owner: str | None = None) -> list[Incident]:
        """Incidents, newest first, of one evaluation or of all (of `owner`'s evaluations only,
        if given)."""
        q = select(I).order_by(I.c.created_at.desc(), I.c.id.desc()).limit(limit)
        if eval_id is not None:
            q = q.where(I.c.eval_id == eval_id)
        if owner is not None:
            q = q.where(I.c.eval_id.in_(select(E.c.id).where(E.c.owner == owner)))
        with self._tx() as conn:
            return [Incident.from_row(r) for r in conn.execute(q).all()]

    # ------------------------------------------------------------ users and tokens

    @retried
    def create_user(self, name: str, role: str) -> User:
        """Raises `StateError` for an unknown role, `ConflictError` if the name is taken."""
        if role not in ROLES:
            raise StateError(f"user {name}: role {role!r} is not known; known: {', '.join(ROLES)}")
        with self._tx(write=True) as conn:
            stored = conn.execute(select(U).where(U.c.name == name)).first()
            if stored is not None and stored.created_at == _now() and stored.role == role:
                return User.from_row(stored)  # stored by an earlier run of this call
            if stored is not None:
                raise ConflictError(f"user {name!r} already exists; choose another name")
            conn.execute(insert(U).values(name=name, role=role, created_at=_now()))
            return User.from_row(conn.execute(select(U).where(U.c.name == name)).one())

    @retried
    def get_user(self, name: str) -> User | None:
        with self._tx() as conn:
            row = conn.execute(select(U).where(U.c.name == name)).first()
        return User.from_row(row) if row else None

    @retried
    def list_users(self) -> list[User]:
        with self._tx() as conn:
            return [User.from_row(r) for r in conn.execute(select(U).order_by(U.c.name)).all()]

    def create_token(self, user_name: str, name: str,
                     expires_at: datetime | None = None) -> tuple[str, Token]:
        """A new token: its secret ("pk_" + 32 url-safe characters), shown once, and its record.

        Only the secret's sha256 is stored. `NotFoundError` for an unknown user."""
        if expires_at is not None and expires_at <= _now():
            raise StateError(f"token {name!r}: expires_at {expires_at.isoformat()} is in the past")
        secret = "pk_" + secrets.token_urlsafe(24)
        return secret, self._store_token(user_name, name, secret, expires_at)

    @retried
    def _store_token(self, user_name: str, name: str, secret: str, expires_at: datetime | None) -> Token:
        with self._tx(write=True) as conn:
            user = conn.execute(select(U).where(U.c.name == user_name)).first()
            if user is None:
                raise NotFoundError(f"user {user_name!r} does not exist; create it first")
            row = conn.execute(select(T).where(T.c.hash == _hash(secret))).first()  # an earlier run's
            if row is None:
                token_id = conn.execute(insert(T).values(
                    user_id=user.id, name=name, hash=_hash(secret), prefix=secret[:8], created_at=_now(),
                    expires_at=expires_at)).inserted_primary_key[0]
                row = conn.execute(select(T).where(T.c.id == token_id)).one()
        return Token.from_row(row, user_name)

    @retried
    def verify_token(self, secret: str) -> tuple[User, Token] | None:
        """The user and token of a secret, or None if unknown, revoked or expired."""
        if not secret.startswith("pk_") or len(secret) > 256:
            return None
        now = _now()
        with self._tx() as conn:  # one query: the API runs this on every request
            row = conn.execute(select(T, U.c.name.label("user_name"), U.c.role.label("user_role"),
                                      U.c.created_at.label("user_created_at"))
                               .join(U, U.c.id == T.c.user_id).where(T.c.hash == _hash(secret))).first()
        if row is None:
            return None
        user = User(id=row.user_id, name=row.user_name, role=row.user_role, created_at=row.user_created_at)
        token = Token.from_row(row, user.name)
        if not token.active(now):
            return None
        if token.last_used_at is None or token.last_used_at < now - TOKEN_TOUCH:
            with self._tx(write=True) as conn:
                conn.execute(update(T).where(T.c.id == token.id, or_(
                    T.c.last_used_at.is_(None), T.c.last_used_at < now - TOKEN_TOUCH)).values(last_used_at=now))
            token = replace(token, last_used_at=now)
        return user, token

    @retried
    def revoke_token(self, token_id: int) -> bool:
        """Revoke a token; False if it was already revoked. `NotFoundError` if unknown."""
        with self._tx(write=True) as conn:
            stmt = update(T).where(T.c.id == token_id, T.c.revoked_at.is_(None)).values(revoked_at=_now())
            if conn.execute(stmt).rowcount:
                return True
            row = conn.execute(select(T.c.revoked_at).where(T.c.id == token_id)).first()
            if not row:
                raise NotFoundError(f"token {token_id} does not exist")
        return row.revoked_at == _now()  # True: revoked by an earlier run of this call

    @retried
    def list_tokens(self, user_name: str | None = None) -> list[Token]:
        q = select(T, U.c.name.label("user_name")).join(U, U.c.id == T.c.user_id).order_by(T.c.id)
        if user_name is not None:
            q = q.where(U.c.name == user_name)
        with self._tx() as conn:
            return [Token.from_row(r, r.user_name) for r in conn.execute(q).all()]


SORTS = ("created_at", "-created_at", "name", "-name", "status", "-status", "priority", "-priority")


def _listed_spec(row: Any) -> dict[str, Any]:
    """The parts of a spec a listing reads (`LISTED_SPEC`), from a row of `list_evaluations`."""
    spec: dict[str, Any] = {}
    for i, (section, key) in enumerate(LISTED_SPEC):
        value = getattr(row, f"spec_{i}")
        if value is not None:
            spec.setdefault(section, {})[key] = value
    return spec


def _reopen(url: str, retry_s: float = 0.0) -> StateStore:
    return StateStore(url, migrate=False, retry_s=retry_s)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _encode_cursor(ev: Evaluation, sort: str) -> str:
    value = getattr(ev, sort.lstrip("-"))
    raw = json.dumps([sort, value.isoformat() if isinstance(value, datetime) else value, ev.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, sort: str) -> tuple[Any, str]:
    try:
        made_for, value, after = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if made_for != sort or not isinstance(after, str):
            raise ValueError(cursor)
        if sort.lstrip("-") == "created_at":
            value = datetime.fromisoformat(value)
            if value.tzinfo is None:
                raise ValueError(cursor)
        elif sort.lstrip("-") == "priority":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(cursor)
        elif not isinstance(value, str):
            raise ValueError(cursor)
        return value, after
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise StateError(f"cursor {cursor[:40]!r} is not one this store returned; list again without it") from exc
