"""The event bus: every state change, progress step, log line and incident, in order.

`EventLog` is the plain data structure; `EventBus` is the Ray actor around it.
Publishers call `publish` without waiting for an answer, so a supervisor is never
blocked. Subscribers pull: `read(after=seq)` returns what came after their last sequence
number, waiting up to `timeout` for something new. A slow subscriber costs nothing to
anyone else; if it falls further behind than the log keeps, its answer says so (`gap`).

Each event is a dict with `seq` (global, strictly increasing), `ts`, `type`
(`status`, `progress`, `log`, `incident`, `shard`, ...), `v` and `eval_id` (or None): one
of `proctor.bus_events`' shapes, which readers validate (`read_events`). The log stamps
`seq` and `ts`, and `v` on an event whose publisher did not say its version.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from typing import Any

import ray

from proctor.bus_events import BUS_VERSION

GLOBAL_KEEP = 50_000
PER_EVAL_KEEP = 2_000
EVALS_KEPT = 20_000


class EventLog:
    def __init__(self, keep: int = GLOBAL_KEEP, per_eval: int = PER_EVAL_KEEP, evals: int = EVALS_KEPT):
        self.seq = 0
        self.all: deque[dict[str, Any]] = deque(maxlen=keep)
        self.by_eval: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        self.per_eval = per_eval
        self.evals = evals

    def append(self, events: list[dict[str, Any]]) -> int:
        now = time.time()
        for event in events:
            self.seq += 1
            event = {"v": BUS_VERSION, **event, "seq": self.seq, "ts": event.get("ts", now)}
            self.all.append(event)
            eval_id = event.get("eval_id")
            if eval_id:
                log = self.by_eval.get(eval_id)
                if log is None:
                    log = self.by_eval[eval_id] = deque(maxlen=self.per_eval)
                    while len(self.by_eval) > self.evals:
                        self.by_eval.popitem(last=False)
                else:
                    self.by_eval.move_to_end(eval_id)
                log.append(event)
        return self.seq

    def since(self, after: int, eval_id: str | None = None, limit: int = 1000,
              types: tuple[str, ...] | None = None) -> dict[str, Any]:
        source = self.by_eval.get(eval_id, ()) if eval_id else self.all
        oldest = source[0]["seq"] if source else self.seq + 1
        out = []
        for event in _after(source, after):
            if types is None or event["type"] in types:
                out.append(event)
                if len(out) >= limit:
                    break
        last = out[-1]["seq"] if len(out) >= limit else self.seq
        return {"events": out, "last_seq": max(last, after), "gap": bool(after and after + 1 < oldest)}


def _after(source: Any, after: int) -> Any:
    """Events with seq > after; the deque is in seq order, so skip from the right end."""
    if not source or source[-1]["seq"] <= after:
        return ()
    if source[0]["seq"] > after:
        return source
    # binary search over a deque by index
    lo, hi = 0, len(source) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if source[mid]["seq"] <= after:
            lo = mid + 1
        else:
            hi = mid
    return (source[i] for i in range(lo, len(source)))


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class EventBus:
    """The event log as a Ray actor. Restarting it starts an empty log: events are a
    live view; the state store keeps what must last."""

    def __init__(self, settings: Any = None) -> None:
        if settings is not None:
            from proctor.observability import observe_process

            observe_process(settings, "events")
        self.log = EventLog()
        self.changed = asyncio.Condition()
        self.epoch = f"{time.time():.6f}"  # a new epoch tells readers their seq numbers reset

    async def publish(self, events: list[dict[str, Any]]) -> int:
        seq = self.log.append(events)
        async with self.changed:
            self.changed.notify_all()
        return seq

    async def read(self, after: int = 0, eval_id: str | None = None, timeout: float = 0.0,
                   limit: int = 1000, types: tuple[str, ...] | None = None) -> dict[str, Any]:
        result = self.log.since(after, eval_id, limit, types)
        deadline = asyncio.get_running_loop().time() + timeout
        while not result["events"] and timeout > 0:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            async with self.changed:
                try:
                    await asyncio.wait_for(self.changed.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            result = self.log.since(after, eval_id, limit, types)
        result["epoch"] = self.epoch
        return result

    async def last_seq(self) -> int:
        return self.log.seq
