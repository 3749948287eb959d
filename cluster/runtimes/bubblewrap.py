"""The `bubblewrap` runtime: the weaker local sandbox, said so in every record.

bwrap runs as the unprivileged host user 65534 (nobody) in new user, pid, network, ipc,
uts and cgroup namespaces, with a read-only root of read-only binds (`layout.py`), a
private writable `/workspace`, private `/tmp`, no capabilities, no further user
namespaces and an empty environment. Memory, pids and CPU limits come from a cgroup that
Proctor creates itself (`cgroups.py`).

Weaker than gVisor because the sandboxed code talks to the host kernel directly: one
kernel bug is a way out. Records carry `isolation: weak`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .base import ExitReason, LaunchRequest, ProcessSandbox, RuntimeUnavailable, Sandbox, SandboxRuntime, SandboxStats
from .cgroups import CgroupSet
from .layout import SANDBOX_USER, WORKSPACE

INSTALL_HINT = "install bubblewrap: `apt-get install bubblewrap`"


class BubblewrapSandbox(ProcessSandbox):
    runtime = "bubblewrap"
    isolation = "weak"

    def __init__(self, request: LaunchRequest, runtime: "BubblewrapRuntime"):
        super().__init__(request)
        self.rt = runtime
        self.dir = runtime.bundles / request.sandbox_id
        self.cgroup: CgroupSet | None = None

    def prepare(self) -> None:
        lim = self.request.limits
        self.dir.mkdir(parents=True, exist_ok=False)
        etc = self.dir / "etc"
        etc.mkdir()
        (etc / "passwd").write_text(f"nobody:x:{SANDBOX_USER}:{SANDBOX_USER}::{WORKSPACE}:/bin/sh\n")
        (etc / "group").write_text(f"nogroup:x:{SANDBOX_USER}:\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\n")
        for _host, inside in self.request.ro_binds:
            if inside.startswith("/etc/"):
                (etc / inside.removeprefix("/etc/")).mkdir(parents=True, exist_ok=True)  # mount point
        for p in (self.dir, *self.dir.rglob("*")):
            p.chmod(0o755 if p.is_dir() else 0o644)
        self.cgroup = CgroupSet.create(f"bwrap-{self.id}", lim.memory_bytes, lim.pids, lim.cpus)
        if self.cgroup is None:
            raise RuntimeUnavailable(
                "bubblewrap: cannot create a cgroup under /sys/fs/cgroup for the sandbox's limits; "
                "run as root on a host with writable cgroups"
            )

    def preexec(self) -> None:
        assert self.cgroup is not None
        self.cgroup.attach()
        os.setgroups([])
        os.setgid(SANDBOX_USER)
        os.setuid(SANDBOX_USER)

    def host_argv(self) -> list[str]:
        req = self.request
        argv = [
            self.rt.bwrap,
            "--unshare-all", "--unshare-user", "--disable-userns",
            "--die-with-parent", "--new-session", "--clearenv",
            "--hostname", "sandbox",
        ]
        for key, value in req.env:
            argv += ["--setenv", key, value]
        argv += ["--ro-bind", str(self.dir / "etc"), "/etc"]
        for host, inside in req.ro_binds:
            argv += ["--ro-bind", host, inside]
        for link, target in (("/bin", "usr/bin"), ("/sbin", "usr/sbin"), ("/lib", "usr/lib"), ("/lib64", "usr/lib64")):
            argv += ["--symlink", target, link]
        argv += [
            "--proc", "/proc",
            "--dev", "/dev",
            "--tmpfs", "/tmp",
            "--bind", str(req.workspace), WORKSPACE,
            "--chdir", WORKSPACE,
            "--cap-drop", "ALL",
            "--remount-ro", "/",
            "--", *req.argv,
        ]
        return argv

    async def force_kill(self) -> None:
        if self.cgroup is not None:
            self.cgroup.kill_all()

    def exit_reason_hint(self, returncode: int | None) -> tuple[ExitReason, str] | None:
        if self.cgroup is not None and self.cgroup.oom_killed():
            return "oom", f"killed at its memory limit of {self.request.limits.memory_bytes} bytes"
        return None

    async def stats(self) -> SandboxStats:
        import asyncio

        cg = self.cgroup
        now = asyncio.get_running_loop().time()
        if cg is None:
            return SandboxStats(at=now)
        return SandboxStats(cg.memory_bytes(), cg.cpu_seconds(), cg.pids_current(), now)

    async def remove(self) -> None:
        if self.cgroup is not None:
            self.cgroup.remove()
        shutil.rmtree(self.dir, ignore_errors=True)


class BubblewrapRuntime(SandboxRuntime):
    name = "bubblewrap"
    isolation = "weak"

    def __init__(self, workdir: Path, bwrap: str | None = None):
        self.bwrap = bwrap or shutil.which("bwrap") or "bwrap"
        self.bundles = workdir / "bwrap"
        self.bundles.mkdir(parents=True, exist_ok=True)
        self.bundles.chmod(0o711)

    @classmethod
    def check(cls) -> None:
        if shutil.which("bwrap") is None:
            raise RuntimeUnavailable(f"bubblewrap: `bwrap` is not installed; {INSTALL_HINT}")
        if os.geteuid() != 0:
            raise RuntimeUnavailable("bubblewrap: Proctor needs root here to set the sandbox's cgroup limits")

    async def launch(self, request: LaunchRequest) -> Sandbox:
        sandbox = BubblewrapSandbox(request, self)
        await sandbox.start()
        return sandbox
