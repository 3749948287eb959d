"""What a dead owner leaves, and why a sandbox ended: decided by the host, never the sandbox.

A runtime's owner (a supervisor) can die with sandboxes running; the next owner of its
folder reaps them (`SandboxRuntime.reap`): no process, cgroup, bundle or runsc container
is left, on the v1 and the v2 cgroup layouts. A sandbox's exit is called an OOM kill only
when the kernel counted one in its cgroup, whatever it printed or exited with.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster.runtimes import LOCAL_RUNTIMES, SandboxRuntime, select_runtime
from cluster.runtimes.base import ProcessSandbox, SandboxStats
from cluster.runtimes.cgroups import PARENT, CgroupSet
from ports import free_port
from test_runtimes import assert_nothing_left, probe

pytestmark = pytest.mark.sandbox
REPO = Path(__file__).resolve().parent.parent

OWNER = textwrap.dedent("""
    import asyncio, os, sys
    from pathlib import Path
    from cluster.runtimes import LaunchRequest, SandboxLimits, select_runtime
    from cluster.runtimes.layout import harness_layout

    SLEEPER = "import time\\nprint('{\\"v\\": 1, \\"seq\\": 0, \\"type\\": \\"log\\", \\"message\\": \\"up\\"}', flush=True)\\ntime.sleep(600)"

    async def main(name, folder, marker):
        runtime = select_runtime(name, Path(folder))
        layout = harness_layout(unprivileged=runtime.isolation == "weak")
        kept = []
        for i in range(2):
            ws = Path(folder) / f"ws-{marker}-{i}"
            ws.mkdir()
            os.chown(ws, 65534, 65534)
            sandbox = await runtime.launch(LaunchRequest(
                f"{marker}-{i}", (layout.python, "-S", "-c", SLEEPER), ws,
                SandboxLimits(timeout_s=600), env=layout.env, ro_binds=layout.ro_binds))
            async for _event in sandbox.events():
                break  # it runs
            kept.append(sandbox)
        print("ready", flush=True)
        await asyncio.sleep(600)

    asyncio.run(main(*sys.argv[1:]))
""")


def _v2_root() -> Path:
    """A cgroup v2 mount: the root on a unified host, `unified/` on a hybrid one."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, mount, kind, *_ = line.split()
        if kind == "cgroup2":
            return Path(mount)
    raise AssertionError("this host mounts no cgroup v2 hierarchy")


@pytest.mark.parametrize("name", list(LOCAL_RUNTIMES))
def test_a_dead_owners_sandboxes_are_reaped_by_the_next(name: str, sandbox_root: Path) -> None:
    folder = sandbox_root / f"reap-{name}-{os.urandom(3).hex()}"
    marker = f"reap{os.urandom(4).hex()}"
    _left_by_a_dead_owner(name, folder, marker)
    runtime = select_runtime(name, folder)
    assert len(CgroupSet.owned(runtime.owner)) == 2  # left behind (bwrap's processes may die with their parent)
    reaped = runtime.reap()
    assert reaped == [f"{marker}-0", f"{marker}-1"]
    for sid in reaped:
        assert_nothing_left(runtime, sid)
    assert CgroupSet.owned(runtime.owner) == []
    assert runtime.reap() == []


