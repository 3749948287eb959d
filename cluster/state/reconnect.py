"""Riding out a database that restarts: which errors mean "the database is away for a
moment", and running a store call again on them until a window has passed.

A PostgreSQL server that restarts terminates its connections ("terminating connection
due to administrator command"), refuses new ones while it is down, and answers "the
database system is starting up" for a moment after; a proxy or a network in between
resets connections. `is_unreachable` tells these apart from errors that a retry cannot
mend (a constraint, a syntax error, a missing table).

`retried` wraps a `StateStore` method: the whole call runs again after each such error,
with exponential backoff and full jitter (`cluster.retry.backoff_s`), until the store's
`retry_s` has passed; then its `StateUnavailable` propagates. Running a call again must be
harmless, also when the failure hid a commit that did happen (the connection broke while
the server committed): every write of one call is stamped with one timestamp (`stamp()`,
the same on every run of the call), and a write that finds its own stamp in place knows
that an earlier run of the call made it, and reports the change as its own instead of
making it twice or reporting it as another actor's.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import random
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from ..retry import backoff_s
from .models import StateError

log = logging.getLogger("proctor.state")

F = TypeVar("F", bound=Callable[..., Any])

# what PostgreSQL, psycopg, SQLite and the OS say when the server is away, restarting or out of reach
UNREACHABLE_WORDS = (
    "connection refused", "could not connect", "connection failed", "connection reset", "reset by peer",
    "server closed the connection", "terminating connection", "the database system is starting up",
    "the database system is shutting down", "the database system is in recovery mode",
    "the database system is not yet accepting connections", "consuming input failed", "connection is closed",
    "connection is lost", "the connection is lost", "no connection to the server", "connection timed out",
    "timeout expired", "broken pipe", "ssl syscall error", "server conn crashed", "database is locked",
    "connection already closed", "cannot_connect_now", "admin_shutdown",
)

_stamp: contextvars.ContextVar[datetime | None] = contextvars.ContextVar("proctor_state_stamp", default=None)


class StateUnavailable(StateError):
    """The database could not be reached (refused, reset, restarting, locked past the busy
    timeout) for the store's whole retry window. The API answers 503 with `Retry-After`;
    the control plane's loops try again on their next round. `ambiguous`: the connection
    broke while a commit was under way, so the write may have happened."""

    transient = True

    def __init__(self, message: str, ambiguous: bool = False):
        super().__init__(message)
        self.ambiguous = ambiguous


def is_unreachable(exc: BaseException) -> bool:
    """Whether SQLAlchemy's `exc` says the database is away for a moment: a disconnect that
    SQLAlchemy itself noticed, or one of `UNREACHABLE_WORDS` in the driver's message."""
    if getattr(exc, "connection_invalidated", False):
        return True
    text = str(getattr(exc, "orig", None) or exc).lower()
    return any(word in text for word in UNREACHABLE_WORDS)


def stamp() -> datetime:
    """The time of the store call under way: the same on every run of a `retried` call (its
    writes' idempotency key); outside one, now."""
    return _stamp.get() or datetime.now(timezone.utc)


def retried(method: F) -> F:
    """Run the `StateStore` method again on `StateUnavailable` until `self.retry_s` has passed
    since its first try. A call made inside another keeps the outer call's stamp and leaves
    the retrying to it."""
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _stamp.get() is not None:
            return method(self, *args, **kwargs)
        token = _stamp.set(datetime.now(timezone.utc))
        try:
            return again(lambda: method(self, *args, **kwargs), self.retry_s, method.__name__)
        finally:
            _stamp.reset(token)

    return call  # type: ignore[return-value]


def again(call: Callable[[], Any], window_s: float, what: str, *, sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random) -> Any:
    """`call()`, again after each `StateUnavailable` until `window_s` has passed since the
    first try (then that error propagates). Other errors propagate at once."""
    started = clock()
    attempt = 0
    while True:
        try:
            return call()
        except StateUnavailable as exc:
            attempt += 1
            waited = clock() - started
            pause = backoff_s(attempt, base_s=0.1, cap_s=2.0, rand=rand)
            if waited + pause > window_s:
                raise
            if attempt == 1:
                log.warning("state store unreachable in %s (%s); retrying for up to %.0f s", what, exc, window_s)
            sleep(pause)
