"""What both clients share beyond their calls: their settings (URL, token, headers), and
the streams (logs, events) that resume after a dropped connection."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from .jsontypes import JsonObject
from ._client_errors import AuthenticationError, PermissionDeniedError, ProctorError
from ._client_errors import _response_error, _unreachable, error_of

POLL_S = 0.5  # `wait` polls this often
RECONNECTS = 5  # consecutive failed (re)connections of a stream before giving up


def _defaults(url: str | None, token: str | None) -> tuple[str, str | None]:
    if url is None or token is None:
        from .settings import load_settings

        settings = load_settings()
        url = url or settings.api_url
        if token is None:
            token = settings.secret("PROCTOR_TOKEN")
            if not token and settings.token_file.is_file():
                token = settings.token_file.read_text().strip()
    return url.rstrip("/"), token or None


def _ws_url(base: str, eval_id: str | None, after: int) -> str:
    path = "/ws/evaluations" + (f"/{quote(eval_id, safe='')}" if eval_id else "")
    return base.replace("http", "ws", 1) + path + "?" + urlencode({"after": after})


def _handshake_error(exc: Exception) -> ProctorError | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    body = bytes(response.body or b"")
    try:
        decoded: object = json.loads(body)
    except ValueError:
        decoded = body.decode(errors="replace")
    return error_of(response.status_code, decoded, {k.lower(): v for k, v in response.headers.raw_items()})


class _Resume:
    """Where a stream (logs, events) has got to, and whether to reopen it after it broke."""

    def __init__(self, url: str, after: int):
        self.url, self.after, self.failures = url, after, 0

    def saw(self, item: JsonObject) -> JsonObject:
        # the last seq seen, not the highest: after a `gap` for a restarted bus, seqs start again
        if isinstance(item.get("seq"), int):
            self.after = item["seq"]
        self.failures = 0
        return item

    def broke(self, cause: Exception) -> float:
        """Seconds to wait before reopening. Raises `UnavailableError` after RECONNECTS tries."""
        self.failures += 1
        if self.failures > RECONNECTS:
            raise _unreachable(self.url, cause) from cause
        return min(0.2 * 2.0 ** self.failures, 5.0)

    def log_params(self, follow: bool, level: str | None, text: str | None) -> JsonObject:
        named = {"follow": str(follow).lower(), "level": level, "text": text, "after": self.after}
        return {k: v for k, v in named.items() if v is not None}


def _ended(code: int | None, reason: str) -> bool:
    """Whether a closed WebSocket stream has ended (1000), or should be reopened. Raises
    the refusal a close code stands for (4000 + an HTTP status, or 1008)."""
    if code == 1000:
        return True
    if code is not None and 4000 <= code < 5000 and code != 4429:  # 4429: too many requests; retried
        raise error_of(code - 4000, {"error": {"code": "closed", "message": reason or f"closed ({code})"}})
    if code == 1008:
        raise PermissionDeniedError(reason or "the server refused the event stream", status=403, code="closed")
    return False


class _Base:
    def __init__(self, url: str | None, token: str | None, timeout: float):
        self.url, self.token = _defaults(url, token)
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._headers["User-Agent"] = "proctor-client/0.1"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _failed(self, r: httpx.Response) -> ProctorError:
        exc = _response_error(r)
        if isinstance(exc, AuthenticationError) and not self.token:
            exc.message += "; pass token=, set PROCTOR_TOKEN, or run `proctor up` (it writes the admin token)"
            exc.args = (exc.message,)
        return exc

