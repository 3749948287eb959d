"""One interface for every sandbox runtime.

A `SandboxRuntime` launches a `Sandbox` from a `LaunchRequest`. Every sandbox has the
same lifecycle, in this order: `launch` → `events()` (and `send()`) → `wait()` →
`cleanup()`; `kill()` may come at any point, and `cleanup()` is guaranteed to be safe
after a failed launch, twice, or after a kill. `stats()` reads current resource use.

`StreamSandbox` holds what every sandbox with a byte-stream channel shares: the
wall-clock deadline, the output cap, parsing of the hostile channel, a bounded tail of
stderr, and kill-once semantics. `ProcessSandbox` builds on it for runtimes that drive a
local host process (gvisor, bubblewrap): subclasses say how to start, stop and measure
their process. The pod sandbox (kubernetes.py) builds on it with an attach stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from proctor.protocol import MAX_LINE_BYTES, EventParser, ParsedEvent

from .cgroups import ROOT as CGROUP_ROOT
from .cgroups import CgroupSet

# what the harness keeps as the sandbox's root: to run commands as other users, kill the
# agent's processes, and give it its folder; nothing else (no mount, no ptrace, no net)
HARNESS_CAPABILITIES = ("CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER")

ExitReason = Literal["exited", "deadline", "output_cap", "oom", "pids", "killed", "launch_failed"]


class RuntimeUnavailable(RuntimeError):
    """No usable sandbox runtime. Caught by the CLI and the API, which refuse to run
    anything and show the message (it says how to install one)."""


class SandboxError(RuntimeError):
    """A sandbox could not be launched or controlled. Caught by the shard executor, which
    turns it into a failed shard outcome."""


@dataclass(frozen=True)
class SandboxLimits:
    cpus: float = 1.0
    memory_bytes: int = 1024**3
    pids: int = 128
    timeout_s: float = 600.0
    output_cap_bytes: int = 16 * 1024**2
    disk_bytes: int = 1024**3


@dataclass(frozen=True)
class LaunchRequest:
    """What to run in a sandbox and with which limits.

    `argv` runs inside (as the sandbox's root holding `HARNESS_CAPABILITIES` where the
    runtime has `harness_root`, else as a non-root user) with `workspace` (a host folder)
    mounted read-write at `/workspace`, `ro_binds` (host path → sandbox path) mounted
    read-only, and `env` as its whole environment. `rootfs`: an image's root filesystem,
    shared read-only (it has every mount point the runtime needs, `/opt/proctor`
    included); None for an empty root with the host's `/usr` bound into it. `image`: the
    same image by reference, for a runtime whose nodes pull it (`pulls_images`); the
    harness is then injected by the runtime, and `ro_binds` do not apply.
    """

    sandbox_id: str
    argv: tuple[str, ...]
    workspace: Path
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    env: tuple[tuple[str, str], ...] = ()
    ro_binds: tuple[tuple[str, str], ...] = ()
    rootfs: Path | None = None
    image: str | None = None  # a digest-pinned reference (NAME@sha256:...), for a runtime that pulls it (kubernetes)
    trace_syscalls: tuple[str, ...] = ()  # traced where the runtime can (gVisor: `runsc --strace`)
    # what only a runtime with nodes and a network can honour (kubernetes); local ones ignore them
    gpus: int = 0
    gpu_type: str | None = None  # one of proctor.spec.KNOWN_GPU_TYPES
    egress: tuple[str, ...] = ()  # "CIDR:port" destinations the sandbox may reach (validated in the spec)
    labels: tuple[tuple[str, str], ...] = ()  # what it belongs to, e.g. ("proctor.dev/eval-id", ...)
    # the conversation on the channel: a shard's, or the service mode's (`proctor.requests`)
    protocol: Literal["shard", "service"] = "shard"
    # local runtimes: a network namespace (a path under /run/netns) to join instead of having
    # no network, and the names the sandbox resolves in it (its /etc/hosts)
    netns: str | None = None
    hosts: tuple[tuple[str, str], ...] = ()  # (name, address)
    # kubernetes: the private network (made by `KubernetesRuntime.open_network`) the pod joins,
    # and the name its siblings reach it by (its `hostname` there)
    network: str | None = None
    hostname: str | None = None

    def hosts_file(self) -> str:
        """The sandbox's /etc/hosts."""
        return "127.0.0.1 localhost\n" + "".join(f"{address} {name}\n" for name, address in self.hosts)


