"""The `bubblewrap` runtime: the weaker local sandbox, said so in every record.

bwrap runs as an unprivileged host user (`HARNESS_HOST_UID`) in new user, pid, network,
ipc, uts and cgroup namespaces, with a read-only root of read-only binds (`layout.py`), a
private writable `/workspace`, private `/tmp`, no further user namespaces (a seccomp
filter, `seccomp.py`) and an empty environment. Its user namespace maps the sandbox's
root to that host user and the sandbox's users 1-65535 to the host's same ids (Proctor
writes the map, as root, while bwrap waits for it): the harness runs as the sandbox's
root holding only
`HARNESS_CAPABILITIES` (within that namespace), the agent's commands as 65534 (nobody)
with none. Image files owned by the host's root are seen as nobody's. Memory, pids and
CPU limits come from a cgroup that Proctor creates itself (`cgroups.py`).

Weaker than gVisor because the sandboxed code talks to the host kernel directly: one
kernel bug is a way out. Records carry `isolation: weak`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
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
)
from .cgroups import CgroupSet
from .cgroups import ROOT as CGROUP_ROOT
from .netns import enter
from .seccomp import program_fd
from .layout import ETC_GROUP as _GROUP
from .layout import ETC_PASSWD as _PASSWD
from .layout import INJECTED, WORKSPACE

INSTALL_HINT = "install bubblewrap: `apt-get install bubblewrap`"
HARNESS_HOST_UID = 2_147_000_000  # the host user behind the sandbox's root: no file or process of the host's
ID_MAP = f"0 {HARNESS_HOST_UID} 1\n1 1 65535\n"
MAP_TIMEOUT_S = 10.0


class BubblewrapSandbox(ProcessSandbox):
    runtime = "bubblewrap"
    isolation = "weak"

    def __init__(self, request: LaunchRequest, runtime: "BubblewrapRuntime"):
        super().__init__(request)
        self.rt = runtime
        self.dir = runtime.bundles / request.sandbox_id
        self._info_r, self._info_w = os.pipe()  # bwrap tells its child's pid here
        self._go_r, self._go_w = os.pipe()  # and waits for a byte here until the maps are written
        self._seccomp = program_fd()

    def prepare(self) -> None:
        lim = self.request.limits
        self.dir.mkdir(parents=True, exist_ok=False)
        etc = self.dir / "etc"
        etc.mkdir()
        (etc / "passwd").write_text(_PASSWD)
        (etc / "group").write_text(_GROUP)
        (etc / "hosts").write_text(self.request.hosts_file())
        (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\n")
        for _host, inside in self.request.ro_binds:
            if inside.startswith("/etc/"):
                (etc / inside.removeprefix("/etc/")).mkdir(parents=True, exist_ok=True)  # mount point
        for p in (self.dir, *self.dir.rglob("*")):
            p.chmod(0o755 if p.is_dir() else 0o644)
        self.cgroup = CgroupSet.create(self.rt.cgroup_name(self.id), lim.memory_bytes, lim.pids, lim.cpus,
                                       root=self.rt.cgroup_root)
        if self.cgroup is None:
            raise RuntimeUnavailable(
                "bubblewrap: cannot create a cgroup under /sys/fs/cgroup for the sandbox's limits; "
                "run as root on a host with writable cgroups"
            )

    def preexec(self) -> None:
        assert self.cgroup is not None
        self.cgroup.attach()
        if self.request.netns:  # the service's namespace of a private network (netns.py); bwrap keeps it
            enter(self.request.netns)
        os.setgroups([])
        os.setgid(HARNESS_HOST_UID)
        os.setuid(HARNESS_HOST_UID)

    def pass_fds(self) -> tuple[int, ...]:
        return (self._info_w, self._go_r, self._seccomp)

    async def started_process(self) -> None:
        """Read the sandbox's pid from bwrap, write its user namespace's maps, let it go."""
        for fd in (self._info_w, self._go_r, self._seccomp):
            os.close(fd)
        self._info_w = self._go_r = self._seccomp = -1
        info = await asyncio.wait_for(asyncio.to_thread(_read_json, self._info_r), MAP_TIMEOUT_S)
        if info is None:
            assert self.proc is not None and self.proc.stderr is not None
            said = await asyncio.wait_for(self.proc.stderr.read(4096), MAP_TIMEOUT_S)
            raise RuntimeError(f"bwrap ended before its sandbox started: {said.decode(errors='replace').strip()}")
        pid = int(info["child-pid"])
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(ID_MAP)
        os.write(self._go_w, b"1")
        self._close_pipes()

    def _close_pipes(self) -> None:
        for name in ("_info_r", "_info_w", "_go_r", "_go_w", "_seccomp"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def host_argv(self) -> list[str]:
        req = self.request
        argv = [
            self.rt.bwrap,
            # no --disable-userns (bwrap refuses it beside --userns-block-fd): the seccomp
            # filter forbids new user namespaces instead
            *(["--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
              if req.netns else ["--unshare-all", "--unshare-user"]),
            "--seccomp", str(self._seccomp),
            "--userns-block-fd", str(self._go_r), "--info-fd", str(self._info_w),
            "--uid", "0", "--gid", "0",
            "--die-with-parent", "--new-session", "--clearenv",
            "--hostname", "sandbox",
        ]
        for key, value in req.env:
            argv += ["--setenv", key, value]
        if req.rootfs is not None:  # an image as the root; the harness's mount points in a tmpfs of their own
            argv += ["--ro-bind", str(req.rootfs), "/", "--tmpfs", INJECTED]
            if req.netns:  # the names of its private network, over the image's own
                argv += ["--ro-bind", str(self.dir / "etc" / "hosts"), "/etc/hosts"]
        else:
            argv += ["--ro-bind", str(self.dir / "etc"), "/etc"]
        for host, inside in req.ro_binds:
            argv += ["--ro-bind", host, inside]
        if req.rootfs is None:
            for link, target in (("/bin", "usr/bin"), ("/sbin", "usr/sbin"), ("/lib", "usr/lib"),
                                 ("/lib64", "usr/lib64")):
                argv += ["--symlink", target, link]
        argv += [
            "--proc", "/proc",
            "--dev", "/dev",
            "--perms", "1777", "--tmpfs", "/tmp",  # as gVisor's: every user may write, none remove another's files
            "--bind", str(req.workspace), WORKSPACE,
            "--chdir", WORKSPACE,
            "--cap-drop", "ALL",
            *[arg for cap in HARNESS_CAPABILITIES for arg in ("--cap-add", cap)],
            "--remount-ro", "/",
            "--", *req.argv,
        ]
        return argv

    async def force_kill(self) -> None:
        if self.cgroup is not None:
            self.cgroup.kill_all()

    async def stats(self) -> SandboxStats:
        import asyncio

        cg = self.cgroup
        now = asyncio.get_running_loop().time()
        if cg is None:
            return SandboxStats(at=now)
        return SandboxStats(cg.memory_bytes(), cg.cpu_seconds(), cg.pids_current(), now, cg.pids_refused())

    async def remove(self) -> None:
        self._close_pipes()
        if self.cgroup is not None:
            self.cgroup.remove()
        shutil.rmtree(self.dir, ignore_errors=True)


class BubblewrapRuntime(LocalRuntime):
    name = "bubblewrap"
    isolation = "weak"
    harness_root = True

    def __init__(self, workdir: Path, bwrap: str | None = None, cgroup_root: Path = CGROUP_ROOT):
        super().__init__(workdir, cgroup_root)
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

    def reap(self) -> list[str]:
        """Kill and remove what a dead owner of this folder left: its cgroups (every
        process in them killed) and the sandboxes' folders."""
        found = set()
        for cgroup in CgroupSet.owned(self.owner, self.cgroup_root):
            found.add(self.sandbox_of(cgroup))
            cgroup.remove()
        found.update(self.remove_bundles(self.bundles))
        return sorted(found)


def _read_json(fd: int) -> JsonObject | None:
    """One JSON object from bwrap's info descriptor (it writes it, then keeps it open);
    None if bwrap closed it first."""
    data = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
        try:
            info: JsonObject = json.loads(data)
        except ValueError:
            continue
        return info
