"""Evaluations: submit, list, read (with shards and resource use), cancel, and their logs."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import ray
from fastapi import APIRouter, Body, Query
from fastapi.responses import StreamingResponse

from cluster.images import check_spec_images
from cluster.state import StateError
from cluster.state.store import SORTS
from cluster.storage import StorageError
from eval_actors.control_plane import SCHEDULER
from eval_actors.handles import ControlPlaneUnavailable
from eval_actors.killswitch import stop_evaluation, supervisors_of
from proctor.observability import tracing
from proctor.spec import parse_spec
from proctor.statuses import STATUSES, TERMINAL

from ..auth import Principal
from ..deps import ApiContext, Caller, Context
from ..errors import ApiError
from ..models import EvaluationDetail, EvaluationOut, EvaluationPage, ShardOut, Stopped, Submitted
from ..resources import EvaluationResources, merge
from ..stages import ShardStages, shard_stages
from ..streaming import log_filter, log_lines
from .results import rows_of

SUBMIT_TIMEOUT_S = 120.0  # the scheduler loads the dataset (or an Inspect task's samples) before it answers
STOP_TIMEOUT_S = 120.0  # a stop answers once the sandboxes are dead and the evaluation is finished
LIVE_TIMEOUT_S = 5.0  # a supervisor's live view; one that does not answer in time is left out
LOG_POLL_S = 10.0

router = APIRouter(tags=["evaluations"])


@router.post("/api/v1/evaluations", status_code=202, response_model=Submitted,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/EvaluationSpec"}}}}})
async def submit(ctx: Context, who: Caller, spec: dict[str, Any] = Body(...)) -> Submitted:
    """Submit an evaluation spec (the JSON form of `proctor schema`)."""
    who.require("researcher", "submitting an evaluation")
    parsed = parse_spec(spec)  # 422 with every bad field before anything is stored
    await asyncio.to_thread(check_spec_images, parsed, ctx.images, ctx.settings.runtime)  # 422: image not in the store
    eval_id = await ctx.actors.call(SCHEDULER, "submit", spec, who.name, trace=tracing.carrier(),
                                    timeout=SUBMIT_TIMEOUT_S)
    current = tracing.current()
    return Submitted(id=eval_id, trace_id=f"{current.trace_id:032x}" if current else None)


@router.get("/api/v1/evaluations", response_model=EvaluationPage)
async def list_evaluations(
    ctx: Context, who: Caller,
    status: list[Literal[STATUSES]] | None = Query(None), owner: str | None = Query(None, max_length=128),  # type: ignore[valid-type]
    label: str | None = Query(None, pattern=r"^[^=]+=.*$", max_length=300, description="key=value"),
    model: str | None = Query(None, max_length=300, description="the model's label, e.g. openai:gpt-4o"),
    text: str | None = Query(None, max_length=200, description="in the name or the model"),
    sort: Literal[SORTS] = Query("-created_at", description="`-` for descending"),  # type: ignore[valid-type]
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=500),
) -> EvaluationPage:
    if who.role == "researcher":
        if owner not in (None, who.name):
            return EvaluationPage(items=[], next_cursor=None)
        owner = who.name
    pair = tuple(label.split("=", 1)) if label else None
    try:
        items, nxt = await asyncio.to_thread(ctx.store.list_evaluations, status=status, owner=owner, label=pair,
                                             text=text, model=model, sort=sort, limit=limit, cursor=cursor)
    except StateError as exc:
        raise ApiError(422, "invalid_request", f"cursor: {exc}",
                       [{"field": "query.cursor", "reason": str(exc)}]) from None
    return EvaluationPage(items=[EvaluationOut.of(e) for e in items], next_cursor=nxt)


@router.get("/api/v1/evaluations/{eval_id}", response_model=EvaluationOut)
async def get_evaluation(eval_id: str, ctx: Context, who: Caller) -> EvaluationOut:
    return EvaluationOut.of(await ctx.readable(eval_id, who))


@router.get("/api/v1/evaluations/{eval_id}/shards", response_model=EvaluationDetail)
async def get_shards(eval_id: str, ctx: Context, who: Caller) -> EvaluationDetail:
    """The evaluation's spec as stored, and the state of each of its shards."""
    ev = await ctx.readable(eval_id, who)
    shards = await asyncio.to_thread(ctx.store.shards, eval_id)
    try:
        timed = shard_stages((await rows_of(ctx, ev))[1])
    except StorageError:  # the shards' states still answer; their stage timings do not
        timed = {}
    return EvaluationDetail(id=eval_id, spec=ev.spec, shards=[
        ShardOut(shard_id=x.shard_id, status=x.status, samples=len(x.sample_ids), units=x.units,
                 attempt=x.attempt + 1, max_attempts=x.max_attempts, resources=x.resources,
                 supervisor=x.supervisor, placement=x.placement, error=x.error, started_at=x.started_at,
                 finished_at=x.finished_at, **dict(timed.get(x.shard_id, ShardStages())))
        for x in shards])