@dataclass(frozen=True)
class SandboxStats:
    memory_bytes: int | None = None
    cpu_seconds: float | None = None
    pids: int | None = None
    at: float = 0.0
    pids_refused: int | None = None  # process creations refused at the pids limit so far (cgroup events)


@dataclass(frozen=True)
class SandboxExit:
    """How a sandbox ended. `reason` is `exited` when its process ended on its own."""

    exit_code: int | None
    reason: ExitReason
    detail: str = ""
    stderr_tail: str = ""
    duration_s: float = 0.0


class Sandbox(ABC):
    runtime: ClassVar[str]
    isolation: ClassVar[Literal["strong", "weak"]]

    def __init__(self, request: LaunchRequest):
        self.request = request
        self.id = request.sandbox_id
        self.parser = EventParser(max_line_bytes=min(MAX_LINE_BYTES, request.limits.output_cap_bytes))
        if request.protocol == "service":
            from proctor.requests import SERVICE_OUT_TYPES, service_out_adapter

            self.parser.types, self.parser.adapter = SERVICE_OUT_TYPES, service_out_adapter

    @abstractmethod
    def events(self) -> AsyncIterator[ParsedEvent]:
        """Validated protocol events, in order, until the channel closes. Iterate it once: a
        reader that leaves early gives up the rest (a local runtime reads and drops it, so
        that the sandbox can end and `wait()` return)."""

    @abstractmethod
    async def send(self, line: bytes) -> None:
        """Write one protocol line to the sandbox. Silently dropped once it has ended."""

    @abstractmethod
    async def stats(self) -> SandboxStats: ...

    @abstractmethod
    async def kill(self, reason: ExitReason = "killed", detail: str = "") -> None:
        """Stop everything in the sandbox now. Idempotent; the first reason wins."""

    @abstractmethod
    async def wait(self) -> SandboxExit: ...

    @abstractmethod
    async def cleanup(self) -> None:
        """Remove everything the sandbox left on the host. Safe to call at any time, twice."""

    @property
    def trace_log(self) -> Path | None:
        """Where the runtime writes the traced syscalls of `trace_syscalls`; None if it cannot."""
        return None

    @property
    def output_bytes(self) -> int | None:
        """Bytes the sandbox has written so far (stdout and stderr); None if the runtime does not count them."""
        return None


class SandboxRuntime(ABC):
    name: ClassVar[str]
    isolation: ClassVar[Literal["strong", "weak"]]
    # the harness runs as the sandbox's root in a pid namespace of its own, holding only
    # HARNESS_CAPABILITIES, so that the agent's commands run as another, powerless user
    harness_root: ClassVar[bool] = False
    # whether the host can read the sandbox's workspace folder (local runtimes); a pod's
    # artifacts come inline in their `artifact` events instead
    shares_workspace: ClassVar[bool] = True
    # whether a task's image goes by reference (`LaunchRequest.image`, pulled by a node)
    # rather than as a root filesystem from the local image store
    pulls_images: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def check(cls) -> None:
        """Raise `RuntimeUnavailable` (saying how to install it) if it cannot run here."""

    @abstractmethod
    async def launch(self, request: LaunchRequest) -> Sandbox:
        """Start a sandbox. Raises `SandboxError`; leaves nothing behind when it does."""

    def reap(self) -> list[str]:
        """Kill and remove every sandbox a dead owner of this runtime left behind (a
        supervisor's previous life), and return their ids. Blocking; called once, when an
        owner starts, before it launches anything. Runtimes with nothing local to reap
        (pods are reconciled against the state store instead) return []."""
        return []


class LocalRuntime(SandboxRuntime):
    """A runtime whose sandboxes are host processes under a folder of their owner's, each
    in a cgroup that Proctor makes: `proctor/<owner>--<sandbox id>`, where `owner` names
    the runtime and its folder, so that the next owner of the folder finds them all."""

    def __init__(self, workdir: Path, cgroup_root: Path = CGROUP_ROOT):
        self.workdir = workdir
        self.cgroup_root = cgroup_root
        self.owner = self.owner_of(workdir)

    @classmethod
    def owner_of(cls, workdir: Path) -> str:
        """The owner part of the cgroup names of this runtime's sandboxes in `workdir`."""
        return f"{cls.name[:6]}-{hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:12]}"

    def cgroup_name(self, sandbox_id: str) -> str:
        return f"{self.owner}--{sandbox_id}"

    @staticmethod
    def sandbox_of(cgroup: CgroupSet) -> str:
        return next(iter(cgroup.dirs.values())).name.split("--", 1)[1]

    @staticmethod
    def remove_bundles(folder: Path) -> list[str]:
        """Remove every sandbox's folder under `folder`; returns their names."""
        removed = []
        for bundle in folder.iterdir() if folder.is_dir() else ():
            shutil.rmtree(bundle, ignore_errors=True)
            removed.append(bundle.name)
        return removed


