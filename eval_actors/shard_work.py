"""What a shard runner (the shard executor, the Inspect shard runner) is given and gives back.

`ShardWork` is the shard to run, `StopSignal` how the platform stops it while it runs, and
`ShardOutcome` its end, as data: runners return one for every failure of the shard and
raise only `asyncio.CancelledError`. `ShardSafety` is the frozen record of what the
shard's safety guard saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cluster.results import SampleRecord
from cluster.runtimes import SandboxExit
from proctor.protocol import Rejection
from proctor.spec import EvaluationSpec, PythonModel, ReferenceModel, Sample

LATE_SAMPLE = "finished after the emergency stop was requested: not a result"

ShardStatus = Literal["succeeded", "failed", "cancelled", "safety_stopped"]


class StopSignal(asyncio.Event):
    """A cancel event that can also ask for an immediate kill (`hard`: the emergency stop)."""

    hard: bool = False
    reason: str = "cancelled"

    def __init__(self) -> None:
        super().__init__()
        self.killed = asyncio.Event()  # set once a hard stop's sandbox is dead

    def stop(self, hard: bool = False, reason: str = "cancelled") -> None:
        self.hard = self.hard or hard
        self.reason = reason
        self.set()


@dataclass(frozen=True)
class ShardWork:
    eval_id: str
    shard_id: str
    spec: EvaluationSpec
    samples: tuple[Sample, ...]
    epochs: tuple[int, ...] = (1,)

    @property
    def units(self) -> int:
        return len(self.samples) * len(self.epochs)


@dataclass(frozen=True)
class ShardSafety:
    """What a shard's safety guard saw (`SafetyGuard.summary`, frozen), with its resource
    trace and series. Violations are in their stored form (`Violation.as_dict`, with
    `transcript` where the transcripts place them): they go as they are into incidents
    and the quarantine report."""

    violations: tuple[dict[str, Any], ...] = ()
    stopped_by: dict[str, Any] | None = None  # the violation that stopped the shard
    dropped: int = 0  # violations over the guard's bound, counted and not kept
    started_at: float | None = None  # when the guard started watching (wall clock)
    killed_at: float | None = None  # when a safety stop's sandbox was dead (wall clock)
    kill_s: float | None = None  # seconds from the stopping violation's detection to the dead sandbox
    trace: tuple[dict[str, Any], ...] = ()  # the resource monitor's recent samples (evidence)
    resources: tuple[dict[str, Any], ...] = ()  # the shard's resource use over its run (for graphs)

    @classmethod
    def of(cls, summary: Mapping[str, Any], trace: list[dict[str, Any]] | None = None,
           resources: list[dict[str, Any]] | None = None) -> ShardSafety:
        """The record of a guard's `summary()` (and its `trace()` and `resources()`)."""
        return cls(violations=tuple(summary.get("violations") or ()), stopped_by=summary.get("stopped_by"),
                   dropped=int(summary.get("dropped") or 0), started_at=summary.get("started_at"),
                   killed_at=summary.get("killed_at"), kill_s=summary.get("kill_s"),
                   trace=tuple(trace or ()), resources=tuple(resources or ()))

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (the guard summary's keys), as the quarantine report and
        `safety.incident.evidence_of` read it."""
        return {"violations": list(self.violations), "dropped": self.dropped, "stopped_by": self.stopped_by,
                "killed_at": self.killed_at, "started_at": self.started_at, "kill_s": self.kill_s,
                "trace": list(self.trace), "resources": list(self.resources)}

    def __getitem__(self, key: str) -> Any:
        """A value of the JSON form by its key (`safety["violations"]`: a list), as the
        guard summary this record replaced was read."""
        return self.as_dict()[key]


@dataclass(frozen=True)
class ShardOutcome:
    eval_id: str
    shard_id: str
    status: ShardStatus
    records: tuple[SampleRecord, ...]
    runtime: str
    isolation: str
    error: str | None = None
    exit: SandboxExit | None = None
    rejections: tuple[Rejection, ...] = ()
    artifacts: tuple[tuple[str, bytes], ...] = ()
    quarantined_artifacts: tuple[tuple[str, bytes], ...] = ()  # flagged by the cleanup scan: not published
    logs: tuple[str, ...] = ()
    duration_s: float = 0.0
    first_event_s: float | None = None
    model_calls: int = 0  # answered by the gateway (counted outside the sandbox)
    model_tokens: int = 0
    safety: ShardSafety = ShardSafety()  # the guard's violations, stop and resource trace
    transcripts: tuple[Any, ...] = ()  # every sample × epoch's SampleTranscript (none when they are off)
    retryable: bool = False  # failed for the platform's sake, not the shard's: the supervisor queues it again


def render_input(value: str | list[Any]) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(f"{m.role}: {m.content}" for m in value)


def render_target(value: str | list[str]) -> str:
    return value if isinstance(value, str) else " | ".join(value)


def model_label(spec: EvaluationSpec) -> str:
    """The model as a row names it: `reference`, `python:<callable>`, `openai:<model>`, `inspect:<model>`."""
    m = spec.model
    if isinstance(m, ReferenceModel):
        return "reference"
    if isinstance(m, PythonModel):
        return f"python:{m.callable}"
    return f"{m.adapter}:{m.model}"
