"""How an evaluation's end is decided from its shards, once every shard has ended: its
final status, and what its summary says of them (the aggregator adds the metrics)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from proctor.statuses import TERMINAL


def all_ended(shards: Sequence[Any]) -> bool:
    return all(s.status in TERMINAL for s in shards)


def final_status(shards: Sequence[Any], cancelling: str | None) -> str:
    """A safety stop wins; then the cancel asked for (`cancelling`: cancelled or
    safety_stopped); then any failed or cancelled shard fails it; else it succeeded."""
    statuses = {s.status for s in shards}
    return ("safety_stopped" if "safety_stopped" in statuses else cancelling
            or ("failed" if "failed" in statuses or "cancelled" in statuses else "succeeded"))


def shard_errors(shards: Sequence[Any]) -> list[str]:
    """The distinct errors of the shards that did not succeed, sorted."""
    return sorted({s.error for s in shards if s.error and s.status != "succeeded"})


def summary_fields(ev: Any, shards: Sequence[Any], final: str, errors: list[str]) -> dict[str, Any]:
    """What the summary of evaluation `ev` says beside its metrics."""
    return {
        "name": ev.name, "status": final, "labels": ev.labels, "owner": ev.owner,
        "shards": {"total": len(shards), "failed": sum(s.status == "failed" for s in shards)},
        "shard_errors": errors[:20],
        "duration_s": round(time.time() - ev.created_at.timestamp(), 3),
    }
