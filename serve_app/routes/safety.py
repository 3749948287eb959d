"""Safety: the emergency stops, incidents (one evaluation's, or the newest of all the caller
may read) and quarantined outputs (safety and admin roles only)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from cluster.state import Evaluation
from cluster.storage import read_bytes
from eval_actors.control_plane import SCHEDULER
from eval_actors.killswitch import kill_running
from safety.incident import report_markdown

from ..deps import Caller, Context
from ..errors import ApiError
from ..models import Artifact, ArtifactList, IncidentList, RecentIncidents, Stopped, StoppedAll
from .evaluations import stop_or_cancel
from .results import MAX_ARTIFACT_DOWNLOAD

STOP_ALL_TIMEOUT_S = 600.0  # every evaluation is stopped in turn before the answer

router = APIRouter(tags=["safety"])


def incident(i: Any) -> dict[str, Any]:
    return {**i.__dict__, "created_at": i.created_at.isoformat()}


@router.post("/api/v1/evaluations/{eval_id}/stop", response_model=Stopped)
async def emergency_stop(eval_id: str, ctx: Context, who: Caller) -> Stopped:
    """Emergency stop: every sandbox of the evaluation is killed; answers once they are dead."""
    return await stop_or_cancel(ctx, eval_id, who, hard=True)


@router.post("/api/v1/stop-all", response_model=StoppedAll)
async def stop_all(ctx: Context, who: Caller) -> dict[str, Any]:
    """Emergency stop of every queued and running evaluation (admin)."""
    who.require("admin", "stopping everything")
    await asyncio.to_thread(kill_running, ctx.killswitch, ctx.store)  # first, from here: killswitch.py
    return {"stopped": await ctx.actors.call(SCHEDULER, "stop_all", True, timeout=STOP_ALL_TIMEOUT_S)}


@router.get("/api/v1/evaluations/{eval_id}/incidents", response_model=IncidentList,
            responses={200: {"content": {"application/json": {}, "text/markdown": {}}}})
async def get_incidents(eval_id: str, ctx: Context, who: Caller,
                        format: Literal["json", "markdown"] = Query("json")) -> Any:
    """The evaluation's safety incidents (rule, severity, action, evidence, timeline,
    resource trace), as JSON or as a Markdown report."""
    await ctx.readable(eval_id, who)
    found = [incident(i) for i in await asyncio.to_thread(ctx.store.incidents, eval_id, 1000)]
    if format == "markdown":
        return Response(report_markdown(eval_id, found), media_type="text/markdown; charset=utf-8")
    return {"id": eval_id, "incidents": found}


@router.get("/api/v1/evaluations/{eval_id}/quarantine", response_model=ArtifactList)
async def list_quarantine(eval_id: str, ctx: Context, who: Caller) -> ArtifactList:
    """What a safety stop moved aside: the stopped shards' rows, artifacts and reports
    (safety and admin roles only)."""
    who.require("safety", "reading quarantined outputs")
    await ctx.readable(eval_id, who)
    found = await asyncio.to_thread(ctx.results.quarantined, eval_id)
    return ArtifactList(id=eval_id, artifacts=[Artifact(path=p, size=n) for p, n, _ in found])


@router.get("/api/v1/evaluations/{eval_id}/quarantine/{path:path}", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "the file"}})
async def download_quarantined(eval_id: str, path: str, ctx: Context, who: Caller) -> Response:
    """One quarantined file (safety and admin roles only), as an opaque download."""
    who.require("safety", "reading quarantined outputs")
    await ctx.readable(eval_id, who)
    found = {p: uri for p, _, uri in await asyncio.to_thread(ctx.results.quarantined, eval_id)}
    if path not in found:
        raise ApiError(404, "not_found", f"evaluation {eval_id} has no quarantined file {path!r}")
    data = await asyncio.to_thread(read_bytes, found[path], ctx.settings, MAX_ARTIFACT_DOWNLOAD)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": "attachment", "X-Content-Type-Options": "nosniff"})


@router.get("/api/v1/incidents", response_model=RecentIncidents)
async def recent_incidents(ctx: Context, who: Caller, limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
    """The newest incidents of every evaluation the caller may read, newest first."""
    def read() -> list[dict[str, Any]]:
        found = []
        evaluations: dict[str, Evaluation | None] = {}
        for i in ctx.store.incidents(None, limit, owner=who.name if who.role == "researcher" else None):
            if i.eval_id not in evaluations:
                evaluations[i.eval_id] = ctx.store.get_evaluation(i.eval_id)
            ev = evaluations[i.eval_id]
            if ev is not None and who.may_read(ev.owner):
                found.append({**incident(i), "evaluation": ev.name, "owner": ev.owner})
        return found[:limit]

    return {"incidents": await asyncio.to_thread(read)}
