"""The Python client of Proctor's HTTP API: `Client` (blocking) and `AsyncClient`.

    from proctor import Client

    with Client() as client:                  # the local platform of `proctor up` by default
        eval_id = client.submit("examples/arithmetic.yaml")
        ev = client.wait(eval_id, on_progress=lambda ev: print(ev.done_units, "/", ev.total_units))
        print(ev.status, ev.summary["metrics"])
        df = client.results_df(eval_id)

The URL defaults to `Settings.api_url`; the token to `$PROCTOR_TOKEN`, else the file that
`proctor up` writes (`Settings.token_file`). Every failed call raises a `ProctorError`
subclass chosen by the HTTP status; transport errors become `UnavailableError` here, at the
edge, so callers never see httpx's or websockets' exceptions.

Both clients describe a call the same way (`_Call`: method, path, query, body, and how to
read the answer); only the sending differs, so their methods stay one-liners.
"""

from __future__ import annotations

import asyncio
import builtins
import io
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import httpx
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import pandas
    import pyarrow

    from .spec import EvaluationSpec

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "safety_stopped"})
POLL_S = 0.5
RECONNECTS = 5  # consecutive failed (re)connections of a stream before giving up


# -- errors -------------------------------------------------------------------------------

class ProctorError(Exception):
    """A call to the API failed. `status` is the HTTP status (None when no answer came),
    `code` the API's stable error code, `fields` the bad fields as `{"field", "reason"}`.
    Caught by the `proctor` CLI, which prints it and exits with the code of its subclass."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "error",
                 fields: builtins.list[dict[str, str]] | None = None):
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


class ValidationError(ProctorError):
    """422 (or a spec file that fails to load here): `fields` names every problem."""


class RateLimitError(ProctorError):
    """429: too many requests; `retry_after` is how many seconds to wait (None if not said).
    `wait` and `proctor submit --follow` catch it, wait so long, and poll on."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(ProctorError):
    """5xx: the platform failed to answer the request."""


class UnavailableError(ServerError):
    """The API cannot be reached (or answered 503): the platform is down or starting. The
    CLI exits 5 (as for every `ServerError`); a caller may retry later."""


_BY_STATUS: dict[int, type[ProctorError]] = {
    401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError, 409: ConflictError,
    422: ValidationError, 429: RateLimitError, 503: UnavailableError}


