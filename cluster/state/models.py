"""The state store's data model: statuses and their one transition table, the tables
(SQLAlchemy 2 declarative), and the frozen records the store hands out.

Records, never ORM objects, leave the store: they are plain frozen dataclasses, so they
pickle across Ray process boundaries and cannot lazily touch a closed session.

Every timestamp is timezone-aware UTC, on SQLite as on PostgreSQL (`UTCDateTime`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from proctor.statuses import STATUSES, TERMINAL, UNSUCCESSFUL


class StateError(RuntimeError):
    """The state store refused an operation or could not reach its database.

    Raised by every `StateStore` method (SQLAlchemy's errors become this at the store's
    boundary). Caught by the API (mapped to 404 / 409 / 503 by subclass), the CLI (which
    prints it), and the scheduler and supervisors, which log it and retry or give up.
    """


class NotFoundError(StateError):
    """The evaluation, shard, user or token named does not exist. The API answers 404."""


class ConflictError(StateError):
    """The change contradicts the stored state: a duplicate id or name, or a status
    transition that the transition table forbids. The API answers 409."""


class RetriesExhaustedError(ConflictError):
    """A shard was sent back to `queued` for a retry but has used all its attempts. The
    supervisor catches it and moves the shard to `failed` instead."""


# ---------------------------------------------------------------- statuses

ROLES = ("viewer", "researcher", "safety", "admin")

_FINAL = tuple(s for s in STATUSES if s in TERMINAL)

# THE transition table: kind → from-status → the statuses it may move to. Terminal states
# are final. `interrupted` exists only while recovering after a crash. A shard moving
# scheduled/running → queued is a retry: its attempt grows by one, up to max_attempts.
TRANSITIONS: dict[str, dict[str, frozenset[str]]] = {
    "evaluation": {
        "queued": frozenset({"scheduled", "interrupted", *UNSUCCESSFUL}),
        "scheduled": frozenset({"running", "interrupted", *UNSUCCESSFUL}),
        "running": frozenset({"succeeded", "interrupted", *UNSUCCESSFUL}),
        "interrupted": frozenset({"queued", *TERMINAL}),
        **{s: frozenset() for s in _FINAL},
    },
    "shard": {
        "queued": frozenset({"scheduled", *UNSUCCESSFUL}),
        "scheduled": frozenset({"running", "queued", *UNSUCCESSFUL}),
        "running": frozenset({"succeeded", "queued", *UNSUCCESSFUL}),
        **{s: frozenset() for s in _FINAL},
    },
}

EVALUATION_STATUSES = tuple(TRANSITIONS["evaluation"])
SHARD_STATUSES = tuple(TRANSITIONS["shard"])


def allowed_from(kind: str, to: str) -> frozenset[str]:
    """The statuses from which a `kind` may move to `to`."""
    return frozenset(s for s, targets in TRANSITIONS[kind].items() if to in targets)


def check_transition(kind: str, what: str, old: str, new: str) -> None:
    """Raise `ConflictError` naming both states unless `old → new` is in the table."""
    table = TRANSITIONS[kind]
    for status in (old, new):
        if status not in table:
            raise StateError(f"{what}: {status!r} is not a {kind} status; known: {', '.join(table)}")
    if new not in table[old]:
        allowed = ", ".join(sorted(table[old])) or "nothing (it is final)"
        raise ConflictError(f"{what}: cannot go from {old} to {new}; from {old} it may go to {allowed}")


# ---------------------------------------------------------------- tables


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite drops zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise StateError(f"timestamp {value.isoformat()} has no timezone; use datetime.now(timezone.utc)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


Json = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    pass


class UserRow(Base):
    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("name", name="uq_users_name"),
        CheckConstraint(f"role IN {ROLES}", name="ck_users_role"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TokenRow(Base):
    __tablename__ = "tokens"
    __table_args__ = (UniqueConstraint("hash", name="uq_tokens_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    hash: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class EvaluationRow(Base):
    __tablename__ = "evaluations"
    __table_args__ = (
        Index("ix_evaluations_created", "created_at", "id"),
        Index("ix_evaluations_owner_created", "owner", "created_at"),
        Index("ix_evaluations_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    labels: Mapped[dict[str, str]] = mapped_column(Json)
    spec: Mapped[dict[str, Any]] = mapped_column(Json)
    model: Mapped[str] = mapped_column(String(256))
    runtime: Mapped[str] = mapped_column(String(32))
    total_shards: Mapped[int] = mapped_column(Integer)
    total_units: Mapped[int] = mapped_column(Integer)
    done_units: Mapped[int] = mapped_column(Integer, default=0)
    wait_reason: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[dict[str, Any] | None] = mapped_column(Json)
    results_uri: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    scheduled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    version: Mapped[int] = mapped_column(Integer, default=1)
    trace_context: Mapped[dict[str, str] | None] = mapped_column(Json)


class ShardRow(Base):
    __tablename__ = "shards"

    eval_id: Mapped[str] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True)
    shard_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    sample_ids: Mapped[list[str]] = mapped_column(Json)
    units: Mapped[int] = mapped_column(Integer)
    resources: Mapped[dict[str, Any]] = mapped_column(Json)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # retries so far: 0 on the first run (users see 1)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    sandbox_id: Mapped[str | None] = mapped_column(String(128))
    supervisor: Mapped[str | None] = mapped_column(String(128))
    placement: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class IncidentRow(Base):
    __tablename__ = "incidents"
    __table_args__ = (Index("ix_incidents_eval_created", "eval_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    eval_id: Mapped[str] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"))
    shard_id: Mapped[str | None] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(String(128))
    severity: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32))
    evidence: Mapped[dict[str, Any]] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


# ---------------------------------------------------------------- records


def _record(cls: type, row: Any, **extra: Any) -> Any:
    names = [f for f in cls.__dataclass_fields__ if f not in extra]
    return cls(**{n: getattr(row, n) for n in names}, **extra)


@dataclass(frozen=True)
class NewShard:
    """A shard to create with its evaluation: `units` is len(sample_ids) × epochs;
    `resources` is {"cpus": float, "memory": bytes, "gpus": int, "gpu_type": str | None}."""

    shard_id: str
    sample_ids: list[str]
    units: int
    resources: dict[str, Any]
    max_attempts: int = 3


@dataclass(frozen=True)
class Evaluation:
    id: str
    owner: str
    name: str
    status: str
    priority: int
    labels: dict[str, str]
    spec: dict[str, Any]
    model: str
    runtime: str
    total_shards: int
    total_units: int
    done_units: int
    wait_reason: str | None
    error: str | None
    summary: dict[str, Any] | None
    results_uri: str | None
    created_at: datetime
    scheduled_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    version: int
    trace_context: dict[str, str] | None = None  # {"traceparent": its span's}: see eval_actors/traces.py

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_row(cls, row: Any, **extra: Any) -> "Evaluation":
        return _record(cls, row, labels=dict(row.labels or {}), **extra)


@dataclass(frozen=True)
class Shard:
    eval_id: str
    shard_id: str
    status: str
    sample_ids: tuple[str, ...]
    units: int
    resources: dict[str, Any]
    attempt: int
    max_attempts: int
    sandbox_id: str | None
    supervisor: str | None
    placement: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def can_retry(self) -> bool:
        """Whether a move back to `queued` would be accepted (attempts remain)."""
        return self.attempt + 1 < self.max_attempts

    @classmethod
    def from_row(cls, row: Any) -> "Shard":
        return _record(cls, row, sample_ids=tuple(row.sample_ids))


@dataclass(frozen=True)
class Incident:
    id: int
    eval_id: str
    shard_id: str | None
    rule: str
    severity: str
    action: str
    evidence: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> "Incident":
        return _record(cls, row)


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> "User":
        return _record(cls, row)


@dataclass(frozen=True)
class Token:
    """An API token as shown to people: never its secret, nor the secret's hash."""

    id: int
    user_id: int
    user_name: str
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    @classmethod
    def from_row(cls, row: Any, user_name: str) -> "Token":
        return _record(cls, row, user_name=user_name)
