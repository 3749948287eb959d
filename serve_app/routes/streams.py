"""Live event streams over WebSockets: one evaluation's, or every evaluation the caller may
read. The loop itself is `serve_app/streaming.relay_events`."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from proctor.statuses import TERMINAL

from ..deps import ApiContext, Context
from ..errors import ApiError
from ..streaming import relay_events

POLL_S = 10.0
CLOSE_CODES = {401: 4401, 403: 4403, 404: 4404, 429: 4429}  # an API error's status -> a WebSocket close code

router = APIRouter(tags=["streams"])


async def stream(ws: WebSocket, ctx: ApiContext, eval_id: str | None, after: int, token: str | None) -> None:
    await ws.accept()
    header = ws.headers.get("authorization") or (f"Bearer {token}" if token else None)
    try:
        who = await ctx.principal(header)
        if eval_id is not None:
            await ctx.readable(eval_id, who)
    except ApiError as exc:
        await ws.close(code=CLOSE_CODES.get(exc.status, 4400), reason=f"{exc.code}: {exc.message}"[:120])
        return

    async def read(cursor: int, wait_s: float) -> dict[str, Any]:
        return await ctx.bus_read(cursor, eval_id, wait_s)

    async def visible(event: dict[str, Any]) -> bool:
        if who.role != "researcher":
            return True
        eid = event.get("eval_id")
        return eid is not None and await ctx.owner_of(eid) == who.name

    async def ended() -> bool:
        assert eval_id is not None
        ev = await asyncio.to_thread(ctx.store.get_evaluation, eval_id)
        return ev is None or ev.status in TERMINAL

    try:
        await relay_events(ws.send_json, read, visible, ended if eval_id is not None else None, after=after,
                           poll_s=POLL_S)
        await ws.close(code=1000, reason="the evaluation ended")
    except WebSocketDisconnect:
        return


@router.websocket("/ws/evaluations/{eval_id}")
async def ws_evaluation(ws: WebSocket, eval_id: str, ctx: Context, after: int = 0, token: str | None = None) -> None:
    """Live events of one evaluation (status, progress, logs, incidents), each with its
    `seq`; reconnect with `after=<last seq>` to resume. Closes once it ends. The token:
    the Authorization header, or `?token=` where a browser cannot set headers."""
    await stream(ws, ctx, eval_id, max(0, after), token)


@router.websocket("/ws/evaluations")
async def ws_all(ws: WebSocket, ctx: Context, after: int = 0, token: str | None = None) -> None:
    """Live events of every evaluation the caller may read."""
    await stream(ws, ctx, None, max(0, after), token)
