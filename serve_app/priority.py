"""The API's path ahead of evaluation work on a busy host.

An emergency stop has to reach the API before it can kill anything. On a host whose CPUs
sandboxes and Ray workers keep busy, the request waited seconds for the processes in its
path to be scheduled at all (stop_latency.py: 7-9 s of an 8.5 s stop with 6 busy
processes on 2 cores passed before the API's handler ran). So the API's replica keeps
that path at a raised priority (`nice` `settings.api_nice`, -10 by default):

  - its own process, every thread (the event loop, and the thread pool it calls the store
    from: threads inherit the creating thread's priority);
  - Serve's ingress on this node: the `ProxyActor` (proxy mode) or the `HAProxyManager`
    and the HAProxy it runs (haproxy mode, what `proctor up` runs), found as the Ray
    workers beside this one (children of the same raylet) and their children.

HAProxy is restarted when the routing table changes, so `PriorityKeeper` looks again
every `EVERY_S`. Raising a priority needs root (or CAP_SYS_NICE): without it the keeper
logs once and does nothing more. The sandboxes keep the default priority, so the API, not
evaluation work, wins a contended CPU; the API's rate limit bounds what it can take.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("proctor.api")

EVERY_S = 5.0
SERVE_TITLES = (b"ray::ProxyActor", b"ray::HAProxyManager")
PROC = Path("/proc")


def _parent(pid: int, proc: Path = PROC) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the name may hold spaces and parens


def serve_path(raylet: int, proc: Path = PROC) -> list[int]:
    """Serve's ingress processes started by `raylet` (its proxy actor or HAProxy manager,
    by their process titles), and every process below them (HAProxy)."""
    parents: dict[int, int] = {}
    titled: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        ppid = _parent(pid, proc)
        if ppid is None:
            continue
        parents[pid] = ppid
        if ppid == raylet:
            try:
                argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            if argv0.startswith(SERVE_TITLES):
                titled.append(pid)
    found = set(titled)
    grew = True
    while grew:  # their children, and theirs
        below = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= below
        grew = bool(below)
    return sorted(found)


def renice(pid: int, nice: int, proc: Path = PROC) -> int:
    """Set every thread of `pid` to `nice` where it is lower priority; returns how many
    threads changed. Raises PermissionError where this process may not raise it."""
    changed = 0
    try:
        tids = [int(t.name) for t in (proc / str(pid) / "task").iterdir()]
    except OSError:
        return 0  # gone
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed += 1
        except ProcessLookupError:
            continue
    return changed


class PriorityKeeper:
    """Keeps this process and Serve's ingress beside it at `nice`, every `EVERY_S`."""

    def __init__(self, nice: int, every_s: float = EVERY_S):
        self.nice = nice
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.nice >= 0 or self._thread is not None:
            return  # 0 (or more): the default priority, nothing to keep
        self._thread = threading.Thread(target=self._run, name="proctor-priority", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def once(self) -> int:
        """One pass: threads changed (PermissionError where this process may not)."""
        changed = renice(os.getpid(), self.nice)
        for pid in serve_path(os.getppid()):
            changed += renice(pid, self.nice)
        return changed

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                changed = self.once()
            except PermissionError:
                log.warning("the API's path keeps the default priority: raising it (api_nice %d) needs root "
                            "or CAP_SYS_NICE", self.nice)
                return
            except Exception:  # never take the API down for this
                log.exception("raising the API's priority failed")
            else:
                if changed:
                    log.info("the API's path at nice %d: %d threads raised", self.nice, changed)
            self._stop.wait(self.every_s)
