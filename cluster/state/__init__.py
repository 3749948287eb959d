"""The durable state store: evaluations, shards, incidents, users and tokens.

`StateStore(url)` opens SQLite (`sqlite:////var/lib/proctor/state.db`, the default) or
PostgreSQL (`postgresql+psycopg://…`) and migrates it; its methods return the frozen
records below and raise `StateError`. `TRANSITIONS` is the one table of allowed status
changes.
"""

from .models import (
    EVALUATION_STATUSES,
    ROLES,
    SHARD_STATUSES,
    TERMINAL,
    TRANSITIONS,
    ConflictError,
    Evaluation,
    Incident,
    NewShard,
    NotFoundError,
    RetriesExhaustedError,
    Shard,
    StateError,
    Token,
    User,
)
from .reconnect import StateUnavailable
from .store import StateStore

__all__ = [
    "EVALUATION_STATUSES",
    "ROLES",
    "SHARD_STATUSES",
    "TERMINAL",
    "TRANSITIONS",
    "ConflictError",
    "Evaluation",
    "Incident",
    "NewShard",
    "NotFoundError",
    "RetriesExhaustedError",
    "Shard",
    "StateError",
    "StateStore",
    "StateUnavailable",
    "Token",
    "User",
]
