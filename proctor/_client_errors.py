"""The client's exceptions: one per HTTP status that means something to a caller, chosen
from an error answer by `error_of`; transport errors become `UnavailableError` here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

class ProctorError(Exception):
    """A call to the API failed. `status` is the HTTP status (None when no answer came),
    `code` the API's stable error code, `fields` the bad fields as `{"field", "reason"}`.
    Caught by the `proctor` CLI, which prints it and exits with the code of its subclass."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "error",
                 fields: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.fields = message, status, code, fields or []

    def __str__(self) -> str:
        lines = [f"{self.message}"] + [f"  {f.get('field')}: {f.get('reason')}" for f in self.fields
                                      if f.get("field") and f"{f.get('field')}: " not in self.message]
        return "\n".join(lines)


class AuthenticationError(ProctorError):
    """401: no token, or one that is unknown, revoked or expired. The CLI exits 6."""


class PermissionDeniedError(ProctorError):
    """403: the token's role may not do this. The CLI exits 6."""


class NotFoundError(ProctorError):
    """404: no such evaluation (or not one the caller may read), artifact or result."""


class ConflictError(ProctorError):
    """409: the request clashes with the current state."""


class InvalidRequestError(ProctorError):
    """422 (or a spec file that fails to load here): `fields` names every problem."""


class RateLimitError(ProctorError):
    """429: too many requests; `retry_after` is how many seconds to wait (None if not said).
    `wait` and `proctor submit --follow` catch it, wait so long, and poll on."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):  # kw: ProctorError's own
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(ProctorError):
    """5xx: the platform failed to answer the request."""


class UnavailableError(ServerError):
    """The API cannot be reached (or answered 503): the platform is down or starting. The
    CLI exits 5 (as for every `ServerError`); a caller may retry later."""


_BY_STATUS: dict[int, type[ProctorError]] = {
    401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError, 409: ConflictError,
    422: InvalidRequestError, 429: RateLimitError, 503: UnavailableError}


def error_of(status: int, body: object, headers: Mapping[str, str] | None = None) -> ProctorError:
    """The exception for an error answer (`{"error": {"code", "message", "fields"?}}`)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code, message, fields = str(err.get("code", "error")), str(err.get("message", "")), err.get("fields")
    else:
        code, message, fields = "http_error", f"HTTP {status}: {str(body)[:300]}", None
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ProctorError)
    kw: dict[str, Any] = {  # the keywords of the error class chosen
        "status": status, "code": code, "fields": fields if isinstance(fields, list) else None}
    if cls is RateLimitError:
        after = (headers or {}).get("retry-after")
        kw["retry_after"] = float(after) if after and after.replace(".", "", 1).isdigit() else None
    return cls(message, **kw)


def _response_error(r: httpx.Response) -> ProctorError:
    try:
        body: object = r.json()
    except ValueError:
        body = r.text
    return error_of(r.status_code, body, r.headers)


def _unreachable(url: str, exc: Exception) -> UnavailableError:
    what = "did not answer in time" if isinstance(exc, httpx.TimeoutException) else "cannot be reached"
    return UnavailableError(f"the Proctor API at {url} {what} ({str(exc) or type(exc).__name__}); "
                            "is the platform up? Start it with `proctor up`", code="unavailable")

