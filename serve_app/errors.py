"""Every API error is JSON: `{"error": {"code": "...", "message": "...", "fields": [...]}}`.

Codes are stable (clients branch on them); messages are for people. Errors of the lower
layers are converted here, at the API's edge.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.state import ConflictError, NotFoundError, StateError
from cluster.storage import StorageError
from eval_actors.handles import ControlPlaneUnavailable
from proctor.spec import SpecError


RETRY_AFTER_S = 5  # what a 503 of a store that is briefly away asks the client to wait


class ApiError(Exception):
    """An error answered to the client as it is. Raised by handlers; caught by the app."""

    def __init__(self, status: int, code: str, message: str, fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields
        self.headers = headers


def body(code: str, message: str, fields: list[dict[str, str]] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if fields:
        error["fields"] = fields
    return {"error": error}


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(body(exc.code, exc.message, exc.fields), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(SpecError)
    async def _spec(_: Request, exc: SpecError) -> JSONResponse:
        fields = [{"field": f, "reason": r} for f, r in exc.errors]
        return JSONResponse(body("invalid_spec", str(exc), fields), status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [{"field": ".".join(str(p) for p in e["loc"]), "reason": e["msg"]} for e in exc.errors()]
        message = "; ".join(f"{f['field']}: {f['reason']}" for f in fields)
        return JSONResponse(body("invalid_request", message, fields), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(NotFoundError)
    async def _missing(_: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse(body("not_found", str(exc)), status_code=404)

    @app.exception_handler(ConflictError)
    async def _conflict(_: Request, exc: ConflictError) -> JSONResponse:
        return JSONResponse(body("conflict", str(exc)), status_code=409)

    @app.exception_handler(StateError)
    async def _state(_: Request, exc: StateError) -> JSONResponse:
        # the database restarts or is unreachable: the same request may succeed in a moment
        return JSONResponse(body("state_unavailable", str(exc)), status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(ControlPlaneUnavailable)
    async def _control_plane(_: Request, exc: ControlPlaneUnavailable) -> JSONResponse:
        # an actor restarts (Ray brings it back) or the platform is down: retry in a moment
        return JSONResponse(body("control_plane_unavailable", str(exc)), status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.transient else None
        return JSONResponse(body("storage_unavailable", str(exc)), status_code=503, headers=headers)
