"""Monitors: each checks one thing about a running sandbox, on its own, when asked.

A monitor's `check()` returns the violations it sees now. It is given plain callables
(not a runtime object), so each is testable alone and `safety/` needs nothing of the
layers above it. `SafetyGuard` (guard.py) calls them at least every second.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from proctor.policy import ResourceWatch

from .violations import Violation

Sample = dict[str, float | None]  # metric -> value now (None: unknown)

UNITS = {"memory": "bytes", "pids": "processes", "cpu_s": "CPU seconds", "disk": "bytes", "output": "bytes"}
TRACE_KEEP = 600  # resource samples kept per shard (at 0.5 s: the last 5 minutes)
HISTORY_EVERY_S = 2.0  # the shard's resource history (graphs): one sample this often at first,
HISTORY_KEEP = 300  # at most this many; when full, every other one goes and the step doubles


class Monitor(ABC):
    name: str = "monitor"

    @abstractmethod
    async def check(self) -> list[Violation]: ...


class ResourceMonitor(Monitor):
    """Memory, processes, CPU seconds, workspace disk and output volume against limits.

    Crossing `warn_at` of a limit records an early warning (once per metric); reaching the
    limit is a violation with the policy's action (once per metric). `trace` keeps the
    samples for the incident report; `history` the whole run at a coarser step (graphs)."""

    name = "resources"

    def __init__(self, sample: Callable[[], Awaitable[Sample]], limits: dict[str, float], watch: ResourceWatch,
                 every: float = 0.5):
        # `every` bounds the sampling: with thousands of shards per supervisor, sampling is
        # what the guards cost
        self.sample = sample
        self.every = every  # sampling costs a little (gVisor: a `runsc events` call): at most this often
        self.last = float("-inf")
        self.limits = {k: v for k, v in limits.items() if v}
        self.watch = watch
        self.warned: set[str] = set()
        self.broken: set[str] = set()
        self.trace: deque[dict[str, Any]] = deque(maxlen=TRACE_KEEP)
        self.peak: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.history_every = HISTORY_EVERY_S

    async def check(self) -> list[Violation]:
        if time.monotonic() - self.last < self.every:
            return []
        self.last = time.monotonic()
        now = await self.sample()
        point = {"t": round(time.time(), 3), **{k: v for k, v in now.items() if v is not None}}
        self.trace.append(point)
        self._remember(point)
        found = []
        refused = now.get("pids_refused") or 0  # forks the runtime refused at the limit, however briefly
        for metric, limit in self.limits.items():
            value = now.get(metric)
            if value is None:
                continue
            self.peak[metric] = max(self.peak.get(metric, 0.0), value)
            share = value / limit
            # the kernel enforces memory and pids at the limit itself: a sandbox at 98% is at it
            at_limit = share >= (0.98 if metric in ("memory", "pids") else 1.0)
            unit = UNITS.get(metric, "")
            if metric == "pids" and refused and not at_limit and metric not in self.broken:
                self.broken.add(metric)
                found.append(Violation(self.name, metric, self.watch.action,
                                       f"pids reached its limit: {refused:.0f} process creations refused at "
                                       f"{limit:.0f} {unit} ({value:.0f} now)",
                                       (f"pids_refused={refused:.0f} pids={value:.0f} limit={limit:.0f}",)))
            elif at_limit and metric not in self.broken:
                self.broken.add(metric)
                found.append(Violation(self.name, metric, self.watch.action,
                                       f"{metric} reached its limit: {value:.0f} of {limit:.0f} {unit}",
                                       (f"{metric}={value:.0f} limit={limit:.0f}",)))
            elif share >= self.watch.warn_at and metric not in self.warned and metric not in self.broken:
                self.warned.add(metric)
                found.append(Violation(self.name, f"{metric}-warning", "record",
                                       f"{metric} at {share:.0%} of its limit ({value:.0f} of {limit:.0f} {unit})",
                                       (f"{metric}={value:.0f} limit={limit:.0f}",)))
        return found

    def _remember(self, point: dict[str, Any]) -> None:
        if len(point) == 1:
            return  # the runtime measured nothing
        if self.history and point["t"] - self.history[-1]["t"] < self.history_every:
            return
        self.history.append(point)
        if len(self.history) >= HISTORY_KEEP:  # bounded for any length of run: halve the resolution
            del self.history[1::2]
            self.history_every *= 2

    def series(self) -> list[dict[str, Any]]:
        """The run's resource history, ending with the latest sample."""
        last = self.trace[-1] if self.trace else None
        if last is not None and len(last) > 1 and (not self.history or last["t"] > self.history[-1]["t"]):
            return [*self.history, last]
        return list(self.history)


def disk_usage(root: Path, stop_after: int | None = None) -> int:
    """Bytes in the files under `root` (no symlinks followed); stops counting past `stop_after`."""
    total = 0
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for e in entries:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        continue
                    if stop_after is not None and total > stop_after:
                        return total
        except OSError:
            continue
    return total
