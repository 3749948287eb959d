"""The gvisor runtime's shared root skeleton: made once, mounted read-only by every sandbox
(`GvisorRuntime.skeleton`), so nothing one sandbox does to it reaches the next."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest

from cluster.runtimes import GvisorRuntime, LaunchRequest, SandboxLimits
from cluster.runtimes.layout import ETC_PASSWD, harness_layout

pytestmark = pytest.mark.sandbox

# runs as the sandbox's root (the harness's user, with its capabilities): tries to change the root
TAMPER = """
import json, os
out = {}
for name, act in [("write /etc/passwd", lambda: open("/etc/passwd", "a").write("evil::0:0::/:/bin/sh\\n")),
                  ("create /etc/x", lambda: open("/etc/x", "w").write("x")),
                  ("mkdir /y", lambda: os.mkdir("/y")),
                  ("chmod /etc", lambda: os.chmod("/etc", 0o777)),
                  ("rename /etc/group", lambda: os.rename("/etc/group", "/etc/g")),
                  ("remove /bin", lambda: os.unlink("/bin"))]:
    try:
        act(); out[name] = "done"
    except OSError as e:
        out[name] = type(e).__name__
print(json.dumps({"v": 2, "seq": 0, "type": "log", "level": "info", "message": json.dumps(out)}), flush=True)
"""


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under `root`: its mode and what it holds (a file's digest, a link's target)."""
    found = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        held = os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        found[str(p.relative_to(root))] = (st.st_mode, held)
    return found


def _tamper(runtime: GvisorRuntime, workspace: Path, sid: str) -> dict[str, str]:
    layout = harness_layout()
    request = LaunchRequest(sid, (layout.python, "-S", "-c", TAMPER), workspace, SandboxLimits(timeout_s=30.0),
                            layout.env, layout.ro_binds)

    async def go() -> dict[str, str]:
        sandbox = await runtime.launch(request)
        try:
            seen = [json.loads(e.message) async for e in sandbox.events() if e.type == "log"]
            await sandbox.wait()
        finally:
            await sandbox.cleanup()
        assert seen, "the probe reported nothing"
        return seen[0]

    return asyncio.run(go())


def test_the_shared_skeleton_is_made_once_and_no_sandbox_changes_it(sandbox_root: Path, workspace: Path) -> None:
    GvisorRuntime.check()
    runtime = GvisorRuntime(sandbox_root / "gvisor-skeleton")
    first = _tamper(runtime, workspace, f"skel-{os.urandom(3).hex()}")
    assert set(first.values()) <= {"OSError", "PermissionError", "FileNotFoundError"} and "done" not in first.values(), first
    skeletons = [p for p in runtime.skeletons.iterdir()]
    assert len(skeletons) == 1, skeletons
    root = skeletons[0]
    assert (root / "etc" / "passwd").read_text() == ETC_PASSWD
    before = _snapshot(root)
    assert "usr" in before and "workspace" in before and before["bin"][1] == "usr/bin"
    second = _tamper(runtime, workspace, f"skel-{os.urandom(3).hex()}")
    assert "done" not in second.values(), second
    assert list(runtime.skeletons.iterdir()) == [root]  # reused, not made again
    assert _snapshot(root) == before
    assert root.stat().st_uid == 0 and not root.stat().st_mode & 0o022  # only the host's root may change it
    assert not list(runtime.bundles.iterdir())  # each sandbox's own bundle is gone
