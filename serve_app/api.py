"""The REST API (FastAPI), served by Ray Serve (`deployment.py`) or any ASGI server.

Every route but health and the docs needs a bearer token (`auth.py`); every error is
JSON with a stable code (`errors.py`). The app talks to the control plane's named actors
and reads the state store and the results store directly.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, Literal

import ray
from fastapi import Depends, FastAPI, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from cluster.results import ResultsStore
from cluster.state import Evaluation, StateStore
from eval_actors.control_plane import SCHEDULER
from proctor.settings import Settings
from proctor.spec import parse_spec

from .auth import Principal, authenticate
from .errors import ApiError, install

STATUSES = ("queued", "scheduled", "running", "succeeded", "failed", "cancelled", "safety_stopped", "interrupted")


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

    @classmethod
    def of(cls, ev: Evaluation) -> "EvaluationOut":
        return cls(**{name: getattr(ev, name) for name in cls.model_fields})


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


def build_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="Proctor", version="1", docs_url="/docs", openapi_url="/openapi.json",
                  description="Evaluate AI models for dangerous capabilities, safely.")
    install(app)
    store = StateStore(settings.state)
    results = ResultsStore(settings.results, settings)

    def scheduler() -> Any:
        try:
            return ray.get_actor(SCHEDULER, namespace=settings.ray_namespace)
        except ValueError:
            raise ApiError(503, "control_plane_unavailable", "the scheduler is not running; run `proctor up`") from None

    async def caller(authorization: str | None = Header(None, description="Bearer <token>")) -> Principal:
        return await asyncio.to_thread(authenticate, store, authorization)

    async def readable(eval_id: str, who: Principal) -> Evaluation:
        ev = await asyncio.to_thread(store.get_evaluation, eval_id)
        if ev is None or not who.may_read(ev.owner):  # another's evaluation does not exist for you
            raise ApiError(404, "not_found", f"evaluation {eval_id} does not exist")
        return ev

    @app.post("/api/v1/evaluations", status_code=202, response_model=Submitted, tags=["evaluations"])
    async def submit(spec: dict[str, Any], who: Principal = Depends(caller)) -> Submitted:
        """Submit an evaluation spec (the JSON form of `proctor schema`)."""
        who.require("researcher", "submitting an evaluation")
        parse_spec(spec)  # 422 with every bad field before anything is stored
        eval_id = await scheduler().submit.remote(spec, who.name)
        return Submitted(id=eval_id)

    @app.get("/api/v1/evaluations", response_model=EvaluationPage, tags=["evaluations"])
    async def list_evaluations(
        status: list[Literal[STATUSES]] | None = Query(None), owner: str | None = None,  # type: ignore[valid-type]
        label: str | None = Query(None, pattern=r"^[^=]+=.*$", description="key=value"),
        text: str | None = Query(None, max_length=200), limit: int = Query(50, ge=1, le=500),
        cursor: str | None = Query(None, max_length=500), who: Principal = Depends(caller),
    ) -> EvaluationPage:
        if who.role == "researcher":
            if owner not in (None, who.name):
                return EvaluationPage(items=[], next_cursor=None)
            owner = who.name
        pair = tuple(label.split("=", 1)) if label else None
        try:
            items, nxt = await asyncio.to_thread(store.list_evaluations, status=status, owner=owner, label=pair,
                                                 text=text, limit=limit, cursor=cursor)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", f"cursor: {exc}") from None
        return EvaluationPage(items=[EvaluationOut.of(e) for e in items], next_cursor=nxt)

    @app.get("/api/v1/evaluations/{eval_id}", response_model=EvaluationOut, tags=["evaluations"])
    async def get_evaluation(eval_id: str, who: Principal = Depends(caller)) -> EvaluationOut:
        return EvaluationOut.of(await readable(eval_id, who))

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
        """Emergency stop: every sandbox of the evaluation is killed at once."""
        return await _stop(eval_id, who, hard=True)

    @app.post("/api/v1/stop-all", tags=["safety"])
    async def stop_all(who: Principal = Depends(caller)) -> dict[str, Any]:
        who.require("admin", "stopping everything")
        return {"stopped": await scheduler().stop_all.remote(True)}

    @app.get("/api/v1/evaluations/{eval_id}/results", tags=["results"])
    async def get_results(eval_id: str, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000),
                          who: Principal = Depends(caller)) -> dict[str, Any]:
        """The summary and a page of sample rows, read from the Parquet results."""
        ev = await readable(eval_id, who)
        if not ev.results_uri:
            return {"id": eval_id, "status": ev.status, "summary": None, "rows": [], "total": 0}
        table = await asyncio.to_thread(results.read, eval_id)
        page = table.slice(offset, limit).drop_columns(["scores", "answers"]).to_pylist()
        return {"id": eval_id, "status": ev.status, "summary": ev.summary, "total": table.num_rows,
                "offset": offset, "rows": page}

    @app.get("/api/v1/evaluations/{eval_id}/incidents", tags=["safety"])
    async def get_incidents(eval_id: str, who: Principal = Depends(caller)) -> dict[str, Any]:
        await readable(eval_id, who)
        found = await asyncio.to_thread(store.incidents, eval_id)
        return {"id": eval_id, "incidents": [i.__dict__ for i in found]}

    @app.get("/api/v1/cluster", tags=["platform"])
    async def cluster(who: Principal = Depends(caller)) -> dict[str, Any]:
        """Capacity (CPUs, memory, GPUs by type, free and used) and the queue."""
        return await scheduler().status.remote()

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

    return app
