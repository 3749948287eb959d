"""Shared fixtures: real sandbox runtimes (gVisor's runsc and bubblewrap)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from cluster.runtimes import BubblewrapRuntime, GvisorRuntime, SandboxRuntime


@pytest.fixture(scope="session")
def sandbox_root() -> Path:
    """A folder the sandbox user can traverse (mkdtemp gives 0700)."""
    root = Path(tempfile.mkdtemp(prefix="proctor-test-"))
    root.chmod(0o711)
    return root


@pytest.fixture(scope="session", params=["gvisor", "bubblewrap"])
def runtime(request: pytest.FixtureRequest, sandbox_root: Path) -> SandboxRuntime:
    """Each local runtime in turn: tests that take it run against both."""
    workdir = sandbox_root / request.param
    if request.param == "gvisor":
        GvisorRuntime.check()
        return GvisorRuntime(workdir)
    BubblewrapRuntime.check()
    return BubblewrapRuntime(workdir)


@pytest.fixture
def workspace(sandbox_root: Path) -> Path:
    ws = Path(tempfile.mkdtemp(prefix="ws-", dir=sandbox_root))
    os.chown(ws, 65534, 65534)
    return ws
