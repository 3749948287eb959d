"""The platform's figures through `ray.util.metrics`, for the Ray dashboard and its Grafana.

Recorded where they happen (the scheduler, the supervisors); the API serves the same
figures in Prometheus format from the event bus (`serve_app/metrics.py`). Ray exports
these with its own `ray_` prefix.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ray.util import metrics as ray_metrics

SANDBOX_START_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]


@lru_cache(maxsize=1)
def _metrics() -> dict[str, Any]:
    return {
        "submissions": ray_metrics.Counter("proctor_submissions_total", "Evaluations submitted."),
        "shards": ray_metrics.Counter("proctor_shards_finished_total", "Shards that ended, by status.",
                                      tag_keys=("status",)),
        "samples": ray_metrics.Counter("proctor_samples_scored_total", "Sample rows scored."),
        "calls": ray_metrics.Counter("proctor_model_gateway_calls_total", "Model calls answered by the gateway."),
        "tokens": ray_metrics.Counter("proctor_model_gateway_tokens_total", "Tokens of the gateway's model calls."),
        "violations": ray_metrics.Counter("proctor_safety_violations_total", "Safety violations, by rule.",
                                          tag_keys=("rule", "action")),
        "start": ray_metrics.Histogram("proctor_sandbox_start_seconds",
                                       "From launching a sandbox to its first protocol event.",
                                       boundaries=SANDBOX_START_BUCKETS),
    }


def record_submission() -> None:
    _metrics()["submissions"].inc()


def record_shard(status: str, samples: int, model_calls: int, model_tokens: int, startup_s: float | None) -> None:
    m = _metrics()
    m["shards"].inc(tags={"status": status})
    if samples:
        m["samples"].inc(samples)
    if model_calls:
        m["calls"].inc(model_calls)
    if model_tokens:
        m["tokens"].inc(model_tokens)
    if startup_s is not None:
        m["start"].observe(startup_s)


def record_violation(rule: str, action: str) -> None:
    _metrics()["violations"].inc(tags={"rule": rule, "action": action})
