"""The platform's event vocabulary: every shape the control plane publishes validates as its
type, a malformed or unknown event is dropped before it reaches a reader, and what passes
goes out exactly as it was published."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from pydantic import ValidationError

from eval_actors.events import EventLog
from proctor.bus_events import (
    BUS_VERSION,
    EVENT_TYPES,
    IncidentEvent,
    LogEvent,
    ProgressEvent,
    ShardEvent,
    StatusEvent,
    StoreEvent,
    WaitingEvent,
    parse_event,
    read_events,
)

# one of each as the scheduler, the supervisors and the aggregator publish them
PUBLISHED: list[tuple[type, dict[str, Any]]] = [
    (StatusEvent, {"type": "status", "eval_id": "ev-1", "status": "queued", "owner": "alice", "name": "arith"}),
    (StatusEvent, {"type": "status", "eval_id": "ev-1", "status": "succeeded", "summary": {"duration_s": 1.5}}),
    (WaitingEvent, {"type": "waiting", "eval_id": "ev-1", "reason": "needs 2 x H100"}),
    (ShardEvent, {"type": "shard", "eval_id": "ev-1", "shard_id": "00000", "status": "scheduled", "node": "n1",
                  "demand": "1 CPU, 1.0 GiB", "supervisor": "sup-0", "wait_s": 0.25}),
    (ShardEvent, {"type": "shard", "eval_id": "ev-1", "shard_id": "00000", "status": "running",
                  "supervisor": "sup-0", "runtime": "gvisor"}),
    (ShardEvent, {"type": "shard", "eval_id": "ev-1", "shard_id": "00000", "status": "queued",
                  "reason": "its supervisor was lost"}),
    (ShardEvent, {"type": "shard", "eval_id": "ev-1", "shard_id": "00000", "status": "succeeded", "error": None,
                  "runtime": "gvisor", "isolation": "strong", "rejections": 0, "duration_s": 2.1, "startup_s": 0.4,
                  "samples": 3, "launched": True, "model_calls": 0, "model_tokens": 0}),
    (ProgressEvent, {"type": "progress", "eval_id": "ev-1", "shard_id": "00000", "done": 2, "total": 3}),
    (ProgressEvent, {"type": "progress", "eval_id": None, "probe": True, "ts": 1.0}),  # benchmarks' probe
    (LogEvent, {"type": "log", "eval_id": "ev-1", "n": 0, "ts": 2.0, "shard_id": "00000", "attempt": 1,
                "level": "info", "message": "hello"}),
    (IncidentEvent, {"type": "incident", "id": 7, "eval_id": "ev-1", "shard_id": "00000", "rule": "rules/exfil",
                     "severity": "high", "action": "stop", "evidence": {"lines": ["x"]},
                     "created_at": "2026-01-01T00:00:00+00:00"}),
    (StoreEvent, {"type": "store", "store": "results", "degraded": True}),
]


@pytest.mark.parametrize("model, event", PUBLISHED, ids=lambda x: x.get("type") if isinstance(x, dict) else "")
def test_what_the_platform_publishes_validates_as_its_type(model: type, event: dict[str, Any]) -> None:
    stamped = EventLog()
    stamped.append([event])
    [out] = stamped.since(0)["events"]
    typed = parse_event(out)
    assert type(typed) is model and typed.v == BUS_VERSION and typed.seq == 1
    assert read_events([out]) == [out]  # passed on as published, fields a model does not name too


def test_every_type_has_a_model() -> None:
    assert {e["type"] for _, e in PUBLISHED} == set(EVENT_TYPES)


@pytest.mark.parametrize("event, why", [
    ({"type": "status", "eval_id": "ev-1", "status": "done"}, "status"),  # not a status
    ({"type": "log", "eval_id": "ev-1", "n": 0, "shard_id": "0", "attempt": 1, "level": "info"}, "message"),
    ({"type": "shard", "eval_id": "ev-1", "status": "running"}, "shard_id"),
    ({"type": "teleport", "eval_id": "ev-1"}, "teleport"),
    ({"type": "status", "eval_id": "ev-1", "status": "queued", "v": 2}, "v"),  # a version this side cannot read
    ({"eval_id": "ev-1"}, "type"),
])
def test_a_malformed_or_unknown_event_is_dropped_and_said(event: dict[str, Any], why: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValidationError):
        parse_event(event)
    good = {"type": "waiting", "eval_id": "ev-1", "reason": "r", "seq": 2}
    with caplog.at_level(logging.WARNING, logger="proctor.bus"):
        assert read_events([{**event, "seq": 1}, good]) == [good]
    assert "a bus event was dropped" in caplog.text and why in caplog.text


def test_the_bus_keeps_a_publishers_version_and_stamps_the_rest() -> None:
    log = EventLog()
    log.append([{"type": "waiting", "eval_id": "e", "reason": "r"}, {"type": "waiting", "eval_id": "e",
                                                                     "reason": "r", "v": 1, "ts": 5.0}])
    first, second = log.since(0, "e")["events"]
    assert (first["v"], first["seq"], second["seq"], second["ts"]) == (BUS_VERSION, 1, 2, 5.0)
    assert json.loads(json.dumps(first)) == first  # plain JSON on the WebSocket
