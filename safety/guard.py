"""The safety guard of one running shard: its monitors, its text rules, and the stop.

The shard executor creates one per sandbox. Text (log lines, tool commands, model
generations, outputs) is checked as it passes (`observe`); the monitors are polled every
`interval` seconds (at most one). The first `stop` violation calls `on_stop` at once (the
executor kills the sandbox); every violation is kept, bounded, for the incident.

Fail closed: a monitor that raises, or does not answer within `MONITOR_TIMEOUT_S`, is a
`watchdog` violation that stops the shard; a shard is never left unwatched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proctor.policy import SafetyPolicy

from .monitors import Monitor, ResourceMonitor
from .rules import RuleSet
from .violations import Violation

log = logging.getLogger("proctor.safety")

MAX_INTERVAL_S = 1.0
MONITOR_TIMEOUT_S = 2.0
SWEEP_TIMEOUT_S = 30.0  # the end-of-shard sweep reads the rest of a record, perhaps tens of MiB
SILENT_ROUNDS = 3
# ... and for this long: a host whose CPUs are saturated can keep a stats read (`runsc events`)
# from answering for several seconds without anything being wrong; the kernel's cgroup limits
# hold meanwhile, and the text rules act on every command and output regardless
SILENT_S = 60.0
MAX_KEPT = 100


class SafetyGuard:
    def __init__(self, policy: SafetyPolicy, monitors: list[Monitor],
                 on_stop: Callable[[Violation], Awaitable[None]], interval: float = 0.5,
                 rules: RuleSet | None = None):
        self.policy = policy
        self.monitors = monitors
        self.rules = rules if rules is not None else RuleSet.of(policy)
        self.on_stop = on_stop
        self.interval = min(interval, MAX_INTERVAL_S)
        self.violations: list[Violation] = []
        self.dropped = 0
        self.stopped: Violation | None = None
        self.stopped_at: float | None = None  # monotonic, when on_stop returned (the sandbox is dead)
        self.killed_at: float | None = None  # the same, wall clock
        self._stopping: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.started = time.time()

    # ------------------------------------------------------------ text

    def observe(self, source: str, text: str) -> list[Violation]:
        """Check a text as it passes; returns what it broke (a `stop` is already acted on)."""
        found = self.rules.check(source, text)
        for v in found:
            self.report(v)
        return found

    def blocks(self, found: list[Violation]) -> bool:
        return any(v.action == "stop" for v in found)

    # ------------------------------------------------------------ reporting

    def report(self, v: Violation) -> None:
        if len(self.violations) < MAX_KEPT:
            self.violations.append(v)
        else:
            self.dropped += 1
        log.warning("safety %s/%s (%s): %s", v.monitor, v.rule, v.action, v.message)
        if v.action == "stop" and self.stopped is None:
            self.stopped = v
            self._stopping = asyncio.get_running_loop().create_task(self._stop(v))

    async def _stop(self, v: Violation) -> None:
        try:
            await self.on_stop(v)
        finally:
            self.stopped_at, self.killed_at = time.monotonic(), time.time()

    async def wait_stopped(self) -> None:
        if self._stopping is not None:
            await asyncio.shield(self._stopping)

    # ------------------------------------------------------------ the loop

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        self._closed = True  # also ends a loop whose cancellation `wait_for` swallowed (Python 3.11)
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=MONITOR_TIMEOUT_S + 1)
        if self._stopping is not None:
            await asyncio.gather(self._stopping, return_exceptions=True)

    async def _loop(self) -> None:
        silent: dict[str, int] = {}
        silent_since: dict[str, float] = {}
        while self.stopped is None and not self._closed:
            for monitor in self.monitors:
                try:
                    found = await asyncio.wait_for(monitor.check(), MONITOR_TIMEOUT_S)
                    silent[monitor.name] = 0
                    silent_since.pop(monitor.name, None)
                except asyncio.CancelledError:
                    raise
                except asyncio.TimeoutError:
                    # a busy event loop or host delays every monitor now and then; one silent
                    # for SILENT_ROUNDS checks in a row and SILENT_S seconds has stopped watching
                    silent[monitor.name] = silent.get(monitor.name, 0) + 1
                    since = silent_since.setdefault(monitor.name, time.monotonic() - MONITOR_TIMEOUT_S)
                    if silent[monitor.name] < SILENT_ROUNDS or time.monotonic() - since < SILENT_S:
                        continue
                    found = [Violation("watchdog", monitor.name, "stop",
                                       f"monitor {monitor.name} did not answer in {silent[monitor.name]} checks "
                                       f"of {MONITOR_TIMEOUT_S:g} s ({time.monotonic() - since:.0f} s); the "
                                       "shard is stopped rather than left unwatched")]
                except Exception as exc:
                    found = [Violation("watchdog", monitor.name, "stop",
                                       f"monitor {monitor.name} failed; the shard is stopped rather than left "
                                       f"unwatched", (f"{type(exc).__name__}: {exc}",))]
                for v in found:
                    self.report(v)
            await asyncio.sleep(self.interval)

    async def sweep(self) -> None:
        """After the sandbox ended: the monitors that read a record (`sweeps`) read the
        rest of it, so that what it did just before ending is not missed."""
        for monitor in self.monitors:
            if getattr(monitor, "sweeps", False):
                try:
                    drain = getattr(monitor, "drain", monitor.check)  # the whole rest, where it can
                    found = await asyncio.wait_for(drain(), SWEEP_TIMEOUT_S)
                except Exception as exc:  # the record could not be read: say so, fail closed
                    found = [Violation("watchdog", monitor.name, "stop", f"monitor {monitor.name} failed at the "
                                       "end of the shard", (f"{type(exc).__name__}: {exc}",))]
                for v in found:
                    self.report(v)

    # ------------------------------------------------------------ the record

    def _resource_monitor(self) -> ResourceMonitor | None:
        return next((m for m in self.monitors if isinstance(m, ResourceMonitor)), None)

    def trace(self) -> list[dict[str, Any]]:
        m = self._resource_monitor()
        return list(m.trace) if m is not None else []

    def resources(self) -> list[dict[str, Any]]:
        """The shard's resource use over its run so far (for graphs)."""
        m = self._resource_monitor()
        return m.series() if m is not None else []

    def summary(self) -> dict[str, Any]:
        return {"violations": [v.as_dict() for v in self.violations], "dropped": self.dropped,
                "stopped_by": self.stopped.as_dict() if self.stopped else None, "killed_at": self.killed_at,
                "started_at": self.started,
                "kill_s": (round(self.stopped_at - self.stopped.detected, 4)
                           if self.stopped is not None and self.stopped_at is not None else None)}
