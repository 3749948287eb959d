"""What the API answers, as the clients return it (frozen; a newer server may add fields)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from .jsontypes import JsonObject
from .statuses import TERMINAL

class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)  # a newer server may add fields


class Evaluation(_Answer):
    """One evaluation as the API shows it. `summary` holds `metrics` per scorer (mean,
    ci_low, ci_high, n, ...), counts, usage and timing once it has finished."""

    id: str
    name: str = ""
    owner: str = ""
    status: str = "queued"
    priority: int = 0
    labels: dict[str, str] = {}
    model: str = ""
    runtime: str = ""
    total_shards: int = 0
    total_units: int = 0
    done_units: int = 0
    wait_reason: str | None = None
    error: str | None = None
    summary: JsonObject | None = None
    results_uri: str | None = None
    created_at: datetime | None = None
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    gpus_per_shard: int = 0
    gpu_type: str | None = None
    suite: str = ""
    trace_id: str | None = None  # its OpenTelemetry trace, where the platform traces

    @property
    def finished(self) -> bool:
        """Whether the status is final (succeeded, failed, cancelled or safety_stopped)."""
        return self.status in TERMINAL


class Stopped(_Answer):
    id: str
    stopped: bool
    status: str


class Artifact(_Answer):
    path: str  # `<shard_id>/<relative path>`
    size: int = 0
    url: str | None = None  # pre-signed, when results are on S3


class Token(_Answer):
    id: int
    user: str
    role: str
    name: str = ""
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked: bool = False


class NewToken(_Answer):
    id: int
    token: str  # the secret: shown once
    user: str
    role: str
    name: str = ""
    expires_at: datetime | None = None

