"""The API's side of tracing: a span per HTTP request, and the trace id in every answer.

`RequestTracing` (ASGI middleware) configures the replica's logs and traces on its first
use (in the replica's process), then, with tracing on, runs every HTTP request in a
server span named after its route (`POST /api/v1/evaluations`), continuing the caller's
trace when the request carries a W3C `traceparent`. Answers carry `traceparent` and
`X-Proctor-Trace-Id`; a 5xx answer or an exception is the span's error. With tracing
off it passes requests straight through.
"""

from __future__ import annotations

from typing import Any

from proctor.observability import observe_process, tracing

TRACE_HEADER = "x-proctor-trace-id"


class RequestTracing:
    def __init__(self, app: Any, settings: Any) -> None:
        self.app = app
        observe_process(settings, "api")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not tracing.enabled():
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        method = scope.get("method", "GET")
        span = tracing.start(f"{method} {scope.get('path', '')}", parent=headers.get("traceparent"), kind="server",
                             activate=True, attributes={"http.request.method": method,
                                                        "url.path": scope.get("path", "")})
        ids = span.parent
        status = 500

        async def answer(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start" and ids is not None:
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"traceparent", ids.traceparent.encode()),
                                      (TRACE_HEADER.encode(), f"{ids.trace_id:032x}".encode())]
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, answer)
        except BaseException as exc:
            error = exc
            raise
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route:
                span.rename(f"{method} {route}")  # known once routed: low cardinality, unlike the path
            span.set(**{"http.response.status_code": status, "http.route": route or "(unmatched)"})
            span.end(error=error or (f"HTTP {status}" if status >= 500 else None))
