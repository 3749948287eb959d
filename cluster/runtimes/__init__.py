"""Sandbox runtimes behind one interface, and the choice among them.

`select_runtime("auto", ...)` takes gvisor, else bubblewrap, else refuses with
`RuntimeUnavailable`: Proctor never runs a shard unsandboxed. `kubernetes` (pods in a
cluster) is only ever chosen by name, never by `auto`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .base import (
    LaunchRequest,
    LocalRuntime,
    RuntimeUnavailable,
    Sandbox,
    SandboxError,
    SandboxExit,
    SandboxLimits,
    SandboxRuntime,
    SandboxStats,
)
from .bubblewrap import BubblewrapRuntime
from .gvisor import GvisorRuntime

if TYPE_CHECKING:
    from proctor.settings import Settings

LOCAL_RUNTIMES: dict[str, type[LocalRuntime]] = {"gvisor": GvisorRuntime, "bubblewrap": BubblewrapRuntime}

__all__ = [
    "LaunchRequest", "LocalRuntime", "RuntimeUnavailable", "Sandbox", "SandboxError", "SandboxExit", "SandboxLimits",
    "SandboxRuntime", "SandboxStats", "BubblewrapRuntime", "GvisorRuntime", "select_runtime", "LOCAL_RUNTIMES",
    "reap_owner",
]


def select_runtime(name: str, workdir: Path, runsc_platform: str = "ptrace", settings: Settings | None = None) -> SandboxRuntime:
    """The runtime called `name` ('auto' picks the strongest local one). `settings` (a
    `proctor.settings.Settings`; read from the environment if not given) configures the
    kubernetes runtime. Raises `RuntimeUnavailable` saying how to install or configure one."""
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "auto":
        reasons = []
        for candidate in ("gvisor", "bubblewrap"):
            try:
                return select_runtime(candidate, workdir, runsc_platform)
            except RuntimeUnavailable as exc:
                reasons.append(str(exc))
        raise RuntimeUnavailable(
            "no sandbox runtime can run here, so Proctor refuses to run evaluations:\n  "
            + "\n  ".join(reasons)
        )
    if name == "kubernetes":
        from proctor.settings import load_settings

        from .kubernetes import KubernetesRuntime

        settings = settings or load_settings()
        KubernetesRuntime.check(settings.kubeconfig)
        return KubernetesRuntime(settings)
    cls = LOCAL_RUNTIMES.get(name)
    if cls is None:
        raise RuntimeUnavailable(f"{name!r} is not a runtime; known: auto, {', '.join(LOCAL_RUNTIMES)}, kubernetes")
    cls.check()
    if cls is GvisorRuntime:
        return GvisorRuntime(workdir, platform=runsc_platform)
    return cls(workdir)


def reap_owner(workdir: Path, runsc_platform: str = "ptrace") -> int:
    """Kill and remove every sandbox that an owner of `workdir` (a supervisor, gone or
    stopped) left there, and the workspaces: each local runtime that can run here reaps
    each runtime folder in it (named for the runtime that used it: `gvisor`, `bubblewrap`,
    `auto`, ...). Returns how many sandboxes were killed. Blocking; for the supervisor's
    next life, and for `proctor down` once the supervisors are gone."""
    killed = 0
    folders = [d for d in workdir.iterdir() if d.is_dir()] if workdir.is_dir() else []
    for folder in folders:
        for name, cls in LOCAL_RUNTIMES.items():
            try:
                cls.check()
            except RuntimeUnavailable:
                continue
            killed += len(select_runtime(name, folder, runsc_platform).reap())
        for ws in folder.glob("ws-*"):
            shutil.rmtree(ws, ignore_errors=True)
    return killed
