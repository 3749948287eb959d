"""Isolation of every runtime, each an assertion on what the sandbox observed.

The probes are small Python programs run inside a real sandbox (runsc or bwrap, or a pod
of the kubernetes runtime); they report what they saw as protocol `log` events. After
each, nothing of the sandbox may be left: no process, no bundle, no cgroup, no runsc
container, no pod.

The kubernetes runtime runs against the API-server double (tests/kubeapi) unless
`PROCTOR_KUBECONFIG` names a real cluster. The double runs containers as plain local
processes, so the isolation probes run on pods only against a real cluster: with the
double, the pod's hardening is asserted on its manifest (test_kubernetes_podspec.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cluster.runtimes import (
    BubblewrapRuntime,
    GvisorRuntime,
    LaunchRequest,
    RuntimeUnavailable,
    SandboxLimits,
    SandboxRuntime,
    select_runtime,
)
from cluster.runtimes.base import HARNESS_CAPABILITIES
from cluster.runtimes.kubernetes import KubernetesRuntime
from cluster.runtimes.layout import harness_layout
from cluster.runtimes.podspec import pod_name
from kubeapi import KubeApiDouble
from proctor.settings import Settings, load_settings

pytestmark = pytest.mark.sandbox
REAL_CLUSTER = load_settings().kubeconfig  # PROCTOR_KUBECONFIG: a real cluster instead of the double
DOUBLES: dict[int, KubeApiDouble] = {}  # id(runtime) -> the double it talks to


# the API-server double runs a pod's container as a local process: it isolates nothing, so
# the isolation probes run on pods only against a real cluster (PROCTOR_KUBECONFIG); the
# pod's isolation is asserted on its manifest (test_kubernetes_podspec.py). A pod's pids
# limit is the kubelet's podPidsLimit (a node setting), not the request's.
ISOLATING = ["gvisor", "bubblewrap"] + (["kubernetes"] if REAL_CLUSTER else [])
PIDS_LIMITED = ["gvisor", "bubblewrap"]


def _runtime(request: pytest.FixtureRequest, sandbox_root: Path) -> Any:
    if request.param != "kubernetes":
        yield request.getfixturevalue("local_runtime_" + request.param)
        return
    double = KubeApiDouble() if REAL_CLUSTER is None else None
    rt = KubernetesRuntime(Settings(home=sandbox_root, kubeconfig=double.kubeconfig if double else REAL_CLUSTER,
                                    kube_instance=f"conformance-{os.urandom(3).hex()}"))
    if double is not None:
        DOUBLES[id(rt)] = double
    yield rt
    rt.close()
    if double is not None:
        DOUBLES.pop(id(rt))
        double.close()


@pytest.fixture(scope="module", params=["gvisor", "bubblewrap", "kubernetes"])
def runtime(request: pytest.FixtureRequest, sandbox_root: Path) -> Any:
    """Each runtime in turn (the conftest's local ones, and pods)."""
    yield from _runtime(request, sandbox_root)


@pytest.fixture(scope="module", params=ISOLATING)
def isolating_runtime(request: pytest.FixtureRequest, sandbox_root: Path) -> Any:
    """Each runtime whose isolation can be probed here."""
    yield from _runtime(request, sandbox_root)


@pytest.fixture(scope="module", params=PIDS_LIMITED)
def pids_limited_runtime(request: pytest.FixtureRequest, sandbox_root: Path) -> Any:
    yield from _runtime(request, sandbox_root)


@pytest.fixture(scope="module")
def local_runtime_gvisor(sandbox_root: Path) -> SandboxRuntime:
    GvisorRuntime.check()
    return GvisorRuntime(sandbox_root / "gvisor")


@pytest.fixture(scope="module")
def local_runtime_bubblewrap(sandbox_root: Path) -> SandboxRuntime:
    BubblewrapRuntime.check()
    return BubblewrapRuntime(sandbox_root / "bubblewrap")


REPORT = textwrap.dedent(
    """
    import json as _j
    def report(**kw):
        print(_j.dumps({"v": 1, "seq": report.seq, "type": "log", "message": _j.dumps(kw)}), flush=True)
        report.seq += 1
    report.seq = 0
    """
)


def probe(runtime: SandboxRuntime, workspace: Path, code: str, **limits: Any) -> tuple[list[dict], Any, Any]:
    """Run `code` in a sandbox; return what it reported, how it ended, and the sandbox."""
    layout = harness_layout(unprivileged=runtime.isolation == "weak")
    sid = f"probe-{os.urandom(4).hex()}"
    request = LaunchRequest(
        sandbox_id=sid,
        argv=(layout.python, "-S", "-c", REPORT + textwrap.dedent(code)),
        workspace=workspace,
        limits=SandboxLimits(**{"timeout_s": 30.0, **limits}),
        env=layout.env,
        ro_binds=layout.ro_binds,
    )

    async def go() -> tuple[list[dict], Any, Any]:
        sandbox = await runtime.launch(request)
        seen = []
        try:
            async for event in sandbox.events():
                if event.type == "log":
                    seen.append(json.loads(event.message))
            exit_ = await sandbox.wait()
        finally:
            await sandbox.cleanup()
        return seen, exit_, sandbox

    seen, exit_, sandbox = asyncio.run(go())
    assert_nothing_left(runtime, sid)
    return seen, exit_, sandbox


def assert_nothing_left(runtime: SandboxRuntime, sid: str) -> None:
    ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    assert sid not in ps, f"a process of sandbox {sid} is still running"
    if isinstance(runtime, KubernetesRuntime):
        pods = asyncio.run(runtime.api.list("pods", runtime.pods.selector))
        assert pod_name(sid) not in {p["metadata"]["name"] for p in pods}, f"the pod of {sid} is left"
        double = DOUBLES.get(id(runtime))
        assert double is None or double.processes() == [], "a container process of the double is left"
        return
    if isinstance(runtime, GvisorRuntime):
        assert not (runtime.bundles / sid).exists()
        listed = subprocess.run([runtime.runsc, "--root", str(runtime.state), "list", "--quiet"],
                                capture_output=True, text=True, check=True).stdout
        assert sid not in listed
    else:
        assert not (runtime.bundles / sid).exists()
    for ctrl in ("memory", "pids", "unified"):
        assert not any(Path("/sys/fs/cgroup", ctrl, "proctor").glob(f"*{sid}")), f"cgroup of {sid} left in {ctrl}"


def test_no_network(isolating_runtime: SandboxRuntime, workspace: Path) -> None:
    runtime = isolating_runtime
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted: list[Any] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        seen, exit_, _ = probe(runtime, workspace, f"""
            import socket
            out = {{}}
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=3); out["connect"] = "connected"
            except OSError as e:
                out["connect"] = type(e).__name__
            try:
                socket.getaddrinfo("pypi.org", 443); out["dns"] = "resolved"
            except OSError as e:
                out["dns"] = type(e).__name__
            try:
                socket.create_connection(("1.1.1.1", 53), timeout=3); out["internet"] = "connected"
            except OSError as e:
                out["internet"] = type(e).__name__
            report(**out)
        """)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert seen[0]["connect"] != "connected"
    assert seen[0]["dns"] == "gaierror"
    assert seen[0]["internet"] != "connected"
    assert accepted == [], "the host's listener received a connection from the sandbox"


def test_secret_outside_binds_is_unreadable(isolating_runtime: SandboxRuntime, workspace: Path, tmp_path: Path) -> None:
    runtime = isolating_runtime
    secret = tmp_path / "credentials"
    secret.write_text("AKIA-SECRET")
    secret.chmod(0o644)
    tmp_path.chmod(0o755)
    seen, _, _ = probe(runtime, workspace, f"""
        out = {{}}
        for p in [{str(secret)!r}, "/root/.bashrc", "/etc/shadow", "/home", {os.getcwd() + "/pyproject.toml"!r}]:
            try:
                open(p).read(); out[p] = "read"
            except OSError as e:
                out[p] = type(e).__name__
        report(**out)
    """)
    assert all(v != "read" for v in seen[0].values()), seen[0]


def test_root_filesystem_is_read_only(isolating_runtime: SandboxRuntime, workspace: Path) -> None:
    runtime = isolating_runtime
    seen, _, _ = probe(runtime, workspace, """
        out = {}
        for p in ["/x", "/usr/x", "/etc/x", "/opt/proctor/lib/x", "/workspace/ok"]:
            try:
                open(p, "w").write("x"); out[p] = "wrote"
            except OSError as e:
                out[p] = type(e).__name__
        root = [l.split() for l in open("/proc/self/mounts") if l.split()[1] == "/"]
        out["root_options"] = root[-1][3]
        report(**out)
    """)
    out = seen[0]
    assert out.pop("/workspace/ok") == "wrote"
    assert "ro" in out.pop("root_options").split(",")
    assert all(v != "wrote" for v in out.values()), out
    assert (workspace / "ok").read_text() == "x"


CAP_BITS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7}


