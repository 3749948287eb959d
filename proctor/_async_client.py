"""The asynchronous client: `AsyncClient`, `Client`'s twin (the same calls, awaited)."""

from __future__ import annotations

import asyncio
import builtins
import json
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import httpx

from .jsontypes import JsonObject
from ._client_answers import Artifact, Evaluation, NewToken, Stopped, Token
from ._client_calls import PAGE_ENTRIES, _Call, _Calls, _ev, _joined, _list_params
from ._client_errors import RateLimitError, _unreachable
from ._client_stream import POLL_S, _Base, _ended, _handshake_error, _Resume, _ws_url
from .transcript import TranscriptInfo, TranscriptPage, TranscriptSearch

_T = TypeVar("_T")  # what a call's answer reads as

if TYPE_CHECKING:
    import pandas
    import pyarrow

    from .spec import EvaluationSpec

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

    async def _send(self, call: _Call[_T]) -> _T:
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
                   on_progress: Callable[[Evaluation], object] | None = None) -> Evaluation:
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
                   after: int = 0) -> AsyncIterator[JsonObject]:
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

    async def events(self, eval_id: str | None = None, after: int = 0) -> AsyncIterator[JsonObject]:
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

    async def summary(self, eval_id: str) -> JsonObject | None:
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

    async def incidents(self, eval_id: str) -> builtins.list[JsonObject]:
        return await self._send(_Calls.incidents(eval_id))

    async def recent_incidents(self, limit: int = 100) -> builtins.list[JsonObject]:
        return await self._send(_Calls.recent_incidents(limit))

    async def transcript(self, eval_id: str, sample_id: str, epoch: int = 1, offset: int = 0,
                         limit: int | None = None) -> TranscriptPage:
        page = await self._send(_Calls.transcript(eval_id, sample_id, epoch, offset, limit or PAGE_ENTRIES))
        while limit is None and page.next_offset is not None:
            more = await self._send(_Calls.transcript(eval_id, sample_id, epoch, page.next_offset, PAGE_ENTRIES))
            page = _joined(page, more)
        return page

    async def transcripts(self, eval_id: str) -> builtins.list[TranscriptInfo]:
        return await self._send(_Calls.transcripts(eval_id))

    async def search_transcripts(self, eval_id: str, pattern: str, limit: int = 100) -> TranscriptSearch:
        return await self._send(_Calls.search_transcripts(eval_id, pattern, limit))

    async def me(self) -> JsonObject:
        return await self._send(_Calls.me())

    async def shards(self, eval_id: str) -> JsonObject:
        return await self._send(_Calls.shards(eval_id))

    async def resources(self, eval_id: str) -> JsonObject:
        return await self._send(_Calls.resources(eval_id))

    async def cluster(self) -> JsonObject:
        return await self._send(_Calls.cluster())

    async def health(self) -> JsonObject:
        return await self._send(_Calls.health())

    async def metrics(self) -> str:
        return await self._send(_Calls.metrics())

    async def create_token(self, user: str, role: str, name: str, expires_in_days: int | None = None) -> NewToken:
        return await self._send(_Calls.create_token(user, role, name, expires_in_days))

    async def tokens(self) -> builtins.list[Token]:
        return await self._send(_Calls.tokens())

    async def revoke_token(self, token_id: int) -> bool:
        return await self._send(_Calls.revoke_token(token_id))
