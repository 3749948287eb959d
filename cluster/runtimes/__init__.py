"""Sandbox runtimes behind one interface, and the choice among them.

`select_runtime("auto", ...)` takes gvisor, else bubblewrap, else refuses with
`RuntimeUnavailable`: Proctor never runs a shard unsandboxed. `kubernetes` (pods in a
cluster) is only ever chosen by name, never by `auto`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import (
    LaunchRequest,
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

LOCAL_RUNTIMES: dict[str, type[SandboxRuntime]] = {"gvisor": GvisorRuntime, "bubblewrap": BubblewrapRuntime}

__all__ = [
    "LaunchRequest", "RuntimeUnavailable", "Sandbox", "SandboxError", "SandboxExit", "SandboxLimits",
    "SandboxRuntime", "SandboxStats", "BubblewrapRuntime", "GvisorRuntime", "select_runtime", "LOCAL_RUNTIMES",
]


def select_runtime(name: str, workdir: Path, runsc_platform: str = "ptrace", settings: Any = None) -> SandboxRuntime:
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
    return cls(workdir)  # type: ignore[call-arg]
