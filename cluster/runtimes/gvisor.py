"""The `gvisor` runtime: `runsc` driven directly with a generated OCI bundle.

Each sandbox gets a bundle whose root is an empty, read-only skeleton (made once per set of
mount points and shared, `GvisorRuntime.skeleton`) with read-only
binds of only what the harness needs (`layout.py`), a private writable `/workspace`,
private `/tmp` and `/dev`, no network (`--network=none`: loopback only, inside the
sandbox's own network stack), `noNewPrivileges`, a generated `/etc` and an explicit
environment. The harness runs as the sandbox's root (gVisor's, not the host's) with only
`HARNESS_CAPABILITIES`; the agent's commands run as uid 65534 with none. Memory, pids and
CPU limits are set on Proctor's own cgroup, which runsc joins.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from proctor.jsontypes import JsonObject

from .base import (
    HARNESS_CAPABILITIES,
    LaunchRequest,
    LocalRuntime,
    ProcessSandbox,
    RuntimeUnavailable,
    Sandbox,
    SandboxStats,
    _host_env,
)
from .cgroups import PARENT, CgroupSet
from .cgroups import ROOT as CGROUP_ROOT
from .layout import ETC_GROUP as _GROUP
from .layout import ETC_PASSWD as _PASSWD
from .layout import INJECTED, WORKSPACE
from .netns import enter

INSTALL_HINT = "install gVisor: `apt-get install runsc` (Debian 12+) or see https://gvisor.dev/docs/user_guide/install/"

HOST_THREADS = 512  # room for runsc's own host threads under the pids cgroup
# The sandbox's pids limit is enforced inside, by the Sentry (RLIMIT_NPROC of the agent's
# user: a fork over it fails with EAGAIN, as in Linux). The host cgroup must never be what
# stops a fork: the Sentry dies of it (a panic in its ptrace platform, exit status 2),
# taking the sandbox and the harness with it. The ptrace platform runs each sandbox
# process as a host stub process with a host thread for every Sentry thread that has run
# it: ~20 host tasks per sandbox process measured on 2 quiet CPUs, ~40 with the machine
# loaded (the Sentry then runs more threads). The host limit stays a backstop against the
# Sentry; a sandbox that dies at it ends as `pids`.
HOST_TASKS_PER_PROCESS = 128


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
            "--network=sandbox" if self.request.netns else "--network=none",
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
        lim = req.limits
        self.bundle.mkdir(parents=True, exist_ok=False)
        # Proctor's own cgroup, which runsc joins and leaves in place: its limits hold, and
        # the kernel's OOM count can be read after the sandbox has gone
        # (the host cgroup counts the sentry's and gofer's own threads too)
        self.cgroup = CgroupSet.create(self.rt.cgroup_name(self.id), lim.memory_bytes, self.cgroup_pids_limit(),
                                       lim.cpus, root=self.rt.cgroup_root)
        if self.cgroup is None:
            raise RuntimeUnavailable("gvisor: cannot create a cgroup under /sys/fs/cgroup for the sandbox's limits; "
                                     "run as root on a host with writable cgroups")
        mounts: list[JsonObject] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "noexec", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        ]
        if req.rootfs is not None:  # an image: the injected harness's mount points live in a tmpfs of their own
            mounts.append({"destination": INJECTED, "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=755", "size=1m"]})
        for host, inside in req.ro_binds:
            mounts.append({"destination": inside, "type": "bind", "source": host,
                           "options": ["rbind", "ro", "nosuid", "nodev"]})
        mounts.append({"destination": WORKSPACE, "type": "bind", "source": str(req.workspace),
                       "options": ["rbind", "rw", "nosuid", "nodev"]})
        if req.netns:  # the names of its private network, over the root's own /etc/hosts
            (self.bundle / "hosts").write_text(req.hosts_file())
            mounts.append({"destination": "/etc/hosts", "type": "bind", "source": str(self.bundle / "hosts"),
                           "options": ["bind", "ro", "nosuid", "nodev"]})
        points = [m["destination"] for m in mounts if m["destination"] != "/etc/hosts"]  # a file, in every root
        root = str(req.rootfs) if req.rootfs is not None else str(self.rt.skeleton(points))
        period = 100_000
        config = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": 0, "gid": 0, "additionalGids": []},  # the harness; the agent is SANDBOX_USER
                "args": list(req.argv),
                "env": [f"{k}={v}" for k, v in req.env],
                "cwd": WORKSPACE,
                "capabilities": {k: list(HARNESS_CAPABILITIES) if k in ("bounding", "effective", "permitted") else []
                                 for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
                "noNewPrivileges": True,
                "rlimits": [
                    {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
                    {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                    {"type": "RLIMIT_NPROC", "hard": lim.pids, "soft": lim.pids},
                ],
            },
            "root": {"path": root, "readonly": True},
            "hostname": "sandbox",
            "mounts": mounts,
            "linux": {
                "cgroupsPath": f"/{PARENT}/{self.rt.cgroup_name(self.id)}",
                "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
                + [{"type": "network", **({"path": req.netns} if req.netns else {})}],
                "resources": {
                    "memory": {"limit": lim.memory_bytes, "swap": lim.memory_bytes},
                    # the host cgroup counts the sentry's and gofer's own threads too
                    "pids": {"limit": self.cgroup_pids_limit()},
                    "cpu": {"quota": max(1000, int(lim.cpus * period)), "period": period},
                },
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
                "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"],
            },
        }
        (self.bundle / "config.json").write_text(json.dumps(config))

    def preexec(self) -> None:
        if self.request.netns:  # the service's namespace of a private network (netns.py)
            enter(self.request.netns, hide_root_check=True)

    def needs_preexec(self) -> bool:
        return bool(self.request.netns)  # else runsc starts with vfork

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
        if self.cgroup is not None and self.cgroup.pids():
            self.cgroup.kill_all(timeout=2.0)

    def cgroup_pids_limit(self) -> int:
        """The host cgroup's pids limit: room for the Sentry's host tasks (see HOST_TASKS_PER_PROCESS)."""
        return self.request.limits.pids * HOST_TASKS_PER_PROCESS + HOST_THREADS

    async def stats(self) -> SandboxStats:
        if self.ended():  # no runsc call about a sandbox that is gone (or being killed by a stop)
            return SandboxStats(at=asyncio.get_running_loop().time())
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
        for lock in self.rt.state.glob(f"*{self.id}*.lock"):  # runsc's own, left when it was busy
            lock.unlink(missing_ok=True)
        if self.cgroup is not None:  # with the controllers runsc added and may have left
            (CgroupSet.named(self.rt.cgroup_name(self.id), self.rt.cgroup_root) or self.cgroup).remove()
        shutil.rmtree(self.bundle, ignore_errors=True)


class GvisorRuntime(LocalRuntime):
    name = "gvisor"
    isolation = "strong"
    harness_root = True

    def __init__(self, workdir: Path, platform: str = "ptrace", runsc: str | None = None,
                 extra_flags: tuple[str, ...] = (), cgroup_root: Path = CGROUP_ROOT):
        super().__init__(workdir, cgroup_root)
        self.runsc = runsc or shutil.which("runsc") or "runsc"
        self.platform = platform
        self.extra_flags = extra_flags
        self.state = workdir / "runsc-state"
        self.bundles = workdir / "bundles"
        self.skeletons = workdir / "skeletons"  # shared read-only roots (`skeleton`)
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.bundles.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.skeletons.mkdir(exist_ok=True, mode=0o700)

    def skeleton(self, mount_points: list[str]) -> Path:
        """The root of a sandbox on the host's userland with these mount points: made once
        per set of mount points and shared, read-only, by every sandbox that has them (each
        sandbox's root is mounted read-only). Mount points, links into /usr, a generated /etc."""
        key = hashlib.sha256("\0".join([_PASSWD, _GROUP, *sorted(set(mount_points))]).encode()).hexdigest()[:16]
        rootfs = self.skeletons / key
        if rootfs.is_dir():
            return rootfs
        building = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.skeletons))
        for point in mount_points:
            (building / point.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            if not (building / link).exists():
                (building / link).symlink_to(target)
        etc = building / "etc"
        etc.mkdir(exist_ok=True)
        (etc / "passwd").write_text(_PASSWD)
        (etc / "group").write_text(_GROUP)
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        (etc / "resolv.conf").write_text("")
        (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\n")
        for d in (building, *building.rglob("*")):
            if d.is_dir() and not d.is_symlink():
                d.chmod(0o755)
        try:
            building.rename(rootfs)
        except OSError:  # another launch made it first
            shutil.rmtree(building, ignore_errors=True)
        return rootfs

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

    def reap(self) -> list[str]:
        """Kill and remove what a dead owner of this folder left: the containers runsc still
        knows, the owner's cgroups (their processes killed), and the bundles."""
        out = subprocess.run([self.runsc, "--root", str(self.state), "list", "--quiet"],
                             capture_output=True, text=True, env=_host_env())
        found = set(out.stdout.split())
        for cgroup in CgroupSet.owned(self.owner, self.cgroup_root):  # first: runsc kill may wait on them
            found.add(self.sandbox_of(cgroup))
            cgroup.kill_all(timeout=2.0)
        for sid in sorted(found):
            subprocess.run([self.runsc, "--root", str(self.state), "delete", "--force", sid],
                           capture_output=True, env=_host_env())
        for cgroup in CgroupSet.owned(self.owner, self.cgroup_root):
            cgroup.remove()
        found.update(self.remove_bundles(self.bundles))
        return sorted(found)

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
