"""The two long-lived answers of the API, as functions of what they read and where they write,
so that they can be tested without a server or a bus.

- `log_lines`: an evaluation's log lines, merging what is kept (the ended shards' lines in the
  results store) with what the event bus still carries, each line once, optionally following
  until the evaluation ends (`GET .../logs`).
- `relay_events`: the WebSocket loop: bus events to the client, a `gap` event where some were
  lost (the bus restarted, or the client fell behind), until the one evaluation it watches ends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from proctor.statuses import TERMINAL

LEVELS = {"debug": 0, "info": 1, "warning": 2, "error": 3}
LOG_FIELDS = ("seq", "ts", "shard_id", "attempt", "level", "message")
RETRY_S = 1.0  # how long a stream waits before it asks a restarting bus again

ReadBus = Callable[[int, float], Awaitable[dict[str, Any]]]  # (after, wait up to s) -> the bus's answer
Ended = Callable[[], Awaitable[bool]]  # the evaluation is gone or in a final status
Sleep = Callable[[float], Awaitable[Any]]


def log_filter(level: str | None, text: str | None) -> Callable[[dict[str, Any]], bool]:
    """Lines of `level` and above (unknown levels count as info) that contain `text` (any case)."""
    floor = LEVELS[level] if level else 0
    needle = text.lower() if text else None

    def keep(line: dict[str, Any]) -> bool:
        return (LEVELS.get(line.get("level"), 1) >= floor  # type: ignore[arg-type]
                and (needle is None or needle in str(line.get("message", "")).lower()))

    return keep


def log_line(line: dict[str, Any]) -> str:
    """One NDJSON line of the logs answer."""
    return json.dumps({k: line.get(k) for k in LOG_FIELDS}) + "\n"


async def log_lines(kept: Callable[[], Awaitable[list[dict[str, Any]]]], read: ReadBus, ended: Ended, *,
                    keep: Callable[[dict[str, Any]], bool], follow: bool, after: int, poll_s: float,
                    sleep: Sleep = asyncio.sleep) -> AsyncIterator[str]:
    """The kept lines (unless resuming `after` a seq), then the bus's `log` events not kept
    already (a line is (shard, attempt, n)). `read` is asked for `log` and `status` events.
    Without `follow` it ends when the bus has nothing more; with it, once the evaluation has
    ended and the bus is drained. A bus that does not answer ends a plain read (what is
    kept was sent) and is asked again by a following one."""
    seen: set[tuple[Any, Any, Any]] = set()
    if not after:
        for line in await kept():
            seen.add((line.get("shard_id"), line.get("attempt"), line.get("n")))
            if keep(line):
                yield log_line(line)
    cursor, ending = after, False
    while True:
        try:
            answer = await read(cursor, poll_s if follow and not ending else 0.0)
        except Exception:  # the bus is restarting or gone: what is kept was sent
            if not follow:
                return
            await sleep(RETRY_S)
            answer = {"events": [], "last_seq": cursor}
        for event in answer["events"]:
            if event["type"] == "status" and event.get("status") in TERMINAL:
                ending = True
            if event["type"] != "log":
                continue
            key = (event.get("shard_id"), event.get("attempt"), event.get("n"))
            if key not in seen and keep(event):
                seen.add(key)
                yield log_line(event)
        cursor = answer["last_seq"]
        if answer["events"]:
            continue
        if not follow or ending:
            return
        ending = await ended()


async def relay_events(send: Callable[[dict[str, Any]], Awaitable[None]], read: ReadBus,
                       visible: Callable[[dict[str, Any]], Awaitable[bool]], ended: Ended | None, *,
                       after: int, poll_s: float, sleep: Sleep = asyncio.sleep) -> None:
    """Send the bus's events after `after` that the client may see, forever, or with `ended`
    (one evaluation's stream) until that evaluation's final status was sent or, on a quiet
    bus, `ended()` says so. A restarted bus (a new `epoch`) is read from its start after a
    `gap` event; so is a bus that does not answer, after a `gap` and `RETRY_S`. Errors of
    `send` (the client left) reach the caller."""
    cursor, epoch = after, None
    while True:
        try:
            answer = await read(cursor, poll_s)
        except Exception:
            await send({"type": "gap", "seq": cursor, "reason": "the event bus is restarting"})
            await sleep(RETRY_S)
            continue
        if epoch is not None and answer["epoch"] != epoch:
            await send({"type": "gap", "seq": cursor, "reason": "the event bus restarted"})
            cursor, epoch = 0, answer["epoch"]
            continue
        epoch = answer["epoch"]
        if answer.get("gap"):
            await send({"type": "gap", "seq": cursor, "reason": "events were dropped: this client fell too far behind"})
        final = False
        for event in answer["events"]:
            if not await visible(event):
                continue
            await send(event)
            final = final or (ended is not None and event["type"] == "status" and event.get("status") in TERMINAL)
        cursor = answer["last_seq"]
        if ended is not None and not answer["events"]:
            final = await ended()
        if final:
            return
