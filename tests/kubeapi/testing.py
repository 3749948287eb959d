"""What the kubernetes runtime's tests share: the double (or the cluster that
`PROCTOR_KUBECONFIG` names), settings for a platform instance of their own, a runtime that
checks after each test that nothing is left, and small probe programs.

The fixtures are plain functions; a test module makes them fixtures by name, e.g.
`runtime = pytest.fixture(testing.runtime)`.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from cluster.runtimes import LaunchRequest, SandboxLimits
from cluster.runtimes.kubeapi import RetryPolicy
from cluster.runtimes.kubernetes import KubernetesRuntime
from cluster.runtimes.layout import harness_layout
from proctor.settings import Settings, load_settings

from . import A100_NODE, CPU_NODES, KubeApiDouble

REAL_CLUSTER = load_settings().kubeconfig  # PROCTOR_KUBECONFIG: run against that cluster instead
FAST = RetryPolicy(attempts=4, first_s=0.01, max_s=0.05)
REPORT = textwrap.dedent("""
    import json as _j
    def report(**kw):
        print(_j.dumps({"v": 1, "seq": report.seq, "type": "log", "message": _j.dumps(kw)}), flush=True)
        report.seq += 1
    report.seq = 0
""")
SLEEPER = REPORT + "import time\nreport(up=True)\ntime.sleep(120)\n"

needs_double = pytest.mark.skipif(REAL_CLUSTER is not None,
                                  reason="needs the API-server double: its faults, nodes or metrics")


def double() -> Any:
    if REAL_CLUSTER is not None:
        yield None
        return
    with KubeApiDouble(nodes=[*CPU_NODES, A100_NODE]) as d:
        yield d


def settings(double: Any, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(home=tmp_path_factory.mktemp("home"), kubeconfig=double.kubeconfig if double else REAL_CLUSTER,
                    kube_instance=f"test-{os.urandom(3).hex()}", kube_pending_timeout_s=1.0)


def runtime(settings: Settings, double: Any) -> Any:
    rt = KubernetesRuntime(settings, retry=FAST)
    yield rt
    left = asyncio.run(rt.api.list("pods", rt.pods.selector))
    rt.close()
    assert not left, f"pods left behind: {[p['metadata']['name'] for p in left]}"
    if double is not None:
        deadline = time.monotonic() + 5
        while double.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert double.processes() == [], "a container process was left running"
        policies = [p["metadata"]["name"] for p in double.objects("networkpolicies")]
        assert policies == ["proctor-deny-all"], policies
        double.faults.rules.clear()


def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


def request(workspace: Path, code: str = SLEEPER, sid: str | None = None, **kw: Any) -> LaunchRequest:
    layout = harness_layout()
    limits = {k: kw.pop(k) for k in list(kw) if k in SandboxLimits.__dataclass_fields__}
    return LaunchRequest(sid or f"kt-{os.urandom(4).hex()}", (layout.python, "-S", "-c", code), workspace,
                         SandboxLimits(**{"timeout_s": 60.0, "memory_bytes": 256 * 1024**2, **limits}),
                         layout.env, layout.ro_binds, **kw)


async def run_to_end(runtime: Any, req: LaunchRequest) -> Any:
    """Launch, read every event, and return how it ended; the sandbox is removed after."""
    sandbox = await runtime.launch(req)
    try:
        async for _ in sandbox.events():
            pass
        return await sandbox.wait()
    finally:
        await sandbox.kill()
        await sandbox.cleanup()


async def first_event(sandbox: Any) -> Any:
    async for event in sandbox.events():
        return event


