"""The `gvisor` runtime: `runsc` driven directly with a generated OCI bundle.

Each sandbox gets a bundle whose root is an empty, read-only skeleton with read-only
binds of only what the harness needs (`layout.py`), a private writable `/workspace`,
private `/tmp` and `/dev`, no network (`--network=none`: loopback only, inside the
sandbox's own network stack), uid/gid 65534, no capabilities, `noNewPrivileges`, a
generated `/etc` and an explicit environment. Memory, pids and CPU limits go into the
OCI spec, and runsc places the sandbox in cgroups that enforce them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from .base import (
    LaunchRequest,
    ProcessSandbox,
    RuntimeUnavailable,
    Sandbox,
    SandboxRuntime,
    SandboxStats,
    ExitReason,
)
from .cgroups import PARENT, CgroupSet
from .layout import SANDBOX_USER, WORKSPACE

INSTALL_HINT = "install gVisor: `apt-get install runsc` (Debian 12+) or see https://gvisor.dev/docs/user_guide/install/"

HOST_THREADS = 512  # room for runsc's own host threads under the pids cgroup
_PASSWD = f"root:x:0:0::/nonexistent:/usr/sbin/nologin\nnobody:x:{SANDBOX_USER}:{SANDBOX_USER}::{WORKSPACE}:/bin/sh\n"
_GROUP = f"root:x:0:\nnogroup:x:{SANDBOX_USER}:\n"


class GvisorSandbox(ProcessSandbox):
    runtime = "gvisor"
    isolation = "strong"

    def __init__(self, request: LaunchRequest, runtime: "GvisorRuntime"):
        super().__init__(request)
        self.rt = runtime
        self.bundle = runtime.bundles / request.sandbox_id
        self._tree: set[int] = set()

    def _runsc(self, *args: str) -> list[str]:
        return [self.rt.runsc, "--root", str(self.rt.state), *args]

    def host_argv(self) -> list[str]:
        return [
            self.rt.runsc,
            "--root", str(self.rt.state),
            f"--platform={self.rt.platform}",
            "--network=none",
            *self._trace_flags(),
            *self.rt.extra_flags,
            "run", "--bundle", str(self.bundle), self.id,
        ]

    def _trace_flags(self) -> list[str]:
        if not self.request.trace_syscalls:
            return []
        # runsc names its debug logs by command: the sandbox's (the Sentry's) is debug.boot.log
        return ["--strace", f"--strace-syscalls={','.join(self.request.trace_syscalls)}",
                f"--debug-log={self.bundle}/debug.%COMMAND%.log"]

    @property
    def trace_log(self) -> Path | None:
        return self.bundle / "debug.boot.log" if self.request.trace_syscalls else None

    def prepare(self) -> None:
        req = self.request
        rootfs = self.bundle / "rootfs"
        self.bundle.mkdir(parents=True, exist_ok=False)
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "noexec", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        ]
        for host, inside in req.ro_binds:
            mounts.append({"destination": inside, "type": "bind", "source": host,
                           "options": ["rbind", "ro", "nosuid", "nodev"]})
        mounts.append({"destination": WORKSPACE, "type": "bind", "source": str(req.workspace),
                       "options": ["rbind", "rw", "nosuid", "nodev"]})
        for m in mounts:
            (rootfs / m["destination"].lstrip("/")).mkdir(parents=True, exist_ok=True)
        for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            if not (rootfs / link).exists():
                (rootfs / link).symlink_to(target)
        etc = rootfs / "etc"
        etc.mkdir(exist_ok=True)
        (etc / "passwd").write_text(_PASSWD)
        (etc / "group").write_text(_GROUP)
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        (etc / "resolv.conf").write_text("")
        (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\n")
        for d in rootfs.rglob("*"):
            if d.is_dir() and not d.is_symlink():
                d.chmod(0o755)
        lim = req.limits
        period = 100_000
        config = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": SANDBOX_USER, "gid": SANDBOX_USER, "additionalGids": []},
                "args": list(req.argv),
                "env": [f"{k}={v}" for k, v in req.env],
                "cwd": WORKSPACE,
                "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
                "noNewPrivileges": True,
                "rlimits": [
                    {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
                    {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                    {"type": "RLIMIT_NPROC", "hard": lim.pids, "soft": lim.pids},
                ],
            },
            "root": {"path": "rootfs", "readonly": True},
            "hostname": "sandbox",
            "mounts": mounts,
            "linux": {
                "cgroupsPath": f"/{PARENT}/{self.id}",
                "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
                "resources": {
                    "memory": {"limit": lim.memory_bytes, "swap": lim.memory_bytes},
                    # the host cgroup counts the sentry's and gofer's own threads too
                    "pids": {"limit": lim.pids + HOST_THREADS},
                    "cpu": {"quota": max(1000, int(lim.cpus * period)), "period": period},
                },
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
                "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"],
            },
        }
        (self.bundle / "config.json").write_text(json.dumps(config, indent=1))

    def _cgroup(self) -> CgroupSet:
        name = f"{PARENT}/{self.id}"
        root = Path("/sys/fs/cgroup")
        if (root / "cgroup.controllers").exists():
            return CgroupSet(2, {"unified": root / name})
        return CgroupSet(1, {c: root / c / name for c in ("pids", "memory")})

    async def force_kill(self) -> None:
        """SIGKILL every host process in the sandbox's cgroup (the sentry, its stubs and
        the gofer): immediate, unlike a round trip through `runsc kill`."""
        if self.proc is not None:
            self._tree |= _descendants(self.proc.pid)
        for pid in self._tree:  # the gofer and the sentry may sit outside the cgroup
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        cgroup = self._cgroup()
        if cgroup.pids():
            cgroup.kill_all(timeout=2.0)

    def exit_reason_hint(self, returncode: int | None) -> tuple[ExitReason, str] | None:
        tail = b"".join(self._stderr).decode("utf-8", "replace")
        if returncode in (137, -9) or "out of memory" in tail.lower() or "oom" in tail.lower():
            return "oom", f"killed at its memory limit of {self.request.limits.memory_bytes} bytes"
        return None

    async def stats(self) -> SandboxStats:
        out = await _output(self._runsc("events", "--stats", self.id))
        try:
            data = json.loads(out or "{}").get("data", {})
        except ValueError:
            return SandboxStats(at=asyncio.get_running_loop().time())
        cpu = data.get("cpu", {}).get("usage", {}).get("total")
        mem = data.get("memory", {}).get("usage", {}).get("usage")
        pids = data.get("pids", {}).get("current")
        return SandboxStats(
            memory_bytes=mem,
            cpu_seconds=cpu / 1e9 if cpu is not None else None,
            pids=pids,
            at=asyncio.get_running_loop().time(),
        )

    async def remove(self) -> None:
        await _quiet(self._runsc("delete", "--force", self.id))
        shutil.rmtree(self.bundle, ignore_errors=True)


class GvisorRuntime(SandboxRuntime):
    name = "gvisor"
    isolation = "strong"

    def __init__(self, workdir: Path, platform: str = "ptrace", runsc: str | None = None,
                 extra_flags: tuple[str, ...] = ()):
        self.runsc = runsc or shutil.which("runsc") or "runsc"
        self.platform = platform
        self.extra_flags = extra_flags
        self.state = workdir / "runsc-state"
        self.bundles = workdir / "bundles"
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.bundles.mkdir(parents=True, exist_ok=True, mode=0o700)

    @classmethod
    def check(cls) -> None:
        import os

        if shutil.which("runsc") is None:
            raise RuntimeUnavailable(f"gvisor: `runsc` is not installed; {INSTALL_HINT}")
        if os.geteuid() != 0:
            raise RuntimeUnavailable("gvisor: runsc needs root here to create its sandboxes and cgroups; run Proctor as root")

    async def launch(self, request: LaunchRequest) -> Sandbox:
        sandbox = GvisorSandbox(request, self)
        await sandbox.start()
        return sandbox

    async def running_ids(self) -> list[str]:
        """Ids of the sandboxes runsc still knows about (for reconciliation)."""
        out = await _output([self.runsc, "--root", str(self.state), "list", "--format=json"])
        try:
            return [c["id"] for c in json.loads(out or "[]") or []]
        except (ValueError, TypeError, KeyError):
            return []


def _descendants(root: int) -> set[int]:
    """Every live process below `root`, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


async def _quiet(argv: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await proc.wait()


async def _output(argv: list[str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    return out.decode("utf-8", "replace")
