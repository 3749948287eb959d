"""Control-plane scale: K evaluations held running at once, with the SIMULATED sandbox runtime.

The sandboxes are a TEST DOUBLE (`cluster.runtimes.simulated`): no process per sandbox,
only the runner protocol spoken inside the supervisor, so that 10,000 of them fit on a
small machine. Everything else is the real control plane: the scheduler (spec
validation, SQLite state store, capacity accounting (CPU-only shards: no Ray placement
group)), the supervisors, the
aggregator (Parquet parts, compaction, summary) and the event bus, on a local Ray
cluster (`ray.cluster_utils.Cluster`, --nodes raylets on this machine) whose declared
CPUs and memory let all K shards fit at once: each shard asks 0.001 CPU and 64Mi, each
node declares `ceil(K / nodes * 0.001) + 1` CPUs and `K / nodes * 64Mi + 1Gi` of memory.

Each evaluation has one sample whose simulated run takes --sim-seconds (default 60, or
120 above 2,000 evaluations; it must outlast the ramp, so that all K run at the same
time), then they all end and are finalised.

Measured in the same run:
  submit rate      K submissions from --submitters threads, each sending batches of
                   --batch `Scheduler.submit` calls and `ray.get`-ing each batch;
  all running      the time from the first submission until the state store counts all
                   K shards `running` (polled every 0.5 s), and how long all K ran;
  memory           resident memory (VmRSS from /proc) of the control plane's actor
                   processes (scheduler, aggregator, event bus, supervisors; the simulated
                   sandboxes live inside the supervisors) before submitting, when all K
                   ran, and at peak (sampled every second, the drain included); the GCS,
                   the raylets and the other processes under the raylets (Ray's agents,
                   placement-group readiness and Parquet-writing task workers) apart;
  CPU              the CPU seconds each process used until all K ran (from /proc): what
                   the ramp waited for;
  event latency    in a second driver process, apart from the busy submitting one (whose
                   GIL would add to every figure): p50/p99/max of (a) every `progress`
                   event the supervisors publish, from the bus appending it (its `ts`) to a
                   subscriber's `read` returning it; (b) probe `progress` events published
                   20 times a second with `ts` = the moment of the `publish` call, from that
                   call to the subscriber reading it (the bus actor's inbound queue
                   included); beside (c) the baseline: an idle bus's publish + read round
                   trip, measured before submitting;
  drain            when all K evaluations were finalised (Parquet compacted, summary
                   written), waited for at most --drain-timeout after the simulated time.

Goal: K = 10,000 held at once with the control plane's actors under 4 GB.

    .venv/bin/python benchmarks/control_plane_scale.py [--evals 10000] [--sim-seconds S]
        [--nodes 1] [--submitters 4] [--batch 100] [--owners 10] [--supervisors 2]
        [--ramp-timeout S] [--drain-timeout 600]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray

from cluster.runtimes.simulated import SimulateRemoteRuntimes
from eval_actors import control_plane
from eval_actors.control_plane import AGGREGATOR, BUS, SCHEDULER, supervisor_names
from proctor.settings import Settings
from procstat import children, cpu_seconds

SHARD_CPUS = 0.001
SHARD_MEMORY = 64 * 1024**2
PROBE_EVERY_S = 0.05
STALL_S = 90.0


def spec_doc(i: int, sim_seconds: float) -> dict[str, Any]:
    return {
        "name": f"scale-{i}",
        "model": {"adapter": "reference"},
        "dataset": {"samples": [{"id": "s0", "input": "q", "target": "a", "metadata": {"sim_seconds": sim_seconds}}]},
        "scorers": [{"type": "exact"}],
        # "kubernetes" runs in the simulated double here (SimulateRemoteRuntimes)
        "sandbox": {"runtime": "kubernetes", "cpus": SHARD_CPUS, "memory": "64Mi",
                    "timeout_s": sim_seconds * 4 + 600},
    }


def rss(pid: int) -> int:
    """Resident bytes of a process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def quantiles(xs: list[float]) -> str:
    if not xs:
        return "no events"
    xs = sorted(xs)
    p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return (f"n={len(xs)}  p50 {p(0.5) * 1000:8.1f} ms  p99 {p(0.99) * 1000:8.1f} ms  "
            f"max {xs[-1] * 1000:8.1f} ms")


