"""The `proctor` Inspect sandbox provider against Inspect's own `local` provider.

Measured in the same run, interleaved request by request:
  exec     — `exec(["true"])` round trip, p50 and p99 (proctor: a request over the
             sandbox's channel to the harness in gVisor and back; local: a subprocess);
  read     — `read_file` of a 1 MiB file (binary), p50 and p99;
  starts   — sandboxes started per second by `sample_init`, samples of 2 services (their
             private network included) against samples of 1, each sample cleaned up after.
Prints the figures and the ratios proctor / local (and 2-service / 1-service).

    .venv/bin/python benchmarks/inspect_provider.py [--runtime gvisor] [--requests 200] [--samples 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from inspect_ai.util._sandbox.local import LocalSandboxEnvironment

from proctor.compose import ProctorConfig, ServiceConfig
from eval_actors.inspect_sandbox.provider import ProctorSandboxEnvironment as Proctor

MIB = b"\x5a" * (1024 * 1024)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(call: Any) -> float:
    t0 = time.perf_counter()
    await call
    return time.perf_counter() - t0


async def requests(proctor: Any, local: Any, n: int) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {"exec": {"proctor": [], "local": []},
                                                 "read": {"proctor": [], "local": []}}
    for env in (proctor, local):
        await env.write_file("mib.bin", MIB)
        await env.exec(["true"])  # warm
    for _ in range(n):
        for name, env in (("proctor", proctor), ("local", local)):
            times["exec"][name].append(await timed(env.exec(["true"])))
            times["read"][name].append(await timed(env.read_file("mib.bin", text=False)))
    return times


async def starts(config: ProctorConfig, samples: int) -> float:
    """Sandboxes started per second by sample_init (cleanup not counted)."""
    spent = 0.0
    for _ in range(samples):
        t0 = time.perf_counter()
        envs = await Proctor.sample_init("bench", config, {})
        spent += time.perf_counter() - t0
        await Proctor.sample_cleanup("bench", config, envs, False)
    return samples * len(config.services) / spent


async def main(runtime: str, n: int, samples: int, home: Path) -> None:
    one = ProctorConfig(runtime=runtime, home=str(home))  # type: ignore[arg-type]
    two = one.model_copy(update={"services": {"default": ServiceConfig(), "target": ServiceConfig()}})
    envs = await Proctor.sample_init("bench", one, {})
    local_envs = await LocalSandboxEnvironment.sample_init("bench", None, {})
    try:
        times = await requests(envs["default"], local_envs["default"], n)
    finally:
        await Proctor.sample_cleanup("bench", one, envs, False)
        await LocalSandboxEnvironment.sample_cleanup("bench", None, local_envs, False)
    print(f"runtime {runtime}, {n} requests of each kind, interleaved")
    for kind, label in (("exec", "exec true"), ("read", "read_file 1 MiB")):
        p = {name: (statistics.median(v), percentile(v, 0.99)) for name, v in times[kind].items()}
        print(f"{label:16} proctor p50 {p['proctor'][0] * 1e3:7.2f} ms p99 {p['proctor'][1] * 1e3:7.2f} ms | "
              f"local p50 {p['local'][0] * 1e3:7.2f} ms p99 {p['local'][1] * 1e3:7.2f} ms | "
              f"ratio p50 {p['proctor'][0] / p['local'][0]:5.1f}x p99 {p['proctor'][1] / p['local'][1]:5.1f}x")
    single, double = await starts(one, samples), await starts(two, samples)
    print(f"sample_init      1 service: {single:5.2f} sandboxes/s | 2 services: {double:5.2f} sandboxes/s | "
          f"ratio {double / single:4.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="gvisor", choices=["gvisor", "bubblewrap"])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--samples", type=int, default=6)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="proctor-bench-inspect-"))
    scratch.chmod(0o711)
    try:
        asyncio.run(main(args.runtime, args.requests, args.samples, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.sync()
