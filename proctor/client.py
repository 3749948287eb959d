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
read the answer); only the sending differs, so their methods stay one-liners. The parts:
`_client_errors` (the exceptions), `_client_answers` (what the API answers), `_client_calls`
(the calls), `_client_stream` (settings and resuming streams) and `_async_client`.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import httpx

from .jsontypes import JsonObject
from ._async_client import AsyncClient
from ._client_answers import Artifact, Evaluation, NewToken, Stopped, Token
from ._client_calls import PAGE_ENTRIES, PARTIAL_KEY, _Call, _Calls, _ev, _joined, _list_params, is_partial
from ._client_errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ProctorError,
    RateLimitError,
    ServerError,
    UnavailableError,
    _unreachable,
    error_of,
)
from ._client_stream import POLL_S, RECONNECTS, _Base, _ended, _handshake_error, _Resume, _ws_url
from .transcript import TranscriptInfo, TranscriptPage, TranscriptSearch

_T = TypeVar("_T")  # what a call's answer reads as

if TYPE_CHECKING:
    import pandas
    import pyarrow

    from .spec import EvaluationSpec

__all__ = ["PARTIAL_KEY", "POLL_S", "RECONNECTS", "Artifact", "AsyncClient", "AuthenticationError", "Client",
           "ConflictError", "Evaluation", "InvalidRequestError", "NewToken", "NotFoundError", "PermissionDeniedError",
           "ProctorError", "RateLimitError", "ServerError", "Stopped", "Token", "UnavailableError", "error_of",
           "is_partial"]

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

    def _send(self, call: _Call[_T]) -> _T:
        try:
            r = self._http.request(call.method, call.path, params=call.params, json=call.body)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        if r.is_error:
            raise self._failed(r)
        return call.read(r)

    def submit(self, spec: EvaluationSpec | Mapping[str, Any] | str | Path) -> str:
        """Submit a spec (object, dict, or YAML/JSON file). Returns the evaluation's id.
        Raises `InvalidRequestError` naming every bad field, `PermissionDeniedError` for viewers."""
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
             on_progress: Callable[[Evaluation], object] | None = None) -> Evaluation:
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
             after: int = 0) -> Iterator[JsonObject]:
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

    def events(self, eval_id: str | None = None, after: int = 0) -> Iterator[JsonObject]:
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

    def summary(self, eval_id: str) -> JsonObject | None:
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

    def incidents(self, eval_id: str) -> builtins.list[JsonObject]:
        return self._send(_Calls.incidents(eval_id))

    def recent_incidents(self, limit: int = 100) -> builtins.list[JsonObject]:
        """The newest incidents of every evaluation the caller may read, newest first."""
        return self._send(_Calls.recent_incidents(limit))

    def transcript(self, eval_id: str, sample_id: str, epoch: int = 1, offset: int = 0,
                   limit: int | None = None) -> TranscriptPage:
        """A sample × epoch's transcript (`proctor.transcript`): its entries from `offset`,
        `limit` of them (None: all, page by page). Live while its shard runs; a quarantined
        one needs the safety or admin role (`PermissionDeniedError`)."""
        page = self._send(_Calls.transcript(eval_id, sample_id, epoch, offset, limit or PAGE_ENTRIES))
        while limit is None and page.next_offset is not None:
            more = self._send(_Calls.transcript(eval_id, sample_id, epoch, page.next_offset, PAGE_ENTRIES))
            page = _joined(page, more)
        return page

    def transcripts(self, eval_id: str) -> builtins.list[TranscriptInfo]:
        """The samples × epochs that have a transcript (stored, quarantined, live)."""
        return self._send(_Calls.transcripts(eval_id))

    def search_transcripts(self, eval_id: str, pattern: str, limit: int = 100) -> TranscriptSearch:
        """The samples and entries where `pattern` appears (case-insensitive), at most `limit`."""
        return self._send(_Calls.search_transcripts(eval_id, pattern, limit))

    def me(self) -> JsonObject:
        """Who the token is: {"name", "role"}."""
        return self._send(_Calls.me())

    def shards(self, eval_id: str) -> JsonObject:
        """The evaluation's stored spec and its shards' states: {"id", "spec", "shards": [...]}."""
        return self._send(_Calls.shards(eval_id))

    def resources(self, eval_id: str) -> JsonObject:
        """Each shard's resource use over time: {"id", "gpus_per_shard", "gpu_type", "shards":
        [{"shard_id", "attempt", "live", "samples": [{"t", "cpu", "memory", ...}]}]}."""
        return self._send(_Calls.resources(eval_id))

    def cluster(self) -> JsonObject:
        """Capacity (CPUs, memory, GPUs by type, free and used) and the queue."""
        return self._send(_Calls.cluster())

    def health(self) -> JsonObject:
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
