"""The embedded platform's local Ray head: started in a session of its own, stopped alone.

`ray start --head` leaves its processes running after it returns (the GCS, the raylet,
the dashboard and its agents, and every worker the raylet starts later), and `ray stop`
stops every Ray cluster on the machine, other users' and tests' included. So `start` runs
`ray start` as the leader of a new session: every process of that cluster stays in it
(workers get process groups of their own, never a session of their own), and `stop` ends
exactly the processes of that session.

The caller keeps the `LocalHead` (`proctor up` writes it to `$PROCTOR_HOME/platform.json`).
It holds what proves, later, that the session is still that cluster's: the machine's boot
id, and Ray's session name, which the cluster's GCS and raylet carry on their command
lines. A record that no longer proves it (a reboot, a cluster already gone) stops nothing.

Sandboxes are not Ray's processes: the runtimes start each in a session of its own.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
KEEP_SESSIONS = 2  # Ray session folders (logs) kept in the temp dir besides the new one
# Ray's longest Unix socket path under its temp folder; the kernel takes 107 bytes at most
SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
MAX_TEMP_DIR = 107 - SOCKET_SUFFIX


class LocalRayError(RuntimeError):
    """The local Ray head could not be started. Caught by `proctor up`, which prints the
    message (Ray's own error, its last lines) and exits 5."""


@dataclass(frozen=True)
class LocalHead:
    """A Ray head that `start` started: its session and what identifies it."""

    session: int  # the session id shared by every process of the cluster
    ray_session: str  # Ray's session name (session_<date>_<pid>), on its daemons' command lines
    boot_id: str
    port: int
    dashboard_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LocalHead | None":
        """The record as `to_dict` wrote it; None for anything else (an older or damaged file)."""
        try:
            return cls(int(data["session"]), str(data["ray_session"]), str(data["boot_id"]), int(data["port"]),
                       int(data["dashboard_port"]))
        except (KeyError, TypeError, ValueError):
            return None


def head_answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether anything accepts connections on the GCS port (a Ray head, ours or not)."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def start(ray: str, port: int, dashboard_port: int, temp_dir: Path, env: Mapping[str, str],
          timeout: float = 180.0) -> LocalHead:
    """`ray start --head` in a new session, with its dashboard on 127.0.0.1:`dashboard_port`.

    Its files (sockets, logs) go to `temp_dir`, not the machine's shared /tmp/ray: Ray's
    job supervisor finds "its" cluster through the newest address file there, which
    would be whichever Ray on the machine started last. The older sessions' folders
    there are removed (the last `KEEP_SESSIONS` stay, for their logs). The ports Ray
    would otherwise fix (the dashboard agent's 52365, the Ray client's 10001) are free
    ones, so that another Ray on the machine keeps its own. Raises `LocalRayError`,
    having stopped whatever the failed start left running, or a `temp_dir` too long for
    Ray's sockets."""
    if len(str(temp_dir)) > MAX_TEMP_DIR:
        raise LocalRayError(f"{temp_dir} is {len(str(temp_dir))} characters: Ray's sockets under it need a folder "
                            f"of at most {MAX_TEMP_DIR}")
    _prune_sessions(temp_dir)
    argv = [ray, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}", "--include-dashboard=true", "--disable-usage-stats",
            f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(env), start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_session(proc.pid, timeout=5.0)
        proc.communicate()
        raise LocalRayError(f"`ray start --head` did not finish in {timeout:.0f} s") from None
    names = [_session_name(pid) for pid in _members(proc.pid)]
    ray_session = next((n for n in names if n), None)
    if proc.returncode != 0 or ray_session is None:
        _stop_session(proc.pid, timeout=5.0)
        why = _last_error(err) or f"it exited with code {proc.returncode}"
        raise LocalRayError(f"could not start Ray on port {port} (dashboard {dashboard_port}): {why}")
    return LocalHead(proc.pid, ray_session, _boot_id(), port, dashboard_port)


def processes(head: LocalHead) -> list[int]:
    """The live processes of `head`'s cluster; [] when its session is not that cluster's
    any more (the machine rebooted, or the cluster is gone)."""
    if head.boot_id != _boot_id():
        return []
    pids = _members(head.session)
    return pids if any(_session_name(p) == head.ray_session for p in pids) else []


def stop(head: LocalHead, timeout: float = 5.0) -> int:
    """Kill every process of `head`'s cluster (SIGKILL, as `ray stop --force` does: its
    state is in Proctor's store, not in Ray) and wait until they are gone, so that its
    ports are free. Returns how many there were (0: nothing of it was running)."""
    return _stop_session(head.session, timeout) if processes(head) else 0


def _stop_session(session: int, timeout: float) -> int:
    """SIGKILL the session's processes until none is left (a raylet may be forking a
    worker meanwhile) or `timeout` has passed. Returns how many were found first."""
    first = left = _members(session)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        _signal(left, signal.SIGKILL)
        time.sleep(0.02)
        left = _members(session)
    return len(first)


def _last_error(stderr: str) -> str:
    """The exception that ended `ray start` (from its last `...Error: ` or `...Exception: `
    line on), without the traceback above it; else its last lines."""
    lines = stderr.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^[\w.]*(?:Error|Exception): ", line)]
    return "\n".join(lines[starts[-1]:] if starts else lines[-4:])[-2000:]


def _prune_sessions(temp_dir: Path) -> None:
    sessions = sorted(p for p in temp_dir.glob("session_2*") if p.is_dir() and not p.is_symlink())
    for old in sessions[:-KEEP_SESSIONS]:
        shutil.rmtree(old, ignore_errors=True)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _members(session: int) -> list[int]:
    """The live (not zombie) processes of `session`."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[3]) == session and fields[0] != b"Z":
            found.append(int(entry.name))
    return found


def _session_name(pid: int) -> str | None:
    """Ray's session name on a daemon's command line (`--session-name=session_...`)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for arg in argv:
        if arg.startswith(b"--session-name=session_"):
            return arg.split(b"=", 1)[1].decode()
    return None


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def address_file_in(temp_dir: str) -> Iterator[None]:
    """While a `ray.cluster_utils.Cluster` is made with `temp_dir` (tests, benchmarks): Ray
    writes its address file under `$RAY_TMPDIR/ray` whatever `temp_dir` says, and fails
    where that folder does not exist (/tmp/ray on a fresh machine). Point it at `temp_dir`,
    so another Ray on this machine never finds this cluster as "the" local one."""
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
