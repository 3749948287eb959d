"""Linux cgroups for one sandbox's processes: limits, usage, kill-all, removal.

Used by runtimes that have no cgroup manager of their own (bubblewrap). Works on the
unified hierarchy (cgroup v2) and on the legacy per-controller one (v1); `CgroupSet.create`
returns None when neither is writable, and the runtime says so in its records.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PARENT = "proctor"


@dataclass
class CgroupSet:
    version: int
    dirs: dict[str, Path]  # controller → folder (v2: one folder under "unified")

    @classmethod
    def create(cls, name: str, memory: int, pids: int, cpus: float, root: Path = ROOT) -> "CgroupSet | None":
        try:
            if (root / "cgroup.controllers").exists():
                return cls._create_v2(root, name, memory, pids, cpus)
            if (root / "memory").is_dir() and (root / "pids").is_dir():
                return cls._create_v1(root, name, memory, pids, cpus)
        except OSError:
            return None
        return None

    @classmethod
    def _create_v2(cls, root: Path, name: str, memory: int, pids: int, cpus: float) -> "CgroupSet":
        parent = root / PARENT
        parent.mkdir(exist_ok=True)
        wanted = {"memory", "pids", "cpu"} & set((root / "cgroup.controllers").read_text().split())
        (root / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))
        (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))
        d = parent / name
        d.mkdir()
        cg = cls(2, {"unified": d})
        _write(d / "memory.max", memory)
        _write(d / "memory.swap.max", 0, missing_ok=True)
        _write(d / "pids.max", pids)
        _write(d / "cpu.max", f"{max(1000, int(cpus * 100_000))} 100000")
        return cg

    @classmethod
    def _create_v1(cls, root: Path, name: str, memory: int, pids: int, cpus: float) -> "CgroupSet":
        dirs: dict[str, Path] = {}
        for ctrl in ("memory", "pids", "cpu", "cpuacct"):
            if not (root / ctrl).is_dir():
                continue
            d = root / ctrl / PARENT / name
            d.mkdir(parents=True)
            dirs[ctrl] = d
        cg = cls(1, dirs)
        _write(dirs["memory"] / "memory.limit_in_bytes", memory)
        _write(dirs["memory"] / "memory.memsw.limit_in_bytes", memory, missing_ok=True)
        _write(dirs["pids"] / "pids.max", pids)
        if "cpu" in dirs:
            _write(dirs["cpu"] / "cpu.cfs_period_us", 100_000)
            _write(dirs["cpu"] / "cpu.cfs_quota_us", max(1000, int(cpus * 100_000)))
        return cg

    def attach(self, pid: int = 0) -> None:
        """Move a process (0: the caller) into every controller. Safe between fork and exec."""
        for d in self.dirs.values():
            with open(d / "cgroup.procs", "w") as f:
                f.write(str(pid or os.getpid()))

    def pids(self) -> list[int]:
        d = self.dirs.get("unified") or self.dirs["pids"]
        try:
            return [int(p) for p in (d / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the group until none is left (a fork bomb keeps forking)."""
        kill_file = self.dirs.get("unified", Path("/nonexistent")) / "cgroup.kill"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if kill_file.exists():
                _write(kill_file, 1, missing_ok=True)
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def memory_bytes(self) -> int | None:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return _read_int(self.dirs.get("unified") or self.dirs["memory"], name)

    def cpu_seconds(self) -> float | None:
        if self.version == 2:
            try:
                for line in (self.dirs["unified"] / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec"):
                        return int(line.split()[1]) / 1e6
            except OSError:
                return None
            return None
        ns = _read_int(self.dirs.get("cpuacct", Path("/nonexistent")), "cpuacct.usage")
        return ns / 1e9 if ns is not None else None

    def pids_current(self) -> int | None:
        return _read_int(self.dirs.get("unified") or self.dirs["pids"], "pids.current")

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process here for exceeding the memory limit."""
        d = self.dirs.get("unified") or self.dirs["memory"]
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (d / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except OSError:
            pass
        return False

    def remove(self) -> None:
        self.kill_all(timeout=2.0)
        for d in self.dirs.values():
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def _write(path: Path, value: object, missing_ok: bool = False) -> None:
    try:
        path.write_text(str(value))
    except FileNotFoundError:
        if not missing_ok:
            raise
    except OSError:
        if not missing_ok:
            raise


def _read_int(d: Path, name: str) -> int | None:
    try:
        return int((d / name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
