"""Prometheus metrics of the platform, served at `GET /api/v1/metrics`.

Counters and histograms are fed from the event bus (docs/architecture.md: the metrics read from it),
by one task per API replica that follows every event from the moment the replica started;
gauges (evaluations by status, queue depth and wait, GPUs, the stores' health) are read
from the state store and the scheduler at scrape time. Every replica follows the whole
bus, so its counters count the whole platform: dashboards and alerts take the `max` over
replicas of those, and the `sum` of the request histograms (each replica's own). The same figures are also recorded by the actors through
`ray.util.metrics` (`eval_actors/metrics.py`) for the Ray dashboard and its Grafana.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proctor.statuses import TERMINAL

log = logging.getLogger("proctor.api.metrics")

SANDBOX_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
EVAL_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 300, 900, 1800, 3600, 7200, 21600, 86400)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.submissions = Counter("proctor_submissions_total", "Evaluations submitted.", registry=r)
        self.finished = Counter("proctor_evaluations_finished_total", "Evaluations that ended, by final status.",
                                ["status"], registry=r)
        self.evaluations = Gauge("proctor_evaluations", "Evaluations in the state store, by status.",
                                 ["status"], registry=r)
        self.queued_shards = Gauge("proctor_queue_depth_shards", "Shards waiting for capacity.", registry=r)
        self.oldest_wait = Gauge("proctor_queue_oldest_wait_seconds",
                                 "How long the shard that has waited longest for capacity has waited.", registry=r)
        self.queue_wait = Histogram("proctor_queue_wait_seconds", "From a shard's queueing to its admission.",
                                    buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.running_shards = Gauge("proctor_running_shards", "Shards admitted and running.", registry=r)
        self.gpus_total = Gauge("proctor_gpus", "GPUs in the cluster, by type.", ["gpu_type"], registry=r)
        self.gpus_allocated = Gauge("proctor_gpus_allocated", "GPUs held by running shards, by type.",
                                    ["gpu_type"], registry=r)
        self.sandbox_start = Histogram("proctor_sandbox_start_seconds",
                                       "From launching a sandbox to its first protocol event.",
                                       buckets=SANDBOX_START_BUCKETS, registry=r)
        self.launches = Counter("proctor_sandbox_launches_total",
                                "Sandbox launches of shards that ended, by result (ok, failed: it never started).",
                                ["result"], registry=r)
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
        self.violations = Counter("proctor_safety_violations_total", "Safety violations, by rule and action.",
                                  ["rule", "action"], registry=r)
        self.store_down = Gauge("proctor_store_degraded",
                                "1 while a store (state, results) fails or is being recovered, else 0.", ["store"],
                                registry=r)
        self.requests = Histogram("proctor_api_request_duration_seconds", "API request latency.",
                                  ["method", "route", "status"], buckets=REQUEST_BUCKETS, registry=r)
        self.events_lost = Counter("proctor_metrics_events_missed_total",
                                   "Bus events this replica could not read (it fell behind or the bus restarted).",
                                   registry=r)
        for store in ("state", "results"):
            self.store_down.labels(store).set(0)
        for result in ("ok", "failed"):
            self.launches.labels(result)
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
        elif kind == "shard" and event.get("status") == "scheduled":
            wait = event.get("wait_s")
            if isinstance(wait, (int, float)) and wait >= 0:
                self.queue_wait.observe(wait)
        elif kind == "shard" and event.get("status") in TERMINAL:
            self.shards_finished.labels(event["status"]).inc()
            if isinstance(event.get("launched"), bool):
                self.launches.labels("ok" if event["launched"] else "failed").inc()
            self.samples.inc(_count(event.get("samples")))
            self.model_calls.inc(_count(event.get("model_calls")))
            self.model_tokens.inc(_count(event.get("model_tokens")))
            start = event.get("startup_s")
            if isinstance(start, (int, float)) and start >= 0:
                self.sandbox_start.observe(start)
        elif kind == "store" and event.get("store") in ("state", "results"):
            # published by whoever sees a store fail or recover: {"store": "results", "degraded": true}
            self.store_degraded(event["store"], bool(event.get("degraded")))
        elif kind == "incident":
            self.violations.labels(str(event.get("rule") or "unknown")[:100],
                                   str(event.get("action") or "unknown")[:20]).inc()

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

    def refresh(self, counts: dict[str, int] | None, cluster: dict[str, Any] | None) -> None:
        """Set the gauges from the store's counts and the scheduler's status (None: not
        readable now; those gauges keep their last values)."""
        if counts is not None:
            for status in set(counts) | {s for (s,) in _label_values(self.evaluations)}:
                self.evaluations.labels(status).set(counts.get(status, 0))
        if cluster is not None:
            self.queued_shards.set(cluster.get("queued_shards", 0))
            self.oldest_wait.set(cluster.get("oldest_wait_s", 0))
            self.running_shards.set(cluster.get("running_shards", 0))
            for gpu_type, g in (cluster.get("gpus") or {}).items():
                self.gpus_total.labels(gpu_type).set(g.get("total", 0))
                self.gpus_allocated.labels(gpu_type).set(g.get("total", 0) - g.get("free", 0))

    def store_degraded(self, store: str, degraded: bool) -> None:
        """Say whether a store (`state`, `results`) is failing or recovering now."""
        self.store_down.labels(store).set(1 if degraded else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request(self, method: str, route: str, status: int, started: float) -> None:
        self.requests.labels(method, route, str(status)).observe(time.perf_counter() - started)


class RequestMetrics:
    """ASGI middleware: every HTTP request's latency into `metrics`, by method, route (the
    route's template, known once routed) and status, and `follow()` on each (it starts
    following the bus once). Plain ASGI: Starlette's `BaseHTTPMiddleware` (what
    `@app.middleware("http")` makes) ran each request in a task of its own behind memory
    streams, a cost the replica paid on every call."""

    def __init__(self, app: Any, metrics: Metrics, follow: Callable[[], None]) -> None:
        self.app = app
        self.metrics = metrics
        self.follow = follow

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        self.follow()
        status = 500  # an exception that leaves the app is answered 500 further out

        async def answer(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, answer)
        finally:
            route = getattr(scope.get("route"), "path", "(unmatched)")
            self.metrics.request(scope.get("method", "GET"), route, status, started)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _label_values(metric: Gauge) -> list[tuple[str, ...]]:
    return list(metric._metrics)  # noqa: SLF001 - prometheus_client has no public accessor