@router.get("/api/v1/evaluations/{eval_id}/resources", response_model=EvaluationResources)
async def get_resources(eval_id: str, ctx: Context, who: Caller) -> EvaluationResources:
    """Each shard's resource use over time (CPU, memory, processes, disk, output; GPU
    where the runtime reports it): kept for ended shards, live for running ones."""
    ev = await ctx.readable(eval_id, who)
    stored = await asyncio.to_thread(ctx.results.read_resources, eval_id)
    running = {x.supervisor for x in await asyncio.to_thread(ctx.store.shards, eval_id)
               if x.status == "running" and x.supervisor}
    live: list[dict[str, Any]] = []
    for name in sorted(running):
        try:
            live += await ctx.actors.call(name, "resources", eval_id, timeout=LIVE_TIMEOUT_S)
        except (ControlPlaneUnavailable, ray.exceptions.RayError):
            continue  # a supervisor that does not answer now: its shards show what was kept
    return merge(eval_id, ev.spec, stored, live)


async def stop_or_cancel(ctx: ApiContext, eval_id: str, who: Principal, hard: bool) -> Stopped:
    """Cancel (`hard`: kill at once) the evaluation, if the caller may stop it."""
    ev = await ctx.readable(eval_id, who)
    if not who.may_stop(ev.owner):
        raise ApiError(403, "forbidden", f"{who.name} ({who.role}) may not stop {ev.owner}'s evaluation")
    if hard and ev.status not in TERMINAL:  # kill here first, then the supervisors and the scheduler
        stopped = await stop_evaluation(ctx.killswitch, eval_id, "cancelled", lambda: supervisors_of(ctx.settings),
                                        lambda: ctx.actors.call(SCHEDULER, "cancel", eval_id, hard,
                                                                timeout=STOP_TIMEOUT_S))
    else:
        stopped = await ctx.actors.call(SCHEDULER, "cancel", eval_id, hard, timeout=STOP_TIMEOUT_S)
    ev = await asyncio.to_thread(ctx.store.get_evaluation, eval_id)
    return Stopped(id=eval_id, stopped=stopped, status=ev.status)


@router.delete("/api/v1/evaluations/{eval_id}", response_model=Stopped)
async def cancel(eval_id: str, ctx: Context, who: Caller) -> Stopped:
    """Cancel: queued shards are dropped, running ones are asked to stop."""
    return await stop_or_cancel(ctx, eval_id, who, hard=False)


@router.get("/api/v1/evaluations/{eval_id}/logs", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}},
                             "description": "one JSON object per line: seq, ts, shard_id, attempt, level, message"}})
async def get_logs(eval_id: str, ctx: Context, who: Caller,
                   follow: bool = Query(False, description="stay open until the evaluation ends"),
                   level: Literal["debug", "info", "warning", "error"] | None = Query(
                       None, description="this level and above"),
                   text: str | None = Query(None, max_length=200, description="lines containing this text"),
                   after: int = Query(0, ge=0, description="resume: only live lines after this seq"),
                   ) -> StreamingResponse:
    """The evaluation's log lines as they stream: kept lines of ended shards, then live ones."""
    await ctx.readable(eval_id, who)

    async def kept() -> list[dict[str, Any]]:
        return await asyncio.to_thread(ctx.results.read_logs, eval_id)

    async def read(cursor: int, wait_s: float) -> dict[str, Any]:
        return await ctx.bus_read(cursor, eval_id, wait_s, ("log", "status"))

    async def ended() -> bool:
        ev = await asyncio.to_thread(ctx.store.get_evaluation, eval_id)
        return ev is None or ev.status in TERMINAL

    return StreamingResponse(log_lines(kept, read, ended, keep=log_filter(level, text), follow=follow, after=after,
                                       poll_s=LOG_POLL_S), media_type="application/x-ndjson")
