"""The API's request and answer models: what the OpenAPI document describes.

Every JSON answer is one of these (`response_model`), so the document describes it and the
answer is checked against it. Free-form parts (result rows, incident evidence, a summary)
stay `dict[str, Any]`: they are written as before, value for value. Numbers that may be
whole or not are `int | float`, so that a whole number is not rewritten as `4.0`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.state import Evaluation
from eval_actors.traces import trace_id

from .stages import ShardStages

USER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"


# ------------------------------------------------------------ evaluations


class EvaluationOut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    name: str
    owner: str
    status: str
    priority: int
    labels: dict[str, str]
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
    gpus_per_shard: int = Field(0, description="GPUs each shard asks for")
    gpu_type: str | None = Field(None, description="the GPU type the shards ask for, if any")
    suite: str = Field("", description="the task suite: the `suite` label, else the dataset file's name, "
                                       "else the evaluation's name")
    trace_id: str | None = Field(None, description="the evaluation's OpenTelemetry trace (when tracing is on)")

    @classmethod
    def of(cls, ev: Evaluation) -> "EvaluationOut":
        gpu = (ev.spec.get("sandbox") or {}).get("gpu") or {}
        return cls(**{name: getattr(ev, name) for name in cls.model_fields if hasattr(ev, name)},
                   gpus_per_shard=int(gpu.get("count") or 0), gpu_type=gpu.get("type"), suite=suite_of(ev),
                   trace_id=trace_id(ev.trace_context))


def suite_of(ev: Evaluation) -> str:
    path = (ev.spec.get("dataset") or {}).get("path")
    return ev.labels.get("suite") or (str(path).rsplit("/", 1)[-1].split(".", 1)[0] if path else "") or ev.name


class EvaluationPage(BaseModel):
    items: list[EvaluationOut]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page")


class Submitted(BaseModel):
    id: str
    status: Literal["queued"] = "queued"
    trace_id: str | None = Field(None, description="the evaluation's OpenTelemetry trace (when tracing is on)")


class Stopped(BaseModel):
    id: str
    stopped: bool
    status: str


class ShardOut(ShardStages):
    shard_id: str
    status: str
    samples: int
    units: int
    attempt: int = Field(description="the shard's current or last attempt, 1-based (as the rows' `attempt` column)")
    max_attempts: int
    resources: dict[str, Any]
    supervisor: str | None
    placement: str | None
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None


class EvaluationDetail(BaseModel):
    id: str
    spec: dict[str, Any]
    shards: list[ShardOut]


# ------------------------------------------------------------ results


class ResultsPage(BaseModel):
    id: str
    status: str
    summary: dict[str, Any] | None = Field(description="metrics per scorer; null until the evaluation ends")
    rows: list[dict[str, Any]] = Field(description="sample rows (the schema of `cluster/results.py`, without "
                                                   "`scores` and `answers`; `stages` as an object)")
    total: int
    offset: int
    partial: bool = Field(description="the evaluation runs: these are the rows written so far")


class Artifact(BaseModel):
    path: str = Field(description="<shard_id>/<path inside the sandbox's workspace>")
    size: int
    url: str | None = Field(None, description="a pre-signed download URL when results are on S3")


class ArtifactList(BaseModel):
    id: str
    artifacts: list[Artifact]


# ------------------------------------------------------------ safety


class IncidentOut(BaseModel):
    id: int
    eval_id: str
    shard_id: str | None
    rule: str = Field(description="<monitor>/<rule>")
    severity: str
    action: str
    evidence: dict[str, Any]
    created_at: str = Field(description="ISO 8601")


class IncidentList(BaseModel):
    id: str
    incidents: list[IncidentOut]


class RecentIncident(IncidentOut):
    evaluation: str = Field(description="the evaluation's name")
    owner: str


class RecentIncidents(BaseModel):
    incidents: list[RecentIncident]


class StoppedAll(BaseModel):
    stopped: list[str] = Field(description="the evaluations the emergency stop reached")


# ------------------------------------------------------------ tokens


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # a JSON boolean is not a number of days
    user: str = Field(pattern=USER_NAME, description="the user the key acts as; created if new (then `role` is needed)")
    role: Literal["viewer", "researcher", "safety", "admin"] | None = Field(
        None, description="the user's role; must match an existing user's")
    name: str = Field("api key", min_length=1, max_length=128, description="what the key is for")
    expires_in_days: int | None = Field(None, ge=1, le=3650, description="none: it never expires")


class TokenCreated(BaseModel):
    id: int
    token: str = Field(description="the secret: shown this once, stored only hashed")
    user: str
    role: str
    name: str
    expires_at: datetime | None


class TokenOut(BaseModel):
    id: int
    user: str
    role: str
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked: bool


class TokenPage(BaseModel):
    items: list[TokenOut]


class Revoked(BaseModel):
    id: int
    revoked: bool


# ------------------------------------------------------------ platform


class Me(BaseModel):
    name: str
    role: str


Number = int | float


class ResultsStoreStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    degraded: bool = Field(description="rows wait on local disk for the results store")
    waiting: int = Field(description="writes waiting")
    bytes: int
    since: Number | None = Field(description="unix seconds of the oldest waiting write")
    folder: str = Field(description="where they wait")
    evaluations: list[str]


class Amount(BaseModel):
    total: Number
    free: Number


class ClusterStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    queued_shards: int
    oldest_wait_s: Number
    running_shards: int
    admitted_total: int
    cpus: Amount
    memory: Amount = Field(description="bytes")
    gpus: dict[str, Amount] = Field(description="by GPU type")
    waiting: dict[str, str | None] = Field(description="why each waiting evaluation waits, by id")
    results_store: ResultsStoreStatus | None = Field(description="null when the aggregator does not answer")


class Health(BaseModel):
    live: bool
    ready: bool = Field(description="the store and the control plane answer")
    checks: dict[str, str] = Field(description="store, control_plane, results_store: `ok` or what is wrong")
    results_store: ResultsStoreStatus | None


# ------------------------------------------------------------ errors


class ErrorDetail(BaseModel):
    code: str = Field(description="stable: clients branch on it")
    message: str = Field(description="for people")
    fields: list[dict[str, str]] | None = Field(None, description="the bad fields: [{field, reason}]")


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what} for status, what in [
        (400, "the request could not be read (e.g. a body that is not JSON)"),
        (401, "no token, or a bad, expired or revoked one"), (403, "the caller's role does not allow it"),
        (404, "no such thing, or not the caller's to see"), (409, "it conflicts with the current state"),
        (413, "the request body is too large"), (422, "invalid input; `fields` names each bad one"),
        (429, "rate limited; `Retry-After` says when to retry"), (503, "the control plane or a store is unavailable"),
    ]
}
