"""Prometheus metrics of the platform, served at `GET /api/v1/metrics`.

Counters and histograms are fed from the event bus (DESIGN.md: the metrics read from it),
by one task per API replica that follows every event from the moment the replica started;
gauges (evaluations by status, queue depth, GPUs) are read from the state store and the
scheduler at scrape time. The same figures are also recorded by the actors through
`ray.util.metrics` (`eval_actors/metrics.py`) for the Ray dashboard and its Grafana.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("proctor.api.metrics")

SANDBOX_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
EVAL_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TERMINAL = {"succeeded", "failed", "cancelled", "safety_stopped"}


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.submissions = Counter("proctor_submissions_total", "Evaluations submitted.", registry=r)
        self.finished = Counter("proctor_evaluations_finished_total", "Evaluations that ended, by final status.",
                                ["status"], registry=r)
        self.evaluations = Gauge("proctor_evaluations", "Evaluations in the state store, by status.",
                                 ["status"], registry=r)
        self.queued_shards = Gauge("proctor_queue_depth_shards", "Shards waiting for capacity.", registry=r)
        self.running_shards = Gauge("proctor_running_shards", "Shards admitted and running.", registry=r)
        self.gpus_total = Gauge("proctor_gpus", "GPUs in the cluster, by type.", ["gpu_type"], registry=r)
        self.gpus_allocated = Gauge("proctor_gpus_allocated", "GPUs held by running shards, by type.",
                                    ["gpu_type"], registry=r)
        self.sandbox_start = Histogram("proctor_sandbox_start_seconds",
                                       "From launching a sandbox to its first protocol event.",
                                       buckets=SANDBOX_START_BUCKETS, registry=r)
        self.eval_duration = Histogram("proctor_evaluation_duration_seconds",
                                       "From submission to the final status.", buckets=EVAL_DURATION_BUCKETS,
                                       registry=r)
        self.shards_finished = Counter("proctor_shards_finished_total", "Shards that ended, by status.",
                                       ["status"], registry=r)
        self.samples = Counter("proctor_samples_scored_total", "Sample rows scored (samples x epochs).",
                               registry=r)
        self.model_calls = Counter("proctor_model_gateway_calls_total", "Model calls answered by the gateway.",
                                   registry=r)
        self.model_tokens = Counter("proctor_model_gateway_tokens_total",
                                    "Tokens (input + output) of the gateway's model calls.", registry=r)
        self.violations = Counter("proctor_safety_violations_total", "Safety violations, by rule.", ["rule"],
                                  registry=r)
        self.requests = Histogram("proctor_api_request_duration_seconds", "API request latency.",
                                  ["method", "route", "status"], buckets=REQUEST_BUCKETS, registry=r)
        self.events_lost = Counter("proctor_metrics_events_missed_total",
                                   "Bus events this replica could not read (it fell behind or the bus restarted).",
                                   registry=r)
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ events

    def observe(self, event: dict[str, Any]) -> None:
        """Count one bus event."""
        kind = event.get("type")
        if kind == "status":
            status = event.get("status")
            if status == "queued":
                self.submissions.inc()
            elif status in TERMINAL:
                self.finished.labels(status).inc()
                duration = (event.get("summary") or {}).get("duration_s")
                if isinstance(duration, (int, float)) and duration >= 0:
                    self.eval_duration.observe(duration)
        elif kind == "shard" and event.get("status") in TERMINAL:
            self.shards_finished.labels(event["status"]).inc()
            self.samples.inc(_count(event.get("samples")))
            self.model_calls.inc(_count(event.get("model_calls")))
            self.model_tokens.inc(_count(event.get("model_tokens")))
            start = event.get("startup_s")
            if isinstance(start, (int, float)) and start >= 0:
                self.sandbox_start.observe(start)
        elif kind == "incident":
            self.violations.labels(str(event.get("rule") or "unknown")[:100]).inc()

    def follow(self, read: Callable[[int], Awaitable[dict[str, Any]]], first: Callable[[], Awaitable[int]]) -> None:
        """Start following the bus (once): `read(after)` long-polls it, `first()` gives the
        sequence number to start after."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._follow(read, first))

    async def _follow(self, read: Callable[[int], Awaitable[dict[str, Any]]],
                      first: Callable[[], Awaitable[int]]) -> None:
        after, epoch = -1, None
        while True:
            try:
                if after < 0:
                    after = await first()
                answer = await read(after)
                if epoch is not None and answer.get("epoch") != epoch:
                    self.events_lost.inc()
                    epoch, after = answer.get("epoch"), 0  # a new bus: its numbers start again
                    continue
                if answer.get("gap"):
                    self.events_lost.inc()
                epoch = answer.get("epoch")
                for event in answer["events"]:
                    self.observe(event)
                after = answer["last_seq"]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the bus is restarting: try again shortly
                log.debug("metrics could not read the bus: %s", exc)
                await asyncio.sleep(1.0)

    # ------------------------------------------------------------ scrape

    def refresh(self, counts: dict[str, int], cluster: dict[str, Any] | None) -> None:
        for status in set(counts) | {s for (s,) in _label_values(self.evaluations)}:
            self.evaluations.labels(status).set(counts.get(status, 0))
        if cluster is not None:
            self.queued_shards.set(cluster.get("queued_shards", 0))
            self.running_shards.set(cluster.get("running_shards", 0))
            for gpu_type, g in (cluster.get("gpus") or {}).items():
                self.gpus_total.labels(gpu_type).set(g.get("total", 0))
                self.gpus_allocated.labels(gpu_type).set(g.get("total", 0) - g.get("free", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request(self, method: str, route: str, status: int, started: float) -> None:
        self.requests.labels(method, route, str(status)).observe(time.perf_counter() - started)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _label_values(metric: Gauge) -> list[tuple[str, ...]]:
    return list(metric._metrics)  # noqa: SLF001 - prometheus_client has no public accessor
