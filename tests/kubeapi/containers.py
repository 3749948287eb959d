"""How the double's kubelet turns a pod's container into a local command.

Two kinds of container:
- an image the double's registry does not hold (the harness image of a pod on the host's
  Python): its `command + args` run as a LOCAL, unisolated process, `python` mapped to
  this machine's Python and each emptyDir's mount path mapped to its folder (in the
  command, the environment and the working folder);
- an image the registry holds (`Kubelet.images`: reference → an unpacked root
  filesystem, e.g. an image of Proctor's store, or a folder holding the harness bundle):
  it runs for real in that root, through bubblewrap — the root read-only, each emptyDir
  bound at its mount path (read-only where the mount says so), `/proc` and `/dev` of its
  own, no network, as the pod's `runAsUser`/`runAsGroup` (a user namespace) — so the
  image's own programs, and nothing of the host's, are what the container sees.

An image registered as `HOST_USERLAND` (the harness image, for the tests of pods whose
harness serves paths of the pod's own, such as /workspace) runs through bubblewrap too,
its root the host's own folders read-only (but /tmp, /run, /proc, /dev, /sys and the
home folders, except this Python's own) with the pod's emptyDirs at their mount paths:
`python` is this machine's Python, and PYTHONPATH the tests' own.

Init containers are either kind too; the kubelet runs them one after another, each to
its end, before the pod's container (`run_init_containers`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

INIT_TIMEOUT_S = 120.0
HOST_USERLAND = Path("/")  # an image of the registry: the host's own folders (see above)
NOT_SHARED = {"proc", "dev", "sys", "tmp", "run", "root", "home", "old_root", "lost+found", "mnt", "media", "boot"}


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]
    cwd: str


def command_of(pod: dict[str, Any], c: dict[str, Any], volumes: Path, images: dict[str, Path]) -> Command:
    """The local command of container `c` of `pod`, its emptyDirs being folders under `volumes`."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"]}
    argv = [*(c.get("command") or []), *(c.get("args") or [])]
    rootfs = images.get(c.get("image") or "")
    if rootfs == HOST_USERLAND:
        env.update({e["name"]: e.get("value", "") for e in c.get("env") or []})
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        if argv and argv[0] == "python":
            argv[0] = sys.executable
        return Command(_bwrap(pod, c, rootfs, volumes) + ["--", *argv], env, "/")
    if rootfs is not None:
        env.update({e["name"]: e.get("value", "") for e in c.get("env") or []})
        return Command(_bwrap(pod, c, rootfs, volumes) + ["--", *argv], env, "/")
    mounts = {m["mountPath"]: str(volumes / m["name"]) for m in c.get("volumeMounts") or []}

    def mapped(text: str) -> str:
        for inside, outside in mounts.items():
            if text == inside or text.startswith(inside + "/"):
                return outside + text[len(inside):]
        return text

    argv = [mapped(a) for a in argv]
    if argv and argv[0] == "python":
        argv[0] = sys.executable
    env.update({e["name"]: mapped(e.get("value", "")) for e in c.get("env") or []})
    return Command(argv, env, mapped(c.get("workingDir") or "/"))


def _bwrap(pod: dict[str, Any], c: dict[str, Any], rootfs: Path, volumes: Path) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RuntimeError("the double runs a pod in an image through bubblewrap: install bwrap")
    context = {**(pod["spec"].get("securityContext") or {}), **(c.get("securityContext") or {})}
    # no --die-with-parent: its parent-death signal follows the THREAD that started bwrap, and
    # the kubelet starts a pod's container from the thread that ran its init containers, which
    # then ends; the kubelet kills the container's process group itself
    argv = [bwrap, "--unshare-all", "--unshare-user"]
    if rootfs == HOST_USERLAND:
        for entry in sorted(Path("/").iterdir()):
            if entry.is_symlink():
                argv += ["--symlink", os.readlink(entry), str(entry)]
            elif entry.is_dir() and entry.name not in NOT_SHARED:
                argv += ["--ro-bind", str(entry), str(entry)]
        for python in sorted({sys.base_prefix, sys.prefix}):  # this Python, wherever it lives (a pyenv in /root)
            if Path(python).parts[1] in NOT_SHARED:
                argv += ["--ro-bind", python, python]
    else:
        argv += ["--ro-bind", str(rootfs), "/"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--hostname", pod["spec"].get("hostname") or pod["metadata"]["name"]]
    for m in c.get("volumeMounts") or []:
        argv += ["--ro-bind" if m.get("readOnly") else "--bind", str(volumes / m["name"]), m["mountPath"]]
    argv += ["--uid", str(context.get("runAsUser", 0)), "--gid", str(context.get("runAsGroup", 0)),
             "--chdir", c.get("workingDir") or "/"]
    return argv


def terminated(code: int, tail: str = "") -> dict[str, Any]:
    from .store import now_iso

    return {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                           "message": tail[-2000:], "startedAt": now_iso(), "finishedAt": now_iso()}}


def run_init_containers(pod: dict[str, Any], volumes: Path, images: dict[str, Path], attach: Callable[[], None],
                        report: Callable[[list[dict[str, Any]]], bool], gone: Callable[[], bool]) -> bool:
    """Run `pod`'s init containers in order, each to its end; True if all exited 0.
    `report(statuses)` publishes the initContainerStatuses (False: the pod is gone); an
    init container still running when `gone()` says so is killed. `attach` is the cgroup's."""
    inits = pod["spec"].get("initContainers") or []
    statuses = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False, "restartCount": 0,
                 "state": {"waiting": {"reason": "PodInitializing"}}} for c in inits]
    for i, c in enumerate(inits):
        command = command_of(pod, c, volumes, images)
        statuses[i]["state"] = {"running": {}}
        if not report(statuses):
            return False
        proc = subprocess.Popen(command.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=command.env, cwd=command.cwd, start_new_session=True,
                                preexec_fn=attach)
        give_up = time.monotonic() + INIT_TIMEOUT_S
        while proc.poll() is None:
            if gone() or time.monotonic() > give_up:
                proc.kill()
            time.sleep(0.05)
        tail = proc.stderr.read().decode(errors="replace") if proc.stderr is not None else ""
        if proc.stderr is not None:
            proc.stderr.close()
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        statuses[i].update(state=terminated(code, tail), ready=code == 0)
        if not report(statuses) or code != 0:
            return False
    return True
