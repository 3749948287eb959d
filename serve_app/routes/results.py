"""Results: the summary and sample rows (JSON pages or one Parquet file), and the artifacts
the sandboxes declared. Transcripts have their own router (`serve_app/transcripts.py`)."""

from __future__ import annotations

import asyncio
import io
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import APIRouter, Query
from fastapi.responses import Response

from cluster.state import Evaluation
from cluster.storage import StorageError, is_s3, presigned_url, read_bytes

from ..deps import ApiContext, Caller, Context
from ..errors import ApiError
from ..models import Artifact, ArtifactList, ResultsPage
from ..stages import with_stage_objects

MAX_ARTIFACT_DOWNLOAD = 256 * 1024**2
PRESIGNED_S = 900

router = APIRouter(tags=["results"])


async def rows_of(ctx: ApiContext, ev: Evaluation) -> tuple[Evaluation, pa.Table | None]:
    """Every row of a finished evaluation; while it runs, the rows written so far (the
    parts of its shards, one row per sample and epoch); None when there are none."""
    try:
        table = await asyncio.to_thread(ctx.results.read, ev.id)
    except StorageError:
        if ev.results_uri:
            raise
        # no folder yet, or its parts were compacted while being read: it may have finished since
        ev = await asyncio.to_thread(ctx.store.get_evaluation, ev.id) or ev
        if not ev.results_uri:
            return ev, None
        table = await asyncio.to_thread(ctx.results.read, ev.id)
    return ev, (table if table.num_rows or ev.results_uri else None)


@router.get("/api/v1/evaluations/{eval_id}/results", response_model=ResultsPage)
async def get_results(eval_id: str, ctx: Context, who: Caller, offset: int = Query(0, ge=0),
                      limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
    """The summary and a page of sample rows, read from the Parquet results. While the
    evaluation runs, the rows written so far (`partial` is true)."""
    ev, table = await rows_of(ctx, await ctx.readable(eval_id, who))
    partial = not ev.results_uri
    if table is None:
        return {"id": eval_id, "status": ev.status, "summary": None, "rows": [], "total": 0, "offset": offset,
                "partial": partial}
    page = with_stage_objects(table.slice(offset, limit).drop_columns(["scores", "answers"]).to_pylist())
    return {"id": eval_id, "status": ev.status, "summary": ev.summary, "total": table.num_rows,
            "offset": offset, "rows": page, "partial": partial}


@router.get("/api/v1/evaluations/{eval_id}/results.parquet", response_class=Response,
            responses={200: {"content": {"application/vnd.apache.parquet": {}},
                             "description": "every sample row; while the evaluation runs, the rows written so far "
                                            "(header `X-Proctor-Partial: true`)"}})
async def get_results_parquet(eval_id: str, ctx: Context, who: Caller) -> Response:
    """Every sample row as one Parquet file (the schema of `cluster/results.py`)."""
    ev, table = await rows_of(ctx, await ctx.readable(eval_id, who))
    if table is None:
        raise ApiError(404, "no_results", f"evaluation {eval_id} has no results yet (it is {ev.status})")

    def encode() -> bytes:
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        return sink.getvalue()

    return Response(await asyncio.to_thread(encode), media_type="application/vnd.apache.parquet",
                    headers={"Content-Disposition": f'attachment; filename="{eval_id}.parquet"',
                             "X-Proctor-Partial": "false" if ev.results_uri else "true"})


@router.get("/api/v1/evaluations/{eval_id}/artifacts", response_model=ArtifactList)
async def list_artifacts(eval_id: str, ctx: Context, who: Caller) -> ArtifactList:
    """The files the evaluation's sandboxes declared as artifacts (copied out, bounded)."""
    await ctx.readable(eval_id, who)
    found = await asyncio.to_thread(ctx.results.artifacts, eval_id)
    s3 = is_s3(ctx.settings.results)
    items = [Artifact(path=path, size=size,
                      url=await asyncio.to_thread(presigned_url, uri, ctx.settings, PRESIGNED_S) if s3 else None)
             for path, size, uri in found]
    return ArtifactList(id=eval_id, artifacts=items)


@router.get("/api/v1/evaluations/{eval_id}/artifacts/{path:path}", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "the file"}})
async def download_artifact(eval_id: str, path: str, ctx: Context, who: Caller) -> Response:
    """One artifact's bytes. Written by a sandbox: served as an opaque download, never rendered."""
    await ctx.readable(eval_id, who)
    try:
        uri = ctx.results.artifact_uri(eval_id, path)  # refuses a path that leaves the artifacts
        data = await asyncio.to_thread(read_bytes, uri, ctx.settings, MAX_ARTIFACT_DOWNLOAD)
    except (ValueError, StorageError):
        raise ApiError(404, "not_found", f"evaluation {eval_id} has no artifact {path!r}") from None
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": attachment(path.rsplit("/", 1)[-1]),
                             "X-Content-Type-Options": "nosniff"})


def attachment(name: str) -> str:
    """A Content-Disposition for a download named `name` (chosen by a sandbox: any text): an
    ASCII fallback name, and the name itself percent-encoded (RFC 6266), so that no name
    breaks the header."""
    plain = "".join(c if 32 <= ord(c) < 127 and c not in '"\\%;' else "_" for c in name)[:200] or "artifact"
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name[:200], safe='')}"