class StreamSandbox(Sandbox):
    """A sandbox whose channel is a byte stream read by Proctor: the deadline, the output
    cap, the stderr tail and the first kill reason, shared by every such runtime."""

    read_chunk = 64 * 1024
    stderr_tail_bytes = 16 * 1024

    def __init__(self, request: LaunchRequest):
        super().__init__(request)
        self.started = 0.0
        self._reason: ExitReason | None = None
        self._detail = ""
        self._output = 0
        self._stderr: deque[bytes] = deque()
        self._stderr_len = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._killing: asyncio.Task[None] | None = None

    def _arm_deadline(self) -> None:
        """Start the wall-clock deadline now (on the event loop's clock)."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.request.limits.timeout_s, self._on_deadline)

    def restart_clock(self) -> None:
        """Start the wall-clock deadline and the duration again from now: a pooled sandbox's
        shard gets its whole deadline from when it takes the sandbox (`cluster/pool.py`)."""
        self.started = time.monotonic()
        if self._deadline is not None:
            self._deadline.cancel()
            self._arm_deadline()

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()

    def _on_deadline(self) -> None:
        self._kill_soon("deadline", f"wall-clock deadline of {self.request.limits.timeout_s:g}s reached")

    def _kill_soon(self, reason: ExitReason, detail: str) -> None:
        if self._killing is None:
            self._killing = asyncio.ensure_future(self.kill(reason, detail))

    def _note_reason(self, reason: ExitReason, detail: str) -> None:
        """Remember why the sandbox ends; the first reason wins."""
        if self._reason is None:
            self._reason, self._detail = reason, detail

    @property
    def output_bytes(self) -> int:
        """Bytes the sandbox has written so far (stdout and stderr)."""
        return self._output

    def _count_output(self, n: int) -> bool:
        self._output += n
        if self._output > self.request.limits.output_cap_bytes:
            self._kill_soon("output_cap", f"output cap of {self.request.limits.output_cap_bytes} bytes exceeded")
            return False
        return True

    def _keep_stderr(self, chunk: bytes) -> None:
        """Count a chunk of stderr and keep it in the bounded tail."""
        if not self._count_output(len(chunk)):
            return
        self._stderr.append(chunk)
        self._stderr_len += len(chunk)
        while self._stderr_len > self.stderr_tail_bytes and len(self._stderr) > 1:
            self._stderr_len -= len(self._stderr.popleft())

    def stderr_tail(self) -> str:
        return b"".join(self._stderr).decode("utf-8", "replace")[-self.stderr_tail_bytes:]


class ProcessSandbox(StreamSandbox):
    """A sandbox driven through one local host process with piped stdin/stdout/stderr, in
    a cgroup of Proctor's (made by `prepare`)."""

    def __init__(self, request: LaunchRequest):
        super().__init__(request)
        self.cgroup: CgroupSet | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self._discarding: asyncio.Future[None] | None = None
        self._exit: SandboxExit | None = None

    def ended(self) -> bool:
        """Whether the sandbox has ended or is being ended: its process has exited, it was
        killed, or its cgroup has no process left (a stop from elsewhere killed it)."""
        return (self.proc is None or self.proc.returncode is not None or self._reason is not None
                or (self.cgroup is not None and not self.cgroup.pids()))

    # -- what a subclass provides

    @abstractmethod
    def host_argv(self) -> list[str]:
        """The host command that runs `request.argv` sandboxed."""

    def prepare(self) -> None:
        """Write what the host command needs (bundle, cgroup) before it starts."""

    def preexec(self) -> None:
        """Runs in the child between fork and exec (e.g. joining a cgroup)."""

    def needs_preexec(self) -> bool:
        """Whether `preexec` must run: without one, Python starts the host command with vfork
        (cheaper than copying the calling process)."""
        return type(self).preexec is not ProcessSandbox.preexec

    def pass_fds(self) -> tuple[int, ...]:
        """Descriptors the host command inherits (e.g. to be told when it may go on)."""
        return ()

    async def started_process(self) -> None:
        """Finish setting up the sandbox once its host process exists (e.g. its user
        namespace's id maps). Raises to fail the launch."""

    @abstractmethod
    async def force_kill(self) -> None:
        """Kill every process of the sandbox, including ones that left the process group."""

    def exit_reason_hint(self, returncode: int | None) -> tuple[ExitReason, str] | None:
        """Why the sandbox ended, from what the host knows: the kernel's OOM kills in its
        cgroup, or process creations its pids limit refused before it failed. Never from
        anything the sandbox wrote or its exit code alone, which it chooses."""
        if self.cgroup is not None and self.cgroup.oom_killed():
            return "oom", f"killed at its memory limit of {self.request.limits.memory_bytes} bytes"
        refused = self.cgroup.pids_refused() if self.cgroup is not None else None
        if returncode != 0 and refused:  # it failed, and its processes had hit their host limit
            return "pids", f"{refused} process creations refused at its host limit of {self.cgroup_pids_limit()}"
        return None

    def cgroup_pids_limit(self) -> int:
        """The pids limit of the sandbox's host cgroup (a runtime may add room for its own tasks)."""
        return self.request.limits.pids

    async def remove(self) -> None:
        """Remove bundles, state and cgroups."""

    # -- the shared lifecycle

    async def start(self) -> None:
        try:
            self.prepare()
            self.started = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                *self.host_argv(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=_host_env(),
                start_new_session=True,
                # without a child hook, Python spawns with vfork: no copy of this (large) process
                preexec_fn=self.preexec if self.needs_preexec() else None,
                close_fds=True,
                pass_fds=self.pass_fds(),
            )
            await self.started_process()
        except Exception as exc:
            await self.cleanup()
            raise SandboxError(f"{self.runtime}: could not start sandbox {self.id}: {exc}") from exc
        self._arm_deadline()
        self._stderr_task = asyncio.create_task(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        while chunk := await self.proc.stderr.read(self.read_chunk):
            self._keep_stderr(chunk)

    async def events(self) -> AsyncIterator[ParsedEvent]:
        assert self.proc and self.proc.stdout
        at_eof = False
        try:
            while True:
                chunk = await self.proc.stdout.read(self.read_chunk)
                if not chunk:
                    at_eof = True
                    break
                if not self._count_output(len(chunk)):
                    break
                for event in self.parser.feed(chunk):
                    yield event
            if self._reason != "output_cap":
                for event in self.parser.finish():
                    yield event
        finally:
            if not at_eof:
                # stopped before the end (the output cap, or a reader that left): the rest is
                # read and dropped, because asyncio's wait() returns only once every pipe has
                # closed, and a full, paused stdout pipe never would
                self._discarding = asyncio.ensure_future(self._discard_stdout())

    async def _discard_stdout(self) -> None:
        assert self.proc and self.proc.stdout
        while await self.proc.stdout.read(self.read_chunk):
            pass

    async def send(self, line: bytes) -> None:
        if self.proc is None or self.proc.stdin is None or self.proc.returncode is not None:
            return
        try:
            self.proc.stdin.write(line)
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            pass

    async def kill(self, reason: ExitReason = "killed", detail: str = "") -> None:
        self._note_reason(reason, detail)
        if self.proc is None or self.proc.returncode is not None:
            return
        await self.force_kill()  # first: it may need the process tree intact
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def wait(self) -> SandboxExit:
        if self._exit is not None:
            return self._exit
        if self.proc is None:
            return SandboxExit(None, "launch_failed", self._detail)
        code = await self.proc.wait()
        if self._killing is not None:
            await asyncio.gather(self._killing, return_exceptions=True)
        await self.force_kill()  # nothing of the sandbox outlives its main process
        if self._stderr_task is not None:
            try:
                await asyncio.wait_for(self._stderr_task, 5)
            except asyncio.TimeoutError:
                self._stderr_task.cancel()
            except asyncio.CancelledError:
                self._stderr_task.cancel()
                if _cancelling():  # this wait() itself is being cancelled, not only the reader
                    raise
        self._disarm_deadline()
        reason, detail = self._reason, self._detail
        if reason is None:
            hint = self.exit_reason_hint(code)
            reason, detail = hint if hint else ("exited", "")
        self._exit = SandboxExit(
            exit_code=code,
            reason=reason,
            detail=detail,
            stderr_tail=self.stderr_tail(),
            duration_s=time.monotonic() - self.started,
        )
        return self._exit

    async def cleanup(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.kill("killed", "cleaned up while running")
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                pass
        self._disarm_deadline()
        for task in (self._stderr_task, self._discarding):
            if task is not None and not task.done():
                task.cancel()
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
        await self.remove()


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _host_env() -> dict[str, str]:
    """The environment of the host-side runtime process (never of the sandboxed one)."""
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
