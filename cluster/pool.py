"""A warm pool of sandboxes, started ahead of demand, each used for one shard.

A sandbox's class is everything it is launched with except what names it (its id, its
workspace, its labels): the runtime, the root (an image's or the host's), the limits
(cpus, memory, pids, disk, output cap, deadline), the traced syscalls, the network mode,
the harness's command and environment. `SandboxPool.take(request)` hands out a warm
sandbox of exactly the request's class, or None (the caller launches one cold); a sandbox
is never handed to a request of another class, and never twice.

A pooled sandbox waits with nothing of a shard in it: its harness has started, said
`harness ready`, and waits on its channel for the shard message; its workspace is an
empty folder of its own. The shard's files, dataset, agent and model settings reach it
only after it is taken (they go in the shard message, or into its workspace then). It is
destroyed (killed, its cgroup, bundle and workspace removed) when it has waited
`max_age_s` (or half its deadline, if shorter), when no demand for its class is left, or
when the pool closes; a destroyed one is replaced while its class is still wanted.

Pooled sandboxes are launched through the owner's runtime, in the owner's folder, with ids
`pool-<owner>-<random>` and workspaces `ws-<id>`: a `reap_owner` of that folder (the
owner's next life, `proctor down`) finds and removes them like any other sandbox.

Targets come from the scheduler's queue (`eval_actors/prewarm.py`): `set_demand` gives
each wanted class its template request and count; the pool keeps at most `size` of a
class. Plain asyncio; no Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .runtimes.base import LaunchRequest, Sandbox, SandboxError, SandboxRuntime

log = logging.getLogger("proctor.pool")

SANDBOX_USER = 65534  # the workspace's owner, as the executor makes it (cluster.runtimes.layout)
CHECK_EVERY_S = 1.0  # ages and targets are looked at this often
READY_TIMEOUT_S = 60.0  # a pooled harness that says nothing by then is destroyed


def class_of(request: LaunchRequest) -> LaunchRequest:
    """The request's class: the request less what names one sandbox (id, workspace, labels)."""
    return replace(request, sandbox_id="", workspace=Path("/"), labels=())


@dataclass
class Warm:
    """A pooled sandbox: started, its harness ready and waiting for its shard."""

    sandbox: Sandbox
    first: Any  # the harness's first event (`harness ready`), given again to whoever takes it
    stream: AsyncIterator[Any]
    born: float
    hold: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


class PooledSandbox:
    """A sandbox taken from the pool: the sandbox itself, whose `events()` starts with the
    harness's first event, read while it waited. Everything else is the sandbox's own."""

    def __init__(self, warm: Warm, request: LaunchRequest):
        self._warm = warm
        self.inner = warm.sandbox
        self.request = request
        self.id = warm.sandbox.id
        self.waited_s = time.monotonic() - warm.born

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def events(self) -> AsyncIterator[Any]:
        stream = self._warm.stream
        try:
            yield self._warm.first
            async for event in stream:
                yield event
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def cleanup(self) -> None:
        try:
            await self.inner.cleanup()
        finally:
            self._warm.hold.close()


@dataclass
class _Class:
    template: LaunchRequest
    wanted: int = 0
    hold: Callable[[], Any] | None = None  # a context manager kept while a sandbox waits (an image's lease)
    warm: list[Warm] = field(default_factory=list)
    starting: int = 0


