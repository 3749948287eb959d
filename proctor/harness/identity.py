"""Who runs what inside the sandbox: the harness, the agent, setup and scorers.

The harness starts as the sandbox's root holding only the capabilities it needs to act
as other users (the runtime grants setuid, setgid, kill, chown, dac_override, fowner).
The agent's tool commands run as the agent's unprivileged user (the image's, or nobody):
on exec that user has no capabilities at all, so it cannot read the harness's memory or
environment (another user's /proc), signal it, or write to its channel (the harness's
pipes are never inherited). Setup steps run as root or a user the spec names; scorers
run as root in a fresh process tree, after `kill_user` has ended every process of the
agent's user.

Where the harness is not root (a pod runs it as a non-root user with no capabilities),
every command runs as the harness's own user (`Users.switching` is False; the harness
says so in its log), and the agent's processes are still all killed before scoring.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

PASSWD = Path("/etc/passwd")
GROUP = Path("/etc/group")



class UserArgs(TypedDict, total=False):
    """`subprocess.Popen`'s arguments that run a command as another user (`Users.popen_args`)."""

    user: int
    group: int
    extra_groups: list[int]

class UnknownUser(ValueError):
    """A user that the sandbox's image does not have. Caught by the run loop: the stage
    that asked for it fails with this message."""


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    name: str

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def resolve(user: str) -> Identity:
    """`name`, `uid` or `uid:gid`, looked up in the sandbox's own /etc/passwd (the image's).
    Raises `UnknownUser`."""
    uid_part, _, gid_part = user.partition(":")
    entry = _passwd_entry(uid_part)
    if uid_part.isdigit():
        uid = int(uid_part)
        gid = int(gid_part) if gid_part.isdigit() else (entry[1] if entry else uid)
        return Identity(uid, gid, entry[2] if entry else uid_part)
    if entry is None:
        raise UnknownUser(f"user {uid_part!r} is not in the sandbox's /etc/passwd; give a user of the image "
                          "or a number ('1000' or '1000:1000')")
    gid = _group_id(gid_part) if gid_part else entry[1]
    return Identity(entry[0], gid, uid_part)


def _passwd_entry(key: str) -> tuple[int, int, str] | None:
    try:
        lines = PASSWD.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":")
        if len(parts) >= 4 and parts[2].isdigit() and parts[3].isdigit() and key in (parts[0], parts[2]):
            return int(parts[2]), int(parts[3]), parts[0]
    return None


def _group_id(key: str) -> int:
    if key.isdigit():
        return int(key)
    try:
        for line in GROUP.read_text(errors="replace").splitlines():
            parts = line.split(":")
            if len(parts) >= 3 and parts[0] == key and parts[2].isdigit():
                return int(parts[2])
    except OSError:
        pass
    raise UnknownUser(f"group {key!r} is not in the sandbox's /etc/group")


class Users:
    """What the harness may do about users here. `sandboxed`: the host says the harness
    runs in a sandbox of its own (its own pid namespace), so `kill(-1)` reaches only the
    sandbox's processes; never set when the harness runs in a test's own process."""

    def __init__(self, sandboxed: bool):
        self.sandboxed = sandboxed
        self.switching = sandboxed and os.geteuid() == 0
        if self.switching:
            _clear_inheritable()
        if sandboxed:
            _blank_initial_environment()

    def popen_args(self, identity: Identity | None) -> UserArgs:
        """`subprocess.Popen` arguments that run a command as `identity` (none where the
        harness cannot change user)."""
        if identity is None or not self.switching or (identity.uid, identity.gid) == (os.geteuid(), os.getegid()):
            return {}
        return {"user": identity.uid, "group": identity.gid, "extra_groups": []}

    def give(self, path: Path, identity: Identity) -> None:
        """Make `path` and everything under it belong to `identity` (the agent's folder)."""
        if not self.switching:
            return
        for p in (path, *path.rglob("*")):
            os.lchown(p, identity.uid, identity.gid)

    def kill_agent(self, identity: Identity, timeout_s: float = 5.0) -> int:
        """Kill every process of the agent's user; returns how many are left. As that user
        (`kill(-1)` reaches exactly the processes it may signal: its own), over and over
        until none is left, since a fork bomb keeps forking. Without a switch of user, the
        harness's own `kill(-1)` ends every other process of its user: the agent's."""
        if not self.sandboxed:
            return 0
        if not self.switching:
            _kill_all_but_me(time.monotonic() + timeout_s)
            _reap()
            return len(_processes_of(os.geteuid(), exclude=os.getpid()))
        if identity.is_root:
            raise ValueError("the agent never runs as root")
        pid = os.fork()
        if pid == 0:  # the child becomes the agent's user and kills all it can but itself
            try:
                os.setgroups([])
                os.setgid(identity.gid)
                os.setuid(identity.uid)
                _kill_all_but_me(time.monotonic() + timeout_s)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        _reap()
        return len(_processes_of(identity.uid))


def _clear_inheritable() -> None:
    """Empty this process's inheritable capabilities: a change of user keeps them, and a
    command run as the agent should hold no capability of any kind (no_new_privs already
    keeps a program's file capabilities from adding any)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # {effective, permitted, inheritable} of capabilities 0-31, then 32-63
    if libc.capget(header, data) == 0:
        data[2] = data[5] = 0
        libc.capset(header, data)


def _blank_initial_environment() -> None:
    """Zero the environment strings the kernel placed at this process's start (what
    /proc/<pid>/environ shows: the sandbox's kernel may show them to other users, as this
    gVisor does), and empty the C library's list. Python keeps its own copy in
    `os.environ`; nothing in it is secret, but the agent is shown nothing of the harness."""
    import ctypes

    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
    i = 0
    while environ[i]:
        address = environ[i]
        ctypes.memset(address, 0, len(ctypes.string_at(address)))
        i += 1
    environ[0] = None


def _kill_all_but_me(deadline: float) -> None:
    me = os.getpid()
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            return  # nothing left to signal
        except PermissionError:
            return
        if not _processes_of(os.geteuid(), exclude=me) or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def _reap() -> None:
    """Collect the exit of every ended child: the harness is the sandbox's first process,
    so the agent's orphans end up its children, and would stay as zombies (counted
    against the pids limit). Called between stages, when no command of its own runs."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _processes_of(uid: int, exclude: int = -1) -> list[int]:
    """Live processes (not zombies) whose real user is `uid`, from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        try:
            status = Path(f"/proc/{entry.name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith(("Z", "X")):
            continue
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            found.append(int(entry.name))
    return found
