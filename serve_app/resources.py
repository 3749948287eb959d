"""An evaluation's resource use over time, for graphs: the kept series of its ended
shards (`_resources/` in the results store) and the live ones its supervisors hold.

Samples are what the runtime measured for the sandbox, never what the sandbox said:
`t` (unix seconds), `memory` (bytes), `pids`, `disk` (workspace bytes), `output` (bytes
written), `cpu_s` (CPU seconds so far), and `cpu` (cores, from consecutive `cpu_s`).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field

METRICS = ("memory", "pids", "disk", "output", "cpu_s", "gpu_util", "gpu_memory")


class ResourceSeries(BaseModel):
    shard_id: str
    attempt: int | None
    live: bool = Field(description="the shard is running; its series still grows")
    samples: list[dict[str, float]] = Field(description="t, memory, pids, disk, output, cpu_s and cpu (cores); "
                                                        "gpu_util and gpu_memory where the runtime reports them")


class EvaluationResources(BaseModel):
    id: str
    gpus_per_shard: int
    gpu_type: str | None
    shards: list[ResourceSeries]


def clean(samples: list[Any]) -> list[dict[str, float]]:
    """Finite numbers only, oldest first, with `cpu` (cores) between consecutive samples."""
    kept: list[dict[str, float]] = []
    for raw in samples:
        if not isinstance(raw, dict) or not _number(raw.get("t")):
            continue
        kept.append({"t": float(raw["t"]), **{k: float(raw[k]) for k in METRICS if _number(raw.get(k))}})
    kept.sort(key=lambda x: x["t"])
    for before, now in zip(kept, kept[1:]):
        dt = now["t"] - before["t"]
        if dt > 0 and "cpu_s" in now and "cpu_s" in before:
            now["cpu"] = round(max(0.0, now["cpu_s"] - before["cpu_s"]) / dt, 4)
    return kept


def merge(eval_id: str, spec: dict[str, Any], stored: list[dict[str, Any]],
          live: list[dict[str, Any]]) -> EvaluationResources:
    """One series per shard attempt; a live series wins over a stored one of the same attempt."""
    series: dict[tuple[str, Any], ResourceSeries] = {}
    for entry in [*stored, *live]:
        key = (str(entry.get("shard_id")), entry.get("attempt"))
        attempt = entry.get("attempt") if isinstance(entry.get("attempt"), int) else None
        series[key] = ResourceSeries(shard_id=key[0], attempt=attempt, live=bool(entry.get("live")),
                                     samples=clean(entry.get("samples") or []))
    gpu = ((spec.get("sandbox") or {}).get("gpu") or {})
    return EvaluationResources(id=eval_id, gpus_per_shard=int(gpu.get("count") or 0), gpu_type=gpu.get("type"),
                               shards=sorted(series.values(), key=lambda s: (s.shard_id, s.attempt or 0)))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
