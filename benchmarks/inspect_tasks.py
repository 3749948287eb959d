"""An Inspect task through Proctor against Inspect's own `inspect eval --sandbox local`.

The same task (examples/inspect/bash_task.py@square: N samples, a bash tool call each,
scripted with mockllm) measured two ways in the same run:

  proctor  — submitted to a control plane on a local Ray instance (`--cpus`, default this
             machine's), sharded (`--shard-size` samples a shard), each shard's Inspect
             loop in a worker outside the sandbox, its bash calls in Proctor (gVisor)
             sandboxes, rows to Parquet and the logs merged; from submit to the end of
             `ControlPlane.wait`. With `--nodes 2` the Ray cluster is two simulated nodes
             on this machine (`ray.cluster_utils.Cluster`), `--cpus` split between them.
  baseline — `inspect eval ... --sandbox local --max-samples K` in one process, K the
             concurrency Proctor had (shards at once × the worker's samples at once),
             bash run directly on this host (no sandbox at all).

Prints samples/s for both and the ratio proctor/baseline.

    .venv/bin/python benchmarks/inspect_tasks.py [--samples 50] [--shard-size 10] [--cpus N] [--nodes 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from eval_actors import control_plane
from eval_actors.inspect_shard import MAX_SAMPLES
from proctor.inspect_spec import task_spec
from proctor.settings import Settings

TASK = Path(__file__).resolve().parent.parent / "examples" / "inspect" / "bash_task.py"


def run_proctor(args: argparse.Namespace, home: Path) -> tuple[float, int]:
    settings = Settings(home=home, results_uri=(home / "results").as_uri(), state_url=f"sqlite:///{home}/state.db",
                        ray_namespace="proctor-bench", supervisors=2, runtime="gvisor")
    cluster = None
    if args.nodes > 1:
        from ray.cluster_utils import Cluster

        per = max(1, args.cpus // args.nodes)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": per})
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=per)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=settings.ray_namespace, logging_level="ERROR",
                 log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=args.cpus, namespace=settings.ray_namespace, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
    try:
        plane = control_plane.start(settings)
        doc = task_spec(f"{TASK}@square", "mockllm/model", args={"samples": args.samples}, name="bench-inspect")
        doc.update(shard_size=args.shard_size, sandbox={"runtime": "gvisor", "cpus": 1, "memory": "512Mi",
                                                        "timeout_s": 1800})
        started = time.monotonic()
        eval_id = plane.submit(doc)
        ev = plane.wait(eval_id, timeout=3600)
        took = time.monotonic() - started
        if ev.status != "succeeded":
            sys.exit(f"the Proctor run ended {ev.status}: {ev.error}")
        return took, int(ev.summary["samples"])
    finally:
        control_plane.stop(settings)
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def run_baseline(args: argparse.Namespace, home: Path, concurrency: int) -> float:
    inspect = Path(sys.executable).parent / "inspect"
    started = time.monotonic()
    subprocess.run([str(inspect), "eval", f"{TASK}@square", "--model", "mockllm/model", "-T",
                    f"samples={args.samples}", "--sandbox", "local", "--max-samples", str(concurrency),
                    "--log-dir", str(home / "baseline-logs"), "--display", "none"],
                   check=True, env={**os.environ, "HOME": str(home)})
    return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--shard-size", type=int, default=10)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--nodes", type=int, default=1)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="proctor-bench-"))
    home.chmod(0o711)  # the sandbox user must reach its workspace
    try:
        took, rows = run_proctor(args, home / "proctor")
        shards_at_once = min(args.cpus, -(-args.samples // args.shard_size))
        concurrency = shards_at_once * min(MAX_SAMPLES, args.shard_size)
        base = run_baseline(args, home, concurrency)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    p, b = rows / took, args.samples / base
    print(f"{args.samples} samples of bash_task.py@square (mockllm, one bash call each), {args.nodes} Ray node(s), "
          f"{args.cpus} CPUs, shards of {args.shard_size}; baseline concurrency {concurrency}")
    print(f"  proctor (gVisor, sharded): {took:7.2f} s  {p:6.2f} samples/s  ({rows} rows)")
    print(f"  inspect --sandbox local:   {base:7.2f} s  {b:6.2f} samples/s")
    print(f"  ratio proctor/baseline: {p / b:.2f}")


if __name__ == "__main__":
    main()
