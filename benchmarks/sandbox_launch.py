"""Sandbox launch overhead: Proctor's gvisor runtime against a bare `runsc run`.

Measured in the same run, interleaved:
  proctor  — from `GvisorRuntime.launch()` (bundle generation included) to the harness's
             first protocol event (`harness ready`);
  baseline — a bare `runsc run` of `/bin/true` from a minimal bundle prepared beforehand,
             from process start to exit.
Prints both medians and their ratio. Goal: ratio <= 1.3.

    .venv/bin/python benchmarks/sandbox_launch.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from cluster.runtimes import GvisorRuntime, LaunchRequest, SandboxLimits
from cluster.runtimes.layout import harness_layout


def bare_bundle(root: Path) -> Path:
    bundle = root / "bare"
    (bundle / "rootfs" / "usr").mkdir(parents=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        (bundle / "rootfs" / link).symlink_to(target)
    config = {
        "ociVersion": "1.0.2",
        "process": {"user": {"uid": 65534, "gid": 65534}, "args": ["/bin/true"], "env": ["PATH=/usr/bin"], "cwd": "/"},
        "root": {"path": "rootfs", "readonly": True},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
    }
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def run_bare(runsc: str, state: Path, bundle: Path, platform: str, i: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([runsc, "--root", str(state), f"--platform={platform}", "--network=none",
                    "run", "--bundle", str(bundle), f"bare-{i}"], check=True, capture_output=True)
    return time.perf_counter() - t0


async def run_proctor(runtime: GvisorRuntime, workspace: Path, i: int) -> float:
    layout = harness_layout()
    request = LaunchRequest(f"bench-{i}", layout.argv(), workspace, SandboxLimits(timeout_s=60),
                            layout.env, layout.ro_binds)
    t0 = time.perf_counter()
    sandbox = await runtime.launch(request)
    try:
        async for _event in sandbox.events():
            took = time.perf_counter() - t0
            break
        else:
            raise RuntimeError(f"no event from the harness: {(await sandbox.wait()).stderr_tail}")
    finally:
        await sandbox.kill()
        await sandbox.wait()
        await sandbox.cleanup()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--platform", default="ptrace")
    args = ap.parse_args()
    GvisorRuntime.check()
    root = Path(tempfile.mkdtemp(prefix="proctor-bench-"))
    root.chmod(0o711)
    runtime = GvisorRuntime(root / "rt", platform=args.platform)
    bundle = bare_bundle(root)
    state = root / "bare-state"
    state.mkdir()
    workspace = root / "ws"
    workspace.mkdir()
    os.chown(workspace, 65534, 65534)
    bare, ours = [], []
    try:
        run_bare(runtime.runsc, state, bundle, args.platform, -1)  # warm caches
        asyncio.run(run_proctor(runtime, workspace, -1))
        for i in range(args.runs):
            bare.append(run_bare(runtime.runsc, state, bundle, args.platform, i))
            ours.append(asyncio.run(run_proctor(runtime, workspace, i)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"runs: {args.runs} each, platform {args.platform}, {os.cpu_count()} CPUs")
    print(f"baseline  bare runsc run /bin/true (start to exit):      median {b * 1000:7.1f} ms  "
          f"p90 {statistics.quantiles(bare, n=10)[-1] * 1000:7.1f} ms")
    print(f"proctor   gvisor launch to harness's first event:        median {o * 1000:7.1f} ms  "
          f"p90 {statistics.quantiles(ours, n=10)[-1] * 1000:7.1f} ms")
    print(f"ratio proctor/baseline: {o / b:.2f}  (goal <= 1.3)")


if __name__ == "__main__":
    main()