def test_the_agent_is_non_root_without_capabilities(isolating_runtime: SandboxRuntime, workspace: Path) -> None:
    """The sandbox's own process (the harness) is either a non-root user with no
    capabilities, or, where the runtime runs it as the sandbox's root, holds only the
    capabilities it needs to act as the agent; a command run as the agent has none."""
    runtime = isolating_runtime
    seen, _, _ = probe(runtime, workspace, """
        import json, os, subprocess, sys
        STATUS = "import json, os; print(json.dumps({'uid': os.getuid(), 'euid': os.geteuid(), 'gid': os.getgid(), "\\
                 "'caps': {l.split(':')[0]: int(l.split()[1], 16) for l in open('/proc/self/status') if l.startswith('Cap')}, "\\
                 "'nnp': [l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs')]}))"
        report(harness=json.loads(subprocess.run([sys.executable, "-S", "-c", STATUS], capture_output=True,
                                                 text=True).stdout))
        if os.geteuid() == 0:
            out = subprocess.run([sys.executable, "-S", "-c", STATUS], capture_output=True, text=True,
                                 user=65534, group=65534, extra_groups=[])
            report(agent=json.loads(out.stdout))
    """)
    harness = seen[0]["harness"]
    assert harness["nnp"] in (["1"], [])  # (this gVisor's /proc does not show it)
    if not runtime.harness_root:
        assert harness["uid"] != 0 and harness["euid"] != 0 and harness["gid"] != 0
        assert harness["caps"] and all(v == 0 for v in harness["caps"].values()), harness["caps"]
        return
    assert harness["uid"] == 0
    allowed = sum(1 << CAP_BITS[c] for c in HARNESS_CAPABILITIES)
    assert harness["caps"]["CapEff"] == harness["caps"]["CapBnd"] == allowed, harness["caps"]
    agent = seen[1]["agent"]
    assert agent["uid"] == agent["euid"] == agent["gid"] == 65534
    # the inheritable set is the runtime's; inert under no_new_privs (the harness empties it too)
    assert agent["caps"] and all(v == 0 for k, v in agent["caps"].items() if k not in ("CapBnd", "CapInh")), agent["caps"]
    assert agent["nnp"] in (["1"], [])