def error_of(status: int, body: Any, headers: Mapping[str, str] | None = None) -> ProctorError:
    """The exception for an error answer (`{"error": {"code", "message", "fields"?}}`)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code, message, fields = str(err.get("code", "error")), str(err.get("message", "")), err.get("fields")
    else:
        code, message, fields = "http_error", f"HTTP {status}: {str(body)[:300]}", None
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ProctorError)
    kw: dict[str, Any] = {"status": status, "code": code, "fields": fields if isinstance(fields, list) else None}
    if cls is RateLimitError:
        after = (headers or {}).get("retry-after")
        kw["retry_after"] = float(after) if after and after.replace(".", "", 1).isdigit() else None
    return cls(message, **kw)


def _response_error(r: httpx.Response) -> ProctorError:
    try:
        body: Any = r.json()
    except ValueError:
        body = r.text
    return error_of(r.status_code, body, r.headers)


def _unreachable(url: str, exc: Exception) -> UnavailableError:
    what = "did not answer in time" if isinstance(exc, httpx.TimeoutException) else "cannot be reached"
    return UnavailableError(f"the Proctor API at {url} {what} ({str(exc) or type(exc).__name__}); "
                            "is the platform up? Start it with `proctor up`", code="unavailable")


# -- what the API answers -------------------------------------------------------------------

class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)  # a newer server may add fields


class Evaluation(_Answer):
    """One evaluation as the API shows it. `summary` holds `metrics` per scorer (mean,
    ci_low, ci_high, n, ...), counts, usage and timing once it has finished."""

    id: str
    name: str = ""
    owner: str = ""
    status: str = "queued"
    priority: int = 0
    labels: dict[str, str] = {}
    model: str = ""
    runtime: str = ""
    total_shards: int = 0
    total_units: int = 0
    done_units: int = 0
    wait_reason: str | None = None
    error: str | None = None
    summary: dict[str, Any] | None = None
    results_uri: str | None = None
    created_at: datetime | None = None
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    gpus_per_shard: int = 0
    gpu_type: str | None = None
    suite: str = ""

    @property
    def finished(self) -> bool:
        """Whether the status is final (succeeded, failed, cancelled or safety_stopped)."""
        return self.status in TERMINAL


class Stopped(_Answer):
    id: str
    stopped: bool
    status: str


class Artifact(_Answer):
    path: str  # `<shard_id>/<relative path>`
    size: int = 0
    url: str | None = None  # pre-signed, when results are on S3


class Token(_Answer):
    id: int
    user: str
    role: str
    name: str = ""
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked: bool = False


class NewToken(_Answer):
    id: int
    token: str  # the secret: shown once
    user: str
    role: str
    name: str = ""
    expires_at: datetime | None = None


# -- the calls ---------------------------------------------------------------------------------

def _json(r: httpx.Response) -> Any:
    return r.json()


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    params: Any = None
    body: Any = None
    read: Callable[[httpx.Response], Any] = _json


def _ev(eval_id: str, tail: str = "") -> str:
    return f"/api/v1/evaluations/{quote(str(eval_id), safe='')}{tail}"


def _spec_body(spec: Any) -> dict[str, Any]:
    if isinstance(spec, Mapping):
        return dict(spec)
    if isinstance(spec, (str, Path)):
        from .spec import SpecError, load_spec

        try:
            spec = load_spec(spec)
        except SpecError as exc:
            raise ValidationError(str(exc).splitlines()[0], code="invalid_spec", status=422,
                                  fields=[{"field": f, "reason": r} for f, r in exc.errors]) from None
    return spec.model_dump(mode="json")


def _list_params(status: str | builtins.list[str] | None, owner: str | None, label: str | None,
                 model: str | None, text: str | None, limit: int, sort: str | None,
                 cursor: str | None) -> builtins.list[tuple[str, Any]]:
    statuses = [status] if isinstance(status, str) else list(status or [])
    pairs = [("status", s) for s in statuses]
    named = {"owner": owner, "label": label, "model": model, "text": text, "limit": limit, "sort": sort,
             "cursor": cursor}
    return pairs + [(k, v) for k, v in named.items() if v is not None]


def _page(r: httpx.Response) -> tuple[builtins.list[Evaluation], str | None]:
    data = r.json()
    return [Evaluation.model_validate(e) for e in data["items"]], data.get("next_cursor")


PARTIAL_KEY = b"proctor.partial"  # schema metadata of the rows of an evaluation still running


def _parquet(r: httpx.Response) -> pyarrow.Table:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(r.content))
    if r.headers.get("x-proctor-partial") == "true":
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), PARTIAL_KEY: b"true"})
    return table


def is_partial(table: pyarrow.Table) -> bool:
    """Whether `Client.results` read the rows of an evaluation that is still running."""
    return (table.schema.metadata or {}).get(PARTIAL_KEY) == b"true"


def _model(cls: type[BaseModel], key: str | None = None) -> Callable[[httpx.Response], Any]:
    """Reads an answer (or the list under `key`) as `cls`."""
    if key is None:
        return lambda r: cls.model_validate(r.json())
    return lambda r: [cls.model_validate(item) for item in r.json()[key]]


class _Calls:
    """Every call of the API, described once for both clients."""

    @staticmethod
    def submit(spec: Any) -> _Call:
        return _Call("POST", "/api/v1/evaluations", body=_spec_body(spec), read=lambda r: r.json()["id"])

    @staticmethod
    def get(eval_id: str) -> _Call:
        return _Call("GET", _ev(eval_id), read=_model(Evaluation))

    @staticmethod
    def page(params: builtins.list[tuple[str, Any]]) -> _Call:
        return _Call("GET", "/api/v1/evaluations", params=params, read=_page)

    @staticmethod
    def cancel(eval_id: str) -> _Call:
        return _Call("DELETE", _ev(eval_id), read=_model(Stopped))

    @staticmethod
    def stop(eval_id: str) -> _Call:
        return _Call("POST", _ev(eval_id, "/stop"), read=_model(Stopped))

    @staticmethod
    def stop_all() -> _Call:
        return _Call("POST", "/api/v1/stop-all", read=lambda r: r.json()["stopped"])

    @staticmethod
    def results(eval_id: str) -> _Call:
        return _Call("GET", _ev(eval_id, "/results.parquet"), read=_parquet)

    @staticmethod
    def artifacts(eval_id: str) -> _Call:
        return _Call("GET", _ev(eval_id, "/artifacts"), read=_model(Artifact, "artifacts"))

    @staticmethod
    def incidents(eval_id: str) -> _Call:
        return _Call("GET", _ev(eval_id, "/incidents"), read=lambda r: r.json()["incidents"])

    @staticmethod
    def recent_incidents(limit: int) -> _Call:
        return _Call("GET", "/api/v1/incidents", params={"limit": limit}, read=lambda r: r.json()["incidents"])

    @staticmethod
    def shards(eval_id: str) -> _Call:
        return _Call("GET", _ev(eval_id, "/shards"))

    @staticmethod
    def resources(eval_id: str) -> _Call:
        return _Call("GET", _ev(eval_id, "/resources"))

    @staticmethod
    def me() -> _Call:
        return _Call("GET", "/api/v1/me")

    @staticmethod
    def cluster() -> _Call:
        return _Call("GET", "/api/v1/cluster")

    @staticmethod
    def health() -> _Call:
        return _Call("GET", "/api/v1/health")

    @staticmethod
    def metrics() -> _Call:
        return _Call("GET", "/api/v1/metrics", read=lambda r: r.text)

    @staticmethod
    def create_token(user: str, role: str, name: str, expires_in_days: int | None) -> _Call:
        body = {"user": user, "role": role, "name": name, "expires_in_days": expires_in_days}
        return _Call("POST", "/api/v1/tokens", body=body, read=_model(NewToken))

    @staticmethod
    def tokens() -> _Call:
        return _Call("GET", "/api/v1/tokens", read=_model(Token, "items"))

    @staticmethod
    def revoke_token(token_id: int) -> _Call:
        return _Call("DELETE", f"/api/v1/tokens/{int(token_id)}", read=lambda r: bool(r.json().get("revoked")))


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
        decoded: Any = json.loads(body)
    except ValueError:
        decoded = body.decode(errors="replace")
    return error_of(response.status_code, decoded, {k.lower(): v for k, v in response.headers.raw_items()})


class _Resume:
    """Where a stream (logs, events) has got to, and whether to reopen it after it broke."""

    def __init__(self, url: str, after: int):
        self.url, self.after, self.failures = url, after, 0

    def saw(self, item: dict[str, Any]) -> dict[str, Any]:
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
        return min(0.2 * 2 ** self.failures, 5.0)

    def log_params(self, follow: bool, level: str | None, text: str | None) -> dict[str, Any]:
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


# -- the blocking client ---------------------------------------------------------------------

class Client(_Base):
    """The blocking client. `url` and `token` default as the module says (`token=""`: send
    none); `timeout` is per request, in seconds. Iterating methods (`list`, `logs`,
    `events`) stream lazily. Close it, or use it in a `with` block."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30):
        super().__init__(url, token, timeout)
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout, follow_redirects=True)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> Any:
        try:
            r = self._http.request(call.method, call.path, params=call.params, json=call.body)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        if r.is_error:
            raise self._failed(r)
        return call.read(r)

    def submit(self, spec: EvaluationSpec | Mapping[str, Any] | str | Path) -> str:
        """Submit a spec (object, dict, or YAML/JSON file). Returns the evaluation's id.
        Raises `ValidationError` naming every bad field, `PermissionDeniedError` for viewers."""
        return self._send(_Calls.submit(spec))

    def get(self, eval_id: str) -> Evaluation:
        return self._send(_Calls.get(eval_id))

    def list_page(self, status: str | builtins.list[str] | None = None, owner: str | None = None,
                  label: str | None = None, model: str | None = None, text: str | None = None,
                  limit: int = 50, sort: str | None = None, cursor: str | None = None
                  ) -> tuple[builtins.list[Evaluation], str | None]:
        """One page of evaluations and the cursor of the next (None after the last)."""
        return self._send(_Calls.page(_list_params(status, owner, label, model, text, limit, sort, cursor)))

    def list(self, status: str | builtins.list[str] | None = None, owner: str | None = None,
             label: str | None = None, model: str | None = None, text: str | None = None,
             limit: int = 50, sort: str | None = None) -> Iterator[Evaluation]:
        """Every matching evaluation, fetched `limit` a page. `label` is `"key=value"`."""
        cursor: str | None = None
        while True:
            items, cursor = self.list_page(status, owner, label, model, text, limit, sort, cursor)
            yield from items
            if not cursor:
                return

    def wait(self, eval_id: str, timeout: float | None = None,
             on_progress: Callable[[Evaluation], Any] | None = None) -> Evaluation:
        """Poll until the evaluation has finished; returns it. `on_progress` is called with
        each new state. Raises `TimeoutError` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            try:
                ev = self.get(eval_id)
            except RateLimitError as exc:
                time.sleep(exc.retry_after or 1)
                continue
            if on_progress and (ev.status, ev.done_units, ev.total_units) != last:
                on_progress(ev)
                last = (ev.status, ev.done_units, ev.total_units)
            if ev.finished:
                return ev
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"evaluation {eval_id} is still {ev.status} after {timeout}s")
            time.sleep(POLL_S)

    def logs(self, eval_id: str, follow: bool = False, level: str | None = None, text: str | None = None,
             after: int = 0) -> Iterator[dict[str, Any]]:
        """Log lines (`seq`, `ts`, `shard_id`, `level`, `message`). With `follow`, the stream
        stays open until the evaluation has finished, and resumes after a dropped connection."""
        at = _Resume(self.url, after)
        timeout = httpx.Timeout(self.timeout, read=None if follow else self.timeout)
        while True:
            try:
                with self._http.stream("GET", _ev(eval_id, "/logs"), params=at.log_params(follow, level, text),
                                       timeout=timeout) as r:
                    if r.is_error:
                        r.read()
                        raise self._failed(r)
                    yield from (at.saw(json.loads(line)) for line in r.iter_lines() if line.strip())
                return
            except httpx.TransportError as exc:
                if not follow:
                    raise _unreachable(self.url, exc) from exc
                time.sleep(at.broke(exc))

    def events(self, eval_id: str | None = None, after: int = 0) -> Iterator[dict[str, Any]]:
        """Events over the WebSocket (all of them, or one evaluation's), from after `after`.
        A dropped connection is reopened after the last `seq` seen: nothing is missed or
        doubled (a `{"type": "gap"}` event says when the server had to drop some). One
        evaluation's stream ends when the server closes it, after the evaluation finished."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake
        from websockets.sync.client import connect

        at = _Resume(self.url, after)
        while True:
            try:
                with connect(_ws_url(self.url, eval_id, at.after), additional_headers=self._headers,
                             open_timeout=self.timeout, max_size=None) as ws:
                    try:
                        yield from (at.saw(json.loads(raw)) for raw in ws)
                    except ConnectionClosed:
                        pass
                if _ended(ws.close_code, ws.close_reason or ""):
                    return
                cause: Exception = ConnectionError(f"the event stream closed with code {ws.close_code}")
            except InvalidHandshake as exc:
                if (refused := _handshake_error(exc)) is not None:
                    raise refused from None
                cause = exc
            except (OSError, TimeoutError) as exc:
                cause = exc
            time.sleep(at.broke(cause))

    def cancel(self, eval_id: str) -> Stopped:
        """Cancel: queued shards are dropped, running ones asked to stop."""
        return self._send(_Calls.cancel(eval_id))

    def stop(self, eval_id: str) -> Stopped:
        """Emergency stop: every sandbox of the evaluation is killed at once."""
        return self._send(_Calls.stop(eval_id))

    def stop_all(self) -> builtins.list[str]:
        """Emergency stop of everything running (admin). Returns the stopped ids."""
        return self._send(_Calls.stop_all())

    def results(self, eval_id: str) -> pyarrow.Table:
        """Every sample row (schema of `cluster/results.py`); while the evaluation runs,
        the rows written so far (then `is_partial(table)` is true). `NotFoundError` (code
        `no_results`) until it has written some."""
        return self._send(_Calls.results(eval_id))

    def results_df(self, eval_id: str) -> pandas.DataFrame:
        return self.results(eval_id).to_pandas()

    def summary(self, eval_id: str) -> dict[str, Any] | None:
        """Metrics per scorer with 95% CIs, counts, usage; None until it has finished."""
        return self.get(eval_id).summary

    def artifacts(self, eval_id: str) -> builtins.list[Artifact]:
        return self._send(_Calls.artifacts(eval_id))

    def download_artifact(self, eval_id: str, path: str, dest: str | Path) -> Path:
        """Save artifact `path` (as `artifacts` names it) to `dest` (a file, or a folder to
        put it in). Returns the file written."""
        target = Path(dest)
        if target.is_dir():
            target = target / Path(path).name
        try:
            with self._http.stream("GET", _ev(eval_id, "/artifacts/" + quote(path))) as r:
                if r.is_error:
                    r.read()
                    raise self._failed(r)
                with target.open("wb") as f:
                    for chunk in r.iter_bytes():
                        f.write(chunk)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        return target

    def incidents(self, eval_id: str) -> builtins.list[dict[str, Any]]:
        return self._send(_Calls.incidents(eval_id))

    def recent_incidents(self, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The newest incidents of every evaluation the caller may read, newest first."""
        return self._send(_Calls.recent_incidents(limit))

    def me(self) -> dict[str, Any]:
        """Who the token is: {"name", "role"}."""
        return self._send(_Calls.me())

    def shards(self, eval_id: str) -> dict[str, Any]:
        """The evaluation's stored spec and its shards' states: {"id", "spec", "shards": [...]}."""
        return self._send(_Calls.shards(eval_id))

    def resources(self, eval_id: str) -> dict[str, Any]:
        """Each shard's resource use over time: {"id", "gpus_per_shard", "gpu_type", "shards":
        [{"shard_id", "attempt", "live", "samples": [{"t", "cpu", "memory", ...}]}]}."""
        return self._send(_Calls.resources(eval_id))

    def cluster(self) -> dict[str, Any]:
        """Capacity (CPUs, memory, GPUs by type, free and used) and the queue."""
        return self._send(_Calls.cluster())

    def health(self) -> dict[str, Any]:
        """`{"live", "ready", "checks"}`; needs no token."""
        return self._send(_Calls.health())

    def metrics(self) -> str:
        """The Prometheus metrics, as text."""
        return self._send(_Calls.metrics())

    def create_token(self, user: str, role: str, name: str, expires_in_days: int | None = None) -> NewToken:
        """A new API key for `user` (admin). Its secret, `.token`, is shown only here."""
        return self._send(_Calls.create_token(user, role, name, expires_in_days))

    def tokens(self) -> builtins.list[Token]:
        return self._send(_Calls.tokens())

    def revoke_token(self, token_id: int) -> bool:
        return self._send(_Calls.revoke_token(token_id))


# -- the async client ----------------------------------------------------------------------

class AsyncClient(_Base):
    """The same calls as `Client`, awaitable; `list`, `logs` and `events` are async iterators."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30):
        super().__init__(url, token, timeout)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=timeout,
                                       follow_redirects=True)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> Any:
        try:
            r = await self._http.request(call.method, call.path, params=call.params, json=call.body)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        if r.is_error:
            raise self._failed(r)
        return call.read(r)

    async def submit(self, spec: EvaluationSpec | Mapping[str, Any] | str | Path) -> str:
        return await self._send(_Calls.submit(spec))

    async def get(self, eval_id: str) -> Evaluation:
        return await self._send(_Calls.get(eval_id))

    async def list_page(self, status: str | builtins.list[str] | None = None, owner: str | None = None,
                        label: str | None = None, model: str | None = None, text: str | None = None,
                        limit: int = 50, sort: str | None = None, cursor: str | None = None
                        ) -> tuple[builtins.list[Evaluation], str | None]:
        return await self._send(_Calls.page(_list_params(status, owner, label, model, text, limit, sort, cursor)))

    async def list(self, status: str | builtins.list[str] | None = None, owner: str | None = None,
                   label: str | None = None, model: str | None = None, text: str | None = None,
                   limit: int = 50, sort: str | None = None) -> AsyncIterator[Evaluation]:
        cursor: str | None = None
        while True:
            items, cursor = await self.list_page(status, owner, label, model, text, limit, sort, cursor)
            for item in items:
                yield item
            if not cursor:
                return

    async def wait(self, eval_id: str, timeout: float | None = None,
                   on_progress: Callable[[Evaluation], Any] | None = None) -> Evaluation:
        """As `Client.wait`; `on_progress` may be a coroutine function."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        last = None
        while True:
            try:
                ev = await self.get(eval_id)
            except RateLimitError as exc:
                await asyncio.sleep(exc.retry_after or 1)
                continue
            if on_progress and (ev.status, ev.done_units, ev.total_units) != last:
                if asyncio.iscoroutine(called := on_progress(ev)):
                    await called
                last = (ev.status, ev.done_units, ev.total_units)
            if ev.finished:
                return ev
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"evaluation {eval_id} is still {ev.status} after {timeout}s")
            await asyncio.sleep(POLL_S)

    async def logs(self, eval_id: str, follow: bool = False, level: str | None = None, text: str | None = None,
                   after: int = 0) -> AsyncIterator[dict[str, Any]]:
        at = _Resume(self.url, after)
        timeout = httpx.Timeout(self.timeout, read=None if follow else self.timeout)
        while True:
            try:
                async with self._http.stream("GET", _ev(eval_id, "/logs"), timeout=timeout,
                                             params=at.log_params(follow, level, text)) as r:
                    if r.is_error:
                        await r.aread()
                        raise self._failed(r)
                    async for line in r.aiter_lines():
                        if line.strip():
                            yield at.saw(json.loads(line))
                return
            except httpx.TransportError as exc:
                if not follow:
                    raise _unreachable(self.url, exc) from exc
                await asyncio.sleep(at.broke(exc))

    async def events(self, eval_id: str | None = None, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        at = _Resume(self.url, after)
        while True:
            try:
                async with connect(_ws_url(self.url, eval_id, at.after), additional_headers=self._headers,
                                   open_timeout=self.timeout, max_size=None) as ws:
                    try:
                        async for raw in ws:
                            yield at.saw(json.loads(raw))
                    except ConnectionClosed:
                        pass
                if _ended(ws.close_code, ws.close_reason or ""):
                    return
                cause: Exception = ConnectionError(f"the event stream closed with code {ws.close_code}")
            except InvalidHandshake as exc:
                if (refused := _handshake_error(exc)) is not None:
                    raise refused from None
                cause = exc
            except (OSError, TimeoutError) as exc:
                cause = exc
            await asyncio.sleep(at.broke(cause))

    async def cancel(self, eval_id: str) -> Stopped:
        return await self._send(_Calls.cancel(eval_id))

    async def stop(self, eval_id: str) -> Stopped:
        return await self._send(_Calls.stop(eval_id))

    async def stop_all(self) -> builtins.list[str]:
        return await self._send(_Calls.stop_all())

    async def results(self, eval_id: str) -> pyarrow.Table:
        return await self._send(_Calls.results(eval_id))

    async def results_df(self, eval_id: str) -> pandas.DataFrame:
        return (await self.results(eval_id)).to_pandas()

    async def summary(self, eval_id: str) -> dict[str, Any] | None:
        return (await self.get(eval_id)).summary

    async def artifacts(self, eval_id: str) -> builtins.list[Artifact]:
        return await self._send(_Calls.artifacts(eval_id))

    async def download_artifact(self, eval_id: str, path: str, dest: str | Path) -> Path:
        target = Path(dest)
        if target.is_dir():
            target = target / Path(path).name
        try:
            async with self._http.stream("GET", _ev(eval_id, "/artifacts/" + quote(path))) as r:
                if r.is_error:
                    await r.aread()
                    raise self._failed(r)
                with target.open("wb") as f:
                    async for chunk in r.aiter_bytes():
                        f.write(chunk)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        return target

    async def incidents(self, eval_id: str) -> builtins.list[dict[str, Any]]:
        return await self._send(_Calls.incidents(eval_id))

    async def recent_incidents(self, limit: int = 100) -> builtins.list[dict[str, Any]]:
        return await self._send(_Calls.recent_incidents(limit))

    async def me(self) -> dict[str, Any]:
        return await self._send(_Calls.me())

    async def shards(self, eval_id: str) -> dict[str, Any]:
        return await self._send(_Calls.shards(eval_id))

    async def resources(self, eval_id: str) -> dict[str, Any]:
        return await self._send(_Calls.resources(eval_id))

    async def cluster(self) -> dict[str, Any]:
        return await self._send(_Calls.cluster())

    async def health(self) -> dict[str, Any]:
        return await self._send(_Calls.health())

    async def metrics(self) -> str:
        return await self._send(_Calls.metrics())

    async def create_token(self, user: str, role: str, name: str, expires_in_days: int | None = None) -> NewToken:
        return await self._send(_Calls.create_token(user, role, name, expires_in_days))

    async def tokens(self) -> builtins.list[Token]:
        return await self._send(_Calls.tokens())

    async def revoke_token(self, token_id: int) -> bool:
        return await self._send(_Calls.revoke_token(token_id))
