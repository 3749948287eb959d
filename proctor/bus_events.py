"""The platform's events: what the event bus carries and the WebSocket stream sends.

Every event is a JSON object with `type` (which model below it is), `v` (the version of
this vocabulary it is written in), `seq` and `ts` (stamped by the bus), and the
evaluation it belongs to (`eval_id`; None for platform-wide ones). `BusEvent` is their
union, discriminated by `type`, like the runner protocol's (`proctor.protocol`).

Publishers build these models and send `event(model)`, their JSON form; consumers (the
API's streams, its metrics) read them through `read_events`, which keeps the events that
validate, in their JSON form as published, and drops the rest with a warning: a
malformed event never reaches a client.
A newer publisher may add fields (they pass through); a new `type` or `v` is a new entry here.

    from proctor.bus_events import parse_event

    for raw in client.events(eval_id):
        event = parse_event(raw)       # StatusEvent, ShardEvent, ProgressEvent, ...
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Annotated, Final, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .jsontypes import JsonObject
from .statuses import Status

BUS_VERSION: Literal[1] = 1
BUS_VERSIONS = (1,)  # what this side reads

log = logging.getLogger("proctor.bus")


class _Event(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)  # a newer publisher's fields pass through

    v: Literal[1] = Field(BUS_VERSION, description="the version of the event vocabulary")
    seq: int | None = Field(None, ge=0, description="the bus's sequence number, strictly increasing")
    ts: float | None = Field(None, description="when it was published (Unix time)")
    eval_id: str | None = Field(None, description="the evaluation it belongs to; None: the platform's")


class StatusEvent(_Event):
    """An evaluation's status changed (`summary` once it has finished)."""

    type: Literal["status"] = "status"
    eval_id: str
    status: Status
    owner: str | None = None
    name: str | None = None
    summary: JsonObject | None = None


class ShardEvent(_Event):
    """A shard's status changed: scheduled (where, for what), running (which supervisor),
    queued again (why), or ended (its figures)."""

    type: Literal["shard"] = "shard"
    eval_id: str
    shard_id: str
    status: Status
    error: str | None = None
    reason: str | None = Field(None, description="why it was queued again")
    node: str | None = None
    demand: str | None = None
    supervisor: str | None = None
    wait_s: float | None = Field(None, description="seconds it waited in the queue")
    runtime: str | None = None
    isolation: str | None = None
    rejections: int | None = Field(None, ge=0)
    duration_s: float | None = None
    startup_s: float | None = None
    samples: int | None = Field(None, ge=0)
    launched: bool | None = Field(None, description="whether its sandbox started")
    model_calls: int | None = Field(None, ge=0)
    model_tokens: int | None = Field(None, ge=0)


class ProgressEvent(_Event):
    """Samples done of a shard (`done` of `total` units)."""

    type: Literal["progress"] = "progress"
    shard_id: str | None = None
    done: int | None = Field(None, ge=0)
    total: int | None = Field(None, ge=0)


class LogEvent(_Event):
    """A log line of a shard's sandbox (the `n`th of its attempt)."""

    type: Literal["log"] = "log"
    eval_id: str
    shard_id: str
    n: int = Field(ge=0)
    attempt: int = Field(ge=1)
    level: str
    message: str


class IncidentEvent(_Event):
    """A safety violation, recorded as an incident."""

    type: Literal["incident"] = "incident"
    eval_id: str
    id: int
    shard_id: str | None = None
    rule: str
    severity: str
    action: str
    evidence: JsonObject = Field(default_factory=dict)
    created_at: str


class WaitingEvent(_Event):
    """Why a queued evaluation waits (e.g. `needs 2 x H100`)."""

    type: Literal["waiting"] = "waiting"
    eval_id: str
    reason: str


class StoreEvent(_Event):
    """A store (`state`, `results`) failed or came back."""

    type: Literal["store"] = "store"
    store: str
    degraded: bool


BusEvent = Annotated[
    Union[StatusEvent, ShardEvent, ProgressEvent, LogEvent, IncidentEvent, WaitingEvent, StoreEvent],
    Field(discriminator="type"),
]
EVENT_TYPES = ("status", "shard", "progress", "log", "incident", "waiting", "store")
_adapter: TypeAdapter[StatusEvent | ShardEvent | ProgressEvent | LogEvent | IncidentEvent | WaitingEvent | StoreEvent] = TypeAdapter(BusEvent)


def event(model: _Event) -> JsonObject:
    """A typed event as publishers send it: its JSON form with `type`, `v` and the fields
    that were given (a field given as None stays, as null; `seq` and `ts` are the bus's)."""
    data: JsonObject = model.model_dump(mode="json", exclude_unset=True)
    return {"type": getattr(model, "type"), "v": model.v, **data}


def parse_event(data: object) -> BusEvent:
    """The typed event of a decoded JSON object. Raises pydantic's `ValidationError`."""
    return _adapter.validate_python(data)


def read_events(events: Iterable[JsonObject]) -> list[JsonObject]:
    """The events that validate, as they were published (their JSON form); each one that
    does not is dropped and logged."""
    kept = []
    for event in events:
        try:
            parse_event(event)
        except ValidationError as exc:
            log.warning("a bus event was dropped (type %r, seq %r): %s", event.get("type"), event.get("seq"),
                        "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]))
            continue
        kept.append(event)
    return kept
