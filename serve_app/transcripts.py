"""Transcript routes: a sample's transcript (paged), the samples that have one, and a search
across an evaluation's transcripts. Mounted by `api.build_app`, with the other routers.

A transcript is read from where it is now: live from the supervisor running its shard,
else from the evaluation's Inspect logs (`cluster/transcripts.py`). Permissions are the
results': whoever may read the evaluation; a quarantined transcript (its shard was stopped
by a safety violation) only the safety and admin roles.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse

from cluster.transcripts import search
from eval_actors.handles import ControlPlaneUnavailable
from proctor.transcript import SampleTranscript, TranscriptList, TranscriptPage, TranscriptSearch, dump

from .deps import ApiContext, Caller, Context
from .errors import ApiError

LIVE_TIMEOUT_S = 5.0

router = APIRouter(tags=["results"])


async def supervisors(ctx: ApiContext, eval_id: str) -> list[str]:
    """The supervisors running a shard of the evaluation now (state store)."""
    shards = await asyncio.to_thread(ctx.store.shards, eval_id)
    return sorted({s.supervisor for s in shards if s.status == "running" and s.supervisor})


async def ask(ctx: ApiContext, supervisor: str, method: str, *args: Any) -> Any:
    """A supervisor's answer, or None when it cannot answer now."""
    try:
        return await ctx.actors.call(supervisor, method, *args, timeout=LIVE_TIMEOUT_S)
    except (ControlPlaneUnavailable, ray.exceptions.RayError):
        return None


@router.get("/api/v1/evaluations/{eval_id}/samples/{sample_id:path}/transcript", response_class=JSONResponse,
            responses={200: {"model": TranscriptPage, "description": "a page of the transcript (entries "
                                                                      "without their empty fields)"}})
async def get_transcript(eval_id: str, ctx: Context, who: Caller, sample_id: str = Path(max_length=1024),
                         epoch: int = Query(1, ge=1, le=1000), offset: int = Query(0, ge=0),
                         limit: int = Query(200, ge=1, le=1000)) -> JSONResponse:
    """One sample × epoch's transcript, a page of its entries at a time: messages, model
    calls (usage, latency), tool calls and results, safety actions, each with its
    provenance. Live while its shard runs. Quarantined: safety and admin roles only."""
    await ctx.readable(eval_id, who)
    shards = await asyncio.to_thread(ctx.store.shards, eval_id)
    shard = next((s for s in shards if sample_id in s.sample_ids), None)
    if shard is None:
        raise ApiError(404, "not_found", f"evaluation {eval_id} has no sample {sample_id!r}")
    found: tuple[SampleTranscript, str] | None = None
    if shard.status == "running" and shard.supervisor:
        live = await ask(ctx, shard.supervisor, "transcript", eval_id, sample_id, epoch)
        if live is not None:
            found = SampleTranscript.model_validate(live), "live"
    if found is None:
        found = await asyncio.to_thread(ctx.transcripts.read, eval_id, sample_id, epoch, True)
    if found is None:
        raise ApiError(404, "not_found", f"sample {sample_id!r} epoch {epoch} of {eval_id} has no transcript "
                                         f"(yet: its shard is {shard.status})")
    t, where = found
    if where == "quarantine":
        who.require("safety", f"reading the quarantined transcript of sample {sample_id!r}")
    page = t.entries[offset:offset + limit]
    more = offset + len(page) < len(t.entries)
    answer = TranscriptPage(eval_id=eval_id, sample_id=sample_id, epoch=epoch,
                            shard_id=t.shard_id or shard.shard_id, where=where, total=len(t.entries),
                            offset=offset, next_offset=offset + len(page) if more else None, cut=t.cut,
                            stopped=t.stopped, entries=[])
    return JSONResponse({**answer.model_dump(mode="json"), "entries": dump(page)})


@router.get("/api/v1/evaluations/{eval_id}/transcripts", response_model=TranscriptList)
async def list_transcripts(eval_id: str, ctx: Context, who: Caller) -> TranscriptList:
    """The samples that have a transcript: stored, quarantined (for the safety and admin
    roles) and live ones."""
    await ctx.readable(eval_id, who)
    stored = await asyncio.to_thread(ctx.transcripts.listing, eval_id, who.at_least("safety"))
    found = {(s.sample_id, s.epoch): s for s in stored}
    for supervisor in await supervisors(ctx, eval_id):
        for item in await ask(ctx, supervisor, "transcripts_started", eval_id) or []:
            found[(item["sample_id"], item["epoch"])] = {**item, "where": "live"}
    return TranscriptList(eval_id=eval_id, samples=list(found.values()))


@router.get("/api/v1/evaluations/{eval_id}/transcripts/search", response_model=TranscriptSearch)
async def search_transcripts(eval_id: str, ctx: Context, who: Caller,
                             pattern: str = Query(min_length=1, max_length=200,
                                                  description="text to find (case-insensitive)"),
                             limit: int = Query(100, ge=1, le=1000)) -> TranscriptSearch:
    """The samples and entries (turns, tool calls and outputs, safety actions) where a
    text appears, across the evaluation's transcripts: stored, quarantined (safety and
    admin roles) and live."""
    await ctx.readable(eval_id, who)
    quarantine = who.at_least("safety")
    result = await asyncio.to_thread(lambda: search(eval_id, pattern, ctx.transcripts.transcripts(eval_id, quarantine),
                                                    limit))
    for supervisor in await supervisors(ctx, eval_id):
        live = await ask(ctx, supervisor, "search_transcripts", eval_id, pattern, limit)
        if live is None:
            continue
        more = TranscriptSearch.model_validate(live)
        room = limit - len(result.matches)
        result.matches += more.matches[:room]
        result.truncated = result.truncated or more.truncated or len(more.matches) > room
        result.samples += more.samples
        result.searched += more.searched
    return result

