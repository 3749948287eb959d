"""End-to-end throughput of the control plane against launching the same sandboxes directly.

N one-sample evaluations (reference model, one `exact` scorer, sandbox runtime `gvisor`,
1 CPU, 256Mi), measured two ways in the same run, on the same local Ray instance
(`ray.init(address="local", num_cpus=--cpus)`, default: this machine's CPU count):

  control plane — every evaluation through `ControlPlane.submit` (spec validation, state
                  store, scheduler (no placement group: CPU-only), supervisor, aggregator Parquet
                  parts and summary), then `ControlPlane.wait` for each; from the first
                  submit to the last wait's return. Its concurrency is what Ray's CPUs
                  admit: one shard per CPU.
  direct        — the same one-sample `ShardWork` run N times by `ShardExecutor` with a
                  `GvisorRuntime` (the supervisors' executor and runtime, trusted
                  rescoring included), under an `asyncio.Semaphore` of the same
                  concurrency (Ray's CPU count); no state store, no results written.

Both sides are warmed up first (one sandbox each way). With --repeats > 1 the two are
measured alternately and the medians are reported. Prints evaluations/s for both and
the ratio control_plane/direct (goal >= 0.8).

With --tracing the two sides are instead the control plane with tracing off (the
baseline) and a second control plane on the same Ray instance with tracing on, exporting
every span over OTLP/HTTP to a real receiver in this process (tests/otlpreceiver.py);
alternated, medians; prints both rates and the overhead of tracing (goal < 3%).

    .venv/bin/python benchmarks/control_plane_throughput.py [--evals 40] [--repeats 1]
        [--cpus N] [--supervisors 2] [--platform ptrace] [--tracing]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from cluster.datasets import load_samples
from cluster.runtimes import GvisorRuntime
from eval_actors import control_plane
from eval_actors.gateway import OpenAIGateway
from eval_actors.local_run import rescore_outside
from eval_actors.shard_executor import ShardExecutor, ShardWork
from proctor.settings import Settings
from proctor.spec import parse_spec
from procstat import children, cpu_seconds


def spec_doc(i: int) -> dict[str, Any]:
    return {
        "name": f"bench-throughput-{i}",
        "model": {"adapter": "reference"},
        "dataset": {"samples": [{"id": "s0", "input": "What is 6 * 7?", "target": "42"}]},
        "scorers": [{"type": "exact"}],
        "sandbox": {"runtime": "gvisor", "cpus": 1, "memory": "256Mi", "timeout_s": 120},
    }


async def run_direct(n: int, concurrency: int, settings: Settings, runtime: GvisorRuntime,
                     sandbox_dir: Path, tag: str) -> tuple[float, list[str]]:
    """N one-sample shards through the shard executor, `concurrency` at a time."""
    spec = parse_spec(spec_doc(0))
    samples = tuple(load_samples(spec.dataset, settings))
    gateway = OpenAIGateway(secret=settings.secret)
    executor = ShardExecutor(runtime, gateway, sandbox_dir, rescore=rescore_outside)
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        work = ShardWork(f"direct-{tag}-{i}", "00000", spec, samples, (1,))
        async with limit:
            outcome = await executor.run(work)
        return outcome.status if outcome.status == "succeeded" else f"{outcome.status}: {outcome.error}"

    try:
        t0 = time.perf_counter()
        statuses = await asyncio.gather(*(one(i) for i in range(n)))
        took = time.perf_counter() - t0
    finally:
        await gateway.aclose()
    return took, list(statuses)


PHASES = ("queued -> scheduled", "scheduled -> running", "running -> shard ended", "shard ended -> finalized")


def run_control_plane(plane: control_plane.ControlPlane, n: int,
                      tag: str) -> tuple[float, float, list[str], dict[str, float]]:
    """N evaluations submitted, then waited for: (wall time, store makespan, statuses,
    median seconds of each phase of an evaluation, from the state store's timestamps)."""
    t0 = time.perf_counter()
    wall0 = time.time()
    ids = [plane.submit(spec_doc(i), owner="bench") for i in range(n)]
    finals = [plane.wait(i, timeout=600) for i in ids]
    took = time.perf_counter() - t0
    makespan = max(ev.finished_at.timestamp() for ev in finals) - wall0
    statuses = [ev.status if ev.status == "succeeded" else f"{ev.status}: {ev.error}" for ev in finals]
    store = plane.store()
    steps: dict[str, list[float]] = {p: [] for p in PHASES}
    for ev in finals:
        shard = store.shards(ev.id)[0]
        marks = [ev.created_at, ev.scheduled_at, shard.started_at, shard.finished_at, ev.finished_at]
        if all(marks):
            for p, a, b in zip(PHASES, marks, marks[1:]):
                steps[p].append((b - a).total_seconds())
    store.close()
    return took, makespan, statuses, {p: statistics.median(v) for p, v in steps.items() if v}


def ray_cpu() -> dict[str, float]:
    """CPU seconds so far of this Ray instance's own processes, by kind: the GCS, the raylet,
    the processes the raylet started (the control plane's actors, task workers, agents; not
    the sandboxes under them), and this driver. Processes that ended are not counted."""
    node = ray._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    under = children(raylet)
    return {"gcs": cpu_seconds(node.all_processes["gcs_server"][0].process.pid), "raylet": cpu_seconds(raylet),
            "actors+workers": sum(cpu_seconds(p) for p in under), "driver": cpu_seconds(os.getpid())}


def check(statuses: list[str], what: str) -> None:
    bad = [s for s in statuses if s != "succeeded"]
    if bad:
        raise SystemExit(f"{what}: {len(bad)} of {len(statuses)} did not succeed, e.g. {bad[0]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evals", type=int, default=40, help="one-sample evaluations per measurement")
    ap.add_argument("--repeats", type=int, default=1, help="alternate measurements of each side")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs declared to Ray")
    ap.add_argument("--supervisors", type=int, default=2)
    ap.add_argument("--platform", default="ptrace", help="runsc platform of both sides")
    ap.add_argument("--tracing", action="store_true", help="measure tracing on against off instead")
    args = ap.parse_args()
    GvisorRuntime.check()
    if args.tracing:
        return main_tracing(args)

    home = Path(tempfile.mkdtemp(prefix="proctor-bench-"))
    home.chmod(0o711)  # the sandbox user must reach its workspace
    settings = Settings(home=home, results_uri=(home / "results").as_uri(), state_url=f"sqlite:///{home}/state.db",
                        ray_namespace="proctor-bench", supervisors=args.supervisors, runsc_platform=args.platform)
    ray.init(address="local", num_cpus=args.cpus, namespace=settings.ray_namespace, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    direct_dir = home / "direct"
    runtime = GvisorRuntime(direct_dir / "gvisor", platform=args.platform)
    direct_times: list[float] = []
    cp_times: list[float] = []
    cp_makespans: list[float] = []
    phases: list[dict[str, float]] = []
    cpu_cp: list[dict[str, float]] = []
    cpu_direct: list[dict[str, float]] = []
    try:
        plane = control_plane.start(settings)
        concurrency = int(ray.cluster_resources()["CPU"])  # 1-CPU shards: the plane admits this many
        # warm-up: runsc, the harness's files in the page cache, the actors' imports and workers
        check(asyncio.run(run_direct(1, 1, settings, runtime, direct_dir / "sandboxes", "warm"))[1], "direct warm-up")
        check(run_control_plane(plane, 2, "warm")[2], "control-plane warm-up")
        for r in range(args.repeats):
            before = ray_cpu()
            took, statuses = asyncio.run(run_direct(args.evals, concurrency, settings, runtime,
                                                    direct_dir / "sandboxes", str(r)))
            after = ray_cpu()
            cpu_direct.append({k: after[k] - before[k] for k in after})
            check(statuses, "direct")
            direct_times.append(took)
            before = ray_cpu()
            took, makespan, statuses, steps = run_control_plane(plane, args.evals, str(r))
            after = ray_cpu()
            cpu_cp.append({k: after[k] - before[k] for k in after})
            check(statuses, "control plane")
            cp_times.append(took)
            cp_makespans.append(makespan)
            phases.append(steps)
    finally:
        control_plane.stop(settings)
        ray.shutdown()
        shutil.rmtree(home, ignore_errors=True)

    d, c, m = statistics.median(direct_times), statistics.median(cp_times), statistics.median(cp_makespans)
    n = args.evals
    print(f"{n} one-sample evaluations (reference model, exact scorer, gvisor {args.platform}, 1 CPU, 256Mi), "
          f"concurrency {concurrency} (Ray's CPUs), {os.cpu_count()} host CPUs, "
          f"{args.supervisors} supervisors, {args.repeats} repeat(s), medians")
    print(f"direct         ShardExecutor + GvisorRuntime, semaphore {concurrency}:  "
          f"{d:7.2f} s  {n / d:6.2f} evaluations/s")
    print(f"control plane  submit + wait (store, scheduler, supervisors, Parquet):  "
          f"{c:7.2f} s  {n / c:6.2f} evaluations/s   (store makespan {m:.2f} s: {n / m:.2f}/s)")
    print(f"ratio control_plane/direct: {(n / c) / (n / d):.2f}  (goal >= 0.8)")
    n_ = args.evals * len(cpu_cp)
    print("CPU seconds per evaluation of Ray's and the control plane's own processes (sandboxes not counted): "
          "control plane " + ", ".join(f"{k} {sum(c[k] for c in cpu_cp) / n_:.3f}" for k in cpu_cp[0])
          + f" = {sum(sum(c.values()) for c in cpu_cp) / n_:.3f};  while the direct side ran (idle plane): "
          + f"{sum(sum(c.values()) for c in cpu_direct) / n_:.3f}")
    print("control plane, median per evaluation (state store timestamps): " + ", ".join(
        f"{p} {statistics.median(s[p] for s in phases if p in s):.3f} s" for p in PHASES))
    if args.repeats > 1:
        print("each run (s): direct " + " ".join(f"{t:.2f}" for t in direct_times)
              + " | control plane " + " ".join(f"{t:.2f}" for t in cp_times))


def main_tracing(args: argparse.Namespace) -> None:
    """The control plane with tracing off against the same with tracing on, alternated."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from otlpreceiver import OtlpReceiver

    receiver = OtlpReceiver()
    home = Path(tempfile.mkdtemp(prefix="proctor-bench-"))
    home.chmod(0o711)
    sides = {}
    for side, extra in (("off", {}), ("on", {"otel_endpoint": receiver.http_url})):
        (home / side).mkdir(mode=0o711)
        sides[side] = Settings(home=home / side, results_uri=(home / side / "results").as_uri(),
                               state_url=f"sqlite:///{home / side}/state.db", ray_namespace=f"proctor-bench-{side}",
                               supervisors=args.supervisors, runsc_platform=args.platform, **extra)
    ray.init(address="local", num_cpus=args.cpus, namespace="proctor-bench", include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    times: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    try:
        planes = {side: control_plane.start(s) for side, s in sides.items()}
        for side, plane in planes.items():  # warm-up: the actors' imports, workers, runsc's files
            check(run_control_plane(plane, 2, f"warm-{side}")[2], f"tracing {side} warm-up")
        for r in range(args.repeats):
            for side in (("off", "on") if r % 2 == 0 else ("on", "off")):
                before = ray_cpu()
                took, _, statuses, _ = run_control_plane(planes[side], args.evals, f"{side}{r}")
                after = ray_cpu()
                check(statuses, f"tracing {side}")
                times[side].append(took)
                cpu[side].append({k: after[k] - before[k] for k in after})
        time.sleep(3)  # the last spans leave their processes' batches
    finally:
        for s in sides.values():
            control_plane.stop(s)
        ray.shutdown()
        receiver.close()
        shutil.rmtree(home, ignore_errors=True)
    traced = {s.trace_id for s in receiver.spans if s.name == "evaluation"}
    n, runs = args.evals, args.repeats
    if len(traced) < n * runs:
        raise SystemExit(f"only {len(traced)} of {n * runs + 2} traced evaluations reached the receiver")
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"{n} one-sample evaluations per run (reference model, gvisor {args.platform}), {runs} run(s) of each "
          f"side alternated, {os.cpu_count()} host CPUs, {args.supervisors} supervisors, medians")
    print(f"tracing off  {off:7.2f} s  {n / off:6.2f} evaluations/s")
    print(f"tracing on   {on:7.2f} s  {n / on:6.2f} evaluations/s   ({len(receiver.spans) / len(traced):.1f} spans "
          f"per evaluation exported over OTLP/HTTP, {len(traced)} traces)")
    print(f"overhead of tracing: {(on - off) / off * 100:+.1f}% wall time  (goal < 3%)")
    kinds = [k for k in cpu["off"][0] if k != "driver"]  # the driver also runs the receiver (the collector's work)
    c_off, c_on = (statistics.median(sum(c[k] for k in kinds) for c in cpu[side]) / n for side in ("off", "on"))
    print(f"CPU seconds per evaluation of Ray's and the control plane's processes ({', '.join(kinds)}; not the "
          f"sandboxes, not the receiver): off {c_off:.3f}, on {c_on:.3f} ({(c_on - c_off) / c_off * 100:+.1f}%)")
    for k in cpu["off"][0]:
        print(f"  {k}: off {statistics.median(c[k] for c in cpu['off']) / n:.4f}, "
              f"on {statistics.median(c[k] for c in cpu['on']) / n:.4f}")
    print("each run (s): off " + " ".join(f"{t:.2f}" for t in times["off"])
          + " | on " + " ".join(f"{t:.2f}" for t in times["on"]))


if __name__ == "__main__":
    main()
