"""What every route shares, declared once as FastAPI dependencies.

`build_app` makes one `ApiContext` (the stores, the authenticator, the rate limiter, the
metrics, the control plane's actor handles) and keeps it on `app.state`; a route asks for
the parts it needs by annotation: `who: Caller` (the authenticated, rate-limited principal),
`ctx: Context`, `store: Store`, `actors: Actors`. `readable` is the one check that an
evaluation exists for the caller.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header
from starlette.requests import HTTPConnection

from cluster.images import ImageStore
from cluster.results import ResultsStore
from cluster.state import Evaluation, StateStore
from cluster.transcripts import TranscriptStore
from eval_actors.control_plane import BUS
from eval_actors.handles import ActorHandles
from eval_actors.killswitch import KillSwitch, marks_of
from proctor.bus_events import read_events
from proctor.settings import Settings

from .auth import Authenticator, Principal
from .errors import ApiError
from .limits import RateLimiter
from .metrics import Metrics

BUS_BATCH = 1000  # events per read of the bus
MAX_OWNERS = 100_000  # evaluation owners kept for filtering the event streams


@dataclass
class ApiContext:
    """The app's shared parts, made once by `build_app`."""

    settings: Settings
    store: StateStore
    results: ResultsStore
    transcripts: TranscriptStore
    images: ImageStore
    authenticate: Authenticator
    limiter: RateLimiter
    metrics: Metrics
    actors: ActorHandles
    killswitch: KillSwitch  # an emergency stop kills from this process first (eval_actors/killswitch.py)
    owners: dict[str, str] = field(default_factory=dict)  # eval id -> owner, for the event streams

    @classmethod
    def of(cls, settings: Settings) -> "ApiContext":
        store = StateStore(settings.state)
        return cls(settings=settings, store=store, results=ResultsStore(settings.results, settings),
                   transcripts=TranscriptStore(settings.results, settings),
                   images=ImageStore.from_settings(settings), authenticate=Authenticator(store, settings),
                   limiter=RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst), metrics=Metrics(),
                   actors=ActorHandles(settings.ray_namespace), killswitch=KillSwitch(marks_of(settings)))

    async def principal(self, header: str | None) -> Principal:
        """Who calls (`Authorization` header), counted against their rate limit. Raises
        `ApiError` 401 or 429."""
        who = await asyncio.to_thread(self.authenticate, header)
        self.limiter.check(who.key)
        return who

    async def readable(self, eval_id: str, who: Principal) -> Evaluation:
        """The evaluation, if the caller may read it. Raises `ApiError` 404 otherwise:
        another's evaluation does not exist for a researcher."""
        ev = await asyncio.to_thread(self.store.get_evaluation, eval_id)
        if ev is None or not who.may_read(ev.owner):
            raise ApiError(404, "not_found", f"evaluation {eval_id} does not exist")
        return ev

    async def owner_of(self, eval_id: str) -> str | None:
        """The evaluation's owner (kept: it never changes), or None if there is no such evaluation."""
        if eval_id not in self.owners:
            ev = await asyncio.to_thread(self.store.get_evaluation, eval_id)
            if ev is None:
                return None
            if len(self.owners) > MAX_OWNERS:
                self.owners.clear()
            self.owners[eval_id] = ev.owner
        return self.owners[eval_id]

    async def bus_read(self, after: int, eval_id: str | None = None, timeout: float = 0.0,
                       types: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Events after `after` (of one evaluation, of some types), waiting up to `timeout`
        seconds for one. Raises `ControlPlaneUnavailable` while the bus restarts."""
        answer = await self.actors.call(BUS, "read", after, eval_id, timeout, BUS_BATCH, types, timeout=timeout + 10)
        return {**answer, "events": read_events(answer["events"])}  # only events of a known shape go out

    async def bus_last(self) -> int:
        return await self.actors.call(BUS, "last_seq")


def context(conn: HTTPConnection) -> ApiContext:
    return conn.app.state.proctor


Context = Annotated[ApiContext, Depends(context)]


def state_store(ctx: Context) -> StateStore:
    return ctx.store


def actor_handles(ctx: Context) -> ActorHandles:
    return ctx.actors


async def caller(ctx: Context,
                 authorization: str | None = Header(None, description="Bearer <API key or JWT>")) -> Principal:
    return await ctx.principal(authorization)


Caller = Annotated[Principal, Depends(caller)]
Store = Annotated[StateStore, Depends(state_store)]
Actors = Annotated[ActorHandles, Depends(actor_handles)]
