"""Every call of the API, described once (`_Call`: method, path, query, body, and how to
read the answer) for both clients, which differ only in how they send it."""

from __future__ import annotations

import builtins
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from .jsontypes import JsonObject
from ._client_answers import Artifact, Evaluation, NewToken, Stopped, Token
from ._client_errors import InvalidRequestError
from .transcript import TranscriptInfo, TranscriptPage, TranscriptSearch

if TYPE_CHECKING:
    from .spec import EvaluationSpec
    import pyarrow

def _json(r: httpx.Response) -> Any:  # the API's JSON answer: each call says what it reads from it
    return r.json()


_T = TypeVar("_T")
_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True)
class _Call(Generic[_T]):
    """One call of the API, and how to read its answer (a `_T`)."""

    method: str
    path: str
    params: Any = None  # httpx's query parameters: a mapping or a list of pairs
    body: Any = None  # JSON
    read: Callable[[httpx.Response], _T] = _json


def _ev(eval_id: str, tail: str = "") -> str:
    return f"/api/v1/evaluations/{quote(str(eval_id), safe='')}{tail}"


def _spec_body(spec: EvaluationSpec | Mapping[str, Any] | str | Path) -> JsonObject:
    if isinstance(spec, Mapping):
        return dict(spec)
    if isinstance(spec, (str, Path)):
        from .spec import SpecError, load_spec

        try:
            spec = load_spec(spec)
        except SpecError as exc:
            raise InvalidRequestError(str(exc).splitlines()[0], code="invalid_spec", status=422,
                                  fields=[{"field": f, "reason": r} for f, r in exc.errors]) from None
    return spec.model_dump(mode="json")


def _list_params(status: str | builtins.list[str] | None, owner: str | None, label: str | None,
                 model: str | None, text: str | None, limit: int, sort: str | None,
                 cursor: str | None) -> builtins.list[tuple[str, str | int]]:
    statuses = [status] if isinstance(status, str) else list(status or [])
    pairs: builtins.list[tuple[str, str | int]] = [("status", s) for s in statuses]
    named = {"owner": owner, "label": label, "model": model, "text": text, "limit": limit, "sort": sort,
             "cursor": cursor}
    return pairs + [(k, v) for k, v in named.items() if v is not None]


def _page(r: httpx.Response) -> tuple[builtins.list[Evaluation], str | None]:
    data = r.json()
    return [Evaluation.model_validate(e) for e in data["items"]], data.get("next_cursor")


PAGE_ENTRIES = 500  # transcript entries fetched at once


def _joined(page: TranscriptPage, more: TranscriptPage) -> TranscriptPage:
    """Two consecutive pages of a transcript as one (the later one's counts)."""
    return more.model_copy(update={"offset": page.offset, "entries": page.entries + more.entries})


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


def _model(cls: type[_M]) -> Callable[[httpx.Response], _M]:
    """Reads an answer as `cls`."""
    return lambda r: cls.model_validate(r.json())


def _models(cls: type[_M], key: str) -> Callable[[httpx.Response], builtins.list[_M]]:
    """Reads the list under `key` of an answer as `cls`."""
    return lambda r: [cls.model_validate(item) for item in r.json()[key]]


class _Calls:
    """Every call of the API, described once for both clients."""

    @staticmethod
    def submit(spec: EvaluationSpec | Mapping[str, Any] | str | Path) -> _Call[str]:
        return _Call("POST", "/api/v1/evaluations", body=_spec_body(spec), read=lambda r: r.json()["id"])

    @staticmethod
    def get(eval_id: str) -> _Call[Evaluation]:
        return _Call("GET", _ev(eval_id), read=_model(Evaluation))

    @staticmethod
    def page(params: builtins.list[tuple[str, str | int]]) -> _Call[tuple[builtins.list[Evaluation], str | None]]:
        return _Call("GET", "/api/v1/evaluations", params=params, read=_page)

    @staticmethod
    def cancel(eval_id: str) -> _Call[Stopped]:
        return _Call("DELETE", _ev(eval_id), read=_model(Stopped))

    @staticmethod
    def stop(eval_id: str) -> _Call[Stopped]:
        return _Call("POST", _ev(eval_id, "/stop"), read=_model(Stopped))

    @staticmethod
    def stop_all() -> _Call[builtins.list[str]]:
        return _Call("POST", "/api/v1/stop-all", read=lambda r: r.json()["stopped"])

    @staticmethod
    def results(eval_id: str) -> _Call[pyarrow.Table]:
        return _Call("GET", _ev(eval_id, "/results.parquet"), read=_parquet)

    @staticmethod
    def artifacts(eval_id: str) -> _Call[builtins.list[Artifact]]:
        return _Call("GET", _ev(eval_id, "/artifacts"), read=_models(Artifact, "artifacts"))

    @staticmethod
    def incidents(eval_id: str) -> _Call[builtins.list[JsonObject]]:
        return _Call("GET", _ev(eval_id, "/incidents"), read=lambda r: r.json()["incidents"])

    @staticmethod
    def recent_incidents(limit: int) -> _Call[builtins.list[JsonObject]]:
        return _Call("GET", "/api/v1/incidents", params={"limit": limit}, read=lambda r: r.json()["incidents"])

    @staticmethod
    def transcript(eval_id: str, sample_id: str, epoch: int, offset: int, limit: int) -> _Call[TranscriptPage]:
        return _Call("GET", _ev(eval_id, f"/samples/{quote(str(sample_id), safe='')}/transcript"),
                     params={"epoch": epoch, "offset": offset, "limit": limit}, read=_model(TranscriptPage))

    @staticmethod
    def transcripts(eval_id: str) -> _Call[builtins.list[TranscriptInfo]]:
        return _Call("GET", _ev(eval_id, "/transcripts"), read=_models(TranscriptInfo, "samples"))

    @staticmethod
    def search_transcripts(eval_id: str, pattern: str, limit: int) -> _Call[TranscriptSearch]:
        return _Call("GET", _ev(eval_id, "/transcripts/search"), params={"pattern": pattern, "limit": limit},
                     read=_model(TranscriptSearch))

    @staticmethod
    def shards(eval_id: str) -> _Call[JsonObject]:
        return _Call("GET", _ev(eval_id, "/shards"))

    @staticmethod
    def resources(eval_id: str) -> _Call[JsonObject]:
        return _Call("GET", _ev(eval_id, "/resources"))

    @staticmethod
    def me() -> _Call[JsonObject]:
        return _Call("GET", "/api/v1/me")

    @staticmethod
    def cluster() -> _Call[JsonObject]:
        return _Call("GET", "/api/v1/cluster")

    @staticmethod
    def health() -> _Call[JsonObject]:
        return _Call("GET", "/api/v1/health")

    @staticmethod
    def metrics() -> _Call[str]:
        return _Call("GET", "/api/v1/metrics", read=lambda r: r.text)

    @staticmethod
    def create_token(user: str, role: str, name: str, expires_in_days: int | None) -> _Call[NewToken]:
        body = {"user": user, "role": role, "name": name, "expires_in_days": expires_in_days}
        return _Call("POST", "/api/v1/tokens", body=body, read=_model(NewToken))

    @staticmethod
    def tokens() -> _Call[builtins.list[Token]]:
        return _Call("GET", "/api/v1/tokens", read=_models(Token, "items"))

    @staticmethod
    def revoke_token(token_id: int) -> _Call[bool]:
        return _Call("DELETE", f"/api/v1/tokens/{int(token_id)}", read=lambda r: bool(r.json().get("revoked")))