class SandboxPool:
    """Warm sandboxes of `runtime`, per class, in `folder` (the runtime's own folder).
    `owner` goes into their ids (e.g. the supervisor's name)."""

    def __init__(self, runtime: SandboxRuntime, folder: Path, owner: str, size: int = 2, max_age_s: float = 300.0,
                 launch_concurrency: int = 1):
        self.runtime = runtime
        self.folder = folder
        self.owner = "".join(c if c.isalnum() or c == "-" else "-" for c in owner)[:40]
        self.size = size
        self.max_age_s = max_age_s
        self.classes: dict[LaunchRequest, _Class] = {}
        self.launched = 0  # counters, for tests and metrics
        self.taken = 0
        self.destroyed = 0
        self._launching = asyncio.Semaphore(launch_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._wake: asyncio.Event | None = None

    # ------------------------------------------------------------ demand

    def set_demand(self, wants: list[tuple[LaunchRequest, int, Callable[[], Any] | None]]) -> None:
        """The classes wanted now and how many of each (capped at `size`): a template
        request of each, and what to hold while one of its sandboxes waits. Every other
        class is wanted 0 times: its sandboxes are destroyed."""
        wanted: dict[LaunchRequest, tuple[LaunchRequest, int, Any]] = {}
        for template, count, hold in wants:
            key = class_of(template)
            prev = wanted.get(key)
            wanted[key] = (template, (prev[1] if prev else 0) + count, hold)
        for key, klass in self.classes.items():
            if key not in wanted:
                klass.wanted = 0
        for key, (template, count, hold) in wanted.items():
            klass = self.classes.setdefault(key, _Class(template))
            klass.template, klass.hold = template, hold
            klass.wanted = max(0, min(count, self.size))
        self._start()

    def ready(self, request: LaunchRequest) -> int:
        """How many warm sandboxes of the request's class wait now."""
        klass = self.classes.get(class_of(request))
        return len(klass.warm) if klass is not None else 0

    def reserved(self) -> tuple[float, int]:
        """CPUs and memory bytes that pooled sandboxes (warm or starting) hold: counted
        against the node's capacity by the scheduler."""
        cpus, memory = 0.0, 0
        for klass in self.classes.values():
            n = len(klass.warm) + klass.starting
            cpus += n * klass.template.limits.cpus
            memory += n * klass.template.limits.memory_bytes
        return cpus, memory

    # ------------------------------------------------------------ take

    def take(self, request: LaunchRequest) -> PooledSandbox | None:
        """A warm sandbox of exactly `request`'s class, now its (deadline restarted, its
        labels the request's), or None. The caller owns it: it runs one shard in it and
        cleans it up; the pool never sees it again."""
        klass = self.classes.get(class_of(request))
        if klass is None:
            return None
        while klass.warm:
            warm = klass.warm.pop(0)  # the oldest first: it is nearest its maximum age
            proc = getattr(warm.sandbox, "proc", None)
            dead = proc is not None and proc.returncode is not None
            if dead or time.monotonic() - warm.born >= self._max_age(klass):
                self._spawn(self._destroy(warm))
                continue
            restart = getattr(warm.sandbox, "restart_clock", None)
            if restart is not None:
                restart()
            self.taken += 1
            self._wake_up()
            own = replace(warm.sandbox.request, labels=request.labels)
            return PooledSandbox(warm, own)
        return None

    # ------------------------------------------------------------ the loop

    def _start(self) -> None:
        if self._closed:
            return
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        self._wake_up()

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _loop(self) -> None:
        assert self._wake is not None
        while not self._closed:
            try:
                self._round()
            except Exception:  # the pool must outlive one bad round; cold launches still work
                log.exception("sandbox pool round failed")
            try:
                await asyncio.wait_for(self._wake.wait(), CHECK_EVERY_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _round(self) -> None:
        now = time.monotonic()
        for klass in self.classes.values():
            for warm in [w for w in klass.warm if now - w.born >= self._max_age(klass)]:  # recycled
                klass.warm.remove(warm)
                self._spawn(self._destroy(warm))
            while len(klass.warm) > klass.wanted:  # demand went: the newest go first
                self._spawn(self._destroy(klass.warm.pop()))
            for _ in range(klass.wanted - len(klass.warm) - klass.starting):
                klass.starting += 1
                self._spawn(self._fill(klass))
        for key in [k for k, c in self.classes.items() if not c.wanted and not c.warm and not c.starting]:
            del self.classes[key]

    def _max_age(self, klass: _Class) -> float:
        """`max_age_s`, and under half the class's deadline: the deadline runs while a sandbox
        waits (it is restarted when taken), and must never be what ends a pooled one."""
        return min(self.max_age_s, klass.template.limits.timeout_s / 2)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fill(self, klass: _Class) -> None:
        warm = None
        try:
            async with self._launching:
                if self._closed or len(klass.warm) >= klass.wanted:
                    return
                warm = await self._launch(klass)
        except Exception as exc:  # a launch that fails here fails again cold, where the shard says why
            log.warning("sandbox pool: could not start a sandbox: %s", exc)
        finally:
            klass.starting -= 1
        if warm is None:
            return
        if self._closed or len(klass.warm) >= klass.wanted:
            await self._destroy(warm)
        else:
            klass.warm.append(warm)

    async def _launch(self, klass: _Class) -> Warm:
        sid = f"pool-{self.owner}-{os.urandom(6).hex()}"
        workspace = self.folder / f"ws-{sid}"
        workspace.mkdir(mode=0o700)
        os.chown(workspace, SANDBOX_USER, SANDBOX_USER)
        hold = contextlib.ExitStack()
        sandbox = None
        try:
            if klass.hold is not None:
                hold.enter_context(klass.hold())
            request = replace(klass.template, sandbox_id=sid, workspace=workspace, labels=())
            sandbox = await self.runtime.launch(request)
            self.launched += 1
            stream = sandbox.events()
            first = await asyncio.wait_for(stream.__anext__(), READY_TIMEOUT_S)
            return Warm(sandbox, first, stream, time.monotonic(), hold)
        except BaseException as exc:
            if sandbox is not None:
                await _quietly_destroy(sandbox)
            shutil.rmtree(workspace, ignore_errors=True)
            hold.close()
            if isinstance(exc, (StopAsyncIteration, asyncio.TimeoutError)):
                raise SandboxError(f"pooled sandbox {sid}: its harness never said it was ready") from None
            raise

    async def _destroy(self, warm: Warm) -> None:
        try:
            await warm.stream.aclose()  # type: ignore[attr-defined]
            await _quietly_destroy(warm.sandbox)
        finally:
            shutil.rmtree(warm.sandbox.request.workspace, ignore_errors=True)
            warm.hold.close()
            self.destroyed += 1

    async def close(self) -> None:
        """Destroy every pooled sandbox and stop; waits until they are gone."""
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        while self._tasks:  # launches under way end (and destroy what they made)
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for klass in self.classes.values():
            while klass.warm:
                await self._destroy(klass.warm.pop())
        self.classes.clear()


async def _quietly_destroy(sandbox: Sandbox) -> None:
    await sandbox.kill("killed", "pooled sandbox recycled")
    try:
        await asyncio.wait_for(sandbox.wait(), 10)
    except asyncio.TimeoutError:
        pass
    await sandbox.cleanup()
