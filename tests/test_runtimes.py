"""Isolation of every local runtime, each an assertion on what the sandbox observed.

The probes are small Python programs run inside a real sandbox (runsc or bwrap); they
report what they saw as protocol `log` events. After each, nothing of the sandbox may be
left: no process, no bundle, no cgroup, no runsc container.
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
from cluster.runtimes.layout import harness_layout

pytestmark = pytest.mark.sandbox

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
    if isinstance(runtime, GvisorRuntime):
        assert not (runtime.bundles / sid).exists()
        listed = subprocess.run([runtime.runsc, "--root", str(runtime.state), "list", "--quiet"],
                                capture_output=True, text=True, check=True).stdout
        assert sid not in listed
    else:
        assert not (runtime.bundles / sid).exists()
    for ctrl in ("memory", "pids", "unified"):
        assert not any(Path("/sys/fs/cgroup", ctrl, "proctor").glob(f"*{sid}")), f"cgroup of {sid} left in {ctrl}"


def test_no_network(runtime: SandboxRuntime, workspace: Path) -> None:
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


def test_secret_outside_binds_is_unreadable(runtime: SandboxRuntime, workspace: Path, tmp_path: Path) -> None:
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


def test_root_filesystem_is_read_only(runtime: SandboxRuntime, workspace: Path) -> None:
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


def test_non_root_without_capabilities(runtime: SandboxRuntime, workspace: Path) -> None:
    seen, _, _ = probe(runtime, workspace, """
        import os
        caps = {l.split(":")[0]: int(l.split()[1], 16) for l in open("/proc/self/status") if l.startswith("Cap")}
        nnp = [l.split()[1] for l in open("/proc/self/status") if l.startswith("NoNewPrivs")]
        report(uid=os.getuid(), euid=os.geteuid(), gid=os.getgid(), caps=caps, nnp=nnp)
    """)
    out = seen[0]
    assert out["uid"] != 0 and out["euid"] != 0 and out["gid"] != 0
    assert out["caps"] and all(v == 0 for v in out["caps"].values()), out["caps"]


def test_fork_bomb_is_stopped_by_pids_limit(runtime: SandboxRuntime, workspace: Path) -> None:
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


def test_host_environment_is_absent(runtime: SandboxRuntime, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "host-secret")
    seen, _, _ = probe(runtime, workspace, """
        import os
        report(env=dict(os.environ))
    """)
    env = seen[0]["env"]
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert "host-secret" not in json.dumps(env)
    assert set(env) <= {"PATH", "HOME", "LANG", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED",
                        "TMPDIR", "PWD"}


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
