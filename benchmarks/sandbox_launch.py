"""Sandbox launch overhead: Proctor's gvisor runtime against a bare `runsc run`.

Measured in the same run, interleaved:
  proctor  — from `GvisorRuntime.launch()` (bundle generation included) to the harness's
             first protocol event (`harness ready`);
  pooled   — from `SandboxPool.take()` of a warm sandbox (cluster/pool.py) to the harness's
             first event in answer to its shard (a `run` shard message goes in after the
             take; the harness's first line after it comes out): what a shard waits for
             when the pool has its class warm (each taken 1 s after it was ready, as pooled
             sandboxes wait between shards);
  baseline — a bare `runsc run` of `/bin/true` from a minimal bundle prepared beforehand,
             from process start to exit.
Prints the medians and each ratio to the baseline. Goal: ratio <= 1.3 (pooled: <= 1.3).

    .venv/bin/python benchmarks/sandbox_launch.py [--runs 20] [--platform ptrace] [--runsc PATH]

`--runsc` runs both sides with another runsc (e.g. a newer one extracted beside the system's).
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

from cluster.pool import SandboxPool
from cluster.runtimes import GvisorRuntime, LaunchRequest, SandboxLimits
from cluster.runtimes.layout import harness_layout
from eval_actors.shard_setup import shard_message
from eval_actors.shard_work import ShardWork
from proctor.protocol import encode
from proctor.spec import parse_spec


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


SETTLE_S = 1.0  # a pooled sandbox waits at least this long before it is taken (its harness done importing)


async def run_pooled(pool: SandboxPool, template: LaunchRequest, message: bytes) -> float:
    """Take a warm sandbox, send it a shard, and time until the harness's first event after it."""
    while not pool.ready(template):
        await asyncio.sleep(0.05)
    await asyncio.sleep(SETTLE_S)
    t0 = time.perf_counter()
    sandbox = pool.take(template)
    assert sandbox is not None
    try:
        events = sandbox.events()
        await events.__anext__()  # `harness ready`, read while it waited
        await sandbox.send(message)
        await events.__anext__()
        took = time.perf_counter() - t0
        await events.aclose()
    finally:
        await sandbox.kill()
        await sandbox.wait()
        await sandbox.cleanup()
    return took


async def run_pooled_series(runtime: GvisorRuntime, folder: Path, runs: int) -> list[float]:
    """`runs` pooled launches, each from a pool that has had time to refill (as between shards)."""
    layout = harness_layout()
    template = LaunchRequest("template", layout.argv("--sandboxed"), Path("/"), SandboxLimits(timeout_s=60),
                             layout.env, layout.ro_binds)
    spec = parse_spec({"name": "bench", "model": {"adapter": "reference"}, "scorers": [{"type": "exact"}],
                       "dataset": {"samples": [{"id": "a", "input": "2+2?", "target": "4"}]}})
    message = encode(shard_message(ShardWork("bench", "s0", spec, tuple(spec.dataset.samples or ()))))
    pool = SandboxPool(runtime, folder, owner="bench", size=1)
    pool.set_demand([(template, 1, None)])
    times = []
    try:
        await run_pooled(pool, template, message)  # warm caches
        for _ in range(runs):
            times.append(await run_pooled(pool, template, message))
    finally:
        await pool.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--platform", default="ptrace")
    ap.add_argument("--runsc", default=None, help="the runsc to run (default: the one on PATH)")
    args = ap.parse_args()
    GvisorRuntime.check()
    root = Path(tempfile.mkdtemp(prefix="proctor-bench-"))
    root.chmod(0o711)
    runtime = GvisorRuntime(root / "rt", platform=args.platform, runsc=args.runsc)
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
        pooled = asyncio.run(run_pooled_series(runtime, root / "rt", args.runs))
        bare_after = [run_bare(runtime.runsc, state, bundle, args.platform, 1000 + i) for i in range(args.runs)]
        bare += bare_after  # the baseline beside the pooled runs too
    finally:
        shutil.rmtree(root, ignore_errors=True)
    b, o, p = statistics.median(bare), statistics.median(ours), statistics.median(pooled)
    version = subprocess.run([runtime.runsc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"runs: {args.runs} each, platform {args.platform}, {version}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, what, times in (("baseline", "bare runsc run /bin/true (start to exit):", bare),
                              ("proctor", "gvisor launch to harness's first event:", ours),
                              ("pooled", "take from pool to first event of the shard:", pooled)):
        print(f"{name:9} {what:46} median {statistics.median(times) * 1000:7.1f} ms  "
              f"min {min(times) * 1000:7.1f} ms  p90 {statistics.quantiles(times, n=10)[-1] * 1000:7.1f} ms")
    print(f"ratio proctor/baseline: {o / b:.2f} of medians, {min(ours) / min(bare):.2f} of minimums  (goal <= 1.3)")
    print(f"ratio pooled/baseline:  {p / b:.2f} of medians, {min(pooled) / min(bare):.2f} of minimums  (goal <= 1.3)")


if __name__ == "__main__":
    main()
