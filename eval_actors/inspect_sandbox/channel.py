"""The outside end of a serving sandbox's channel (`proctor.requests`).

`ServiceChannel` sends requests, each with a fresh id, and gathers their answers from the
sandbox's validated events: one reader task routes every `chunk` and `result` to the
request it names. What the sandbox sends is hostile: an answer to an id nobody asked, a
stream beyond the size asked for, or bad base64 is dropped or fails only its own request,
and memory stays bounded by the limits of the requests in flight. When the sandbox ends
(its harness died, a safety stop killed it), every waiting request fails with
`SandboxEnded` carrying the reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from proctor.requests import (
    PIECE_BYTES,
    DataPiece,
    ExecRequest,
    ReadFileRequest,
    RequestFailed,
    ServiceStart,
    WriteFileRequest,
)
from proctor.protocol import encode

READY_TIMEOUT_S = 120.0


class SandboxEnded(RuntimeError):
    """The sandbox is gone (its harness ended, or it was stopped); says why. Raised by
    every request in flight or made after; the provider turns it into the sample's error."""


@dataclass(frozen=True)
class ExecOutcome:
    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    stdout_bytes: int
    stderr_bytes: int
    message: str = ""


@dataclass
class _Pending:
    limit: int
    streams: dict[str, bytearray] = field(default_factory=lambda: {"stdout": bytearray(), "stderr": bytearray(),
                                                                    "file": bytearray()})
    over: bool = False
    done: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ServiceChannel:
    def __init__(self, sandbox: Any, ended_reason: Callable[[], str | None] = lambda: None):
        """`sandbox`: a launched runtime sandbox whose request has `protocol: service`.
        `ended_reason`: why it was stopped, if the outside stopped it (a safety stop)."""
        self.sandbox = sandbox
        self.ended_reason = ended_reason
        self._pending: dict[str, _Pending] = {}
        self._ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._ended: str | None = None
        self._reader = asyncio.create_task(self._read())
        self.logs: list[str] = []

    async def start(self, start: ServiceStart, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Send the service's defaults and wait until the harness says it serves. Raises
        `SandboxEnded`."""
        await self.sandbox.send(encode(start))
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)
        except asyncio.TimeoutError:
            raise SandboxEnded(f"the sandbox did not start serving in {timeout_s:g} s") from None

    # ------------------------------------------------------------ requests

    async def exec(self, argv: list[str], stdin: bytes | None = None, cwd: str | None = None,
                   env: dict[str, str] | None = None, user: str | None = None, timeout_s: float | None = None,
                   output_limit: int = 10 * 1024**2) -> ExecOutcome:
        rid = uuid.uuid4().hex
        request = ExecRequest(id=rid, argv=argv, cwd=cwd, env=env or {}, user=user, timeout_s=timeout_s,
                              output_limit=output_limit, input=stdin is not None)
        pending = self._open(rid, output_limit)
        await self.sandbox.send(encode(request))
        if stdin is not None:
            await self._send_data(rid, stdin)
        result = await self._wait(rid, pending)
        if pending.over:
            raise RequestFailed("failed", "the sandbox sent more output than the limit it was given")
        return ExecOutcome(result["returncode"] if result["returncode"] is not None else -1,
                           bytes(pending.streams["stdout"]), bytes(pending.streams["stderr"]), result["timed_out"],
                           result["stdout_bytes"], result["stderr_bytes"], result["message"])

    async def read_file(self, path: str, limit: int) -> bytes:
        rid = uuid.uuid4().hex
        pending = self._open(rid, limit)
        await self.sandbox.send(encode(ReadFileRequest(id=rid, path=path, limit=limit)))
        await self._wait(rid, pending)
        if pending.over:
            raise RequestFailed("too_large", f"{path} is larger than the limit of {limit} bytes")
        return bytes(pending.streams["file"])

    async def write_file(self, path: str, content: bytes) -> None:
        rid = uuid.uuid4().hex
        pending = self._open(rid, 0)
        await self.sandbox.send(encode(WriteFileRequest(id=rid, path=path)))
        await self._send_data(rid, content)
        await self._wait(rid, pending)

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    # ------------------------------------------------------------ plumbing

    def _open(self, rid: str, limit: int) -> _Pending:
        if self._ended is not None:
            raise SandboxEnded(self._ended)
        pending = self._pending[rid] = _Pending(limit)
        return pending

    async def _send_data(self, rid: str, data: bytes) -> None:
        for at in range(0, max(len(data), 1), PIECE_BYTES):
            piece = data[at:at + PIECE_BYTES]
            last = at + PIECE_BYTES >= len(data)
            await self.sandbox.send(encode(DataPiece(id=rid, data=base64.b64encode(piece).decode(), eof=last)))

    async def _wait(self, rid: str, pending: _Pending) -> dict[str, Any]:
        try:
            result = await pending.done
        finally:
            self._pending.pop(rid, None)
        if not result["ok"]:
            raise RequestFailed(result["error"] or "failed", result["message"])
        return result

    async def _read(self) -> None:
        try:
            async for event in self.sandbox.events():
                if event.type == "log":
                    self._on_log(event.message)
                elif event.type == "chunk":
                    self._on_chunk(event)
                elif event.type == "result":
                    pending = self._pending.get(event.id)
                    if pending is not None and not pending.done.done():
                        pending.done.set_result(event.model_dump())
        except asyncio.CancelledError:
            self._end("the sandbox was closed")
            raise
        exit_ = await self.sandbox.wait()
        self._end(self.ended_reason() or (f"the sandbox ended ({exit_.reason}"
                                            f"{': ' + exit_.detail if exit_.detail else ''})"
                                            + (f"; its last words: {exit_.stderr_tail[-500:]}"
                                               if exit_.stderr_tail.strip() else "")))

    def _end(self, reason: str) -> None:
        """Fail whatever waits, and every later request, with `reason`."""
        self._ended = reason
        if not self._ready.done():
            self._ready.set_exception(SandboxEnded(reason))
            self._ready.exception()  # retrieved here: nobody may be waiting
        for pending in self._pending.values():
            if not pending.done.done():
                pending.done.set_exception(SandboxEnded(reason))

    def _on_log(self, message: str) -> None:
        if len(self.logs) < 100:
            self.logs.append(message[:2000])
        if message.startswith("service ready") and not self._ready.done():
            self._ready.set_result(message)
        elif message.startswith("no service to start") or message.startswith("service:"):
            if not self._ready.done():
                self._ready.set_exception(SandboxEnded(f"the sandbox could not start serving: {message[:2000]}"))

    def _on_chunk(self, event: Any) -> None:
        pending = self._pending.get(event.id)
        if pending is None or pending.over:
            return
        try:
            data = base64.b64decode(event.data, validate=True)
        except (binascii.Error, ValueError):
            pending.over = True
            return
        stream = pending.streams[event.stream]
        if len(stream) + len(data) > pending.limit:
            pending.over = True
            stream.clear()
            return
        stream += data
