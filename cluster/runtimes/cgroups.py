"""Linux cgroups for one sandbox's processes: limits, usage, kill-all, removal.

Proctor makes the cgroup of every local sandbox itself (bubblewrap's, and gVisor's, which
runsc joins without owning it), so that the limits, the kernel's OOM count and the kill
path never depend on what runs inside. Works on the unified hierarchy (cgroup v2) and on
the legacy per-controller one (v1, with or without a `unified` mount beside it);
`CgroupSet.create` returns None when neither is writable, and the runtime says so.

Every sandbox cgroup is `proctor/<owner>--<sandbox id>`: `owned()` finds what an owner
(a runtime's folder) left, on whichever layout the host has, so that a restarted owner
can reap it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
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

    @classmethod
    def owned(cls, owner: str, root: Path = ROOT) -> list["CgroupSet"]:
        """Every sandbox cgroup of `owner` (named `<owner>--*`) under `root`: v2's
        `proctor/`, v1's `<controller>/proctor/` and a hybrid host's `unified/proctor/`."""
        return cls._matching(lambda name: name.startswith(f"{owner}--"), root)

    @classmethod
    def named(cls, name: str, root: Path = ROOT) -> "CgroupSet | None":
        """The cgroup `name` in every hierarchy that has it (including the controllers a
        runtime such as runsc added beside Proctor's own), or None."""
        found = cls._matching(lambda n: n == name, root)
        return found[0] if found else None

    @classmethod
    def where(cls, wanted: Callable[[str], bool], root: Path = ROOT) -> list["CgroupSet"]:
        """Every sandbox cgroup whose name satisfies `wanted` (a predicate on the name)."""
        return cls._matching(wanted, root)

    @classmethod
    def _matching(cls, wanted: Callable[[str], bool], root: Path) -> list["CgroupSet"]:
        found: dict[str, dict[str, Path]] = {}
        v2 = (root / "cgroup.controllers").exists()
        parents = {"unified": root / PARENT} if v2 else {
            d.name: d / PARENT for d in _subdirs(root) if (d / PARENT).is_dir()}
        for ctrl, parent in parents.items():
            for d in _subdirs(parent):
                if wanted(d.name):
                    found.setdefault(d.name, {})[ctrl] = d
        return [cls(2 if v2 or set(dirs) == {"unified"} else 1, dirs) for dirs in found.values()]

    def attach(self, pid: int = 0) -> None:
        """Move a process (0: the caller) into every controller. Safe between fork and exec."""
        for d in self.dirs.values():
            with open(d / "cgroup.procs", "w") as f:
                f.write(str(pid or os.getpid()))

    def pids(self) -> list[int]:
        """Every process in the group (of each controller's folder: a process half-moved
        by a dying owner may sit in some only)."""
        found: set[int] = set()
        for d in self.dirs.values():
            try:
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except OSError:
                pass
        return sorted(found)

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

    def pids_refused(self) -> int | None:
        """How many process creations the pids limit has refused here (`pids.events`)."""
        d = self.dirs.get("unified") or self.dirs.get("pids")
        if d is None:
            return None
        try:
            for line in (d / "pids.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max":
                    return int(value)
        except (OSError, ValueError):
            return None
        return None

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


def _subdirs(path: Path) -> list[Path]:
    try:
        return [d for d in path.iterdir() if d.is_dir() and not d.is_symlink()]
    except OSError:
        return []


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
