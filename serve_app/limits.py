"""Request limits: a token bucket per caller, and a cap on request bodies.

Both are per API replica (in memory): with N replicas a caller may reach N times the
rate, which is what a limit against runaway scripts needs; it is not a quota.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from typing import Any

from .errors import ApiError, body

MAX_BUCKETS = 100_000


class RateLimiter:
    """`rate` requests per second per key, with bursts of up to `burst`."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = float(burst)
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str, now: float | None = None) -> float:
        """Spend one request of `key`: 0 if allowed, else the seconds until one is."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, at = self.buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self.buckets[key] = (tokens, now)
        while len(self.buckets) > MAX_BUCKETS:
            self.buckets.popitem(last=False)
        return wait

    def check(self, key: str) -> None:
        wait = self.take(key)
        if wait:
            seconds = max(1, math.ceil(wait))
            raise ApiError(429, "rate_limited", f"too many requests; retry in {seconds} s",
                           headers={"Retry-After": str(seconds)})


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is refused with 413 before the app reads
    it, whether it declares a Content-Length or streams chunks."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _refuse(send, 400, "invalid_request", "Content-Length is not a number")
                if declared > self.limit:
                    return await _refuse(send, 413, "request_too_large",
                                         f"the request body is {declared} bytes; the limit is {self.limit}")
        seen = 0
        refused = False

        async def counted() -> dict[str, Any]:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # answer now; the app sees the client gone and is not heard
                    refused = True
                    await _refuse(send, 413, "request_too_large", f"the request body is over {self.limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: dict[str, Any]) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, guarded)


async def _refuse(send: Any, status: int, code: str, message: str) -> None:
    payload = json.dumps(body(code, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
