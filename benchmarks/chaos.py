"""Chaos: evaluations while their results store goes away, and what comes back.

A control plane on a local Ray instance writes results to a moto S3 server on 127.0.0.1
through a real TCP fault proxy (tests/faultproxy.py), as in the tests; shards run in the
**simulated sandbox runtime (a test double)**, so that the figures are the store's and
the control plane's, not gVisor's. Per round, N evaluations (S samples x E epochs each)
are submitted and the proxy refuses connections (and resets open ones) for D seconds,
starting right after the submissions; then the store is back. Rounds: a warm-up (not
reported), the baseline (no outage), then D = 10 and 60 s (and 300 s with --long).

Figures per round: evaluations succeeded of N; rows lost (samples x epochs expected less
rows found through `ResultsStore.read`, must be 0) and rows doubled (on the store, read by
a plain Parquet reader, after compaction; must be 0); wall time from the first submission
to the last evaluation's end, against the baseline's; time from the store's return to
all rows written (the outbox empty and every evaluation ended); the outbox's largest size
on disk while the store was away.

    .venv/bin/python benchmarks/chaos.py [--evals 6] [--samples 20] [--epochs 2] [--long] [--budget 1800]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.parquet as pq
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from faultproxy import FaultProxy  # noqa: E402
from s3server import MotoS3Server  # noqa: E402

from cluster.outbox import Outbox  # noqa: E402
from cluster.results import ResultsStore  # noqa: E402
from cluster.runtimes.simulated import SimulateRemoteRuntimes  # noqa: E402
from cluster.storage import filesystem  # noqa: E402
from eval_actors import control_plane  # noqa: E402
from eval_actors.control_plane import ControlPlane  # noqa: E402
from proctor.settings import Settings  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled", "safety_stopped")


def spec(name: str, samples: int, epochs: int, sim_seconds: float) -> dict[str, Any]:
    return {
        "name": name, "model": {"adapter": "reference"}, "scorers": [{"type": "exact"}],
        "dataset": {"samples": [{"id": f"s{i}", "input": "q", "target": "a", "metadata": {"sim_seconds": sim_seconds}}
                                for i in range(samples)]},
        "epochs": epochs, "shard_size": 4, "sandbox": {"runtime": "kubernetes", "cpus": 0.5, "memory": "128Mi"},
    }


def run_round(plane: ControlPlane, settings: Settings, proxy: FaultProxy, args: argparse.Namespace,
              outage_s: float) -> dict[str, Any]:
    box = Outbox.from_settings(settings)
    store = plane.store()
    peak = [0]
    returned: list[float] = []
    started = time.monotonic()
    ids = [plane.submit(spec(f"chaos-{outage_s:g}-{i}", args.samples, args.epochs, args.sim_seconds))
           for i in range(args.evals)]
    if outage_s:
        proxy.set_mode("refuse")

        def back() -> None:
            deadline = started + outage_s
            while time.monotonic() < deadline:
                peak[0] = max(peak[0], box.size_bytes())
                time.sleep(0.25)
            proxy.set_mode("pass")
            returned.append(time.monotonic())

        timer = threading.Thread(target=back, daemon=True)
        timer.start()
    while True:
        evs = [store.get_evaluation(i) for i in ids]
        if all(ev is not None and ev.status in TERMINAL for ev in evs) and not box.entries():
            break
        time.sleep(0.2)
    ended = time.monotonic()
    if outage_s:
        timer.join()
    results = ResultsStore(settings.results, settings)
    expected = args.samples * args.epochs
    lost = doubled = 0
    for ev in evs:
        table = results.read(ev.id)
        lost += expected - table.num_rows
        fs, path = filesystem(results.eval_uri(ev.id), settings)
        doubled += pq.read_table(path, filesystem=fs).num_rows - table.num_rows
    return {
        "outage_s": outage_s, "succeeded": sum(ev.status == "succeeded" for ev in evs), "evals": len(evs),
        "rows_lost": lost, "rows_doubled": doubled, "wall_s": round(ended - started, 2),
        "written_after_return_s": round(ended - returned[0], 2) if returned else None,
        "spill_peak_bytes": peak[0], "errors": sorted({ev.error for ev in evs if ev.error})[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evals", type=int, default=6)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sim-seconds", type=float, default=0.05)
    parser.add_argument("--long", action="store_true", help="also a 300 s outage")
    parser.add_argument("--budget", type=float, default=1800.0, help="store_outage_budget_s")
    args = parser.parse_args()
    outages = [0.0, 10.0, 60.0] + ([300.0] if args.long else [])

    home = Path(tempfile.mkdtemp(prefix="proctor-bench-chaos-"))
    s3 = MotoS3Server(home=home / "s3")
    (home / "s3").mkdir()
    proxy: FaultProxy | None = None
    try:
        s3.start()
        target = urlparse(s3.endpoint)
        proxy = FaultProxy((target.hostname or "127.0.0.1", target.port or 80)).start()
        settings = s3.settings(f"chaos-{uuid.uuid4().hex[:8]}", s3_endpoint_url=proxy.endpoint, home=home,
                               state_url=f"sqlite:///{home}/state.db", ray_namespace="proctor-bench-chaos",
                               supervisors=1, store_outage_budget_s=args.budget)
        ray.init(address="local", num_cpus=8, namespace=settings.ray_namespace, logging_level="ERROR",
                 log_to_driver=False, include_dashboard=False)
        print("SIMULATED sandboxes (a TEST DOUBLE); the store: moto S3 behind a TCP fault proxy (refuse + reset)")
        print(f"N={args.evals} evaluations x {args.samples} samples x {args.epochs} epochs; "
              f"store_retry_s={settings.store_retry_s:g}, store_outage_budget_s={args.budget:g}", flush=True)
        plane = control_plane.start(settings, runtime_factory=SimulateRemoteRuntimes())
        run_round(plane, settings, proxy, args, 0.0)  # warm-up (worker processes start), not reported
        rounds = []
        for outage in outages:
            result = run_round(plane, settings, proxy, args, outage)
            rounds.append(result)
            base = rounds[0]["wall_s"] or 1.0
            print(f"outage {outage:>5g} s: {result['succeeded']}/{result['evals']} succeeded, "
                  f"rows lost {result['rows_lost']}, doubled {result['rows_doubled']}, wall {result['wall_s']} s "
                  f"({result['wall_s'] / base:.2f}x baseline), "
                  + (f"all written {result['written_after_return_s']} s after the store returned, " if outage else "")
                  + f"spill peak {result['spill_peak_bytes'] / 1024:.0f} KiB"
                  + (f"; errors: {result['errors']}" if result["errors"] else ""), flush=True)
    finally:
        if proxy is not None:
            proxy.stop()
        if ray.is_initialized():
            control_plane.stop(settings)
            ray.shutdown()
        s3.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