def test_fork_bomb_is_stopped_by_pids_limit(pids_limited_runtime: SandboxRuntime, workspace: Path) -> None:
    runtime = pids_limited_runtime
    seen, exit_, _ = probe(runtime, workspace, """
        import os, time
        forked, error = 0, None
        try:
            while forked < 5000:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                forked += 1
        except OSError as e:
            error = e.errno
        report(forked=forked, error=error)
    """, pids=32, timeout_s=20)
    assert seen[0]["error"] == 11  # EAGAIN
    assert seen[0]["forked"] < 32


def test_memory_hog_is_killed_at_its_limit(runtime: SandboxRuntime, workspace: Path) -> None:
    seen, exit_, _ = probe(runtime, workspace, """
        hog = []
        report(started=True)
        while True:
            hog.append(bytearray(8 * 1024 * 1024))
            if len(hog) % 8 == 0:
                report(mib=len(hog) * 8)
    """, memory_bytes=160 * 1024**2)
    assert exit_.reason == "oom", exit_
    assert max(s.get("mib", 0) for s in seen) <= 160


def test_sleeper_is_killed_at_its_deadline(runtime: SandboxRuntime, workspace: Path) -> None:
    started = time.monotonic()
    seen, exit_, _ = probe(runtime, workspace, """
        import time
        report(sleeping=True)
        time.sleep(120)
        report(woke=True)
    """, timeout_s=2)
    assert exit_.reason == "deadline"
    assert seen == [{"sleeping": True}]
    assert time.monotonic() - started < 15