class Processes:
    """The PIDs to watch: control-plane actors by name, the GCS, the raylets, and the other
    processes under the raylets (Ray's agents, task workers)."""

    def __init__(self, settings: Settings, cluster: Any):
        names = {SCHEDULER, AGGREGATOR, BUS, *supervisor_names(settings)}
        table = ray._private.state.state.actor_table(None, actor_state_name="ALIVE")
        self.actors = {a["Name"]: a["Pid"] for a in table.values() if a["Name"] in names}
        self.gcs = cluster.head_node.all_processes["gcs_server"][0].process.pid
        self.raylets = [n.all_processes["raylet"][0].process.pid for n in cluster.list_all_nodes()]

    def others(self) -> list[int]:
        return [p for r in self.raylets for p in children(r) if p not in self.actors.values()]

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each actor, the GCS, the raylets, this driver and the others alive."""
        out = {name.removeprefix("proctor-"): cpu_seconds(pid) for name, pid in self.actors.items()}
        out.update(gcs=cpu_seconds(self.gcs), raylets=sum(cpu_seconds(p) for p in self.raylets),
                   driver=cpu_seconds(os.getpid()), others=sum(cpu_seconds(p) for p in self.others()))
        return out

    def sample(self) -> dict[str, int]:
        plane = {name: rss(pid) for name, pid in self.actors.items()}
        others = self.others()
        return {"plane": sum(plane.values()), **{f"actor:{k}": v for k, v in plane.items()},
                "gcs": rss(self.gcs), "raylets": sum(rss(p) for p in self.raylets),
                "others": sum(rss(p) for p in others), "others_n": len(others)}


class Watcher(threading.Thread):
    """Samples the store's shard counts and the processes' memory; prints a line every 10 s."""

    def __init__(self, plane: control_plane.ControlPlane, procs: Processes, k: int, t0: float):
        super().__init__(daemon=True)
        self.plane, self.procs, self.k, self.t0 = plane, procs, k, t0
        self.stop = threading.Event()
        self.all_running_at: float | None = None
        self.all_running_until: float | None = None
        self.peak_running = (0, 0.0)
        self.peak: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.terminal_at: float | None = None
        self.first_done_at: float | None = None
        self.changed_at = 0.0  # when the shard or evaluation counts last changed
        self.cpu_start = procs.cpu()
        self.cpu_ramp: dict[str, float] = {}
        self.mem_held: dict[str, int] = {}
        self.history: list[tuple[float, int]] = []  # (t, running) every 10 s

    def run(self) -> None:
        store = self.plane.store()
        last_mem = last_print = 0.0
        try:
            while not self.stop.is_set():
                now = time.monotonic() - self.t0
                shards = store.counts_by_status("shard")
                evals = store.counts_by_status("evaluation")
                if (shards, evals) != (self.counts, getattr(self, "evals", None)):
                    self.changed_at = now
                self.counts, self.evals = shards, evals
                running = shards["running"]
                if running > self.peak_running[0]:
                    self.peak_running = (running, now)
                if running >= self.k and self.all_running_at is None:
                    self.all_running_at = now
                    self.cpu_ramp = self.procs.cpu()
                if self.all_running_at is not None and self.all_running_until is None and running < self.k:
                    self.all_running_until = now
                done = sum(evals[s] for s in control_plane.TERMINAL)
                if done and self.first_done_at is None:
                    self.first_done_at = now
                if done >= self.k and self.terminal_at is None:
                    self.terminal_at = now
                if now - last_mem >= 1.0 or (self.all_running_at is not None and not self.mem_held):
                    last_mem = now
                    mem = self.procs.sample()
                    for key, value in mem.items():
                        self.peak[key] = max(self.peak.get(key, 0), value)
                    if self.all_running_at is not None and not self.mem_held:
                        self.mem_held = mem
                    if now - last_print >= 10.0:
                        last_print = now
                        self.history.append((now, running))
                        print(f"  t={now:6.1f}s  shards: queued {shards['queued']:6d} scheduled {shards['scheduled']:6d} "
                              f"running {running:6d} done {sum(shards[s] for s in control_plane.TERMINAL):6d}  "
                              f"evaluations done {done:6d}  control-plane RSS {mem['plane'] / 2**20:7.0f} MiB  "
                              f"GCS {mem['gcs'] / 2**20:5.0f} MiB  raylets {mem['raylets'] / 2**20:5.0f} MiB  "
                              f"other Ray processes {mem['others_n']} / {mem['others'] / 2**20:5.0f} MiB", flush=True)
                self.stop.wait(0.5)
        finally:
            store.close()


class Subscriber(threading.Thread):
    """Reads every `progress` event from the bus, as a WebSocket client would, and times it."""

    def __init__(self, bus: Any, after: int):
        super().__init__(daemon=True)
        self.bus, self.after = bus, after
        self.stop = threading.Event()
        self.plane_lat: list[float] = []
        self.probe_lat: list[float] = []
        self.gaps = 0

    def run(self) -> None:
        while not self.stop.is_set():
            got = ray.get(self.bus.read.remote(self.after, None, 0.5, 5000, ("progress",)))
            now = time.time()
            self.gaps += bool(got["gap"])
            self.after = got["last_seq"]
            for ev in got["events"]:
                (self.probe_lat if ev.get("probe") else self.plane_lat).append(now - ev["ts"])


class Prober(threading.Thread):
    def __init__(self, bus: Any):
        super().__init__(daemon=True)
        self.bus = bus
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(PROBE_EVERY_S):
            self.bus.publish.remote([{"type": "progress", "eval_id": None, "probe": True, "ts": time.time()}])


def latency_process(address: str, namespace: str, conn: Any) -> None:
    """A second driver, apart from the busy submitting one (its GIL would add to every
    figure): an idle-bus baseline first, then the subscriber and the prober until told."""
    ray.init(address=address, namespace=namespace, logging_level="ERROR", log_to_driver=False)
    bus = ray.get_actor(BUS, namespace=namespace)
    base = []
    for _ in range(200):  # baseline: an idle bus's publish -> read round trip
        t = time.time()
        seq = ray.get(bus.publish.remote([{"type": "progress", "eval_id": None, "probe": True, "ts": t}]))
        ray.get(bus.read.remote(seq - 1, None, 0.0, 10, ("progress",)))
        base.append(time.time() - t)
    subscriber = Subscriber(bus, ray.get(bus.last_seq.remote()))
    subscriber.start()
    prober = Prober(bus)
    prober.start()
    conn.send(base)
    conn.recv()  # stop
    prober.stop.set()
    time.sleep(1.0)  # the last probes are read
    subscriber.stop.set()
    subscriber.join(timeout=5)
    conn.send((subscriber.plane_lat, subscriber.probe_lat, subscriber.gaps))
    ray.shutdown()


def submit_all(plane: control_plane.ControlPlane, k: int, sim_seconds: float, threads: int, batch: int,
               owners: int) -> list[str]:
    ids: list[list[str]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            scheduler = plane.scheduler
            mine = list(range(t, k, threads))
            for start in range(0, len(mine), batch):
                refs = [scheduler.submit.remote(spec_doc(i, sim_seconds), f"user{i % owners}")
                        for i in mine[start:start + batch]]
                ids[t].extend(ray.get(refs))
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    if errors:
        raise errors[0]
    return [i for chunk in ids for i in chunk]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evals", type=int, default=10_000, help="evaluations held at once (K)")
    ap.add_argument("--sim-seconds", type=float, default=None,
                    help="simulated run time of each evaluation's one sample (default 60, 120 above 2,000)")
    ap.add_argument("--nodes", type=int, default=1, help="Ray nodes (raylets) on this machine, sharing the shards")
    ap.add_argument("--submitters", type=int, default=4, help="driver threads submitting")
    ap.add_argument("--batch", type=int, default=100, help="submissions per ray.get")
    ap.add_argument("--owners", type=int, default=10, help="distinct users the evaluations belong to")
    ap.add_argument("--supervisors", type=int, default=2)
    ap.add_argument("--ramp-timeout", type=float, default=None,
                    help="seconds to wait, after the last submission, for all K to run (default: --sim-seconds)")
    ap.add_argument("--drain-timeout", type=float, default=600.0,
                    help="seconds to wait, after the simulated time, for all evaluations to be finalised "
                         "(only when all K ran)")
    args = ap.parse_args()
    k = args.evals
    sim = args.sim_seconds if args.sim_seconds is not None else (60.0 if k <= 2000 else 120.0)

    from ray.cluster_utils import Cluster

    home = Path(tempfile.mkdtemp(prefix="proctor-bench-scale-"))
    settings = Settings(home=home, results_uri=(home / "results").as_uri(), state_url=f"sqlite:///{home}/state.db",
                        ray_namespace="proctor-bench", supervisors=args.supervisors)
    per_node = math.ceil(k / args.nodes)
    cpus = math.ceil(per_node * SHARD_CPUS) + 1
    memory = per_node * SHARD_MEMORY + 1024**3
    node_args = {"num_cpus": cpus, "memory": memory, "object_store_memory": 256 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    for _ in range(args.nodes - 1):
        cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=settings.ray_namespace, logging_level="ERROR", log_to_driver=False)
    print("SIMULATED sandboxes (a TEST DOUBLE: no sandbox processes; the protocol is spoken inside the supervisors)")
    print(f"K={k} one-sample evaluations, {sim:g} s simulated each, {SHARD_CPUS} CPU + 64Mi per shard; "
          f"Ray: {args.nodes} node(s) x {cpus} logical CPUs, {memory / 1024**3:.0f} GiB logical memory; "
          f"{args.supervisors} supervisors; host: {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 1024**3:.0f} GB; "
          f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    watcher = latency = None
    conn, child_conn = multiprocessing.Pipe()
    plane_lat: list[float] = []
    probe_lat: list[float] = []
    gaps = 0
    status: dict[str, Any] = {}
    try:
        plane = control_plane.start(settings, runtime_factory=SimulateRemoteRuntimes())
        procs = Processes(settings, cluster)
        idle = procs.sample()
        latency = multiprocessing.get_context("spawn").Process(
            target=latency_process, args=(cluster.address, settings.ray_namespace, child_conn), daemon=True)
        latency.start()
        base = conn.recv()

        t0 = time.monotonic()
        watcher = Watcher(plane, procs, k, t0)
        watcher.start()
        ids = submit_all(plane, k, sim, args.submitters, args.batch, args.owners)
        submitted = time.monotonic() - t0
        print(f"  submitted {len(ids)} in {submitted:.1f} s", flush=True)
        # until all run, or until the first would have finished anyway
        deadline = t0 + submitted + (args.ramp_timeout if args.ramp_timeout is not None else sim)
        while watcher.all_running_at is None and time.monotonic() < deadline:
            if time.monotonic() - t0 - watcher.changed_at > STALL_S:
                print(f"  nothing changed in the store for {STALL_S:.0f} s: stopped waiting", flush=True)
                break
            time.sleep(0.5)
        if not watcher.cpu_ramp:
            watcher.cpu_ramp = procs.cpu()
        started = time.monotonic()
        drain_until = t0 + (watcher.all_running_at or 0.0) + sim + args.drain_timeout
        while watcher.all_running_at is not None and watcher.terminal_at is None and time.monotonic() < drain_until:
            # while all hold, nothing changes: a stall counts only once they should be ending
            ending = watcher.all_running_at + sim
            if time.monotonic() - t0 - max(watcher.changed_at, ending) > STALL_S:
                print(f"  nothing changed in the store for {STALL_S:.0f} s: stopped waiting", flush=True)
                break
            time.sleep(1.0)
        ramp_end = watcher.all_running_at or (started - t0)
        conn.send("stop")
        if conn.poll(30):
            plane_lat, probe_lat, gaps = conn.recv()
        status = ray.get(plane.scheduler.status.remote(), timeout=30)
    finally:
        if watcher is not None:
            watcher.stop.set()
            watcher.join(timeout=5)
        if latency is not None:
            latency.join(timeout=10)
            if latency.is_alive():
                latency.terminate()
        control_plane.stop(settings)
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(home, ignore_errors=True)

    mib = lambda b: f"{b / 2**20:6.0f} MiB"  # noqa: E731
    peak, held = watcher.peak, watcher.mem_held
    print("results (SIMULATED sandboxes: a TEST DOUBLE)")
    print(f"submit rate:      {k / submitted:7.1f} evaluations/s  ({k} in {submitted:.1f} s, "
          f"{args.submitters} threads x batches of {args.batch} Scheduler.submit calls)")
    if watcher.all_running_at is not None:
        until = watcher.all_running_until
        print(f"all {k} running at once: {watcher.all_running_at:.1f} s after the first submission"
              + (f", for {until - watcher.all_running_at:.1f} s" if until else "")
              + f"  (admission {k / watcher.all_running_at:.1f} shards/s overall)")
    else:
        print(f"all {k} running at once: NOT within {ramp_end:.0f} s; at most {watcher.peak_running[0]} running "
              f"(at {watcher.peak_running[1]:.1f} s)")
        for t_, n_ in watcher.history[::max(1, len(watcher.history) // 12)]:
            print(f"    t={t_:6.1f} s  running {n_}")
    print(f"control-plane actors' RSS (scheduler + aggregator + bus + {args.supervisors} supervisors):")
    print(f"  idle before submitting {mib(idle['plane'])}   with all {k} running "
          f"{mib(held['plane']) if held else '   n/a'}   peak (drain included) {mib(peak.get('plane', 0))}"
          f"   (goal < 4096 MiB)")
    print("  peak per actor: " + ", ".join(f"{k_.split(':', 1)[1].removeprefix('proctor-')} "
                                            f"{peak[k_] / 2**20:.0f}" for k_ in sorted(peak)
                                            if k_.startswith("actor:")) + " MiB")
    print(f"Ray itself, peak RSS: GCS {mib(peak.get('gcs', 0))}  raylet(s) {mib(peak.get('raylets', 0))}  "
          f"other processes under the raylets {mib(peak.get('others', 0))} (agents, task workers; "
          f"at most {peak.get('others_n', 0)})")
    used = {name: watcher.cpu_ramp[name] - watcher.cpu_start.get(name, 0.0) for name in watcher.cpu_ramp}
    print(f"CPU seconds used until all ran ({ramp_end:.0f} s x {os.cpu_count()} CPUs = "
          f"{ramp_end * (os.cpu_count() or 1):.0f} available): " + ", ".join(
              f"{name} {sec:.0f}" for name, sec in sorted(used.items(), key=lambda kv: -kv[1])))
    print(f"progress events, bus append -> subscriber read:  {quantiles(plane_lat)}")
    print(f"probe events, publish call -> subscriber read:   {quantiles(probe_lat)}")
    print(f"baseline, idle bus publish + read round trip:    {quantiles(base)}")
    if probe_lat and base:
        p99 = sorted(probe_lat)[min(len(probe_lat) - 1, int(0.99 * len(probe_lat)))]
        print(f"ratio probe p99 under load / idle round-trip p99: "
              f"{p99 / sorted(base)[min(len(base) - 1, int(0.99 * len(base)))]:.1f}"
              + (f"  (the subscriber fell behind the log {gaps} times)" if gaps else ""))
    if watcher.terminal_at is not None:
        print(f"drain: all {k} finalised (Parquet compacted, summary written) at {watcher.terminal_at:.1f} s; "
              f"first at {watcher.first_done_at:.1f} s")
    else:
        print(f"drain: NOT finished: shards {watcher.counts}")
    if status:
        print(f"scheduler: admitted {status.get('admitted_total')}, running {status.get('running_shards')}, "
              f"queued {status.get('queued_shards')}; load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
