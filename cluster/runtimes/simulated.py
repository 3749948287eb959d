"""A TEST DOUBLE of a sandbox runtime: it speaks the runner protocol without any process.

For what cannot run for real here: 10,000 concurrent sandboxes on two cores, or GPU
shards on a machine without GPUs. It is never chosen by a spec or by `auto`; only tests
and benchmarks hand it to a supervisor explicitly, and every record it produces says
`runtime: simulated`, `isolation: none`.

Behaviour: it waits for the `shard` message, then for each sample × epoch sleeps
`metadata.sim_seconds` (default 0.01 s), emits a `progress` and a `sample` event whose
output is the sample's target (so exact scoring gives 1.0) unless `metadata.sim_wrong`,
and ends with `done`. `kill()` ends it at once, like a real kill.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from proctor.protocol import ParsedEvent, decode_in

from .base import ExitReason, LaunchRequest, Sandbox, SandboxExit, SandboxRuntime, SandboxStats


class SimulatedSandbox(Sandbox):
    runtime = "simulated"
    isolation = "none"  # type: ignore[assignment]  # a test double isolates nothing: no real runtime may say so

    def __init__(self, request: LaunchRequest):
        super().__init__(request)
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.started = time.monotonic()
        self._killed: tuple[ExitReason, str] | None = None
        self._ended = asyncio.Event()
        self._kill_now = asyncio.Event()
        self._seq = 0

    def _line(self, **event: object) -> bytes:
        event = {"v": 1, "seq": self._seq, **event}
        self._seq += 1
        return json.dumps(event).encode() + b"\n"

    async def events(self) -> AsyncIterator[ParsedEvent]:
        deadline = self.started + self.request.limits.timeout_s
        try:
            for ev in self.parser.feed(self._line(type="log", level="info", message="harness ready (simulated)")):
                yield ev
            shard = decode_in(await self.inbox.get())
            if shard.type != "shard":
                return
            total = len(shard.samples) * len(shard.epochs)
            done = 0
            for epoch in shard.epochs:
                for sample in shard.samples:
                    delay = float(sample.metadata.get("sim_seconds", 0.01))
                    wait = min(delay, max(0.0, deadline - time.monotonic()))
                    try:
                        await asyncio.wait_for(self._kill_now.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                    if time.monotonic() >= deadline:
                        self._killed = self._killed or ("deadline", "wall-clock deadline reached")
                    if self._killed:
                        return
                    target = sample.target if isinstance(sample.target, str) else sample.target[0]
                    output = "wrong" if sample.metadata.get("sim_wrong") else target
                    now = time.time()
                    done += 1
                    scores = {s.get("name") or s["type"]: {"value": float(output == target)} for s in shard.scorers}
                    chunk = self._line(type="sample", sample_id=sample.id, epoch=epoch, input="", target=target,
                                       output=output, scores=scores, started_at=now - delay, completed_at=now)
                    chunk += self._line(type="progress", completed=done, total=total)
                    for ev in self.parser.feed(chunk):
                        yield ev
            for ev in self.parser.feed(self._line(type="done", status="ok", samples=done)):
                yield ev
        finally:
            self._ended.set()

    async def send(self, line: bytes) -> None:
        if not self._ended.is_set():
            self.inbox.put_nowait(line)

    async def stats(self) -> SandboxStats:
        return SandboxStats(memory_bytes=0, cpu_seconds=0.0, pids=0, at=asyncio.get_running_loop().time())

    async def kill(self, reason: ExitReason = "killed", detail: str = "") -> None:
        if self._killed is None:
            self._killed = (reason, detail)
        self._kill_now.set()
        self.inbox.put_nowait(b'{"v":1,"type":"cancel"}')

    async def wait(self) -> SandboxExit:
        await self._ended.wait()
        reason, detail = self._killed or ("exited", "")
        return SandboxExit(0 if reason == "exited" else None, reason, detail,
                           duration_s=time.monotonic() - self.started)

    async def cleanup(self) -> None:
        await self.kill("killed", "cleaned up")


class SimulatedRuntime(SandboxRuntime):
    name = "simulated"
    isolation = "none"  # type: ignore[assignment]  # a test double isolates nothing: no real runtime may say so

    @classmethod
    def check(cls) -> None:
        return None

    async def launch(self, request: LaunchRequest) -> Sandbox:
        return SimulatedSandbox(request)


class SimulateRemoteRuntimes:
    """A supervisor's runtime factory for tests and benchmarks on a machine without a
    cluster: `kubernetes` (pods, GPUs) and `simulated` become the simulated double;
    every local runtime stays real."""

    def __call__(self, name: str, workdir: Path) -> SandboxRuntime:
        if name in ("kubernetes", "simulated"):
            return SimulatedRuntime()
        from . import select_runtime

        return select_runtime(name, workdir)
