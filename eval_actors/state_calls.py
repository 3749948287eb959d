"""The state store as an actor's event loop uses it: every call on a worker thread.

A store call blocks its thread while the database answers; on SQLite that is up to the
busy timeout (30 s) while another process holds the write lock, and on PostgreSQL as long
as the store retries a database that restarts (`Settings.state_retry_s`). On an actor's
event loop that would stop everything else the actor does (heartbeats, cancels, emergency
stops, other shards), so the scheduler and the supervisors call the store through
`ThreadedStore`: `await store.get_evaluation(id)` runs `StateStore.get_evaluation` with
`asyncio.to_thread`, and the loop goes on meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from cluster.state import StateStore


class ThreadedStore:
    """`StateStore`'s methods as coroutines that run them on a worker thread. `sync` is the
    store itself, for the rare caller off the event loop."""

    def __init__(self, store: StateStore) -> None:
        self.sync = store

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.sync, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call