def _left_by_a_dead_owner(name: str, folder: Path, marker: str) -> None:
    """Two running sandboxes of runtime `name` in `folder`, whose owner is dead."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, name, str(folder), marker], cwd=REPO,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
    finally:
        owner.send_signal(signal.SIGKILL)  # the owner dies; nobody cleans up
        owner.wait()
        owner.stdout.close()


@pytest.mark.parametrize("name", list(LOCAL_RUNTIMES))
def test_proctor_down_reaps_what_the_supervisors_left_and_nothing_else(name: str, sandbox_root: Path) -> None:
    """`proctor down` (serve_app.platform.down) once Ray is gone: the sandboxes in each
    supervisor's folder are killed; those of another owner (a `proctor run`) are not."""
    from proctor.settings import Settings
    from serve_app.platform import down

    home = sandbox_root / f"down-{name}-{os.urandom(3).hex()}"
    settings = Settings(home=home, ray_port=free_port())  # no Ray answers there: only the reaping is left
    marker, other = f"dn{os.urandom(4).hex()}", f"ot{os.urandom(4).hex()}"
    _left_by_a_dead_owner(name, settings.sandbox_dir / "proctor-supervisor-0" / name, marker)
    _left_by_a_dead_owner(name, settings.sandbox_dir / "local" / name, other)
    supervisors = select_runtime(name, settings.sandbox_dir / "proctor-supervisor-0" / name)
    bystander = select_runtime(name, settings.sandbox_dir / "local" / name)
    try:
        assert down(settings) == ["sandboxes"]
        for sid in (f"{marker}-0", f"{marker}-1"):
            assert_nothing_left(supervisors, sid)
        assert len(CgroupSet.owned(bystander.owner)) == 2  # not a supervisor's: left to its owner
        assert down(settings) == []  # nothing left to reap
    finally:
        bystander.reap()


@pytest.mark.parametrize("name", list(LOCAL_RUNTIMES))
def test_reaping_finds_sandboxes_on_the_v2_layout(name: str, sandbox_root: Path) -> None:
    root = _v2_root()
    runtime = LOCAL_RUNTIMES[name](sandbox_root / f"reap-v2-{name}", cgroup_root=root)  # type: ignore[call-arg]
    group = root / PARENT / runtime.cgroup_name("v2-left")
    group.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        (group / "cgroup.procs").write_text(str(sleeper.pid))  # as the runtime's sandbox would be
        assert runtime.reap() == ["v2-left"]
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        assert not group.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
        if group.exists():
            group.rmdir()


def test_a_sandbox_that_says_oom_was_not_oom_killed(runtime: SandboxRuntime, workspace: Path) -> None:
    """Its own words and its exit code are the sandbox's to choose: only the kernel's count
    in its cgroup makes an exit an OOM kill (which would become a memory violation)."""
    seen, exit_, _ = probe(runtime, workspace, """
        import os, sys
        report(started=True)
        sys.stderr.write("Out of memory: Killed process 1 (python); oom-kill; room; zoom\\n")
        sys.stderr.flush()
        os._exit(137)
    """)
    assert seen == [{"started": True}]
    assert exit_.reason == "exited" and exit_.exit_code == 137, exit_
    assert "oom-kill" in exit_.stderr_tail


class _LingeringStderr(ProcessSandbox):
    """A host process that exits while a child of it keeps stderr open (a test double of
    a sandbox whose stderr reader outlives its main process)."""

    runtime = "lingering"
    isolation = "weak"

    def host_argv(self) -> list[str]:
        return ["sh", "-c", "sleep 30 >&2 & exit 0"]

    async def force_kill(self) -> None:
        pass

    async def stats(self) -> SandboxStats:
        return SandboxStats()


def test_a_cancelled_wait_raises_while_it_waits_for_stderr(workspace: Path) -> None:
    from cluster.runtimes import LaunchRequest

    async def go() -> None:
        sandbox = _LingeringStderr(LaunchRequest("lingering", ("true",), workspace))
        await sandbox.start()
        assert sandbox.proc is not None
        try:
            waiting = asyncio.create_task(sandbox.wait())
            started = time.monotonic()
            await asyncio.sleep(0.5)  # its main process has ended; wait() waits for stderr
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert time.monotonic() - started < 4  # not after the stderr reader's 5 s
        finally:
            os.killpg(sandbox.proc.pid, signal.SIGKILL)
            await sandbox.cleanup()
            await sandbox.proc.communicate()  # the pipes to their end: their transports close

    asyncio.run(go())
