"""What the double's kubelet and metrics read of a container's processes, from /proc:
their tree, resident memory and CPU seconds."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .kubelet import Container


def _process_tree() -> dict[int, list[int]]:
    """Parent pid → child pids, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
                children.setdefault(int(stat[stat.rindex(b")") + 2:].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return children


def _below(pid: int, tree: dict[int, list[int]]) -> list[int]:
    """`pid` and every process below it."""
    found, todo, seen = [], [pid], set()
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            found.append(p)
            todo.extend(tree.get(p, []))
    return found


def _rss(pid: int, tree: dict[int, list[int]]) -> int:
    """Resident bytes of `pid` and every process below it."""
    total = 0
    for p in _below(pid, tree):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass
    return total


def rss(pid: int) -> int:
    return _rss(pid, _process_tree())


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of `pid` and every live process below it."""
    total = 0.0
    for p in _below(pid, _process_tree()):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def scrape_cpu(c: "Container") -> tuple[float, float]:
    """What metrics-server reports for a container: its average CPU rate (cores) since the
    last scrape (or its start), and that window in seconds."""
    now = time.monotonic()
    used = c.cgroup.cpu_seconds() if c.cgroup is not None else None
    used = used if used is not None else cpu_seconds(c.proc.pid)
    then, before = c.scraped or (c.started, 0.0)
    c.scraped = (now, used)
    window = max(now - then, 1e-3)
    return max(0.0, used - before) / window, window
