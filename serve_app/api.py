"""The REST and WebSocket API (FastAPI), served by Ray Serve (`deployment.py`) or any ASGI server.

Every route but health and the docs needs a bearer token (`auth.py`), counted against a
rate limit per token (`limits.py`); request bodies are capped; CORS is closed unless
origins are configured. Every error is JSON with a stable code (`errors.py`). The app
talks to the control plane's named actors (scheduler, event bus) and reads the state
store and the results store directly.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any, Literal
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from fastapi import Body, Depends, FastAPI, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cluster.results import ResultsStore
from cluster.state import Evaluation, StateError, StateStore
from cluster.state.store import SORTS
from cluster.storage import StorageError, is_s3, presigned_url, read_bytes
from eval_actors.control_plane import BUS, SCHEDULER
from proctor.settings import Settings
from proctor.spec import EvaluationSpec, parse_spec
from safety.incident import report_markdown

from .auth import Authenticator, Principal
from .errors import ApiError, install
from .limits import BodyLimit, RateLimiter
from .metrics import Metrics
from .resources import EvaluationResources, merge

STATUSES = ("queued", "scheduled", "running", "succeeded", "failed", "cancelled", "safety_stopped", "interrupted")
TERMINAL = ("succeeded", "failed", "cancelled", "safety_stopped")
LEVELS = {"debug": 0, "info": 1, "warning": 2, "error": 3}
MAX_ARTIFACT_DOWNLOAD = 256 * 1024**2
WS_POLL_S = 10.0
HANDLE_TTL_S = 5.0
USER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"


class EvaluationOut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    name: str
    owner: str
    status: str
    priority: int
    labels: dict[str, str]
    model: str
    runtime: str
    total_shards: int
    total_units: int
    done_units: int
    wait_reason: str | None
    error: str | None
    summary: dict[str, Any] | None
    results_uri: str | None
    created_at: datetime
    scheduled_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    gpus_per_shard: int = Field(0, description="GPUs each shard asks for")
    gpu_type: str | None = Field(None, description="the GPU type the shards ask for, if any")
    suite: str = Field("", description="the task suite: the `suite` label, else the dataset file's name, "
                                       "else the evaluation's name")

    @classmethod
    def of(cls, ev: Evaluation) -> "EvaluationOut":
        gpu = (ev.spec.get("sandbox") or {}).get("gpu") or {}
        return cls(**{name: getattr(ev, name) for name in cls.model_fields if hasattr(ev, name)},
                   gpus_per_shard=int(gpu.get("count") or 0), gpu_type=gpu.get("type"), suite=suite_of(ev))


def suite_of(ev: Evaluation) -> str:
    path = (ev.spec.get("dataset") or {}).get("path")
    return ev.labels.get("suite") or (str(path).rsplit("/", 1)[-1].split(".", 1)[0] if path else "") or ev.name


class EvaluationPage(BaseModel):
    items: list[EvaluationOut]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page")


class Submitted(BaseModel):
    id: str
    status: Literal["queued"] = "queued"


class Stopped(BaseModel):
    id: str
    stopped: bool
    status: str


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # a JSON boolean is not a number of days
    user: str = Field(pattern=USER_NAME, description="the user the key acts as; created if new (then `role` is needed)")
    role: Literal["viewer", "researcher", "safety", "admin"] | None = Field(
        None, description="the user's role; must match an existing user's")
    name: str = Field("api key", min_length=1, max_length=128, description="what the key is for")
    expires_in_days: int | None = Field(None, ge=1, le=3650, description="none: it never expires")


class TokenCreated(BaseModel):
    id: int
    token: str = Field(description="the secret: shown this once, stored only hashed")
    user: str
    role: str
    name: str
    expires_at: datetime | None


class TokenOut(BaseModel):
    id: int
    user: str
    role: str
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked: bool


class TokenPage(BaseModel):
    items: list[TokenOut]


class Revoked(BaseModel):
    id: int
    revoked: bool


class ShardOut(BaseModel):
    shard_id: str
    status: str
    samples: int
    units: int
    attempt: int
    max_attempts: int
    resources: dict[str, Any]
    supervisor: str | None
    placement: str | None
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None


class EvaluationDetail(BaseModel):
    id: str
    spec: dict[str, Any]
    shards: list[ShardOut]


class Artifact(BaseModel):
    path: str = Field(description="<shard_id>/<path inside the sandbox's workspace>")
    size: int
    url: str | None = Field(None, description="a pre-signed download URL when results are on S3")


class ArtifactList(BaseModel):
    id: str
    artifacts: list[Artifact]


def _incident(i: Any) -> dict[str, Any]:
    return {**i.__dict__, "created_at": i.created_at.isoformat()}


class ErrorDetail(BaseModel):
    code: str = Field(description="stable: clients branch on it")
    message: str = Field(description="for people")
    fields: list[dict[str, str]] | None = Field(None, description="the bad fields: [{field, reason}]")


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what} for status, what in [
        (400, "the request could not be read (e.g. a body that is not JSON)"),
        (401, "no token, or a bad, expired or revoked one"), (403, "the caller's role does not allow it"),
        (404, "no such thing, or not the caller's to see"), (409, "it conflicts with the current state"),
        (413, "the request body is too large"), (422, "invalid input; `fields` names each bad one"),
        (429, "rate limited; `Retry-After` says when to retry"), (503, "the control plane or a store is unavailable"),
    ]
}


def build_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="Proctor", version="1", docs_url="/docs", openapi_url="/openapi.json",
                  description="Evaluate AI models for dangerous capabilities, safely.", responses=ERRORS)
    install(app)
    store = StateStore(settings.state)
    results = ResultsStore(settings.results, settings)
    authenticate = Authenticator(store, settings)
    limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    metrics = Metrics()
    owners: dict[str, str] = {}  # eval id -> owner, for filtering the event streams

    if settings.cors_origins:  # closed unless configured
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)

    handles: dict[str, tuple[Any, float]] = {}

    def actor(name: str) -> Any:
        # `ray.get_actor` is a GCS round trip: keep a handle briefly (a restarted actor keeps
        # its name and handle; a replaced one is found again after HANDLE_TTL_S)
        now = time.monotonic()
        hit = handles.get(name)
        if hit is not None and now - hit[1] < HANDLE_TTL_S:
            return hit[0]
        try:
            handle = ray.get_actor(name, namespace=settings.ray_namespace)
        except ValueError:
            raise ApiError(503, "control_plane_unavailable", f"{name} is not running; run `proctor up`") from None
        handles[name] = (handle, now)
        return handle

    def scheduler() -> Any:
        return actor(SCHEDULER)

    async def bus_read(after: int, eval_id: str | None = None, timeout: float = 0.0,
                       types: tuple[str, ...] | None = None) -> dict[str, Any]:
        return await actor(BUS).read.remote(after, eval_id, timeout, 1000, types)

    async def bus_last() -> int:
        return await actor(BUS).last_seq.remote()

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        metrics.follow(lambda after: bus_read(after, timeout=WS_POLL_S), bus_last)
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.request(request.method, getattr(route, "path", "(unmatched)"), response.status_code, started)
        return response

    async def principal(header: str | None) -> Principal:
        who = await asyncio.to_thread(authenticate, header)
        limiter.check(who.key)
        return who

    async def caller(authorization: str | None = Header(None, description="Bearer <API key or JWT>")) -> Principal:
        return await principal(authorization)

    async def readable(eval_id: str, who: Principal) -> Evaluation:
        ev = await asyncio.to_thread(store.get_evaluation, eval_id)
        if ev is None or not who.may_read(ev.owner):  # another's evaluation does not exist for you
            raise ApiError(404, "not_found", f"evaluation {eval_id} does not exist")
        return ev

    # ------------------------------------------------------------ evaluations

    @app.post("/api/v1/evaluations", status_code=202, response_model=Submitted, tags=["evaluations"],
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/EvaluationSpec"}}}}})
    async def submit(spec: dict[str, Any] = Body(...), who: Principal = Depends(caller)) -> Submitted:
        """Submit an evaluation spec (the JSON form of `proctor schema`)."""
        who.require("researcher", "submitting an evaluation")
        parse_spec(spec)  # 422 with every bad field before anything is stored
        eval_id = await scheduler().submit.remote(spec, who.name)
        return Submitted(id=eval_id)

    @app.get("/api/v1/evaluations", response_model=EvaluationPage, tags=["evaluations"])
    async def list_evaluations(
        status: list[Literal[STATUSES]] | None = Query(None), owner: str | None = Query(None, max_length=128),  # type: ignore[valid-type]
        label: str | None = Query(None, pattern=r"^[^=]+=.*$", max_length=300, description="key=value"),
        model: str | None = Query(None, max_length=300, description="the model's label, e.g. openai:gpt-4o"),
        text: str | None = Query(None, max_length=200, description="in the name or the model"),
        sort: Literal[SORTS] = Query("-created_at", description="`-` for descending"),  # type: ignore[valid-type]
        limit: int = Query(50, ge=1, le=500),
        cursor: str | None = Query(None, max_length=500), who: Principal = Depends(caller),
    ) -> EvaluationPage:
        if who.role == "researcher":
            if owner not in (None, who.name):
                return EvaluationPage(items=[], next_cursor=None)
            owner = who.name
        pair = tuple(label.split("=", 1)) if label else None
        try:
            items, nxt = await asyncio.to_thread(store.list_evaluations, status=status, owner=owner, label=pair,
                                                 text=text, model=model, sort=sort, limit=limit, cursor=cursor)
        except StateError as exc:
            raise ApiError(422, "invalid_request", f"cursor: {exc}",
                           [{"field": "query.cursor", "reason": str(exc)}]) from None
        return EvaluationPage(items=[EvaluationOut.of(e) for e in items], next_cursor=nxt)

    @app.get("/api/v1/evaluations/{eval_id}", response_model=EvaluationOut, tags=["evaluations"])
    async def get_evaluation(eval_id: str, who: Principal = Depends(caller)) -> EvaluationOut:
        return EvaluationOut.of(await readable(eval_id, who))

    @app.get("/api/v1/evaluations/{eval_id}/shards", response_model=EvaluationDetail, tags=["evaluations"])
    async def get_shards(eval_id: str, who: Principal = Depends(caller)) -> EvaluationDetail:
        """The evaluation's spec as stored, and the state of each of its shards."""
        ev = await readable(eval_id, who)
        shards = await asyncio.to_thread(store.shards, eval_id)
        return EvaluationDetail(id=eval_id, spec=ev.spec, shards=[
            ShardOut(shard_id=x.shard_id, status=x.status, samples=len(x.sample_ids), units=x.units,
                     attempt=x.attempt, max_attempts=x.max_attempts, resources=x.resources,
                     supervisor=x.supervisor, placement=x.placement, error=x.error, started_at=x.started_at,
                     finished_at=x.finished_at) for x in shards])

    @app.get("/api/v1/evaluations/{eval_id}/resources", response_model=EvaluationResources, tags=["evaluations"])
    async def get_resources(eval_id: str, who: Principal = Depends(caller)) -> EvaluationResources:
        """Each shard's resource use over time (CPU, memory, processes, disk, output; GPU
        where the runtime reports it): kept for ended shards, live for running ones."""
        ev = await readable(eval_id, who)
        stored = await asyncio.to_thread(results.read_resources, eval_id)
        running = {x.supervisor for x in await asyncio.to_thread(store.shards, eval_id)
                   if x.status == "running" and x.supervisor}
        live: list[dict[str, Any]] = []
        for name in sorted(running):
            try:
                live += await asyncio.wait_for(actor(name).resources.remote(eval_id), 5)
            except (ApiError, asyncio.TimeoutError, ray.exceptions.RayError):
                continue  # a supervisor that does not answer now: its shards show what was kept
        return merge(eval_id, ev.spec, stored, live)

    async def _stop(eval_id: str, who: Principal, hard: bool) -> Stopped:
        ev = await readable(eval_id, who)
        if not who.may_stop(ev.owner):
            raise ApiError(403, "forbidden", f"{who.name} ({who.role}) may not stop {ev.owner}'s evaluation")
        stopped = await scheduler().cancel.remote(eval_id, hard)
        ev = await asyncio.to_thread(store.get_evaluation, eval_id)
        return Stopped(id=eval_id, stopped=stopped, status=ev.status)

    @app.delete("/api/v1/evaluations/{eval_id}", response_model=Stopped, tags=["evaluations"])
    async def cancel(eval_id: str, who: Principal = Depends(caller)) -> Stopped:
        """Cancel: queued shards are dropped, running ones are asked to stop."""
        return await _stop(eval_id, who, hard=False)

    @app.post("/api/v1/evaluations/{eval_id}/stop", response_model=Stopped, tags=["safety"])
    async def emergency_stop(eval_id: str, who: Principal = Depends(caller)) -> Stopped:
        """Emergency stop: every sandbox of the evaluation is killed; answers once they are dead."""
        return await _stop(eval_id, who, hard=True)

    @app.post("/api/v1/stop-all", tags=["safety"])
    async def stop_all(who: Principal = Depends(caller)) -> dict[str, Any]:
        """Emergency stop of every queued and running evaluation (admin)."""
        who.require("admin", "stopping everything")
        return {"stopped": await scheduler().stop_all.remote(True)}

    # ------------------------------------------------------------ logs, results, artifacts, incidents

    @app.get("/api/v1/evaluations/{eval_id}/logs", tags=["evaluations"], response_class=StreamingResponse,
             responses={200: {"content": {"application/x-ndjson": {}},
                              "description": "one JSON object per line: seq, ts, shard_id, attempt, level, message"}})
    async def get_logs(eval_id: str, follow: bool = Query(False, description="stay open until the evaluation ends"),
                       level: Literal["debug", "info", "warning", "error"] | None = Query(
                           None, description="this level and above"),
                       text: str | None = Query(None, max_length=200, description="lines containing this text"),
                       after: int = Query(0, ge=0, description="resume: only live lines after this seq"),
                       who: Principal = Depends(caller)) -> StreamingResponse:
        """The evaluation's log lines as they stream: kept lines of ended shards, then live ones."""
        await readable(eval_id, who)
        floor = LEVELS[level] if level else 0
        needle = text.lower() if text else None

        def keep(line: dict[str, Any]) -> bool:
            return (LEVELS.get(line.get("level"), 1) >= floor
                    and (needle is None or needle in str(line.get("message", "")).lower()))

        def dump(line: dict[str, Any]) -> str:
            return json.dumps({k: line.get(k) for k in ("seq", "ts", "shard_id", "attempt", "level", "message")}) + "\n"

        async def lines() -> AsyncIterator[str]:
            seen: set[tuple[Any, Any, Any]] = set()
            if not after:
                for line in await asyncio.to_thread(results.read_logs, eval_id):
                    seen.add((line.get("shard_id"), line.get("attempt"), line.get("n")))
                    if keep(line):
                        yield dump(line)
            cursor, ending = after, False
            while True:
                try:
                    answer = await bus_read(cursor, eval_id, WS_POLL_S if follow and not ending else 0.0,
                                            ("log", "status"))
                except Exception:  # the bus is restarting or gone: what is kept was sent
                    if not follow:
                        return
                    await asyncio.sleep(1.0)
                    answer = {"events": [], "last_seq": cursor}
                for event in answer["events"]:
                    if event["type"] == "status" and event.get("status") in TERMINAL:
                        ending = True
                    if event["type"] != "log":
                        continue
                    key = (event.get("shard_id"), event.get("attempt"), event.get("n"))
                    if key not in seen and keep(event):
                        seen.add(key)
                        yield dump(event)
                cursor = answer["last_seq"]
                if answer["events"]:
                    continue
                if not follow or ending:
                    return
                ev = await asyncio.to_thread(store.get_evaluation, eval_id)
                ending = ev is None or ev.status in TERMINAL

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def rows_of(ev: Evaluation) -> tuple[Evaluation, pa.Table | None]:
        """Every row of a finished evaluation; while it runs, the rows written so far
        (the parts of its shards, one row per sample and epoch); None when there are none."""
        try:
            table = await asyncio.to_thread(results.read, ev.id)
        except StorageError:
            if ev.results_uri:
                raise
            # no folder yet, or its parts were compacted while being read: it may have finished since
            ev = await asyncio.to_thread(store.get_evaluation, ev.id) or ev
            if not ev.results_uri:
                return ev, None
            table = await asyncio.to_thread(results.read, ev.id)
        return ev, (table if table.num_rows or ev.results_uri else None)

    @app.get("/api/v1/evaluations/{eval_id}/results", tags=["results"])
    async def get_results(eval_id: str, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000),
                          who: Principal = Depends(caller)) -> dict[str, Any]:
        """The summary and a page of sample rows, read from the Parquet results. While the
        evaluation runs, the rows written so far (`partial` is true)."""
        ev, table = await rows_of(await readable(eval_id, who))
        partial = not ev.results_uri
        if table is None:
            return {"id": eval_id, "status": ev.status, "summary": None, "rows": [], "total": 0, "offset": offset,
                    "partial": partial}
        page = table.slice(offset, limit).drop_columns(["scores", "answers"]).to_pylist()
        return {"id": eval_id, "status": ev.status, "summary": ev.summary, "total": table.num_rows,
                "offset": offset, "rows": page, "partial": partial}

    @app.get("/api/v1/evaluations/{eval_id}/results.parquet", tags=["results"], response_class=Response,
             responses={200: {"content": {"application/vnd.apache.parquet": {}},
                              "description": "every sample row; while the evaluation runs, the rows written so far "
                                             "(header `X-Proctor-Partial: true`)"}})
    async def get_results_parquet(eval_id: str, who: Principal = Depends(caller)) -> Response:
        """Every sample row as one Parquet file (the schema of `cluster/results.py`)."""
        ev, table = await rows_of(await readable(eval_id, who))
        if table is None:
            raise ApiError(404, "no_results", f"evaluation {eval_id} has no results yet (it is {ev.status})")

        def encode() -> bytes:
            sink = io.BytesIO()
            pq.write_table(table, sink, compression="zstd")
            return sink.getvalue()

        return Response(await asyncio.to_thread(encode), media_type="application/vnd.apache.parquet",
                        headers={"Content-Disposition": f'attachment; filename="{eval_id}.parquet"',
                                 "X-Proctor-Partial": "false" if ev.results_uri else "true"})

    @app.get("/api/v1/evaluations/{eval_id}/artifacts", response_model=ArtifactList, tags=["results"])
    async def list_artifacts(eval_id: str, who: Principal = Depends(caller)) -> ArtifactList:
        """The files the evaluation's sandboxes declared as artifacts (copied out, bounded)."""
        await readable(eval_id, who)
        found = await asyncio.to_thread(results.artifacts, eval_id)
        s3 = is_s3(settings.results)
        items = [Artifact(path=path, size=size,
                          url=await asyncio.to_thread(presigned_url, uri, settings, 900) if s3 else None)
                 for path, size, uri in found]
        return ArtifactList(id=eval_id, artifacts=items)

    @app.get("/api/v1/evaluations/{eval_id}/artifacts/{path:path}", tags=["results"], response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}, "description": "the file"}})
    async def download_artifact(eval_id: str, path: str, who: Principal = Depends(caller)) -> Response:
        """One artifact's bytes. Written by a sandbox: served as an opaque download, never rendered."""
        await readable(eval_id, who)
        try:
            uri = results.artifact_uri(eval_id, path)  # refuses a path that leaves the artifacts
            data = await asyncio.to_thread(read_bytes, uri, settings, MAX_ARTIFACT_DOWNLOAD)
        except (ValueError, StorageError):
            raise ApiError(404, "not_found", f"evaluation {eval_id} has no artifact {path!r}") from None
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": attachment(path.rsplit("/", 1)[-1]),
                                 "X-Content-Type-Options": "nosniff"})

    @app.get("/api/v1/evaluations/{eval_id}/incidents", tags=["safety"],
             responses={200: {"content": {"application/json": {}, "text/markdown": {}}}})
    async def get_incidents(eval_id: str, format: Literal["json", "markdown"] = Query("json"),
                            who: Principal = Depends(caller)) -> Any:
        """The evaluation's safety incidents (rule, severity, action, evidence, timeline,
        resource trace), as JSON or as a Markdown report."""
        await readable(eval_id, who)
        found = [_incident(i) for i in await asyncio.to_thread(store.incidents, eval_id, 1000)]
        if format == "markdown":
            return Response(report_markdown(eval_id, found), media_type="text/markdown; charset=utf-8")
        return {"id": eval_id, "incidents": found}

    @app.get("/api/v1/evaluations/{eval_id}/quarantine", response_model=ArtifactList, tags=["safety"])
    async def list_quarantine(eval_id: str, who: Principal = Depends(caller)) -> ArtifactList:
        """What a safety stop moved aside: the stopped shards' rows, artifacts and reports
        (safety and admin roles only)."""
        who.require("safety", "reading quarantined outputs")
        await readable(eval_id, who)
        found = await asyncio.to_thread(results.quarantined, eval_id)
        return ArtifactList(id=eval_id, artifacts=[Artifact(path=p, size=n) for p, n, _ in found])

    @app.get("/api/v1/evaluations/{eval_id}/quarantine/{path:path}", tags=["safety"], response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}, "description": "the file"}})
    async def download_quarantined(eval_id: str, path: str, who: Principal = Depends(caller)) -> Response:
        """One quarantined file (safety and admin roles only), as an opaque download."""
        who.require("safety", "reading quarantined outputs")
        await readable(eval_id, who)
        found = {p: uri for p, _, uri in await asyncio.to_thread(results.quarantined, eval_id)}
        if path not in found:
            raise ApiError(404, "not_found", f"evaluation {eval_id} has no quarantined file {path!r}")
        data = await asyncio.to_thread(read_bytes, found[path], settings, MAX_ARTIFACT_DOWNLOAD)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": "attachment", "X-Content-Type-Options": "nosniff"})

    # ------------------------------------------------------------ tokens

    @app.post("/api/v1/tokens", status_code=201, response_model=TokenCreated, tags=["tokens"])
    async def create_token(req: TokenRequest, who: Principal = Depends(caller)) -> TokenCreated:
        """A new API key (admin). A new user is created with `role`."""
        who.require("admin", "creating tokens")

        def create() -> TokenCreated:
            user = store.get_user(req.user)
            if user is None:
                if req.role is None:
                    raise ApiError(422, "invalid_request", f"user {req.user!r} is new: give its role",
                                   [{"field": "body.role", "reason": "required for a new user"}])
                user = store.create_user(req.user, req.role)
            elif req.role is not None and req.role != user.role:
                raise ApiError(409, "conflict", f"user {req.user!r} is a {user.role}, not a {req.role}")
            expires = (datetime.now(timezone.utc) + timedelta(days=req.expires_in_days)
                       if req.expires_in_days else None)
            secret, token = store.create_token(user.name, req.name, expires)
            return TokenCreated(id=token.id, token=secret, user=user.name, role=user.role, name=token.name,
                                expires_at=token.expires_at)

        return await asyncio.to_thread(create)

    @app.get("/api/v1/tokens", response_model=TokenPage, tags=["tokens"])
    async def list_tokens(who: Principal = Depends(caller)) -> TokenPage:
        """API keys (never their secrets): all of them for an admin, one's own otherwise."""
        def read() -> TokenPage:
            roles = {u.name: u.role for u in store.list_users()}
            found = store.list_tokens(None if who.at_least("admin") else who.name)
            return TokenPage(items=[TokenOut(id=t.id, user=t.user_name, role=roles.get(t.user_name, "viewer"),
                                             name=t.name, prefix=t.prefix, created_at=t.created_at,
                                             expires_at=t.expires_at, last_used_at=t.last_used_at,
                                             revoked=t.revoked_at is not None) for t in found])

        return await asyncio.to_thread(read)

    @app.delete("/api/v1/tokens/{token_id}", response_model=Revoked, tags=["tokens"])
    async def revoke_token(token_id: int, who: Principal = Depends(caller)) -> Revoked:
        """Revoke an API key: any (admin), or one's own."""
        def revoke() -> Revoked:
            mine = {t.id for t in store.list_tokens(who.name)}
            if not who.at_least("admin") and token_id not in mine:
                raise ApiError(404, "not_found", f"token {token_id} does not exist")
            return Revoked(id=token_id, revoked=store.revoke_token(token_id))

        return await asyncio.to_thread(revoke)

    # ------------------------------------------------------------ platform

    @app.get("/api/v1/incidents", tags=["safety"])
    async def recent_incidents(limit: int = Query(100, ge=1, le=1000),
                               who: Principal = Depends(caller)) -> dict[str, Any]:
        """The newest incidents of every evaluation the caller may read, newest first."""
        def read() -> list[dict[str, Any]]:
            found = []
            evaluations: dict[str, Evaluation | None] = {}
            for i in store.incidents(None, limit, owner=who.name if who.role == "researcher" else None):
                if i.eval_id not in evaluations:
                    evaluations[i.eval_id] = store.get_evaluation(i.eval_id)
                ev = evaluations[i.eval_id]
                if ev is not None and who.may_read(ev.owner):
                    found.append({**_incident(i), "evaluation": ev.name, "owner": ev.owner})
            return found[:limit]

        return {"incidents": await asyncio.to_thread(read)}

    @app.get("/api/v1/me", tags=["platform"])
    async def me(who: Principal = Depends(caller)) -> dict[str, str]:
        """Who the token is."""
        return {"name": who.name, "role": who.role}

    @app.get("/api/v1/cluster", tags=["platform"])
    async def cluster(who: Principal = Depends(caller)) -> dict[str, Any]:
        """Capacity (CPUs, memory, GPUs by type, free and used) and the queue."""
        return await scheduler().status.remote()

    @app.get("/api/v1/metrics", tags=["platform"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"}})
    async def get_metrics(who: Principal = Depends(caller)) -> Response:
        """Prometheus metrics (`proctor_*`)."""
        counts = await asyncio.to_thread(store.counts_by_status)
        try:
            status = await asyncio.wait_for(scheduler().status.remote(), 5)
        except Exception:  # scraping must work while the control plane restarts
            status = None
        metrics.refresh(counts, status)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/v1/health", tags=["platform"])
    async def health(request: Request) -> dict[str, Any]:
        """Liveness and readiness of the control plane and the store (no token needed)."""
        checks: dict[str, str] = {}
        try:
            await asyncio.to_thread(store.counts_by_status)
            checks["store"] = "ok"
        except Exception as exc:  # a health check reports, it does not raise
            checks["store"] = f"error: {exc}"
        try:
            await asyncio.wait_for(scheduler().status.remote(), 5)
            checks["control_plane"] = "ok"
        except Exception as exc:
            checks["control_plane"] = f"error: {exc}"
        ready = all(v == "ok" for v in checks.values())
        return {"live": True, "ready": ready, "checks": checks}

    # ------------------------------------------------------------ WebSockets

    async def owner_of(eval_id: str) -> str | None:
        if eval_id not in owners:
            ev = await asyncio.to_thread(store.get_evaluation, eval_id)
            if ev is None:
                return None
            if len(owners) > 100_000:
                owners.clear()
            owners[eval_id] = ev.owner
        return owners[eval_id]

    async def stream(ws: WebSocket, eval_id: str | None, after: int, token: str | None) -> None:
        await ws.accept()
        header = ws.headers.get("authorization") or (f"Bearer {token}" if token else None)
        try:
            who = await principal(header)
            if eval_id is not None:
                await readable(eval_id, who)
        except ApiError as exc:
            code = {401: 4401, 403: 4403, 404: 4404, 429: 4429}.get(exc.status, 4400)
            await ws.close(code=code, reason=f"{exc.code}: {exc.message}"[:120])
            return
        cursor, epoch = after, None
        try:
            while True:
                try:
                    answer = await bus_read(cursor, eval_id, WS_POLL_S)
                except Exception:
                    await ws.send_json({"type": "gap", "seq": cursor, "reason": "the event bus is restarting"})
                    await asyncio.sleep(1.0)
                    continue
                if epoch is not None and answer["epoch"] != epoch:
                    await ws.send_json({"type": "gap", "seq": cursor, "reason": "the event bus restarted"})
                    cursor, epoch = 0, answer["epoch"]
                    continue
                epoch = answer["epoch"]
                if answer.get("gap"):
                    await ws.send_json({"type": "gap", "seq": cursor,
                                        "reason": "events were dropped: this client fell too far behind"})
                final = False
                for event in answer["events"]:
                    eid = event.get("eval_id")
                    if who.role == "researcher" and (eid is None or await owner_of(eid) != who.name):
                        continue
                    await ws.send_json(event)
                    final = final or (eval_id is not None and event["type"] == "status"
                                      and event.get("status") in TERMINAL)
                cursor = answer["last_seq"]
                if eval_id is not None and not answer["events"]:
                    ev = await asyncio.to_thread(store.get_evaluation, eval_id)
                    final = ev is None or ev.status in TERMINAL
                if final:
                    await ws.close(code=1000, reason="the evaluation ended")
                    return
        except WebSocketDisconnect:
            return

    @app.websocket("/ws/evaluations/{eval_id}")
    async def ws_evaluation(ws: WebSocket, eval_id: str, after: int = 0, token: str | None = None) -> None:
        """Live events of one evaluation (status, progress, logs, incidents), each with its
        `seq`; reconnect with `after=<last seq>` to resume. Closes once it ends. The token:
        the Authorization header, or `?token=` where a browser cannot set headers."""
        await stream(ws, eval_id, max(0, after), token)

    @app.websocket("/ws/evaluations")
    async def ws_all(ws: WebSocket, after: int = 0, token: str | None = None) -> None:
        """Live events of every evaluation the caller may read."""
        await stream(ws, None, max(0, after), token)

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with the evaluation spec's own schema as the submit body
        (the body is read as a mapping so that `parse_spec` names every bad field)."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            spec_schema = EvaluationSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(spec_schema.pop("$defs", {}))
            schemas["EvaluationSpec"] = spec_schema
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def attachment(name: str) -> str:
    """A Content-Disposition for a download named `name` (chosen by a sandbox: any text): an
    ASCII fallback name, and the name itself percent-encoded (RFC 6266), so that no name
    breaks the header."""
    plain = "".join(c if 32 <= ord(c) < 127 and c not in '"\\%;' else "_" for c in name)[:200] or "artifact"
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name[:200], safe='')}"