def test_stdout_flood_is_cut_at_the_cap(runtime: SandboxRuntime, workspace: Path) -> None:
    seen, exit_, sandbox = probe(runtime, workspace, """
        import sys
        line = ("x" * 1023 + "\\n").encode()
        report(flooding=True)
        for _ in range(200_000):
            sys.stdout.buffer.write(line)
    """, output_cap_bytes=256 * 1024)
    assert exit_.reason == "output_cap"
    assert sandbox._output <= 256 * 1024 + 2 * sandbox.read_chunk
    assert sandbox.parser.rejected > 0  # the flood's lines are not protocol


def test_a_flood_read_slowly_still_ends_at_the_cap(runtime: SandboxRuntime, workspace: Path) -> None:
    # the reader falls behind (its buffer fills and reading pauses) before the cap is hit:
    # wait() must still return, and nothing may be left
    layout = harness_layout(unprivileged=runtime.isolation == "weak")
    code = REPORT + textwrap.dedent("""
        import sys
        report(flooding=True)
        line = ("x" * 1023 + "\\n").encode()
        for _ in range(200_000):
            sys.stdout.buffer.write(line)
    """)
    request = LaunchRequest(f"slow-{os.urandom(3).hex()}", (layout.python, "-S", "-c", code), workspace,
                            SandboxLimits(timeout_s=60, output_cap_bytes=1024 * 1024), layout.env, layout.ro_binds)

    async def go() -> Any:
        sandbox = await runtime.launch(request)
        try:
            async for _event in sandbox.events():
                await asyncio.sleep(1.0)  # the sandbox writes far more than the reader buffers meanwhile
            return await asyncio.wait_for(sandbox.wait(), 30)
        finally:
            await sandbox.cleanup()

    exit_ = asyncio.run(go())
    assert exit_.reason == "output_cap"
    assert_nothing_left(runtime, request.sandbox_id)


def test_host_environment_is_absent(runtime: SandboxRuntime, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "host-secret")
    seen, _, _ = probe(runtime, workspace, """
        import os
        report(env=dict(os.environ))
    """)
    env = seen[0]["env"]
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert "host-secret" not in json.dumps(env)
    allowed = {"PATH", "HOME", "LANG", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "TMPDIR", "PWD"}
    if isinstance(runtime, KubernetesRuntime):  # what the kubelet and the entrypoint add; no service links
        allowed |= {"HOSTNAME", "PROCTOR_WORKSPACE", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT",
                    "KUBERNETES_SERVICE_PORT_HTTPS", "KUBERNETES_PORT", "KUBERNETES_PORT_443_TCP",
                    "KUBERNETES_PORT_443_TCP_ADDR", "KUBERNETES_PORT_443_TCP_PORT", "KUBERNETES_PORT_443_TCP_PROTO"}
    assert set(env) <= allowed, set(env) - allowed


def test_kill_stops_a_running_sandbox_at_once(runtime: SandboxRuntime, workspace: Path) -> None:
    layout = harness_layout(unprivileged=runtime.isolation == "weak")
    code = REPORT + "import time\nreport(up=True)\ntime.sleep(60)\n"
    request = LaunchRequest(f"kill-{os.urandom(3).hex()}", (layout.python, "-S", "-c", code), workspace,
                            SandboxLimits(timeout_s=60), layout.env, layout.ro_binds)

    async def go() -> tuple[float, Any]:
        sandbox = await runtime.launch(request)
        async for event in sandbox.events():
            t0 = time.monotonic()
            await sandbox.kill("killed", "test")
            break
        exit_ = await sandbox.wait()
        took = time.monotonic() - t0
        await sandbox.cleanup()
        return took, exit_

    took, exit_ = asyncio.run(go())
    assert exit_.reason == "killed"
    assert took < 5.0  # at once, not at the 60 s deadline; the kill latency is measured in benchmarks/
    assert_nothing_left(runtime, request.sandbox_id)


def test_auto_refuses_without_any_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RuntimeUnavailable) as info:
        select_runtime("auto", tmp_path)
    message = str(info.value)
    assert "refuses" in message and "apt-get install runsc" in message and "apt-get install bubblewrap" in message


def test_auto_prefers_gvisor(tmp_path: Path) -> None:
    assert isinstance(select_runtime("auto", tmp_path), GvisorRuntime)
    assert isinstance(select_runtime("bubblewrap", tmp_path), BubblewrapRuntime)
    assert select_runtime("bubblewrap", tmp_path).isolation == "weak"
