"""Sandbox runtimes behind one interface, and the choice among them.

`select_runtime("auto", ...)` takes gvisor, else bubblewrap, else refuses with
`RuntimeUnavailable`: Proctor never runs a shard unsandboxed.
"""

from __future__ import annotations

from pathlib import Path

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


def select_runtime(name: str, workdir: Path, runsc_platform: str = "ptrace") -> SandboxRuntime:
    """The runtime called `name` ('auto' picks the strongest available). Raises
    `RuntimeUnavailable` with install instructions when none can run here."""
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
        raise RuntimeUnavailable("kubernetes: the pod runtime runs only inside a cluster deployed from kuberay/")
    cls = LOCAL_RUNTIMES.get(name)
    if cls is None:
        raise RuntimeUnavailable(f"{name!r} is not a runtime; known: auto, {', '.join(LOCAL_RUNTIMES)}, kubernetes")
    cls.check()
    if cls is GvisorRuntime:
        return GvisorRuntime(workdir, platform=runsc_platform)
    return cls(workdir)  # type: ignore[call-arg]
