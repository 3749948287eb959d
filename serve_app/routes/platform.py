"""The platform: who the caller is, the cluster's capacity and queue, Prometheus metrics,
and health (the only route here that needs no token)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from cluster.state import StateError
from eval_actors.control_plane import AGGREGATOR, SCHEDULER

from ..deps import ApiContext, Caller, Context
from ..models import ClusterStatus, Health, Me

PROBE_TIMEOUT_S = 5.0  # health and metrics answer while the control plane restarts

router = APIRouter(tags=["platform"])


@router.get("/api/v1/me", response_model=Me)
async def me(who: Caller) -> dict[str, str]:
    """Who the token is."""
    return {"name": who.name, "role": who.role}


@router.get("/api/v1/cluster", response_model=ClusterStatus)
async def cluster(ctx: Context, who: Caller) -> dict[str, Any]:
    """Capacity (CPUs, memory, GPUs by type, free and used), the queue, and the results
    store (`degraded` while rows wait on local disk for it; null when unknown)."""
    return {**await ctx.actors.call(SCHEDULER, "status"), "results_store": await results_store(ctx)}


@router.get("/api/v1/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"}})
async def get_metrics(ctx: Context, who: Caller) -> Response:
    """Prometheus metrics (`proctor_*`)."""
    metrics = ctx.metrics
    try:
        counts: dict[str, int] | None = await asyncio.to_thread(ctx.store.counts_by_status)
    except StateError:  # scraped all the same: the alert on proctor_store_degraded says why
        counts = None
    metrics.store_degraded("state", counts is None)
    results = await results_store(ctx)
    if results is not None:
        metrics.store_degraded("results", bool(results.get("degraded")))
    try:
        status = await ctx.actors.call(SCHEDULER, "status", timeout=PROBE_TIMEOUT_S)
    except Exception:  # scraping must work while the control plane restarts
        status = None
    metrics.refresh(counts, status)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/api/v1/health", response_model=Health)
async def health(ctx: Context) -> dict[str, Any]:
    """Liveness and readiness of the control plane and the store (no token needed)."""
    checks: dict[str, str] = {}
    try:
        await asyncio.to_thread(ctx.store.counts_by_status)
        checks["store"] = "ok"
    except Exception as exc:  # a health check reports, it does not raise
        checks["store"] = f"error: {exc}"
    try:
        await ctx.actors.call(SCHEDULER, "status", timeout=PROBE_TIMEOUT_S)
        checks["control_plane"] = "ok"
    except Exception as exc:
        checks["control_plane"] = f"error: {exc}"
    ready = all(v == "ok" for v in checks.values())
    # the results store may be away without the platform being unready: rows wait on disk
    results = await results_store(ctx)
    if results is None:
        checks["results_store"] = "unknown: the aggregator did not answer"
    elif results.get("degraded"):
        since = datetime.fromtimestamp(results["since"], timezone.utc).isoformat(timespec="seconds")
        checks["results_store"] = (f"degraded: unreachable since {since}; {results['waiting']} writes "
                                   f"({results['bytes']} bytes) wait in {results['folder']}")
    else:
        checks["results_store"] = "ok"
    return {"live": True, "ready": ready, "checks": checks, "results_store": results}


async def results_store(ctx: ApiContext) -> dict[str, Any] | None:
    """The aggregator's view of the results store (`degraded` while writes wait in its
    outbox), or None when it does not answer."""
    try:
        return await ctx.actors.call(AGGREGATOR, "store_status", timeout=PROBE_TIMEOUT_S)
    except Exception:  # reported, never raised: health and metrics answer while actors restart
        return None
