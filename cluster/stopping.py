"""Stopping an evaluation's local sandboxes by name, from any process on the host.

Every local sandbox of a shard is named `<eval id>-<shard id>-a<attempt>` and lives in
the cgroup `proctor/<owner>--<sandbox id>` (`runtimes/base.py`), and runsc's own
processes (`runsc run`, its sentry and gofer) carry the sandbox id in their arguments.
So a process that knows only an evaluation's id can kill all of its sandboxes on this
host without asking the supervisor that runs them, whose event loop may be busy:
`kill_evaluations` writes `cgroup.kill` (cgroup v2) or SIGKILLs each pid of the group, and
SIGKILLs the evaluation's runsc processes that sit outside the group.

`StopMarks` are the durable "stopping" markers (one small file per evaluation under a
folder of the platform's home): written before anything is killed, read by the shard
executor right before it launches a sandbox and as each sample arrives, so that no new
sandbox starts for an evaluation being stopped and no sample that finished after the stop
is counted as a result. They survive a restart of any actor.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .runtimes.cgroups import ROOT as CGROUP_ROOT
from .runtimes.cgroups import CgroupSet

# the host processes of a local runtime that may live outside the sandbox's cgroup
RUNTIME_PROCESSES = ("runsc", "bwrap")


class StopMarks:
    """Durable "stopping" markers, one file per evaluation in `folder`, holding the final
    status the stop asks for (`cancelled` or `safety_stopped`) and when it was asked."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, eval_id: str) -> Path:
        if not eval_id or "/" in eval_id or eval_id.startswith("."):
            raise ValueError(f"{eval_id!r} is not an evaluation id")
        return self.folder / eval_id

    def mark(self, eval_id: str, status: str = "cancelled") -> None:
        """Record that `eval_id` is being stopped (the first status wins). Durable once it returns."""
        path = self._path(eval_id)
        if path.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{eval_id}.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(f"{status} {time.time():.6f}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def requested(self, eval_id: str) -> bool:
        """Whether a stop of `eval_id` was requested (a stat: cheap enough for every sample)."""
        try:
            return self._path(eval_id).exists()
        except ValueError:
            return False

    def status(self, eval_id: str) -> str | None:
        """The final status the stop asked for, or None if none was requested."""
        try:
            return self._path(eval_id).read_text().split()[0]
        except (OSError, IndexError, ValueError):
            return None

    def claim(self, eval_id: str, sandbox_id: str) -> None:
        """Record that the sandbox `sandbox_id`, whose name does not say its evaluation (a
        warm one from the pool, `pool-<owner>-<hex>`), now runs a shard of `eval_id`: a
        stop finds it by this claim. Durable once it returns."""
        self._path(eval_id)  # checks the id
        if not sandbox_id or "/" in sandbox_id or sandbox_id.startswith("."):
            raise ValueError(f"{sandbox_id!r} is not a sandbox id")
        claims = self.folder / ".claims"
        claims.mkdir(parents=True, exist_ok=True)
        tmp = claims / f".{sandbox_id}.{os.getpid()}"
        tmp.write_text(eval_id)
        os.replace(tmp, claims / sandbox_id)

    def claims(self) -> dict[str, str]:
        """Claimed sandbox ids and the evaluation each runs (a claim outlives its sandbox
        harmlessly: a sandbox id is never reused)."""
        found: dict[str, str] = {}
        try:
            entries = list(os.scandir(self.folder / ".claims"))
        except OSError:
            return found
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                found[entry.name] = Path(entry.path).read_text().strip()
            except OSError:
                continue
        return found

    def clear(self, eval_id: str) -> None:
        try:
            self._path(eval_id).unlink(missing_ok=True)
        except ValueError:
            pass


@dataclass(frozen=True)
class KillPass:
    """What one pass of `kill_evaluations` found for one evaluation: its sandboxes (by id)
    here, the processes it signalled, and those still alive right after (0: nothing left)."""

    sandboxes: tuple[str, ...]
    killed: int
    alive: int


def _owner_of(name: str, eval_ids: set[str], claims: dict[str, str] | None = None) -> str | None:
    """The evaluation whose sandbox `name` (a cgroup's `<owner>--<sandbox id>`, or a
    sandbox id) belongs to: sandbox ids are `<eval id>-<shard id>-a<attempt>`, or a
    pooled sandbox's claimed in `claims` (`StopMarks.claims`)."""
    sandbox = name.split("--", 1)[1] if "--" in name else name
    if claims and claims.get(sandbox) in eval_ids:
        return claims[sandbox]
    for eval_id in eval_ids:
        if sandbox.startswith(f"{eval_id}-"):
            return eval_id
    return None


def cgroups_of(eval_ids: set[str], root: Path = CGROUP_ROOT,
               claims: dict[str, str] | None = None) -> dict[str, list[CgroupSet]]:
    """The sandbox cgroups on this host of each of `eval_ids`."""
    found: dict[str, list[CgroupSet]] = {}
    for group in CgroupSet.where(lambda name: "--" in name and _owner_of(name, eval_ids, claims) is not None, root):
        owner = _owner_of(next(iter(group.dirs.values())).name, eval_ids, claims)
        found.setdefault(owner or "", []).append(group)
    return found


def runtime_pids_of(eval_ids: set[str], claims: dict[str, str] | None = None) -> dict[str, list[int]]:
    """Host processes of a local runtime (runsc, bwrap) whose arguments name a sandbox of
    one of `eval_ids` (runsc's sentry and gofer may sit outside the sandbox's cgroup), by
    evaluation; one read of /proc. Not `runsc delete`, which removes a dead sandbox."""
    prefixes = [(f"{eval_id}-".encode(), eval_id) for eval_id in eval_ids]
    prefixes += [(sandbox.encode(), eval_id) for sandbox, eval_id in (claims or {}).items() if eval_id in eval_ids]
    me = os.getpid()
    found: dict[str, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"delete" in argv or not any(name.encode() in arg for arg in argv for name in RUNTIME_PROCESSES):
            continue
        for prefix, eval_id in prefixes:
            if any(prefix in arg for arg in argv):
                found.setdefault(eval_id, []).append(int(entry.name))
                break
    return found


def kill_evaluations(eval_ids: set[str], root: Path = CGROUP_ROOT,
                     claims: dict[str, str] | None = None) -> dict[str, KillPass]:
    """SIGKILL every process of every local sandbox of `eval_ids` on this host, once, and
    count what is still alive. Blocking: one read of /proc and a few system calls per
    sandbox; never raises for a process or group that vanished meanwhile."""
    groups = cgroups_of(eval_ids, root, claims)
    killed = dict.fromkeys(eval_ids, 0)
    for eval_id, sets in groups.items():
        for group in sets:
            pids = group.pids()
            unified = group.dirs.get("unified")
            if unified is not None:
                try:
                    (unified / "cgroup.kill").write_text("1")  # the kernel kills the whole group
                    killed[eval_id] += len(pids)  # (they may be gone before a signal of ours reaches them)
                    pids = group.pids()  # any forked meanwhile
                except OSError:
                    pass  # no cgroup.kill before Linux 5.14: each pid below
            for pid in pids:
                killed[eval_id] += _kill(pid)
    for eval_id, pids in runtime_pids_of(eval_ids, claims).items():
        for pid in pids:
            killed[eval_id] += _kill(pid)
    left = runtime_pids_of(eval_ids, claims)
    return {eval_id: KillPass(
        tuple(sorted(next(iter(g.dirs.values())).name.split("--", 1)[1] for g in groups.get(eval_id, []))),
        killed[eval_id],
        sum(len(g.pids()) for g in groups.get(eval_id, [])) + len(left.get(eval_id, [])))
        for eval_id in eval_ids}


def alive(eval_id: str, root: Path = CGROUP_ROOT, claims: dict[str, str] | None = None) -> int:
    """How many host processes of `eval_id`'s local sandboxes are alive here (read only)."""
    ids = {eval_id}
    return (sum(len(g.pids()) for g in cgroups_of(ids, root, claims).get(eval_id, []))
            + len(runtime_pids_of(ids, claims).get(eval_id, [])))


def _kill(pid: int) -> int:
    try:
        os.kill(pid, signal.SIGKILL)
        return 1
    except (ProcessLookupError, PermissionError):
        return 0
