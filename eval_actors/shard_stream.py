"""What a running shard streams while it runs: rows to the aggregator, progress and log
lines to the event bus, and the log lines it keeps for the shard's attempt.

`ShardStream` is the supervisor's callbacks for one shard attempt (the executor's
`on_record` and `on_event`, the Inspect runner's `progressed`), with no Ray in it: the
aggregator's `add_records` and the bus's publish are passed in. Rows go at most every
`STREAM_EVERY_S` (the shard's end hands all of them over again, idempotently), progress
at most every `PROGRESS_EVERY_S`; every log line is published live, the first
`MAX_LOG_LINES` are kept, and a last line says how many more were not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from proctor.bus_events import LogEvent, ProgressEvent, event
from proctor.jsontypes import JsonObject

PROGRESS_EVERY_S = 0.25
STREAM_EVERY_S = 1.0
MAX_LOG_LINES = 10_000  # kept per shard attempt (all are published live)


class ShardStream:
    def __init__(self, eval_id: str, shard_id: str, attempt: int, units: int,
                 add_records: Callable[[list[Any]], None], publish: Callable[[list[JsonObject]], None]):
        self.eval_id, self.shard_id, self.attempt, self.units = eval_id, shard_id, attempt, units
        self.add_records = add_records
        self.publish = publish
        self.pending: list[Any] = []
        self.done = 0
        self.logs: list[JsonObject] = []
        self.dropped_logs = 0
        self._progress_at = self._streamed_at = 0.0

    def on_record(self, record: Any) -> None:
        """A scored sample: counted, and sent with those gathered since the last send."""
        self.pending.append(record)
        self.done += 1
        now = time.monotonic()
        if now - self._streamed_at > STREAM_EVERY_S:
            self._streamed_at = now
            self.add_records(list(self.pending))
            self.pending.clear()

    def on_event(self, ev: Any) -> None:
        """A runner event: progress (throttled) and log lines."""
        if ev.type == "progress" and time.monotonic() - self._progress_at > PROGRESS_EVERY_S:
            self._progress_at = time.monotonic()
            self.publish([self.progress(self.done)])
        elif ev.type == "log":
            line: JsonObject = {"n": len(self.logs) + self.dropped_logs, "ts": time.time(),
                                "shard_id": self.shard_id, "attempt": self.attempt, "level": ev.level,
                                "message": ev.message[:2000]}
            if len(self.logs) < MAX_LOG_LINES:
                self.logs.append(line)
            else:
                self.dropped_logs += 1
            self.publish([event(LogEvent(eval_id=self.eval_id, **line))])

    def progressed(self, finished: int) -> None:
        """Samples finished so far, as the Inspect runner counts them (throttled; the last always)."""
        if time.monotonic() - self._progress_at > PROGRESS_EVERY_S or finished == self.units:
            self._progress_at = time.monotonic()
            self.publish([self.progress(finished)])

    def progress(self, done: int) -> JsonObject:
        return event(ProgressEvent(eval_id=self.eval_id, shard_id=self.shard_id, done=done, total=self.units))

    def kept_logs(self) -> list[JsonObject]:
        """The attempt's log lines to store, with a last one saying how many were not kept."""
        if not self.dropped_logs:
            return self.logs
        return [*self.logs, {"n": len(self.logs) + self.dropped_logs, "ts": time.time(), "shard_id": self.shard_id,
                             "attempt": self.attempt, "level": "warning",
                             "message": f"proctor: {self.dropped_logs} more log lines were not kept"}]
