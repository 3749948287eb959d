"""The REST and WebSocket API (FastAPI), served by Ray Serve (`deployment.py`) or any ASGI server.

`build_app` is the one app factory: it makes the shared parts (`deps.ApiContext`), adds the
middleware, the error handlers and the OpenAPI document, and mounts the routers, one per
resource (`routes/`: evaluations, results, safety, tokens, platform, streams; transcripts in
`transcripts.py`).

Every route but health and the docs needs a bearer token (`auth.py`), counted against a
rate limit per token (`limits.py`); request bodies are capped; CORS is closed unless
origins are configured. Every error is JSON with a stable code (`errors.py`). The app
talks to the control plane's named actors (scheduler, event bus, aggregator, supervisors)
through `eval_actors.handles`, and reads the state store and the results store directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from proctor.settings import Settings
from proctor.spec import EvaluationSpec

from .deps import ApiContext
from .errors import install
from .limits import BodyLimit
from .metrics import RequestMetrics
from .models import ERRORS
from .routes import ROUTERS
from .tracing import RequestTracing
from .transcripts import router as transcripts_router

__all__ = ["build_app"]

FOLLOW_POLL_S = 10.0  # the metrics' long poll of the event bus


def build_app(settings: Settings) -> FastAPI:
    ctx = ApiContext.of(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.store.close()  # its pooled database connections, closed when the app stops

    app = FastAPI(title="Proctor", version="1", docs_url="/docs", openapi_url="/openapi.json",
                  description="Evaluate AI models for dangerous capabilities, safely.", responses=ERRORS,
                  lifespan=lifespan)
    app.state.proctor = ctx
    install(app)
    if settings.cors_origins:  # closed unless configured
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(RequestTracing, settings=settings)
    app.add_middleware(RequestMetrics, metrics=ctx.metrics, follow=lambda: ctx.metrics.follow(
        lambda after: ctx.bus_read(after, timeout=FOLLOW_POLL_S), ctx.bus_last))
    app.include_router(transcripts_router)
    for router in ROUTERS:
        app.include_router(router)

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
