"""API throughput and latency through Ray Serve's ingress modes against the same FastAPI app on plain uvicorn.

Two endpoints, each at 1, 10 and 50 concurrent clients (--clients), each against two servers
of the same `serve_app.api.build_app(settings)`, in the same run:

  serve    the Serve application `proctor up` deploys (`serve_app.deployment`, one replica),
           reached through one of Serve's ingress modes (`serve_app/ingress.py`, --modes):
             proxy    HTTP -> Serve's Python proxy actor -> Ray actor call -> the replica;
             direct   HTTP -> the replica's own HTTP server, on the port Serve gave it
                      (RAY_SERVE_ENABLE_DIRECT_INGRESS; the client asks the controller);
             haproxy  HTTP -> HAProxy on the API port -> the replica's own HTTP server
                      (RAY_SERVE_ENABLE_HA_PROXY, Debian's haproxy; what `proctor up` runs);
  uvicorn  one plain `uvicorn.Server` (one worker, uvloop and httptools as uvicorn picks
           them) in a process of its own that joined the same Ray instance as a driver,
           so the app reaches the same control plane (`ray.get_actor`).

Serve reads its ingress flags when its modules load, in every process of the Ray
instance: each mode runs in a process of its own (this script again, `--modes <one>`),
with its own Ray instance and its own uvicorn baseline measured beside it, and the report
gathers them.

  GET  /api/v1/evaluations/{id}  a finished one-sample evaluation: the bearer key checked
                                 (one SQLite read), the evaluation read (one SQLite read),
                                 its JSON, summary included.
  POST /api/v1/evaluations       a valid one-sample spec: the key checked, the spec parsed
                                 (422 on error), `Scheduler.submit` awaited (parse again,
                                 split into one shard, one SQLite write transaction,
                                 enqueue, an event published), 202 with the id. Every
                                 submitted evaluation stays queued: it asks 1 x H100 on a
                                 cluster without GPUs, which the scheduler keeps waiting
                                 ("no node can ever hold it") and skips cheaply on every
                                 pass, so no sandbox ever runs and the queue's growth costs
                                 little. (Letting them run, even in the simulated sandbox
                                 double, would put a Parquet part, a compaction and a
                                 summary behind every request: more than two cores drain,
                                 and the figures would measure that backlog.) The scheduler
                                 writes each one's wait reason once after the 202, beside
                                 the requests.

One local Ray instance (`ray.init(address="local")`, Ray's token auth as `proctor up` sets
it), the control plane started once with the simulated sandbox runtime (a TEST DOUBLE,
`cluster/runtimes/simulated.py`; it runs only the GET target's one sample), state in SQLite
and results in a `file://` folder under a temporary home, one `researcher` API key for all
clients, and the per-key rate limit off (`rate_limit_per_s=0`): what is measured is the
server, not the limit.

The load generator is a process of its own (spawned), apart from the driver and both
servers: C asyncio clients, each with one keep-alive connection, issuing requests back to
back for --warmup seconds, then --duration seconds measured. Requests answered inside the
measured window count: req/s = successes / duration, p50/p99 of their latency (send to
last byte of the body), errors = other statuses and connection failures. By default the
clients speak HTTP/1.1 themselves over asyncio streams (--client raw, ~0.1-0.2 ms of CPU
per request here): an httpx.AsyncClient (--client httpx) took ~2.5 ms per request, more
than plain uvicorn's whole answer, and so halved uvicorn's figures on two cores; the
client's CPU per request is printed either way. The two servers
are measured one after the other in each cell, in alternating order, so that both share
the machine's noise. For each cell the CPU milliseconds per request of the processes
involved (from /proc, warm-up included) show where the time goes: uvicorn's process;
Serve's proxy, replica and controller; the scheduler actor; Ray's GCS and raylet; the load
generator; and the share of all host CPUs busy, with the load average before and after,
which tells whether other work shared the machine.

Prints req/s, p50, p99 and errors per (mode, endpoint, clients, server), then per mode
the ratio serve/uvicorn of req/s (goal >= 0.5) and whether Serve's p99 at 10 clients is
under 100 ms. --json prints one JSON document on stdout instead (progress goes to stderr).

    .venv/bin/python benchmarks/api_latency.py [--modes proxy,direct,haproxy] [--duration 10]
        [--warmup 2] [--clients 1,10,50] [--endpoints get,post] [--client raw|httpx] [--cpus N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from procstat import children, cpu_seconds
from pyspy import hottest, py_spy

from serve_app.ingress import MODES  # light: no Ray

GOAL_RATIO = 0.5
GOAL_P99_MS = 100.0
GOAL_AT = 10
TOKEN_USER = "bench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec_doc(name: str, gpu: bool) -> dict[str, Any]:
    """One sample, the reference model, `kubernetes` (the simulated double here). With
    `gpu` it asks 1 x H100, which this cluster can never place: it stays queued."""
    sandbox: dict[str, Any] = {"runtime": "kubernetes", "cpus": 0.5, "memory": "64Mi", "timeout_s": 600}
    if gpu:
        sandbox["gpu"] = {"count": 1, "type": "H100"}
    return {"name": name, "model": {"adapter": "reference"},
            "dataset": {"samples": [{"id": "s0", "input": "What is 6 * 7?", "target": "42"}]},
            "scorers": [{"type": "exact"}], "sandbox": sandbox}


# ---------------------------------------------------------------- the load generator


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """One HTTP/1.1 response read to the end of its body: (status, connection closes)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked, close = 0, False, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, close


class Tally:
    def __init__(self, start: float, end: float):
        self.start, self.end = start, end
        self.latencies: list[float] = []
        self.errors = 0
        self.first_error = ""
        self.total = 0  # every answered request, warm-up included (for CPU per request)

    def add(self, sent: float, done: float, ok: bool, what: str) -> None:
        self.total += 1
        if not self.start <= done <= self.end:
            return
        if ok:
            self.latencies.append(done - sent)
        else:
            self.errors += 1
            self.first_error = self.first_error or what


async def raw_client(job: dict[str, Any], tally: Tally) -> None:
    request = job["request"]
    reader = writer = None
    while True:
        sent = time.perf_counter()
        if sent >= tally.end:
            break
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(job["host"], job["port"])
            writer.write(request)
            status, close = await read_response(reader)
            ok, what = status == job["expect"], f"HTTP {status}"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            ok, what, close = False, repr(exc), True
            await asyncio.sleep(0.01)
        tally.add(sent, time.perf_counter(), ok, what)
        if close and writer is not None:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def httpx_client(job: dict[str, Any], tally: Tally, client: Any) -> None:
    import httpx

    url = f"http://{job['host']}:{job['port']}{job['path']}"
    while True:
        sent = time.perf_counter()
        if sent >= tally.end:
            break
        try:
            r = await client.request(job["method"], url, headers=job["headers"], content=job["body"])
            ok, what = r.status_code == job["expect"], f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            ok, what = False, repr(exc)
            await asyncio.sleep(0.01)
        tally.add(sent, time.perf_counter(), ok, what)


async def run_cell(job: dict[str, Any]) -> dict[str, Any]:
    c = job["clients"]
    t0 = time.perf_counter()
    tally = Tally(t0 + job["warmup"], t0 + job["warmup"] + job["duration"])
    cpu0 = time.process_time()
    if job["client"] == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            await asyncio.gather(*(httpx_client(job, tally, client) for _ in range(c)))
    else:
        await asyncio.gather(*(raw_client(job, tally) for _ in range(c)))
    return {"latencies": tally.latencies, "errors": tally.errors, "first_error": tally.first_error,
            "total": tally.total, "client_cpu_s": time.process_time() - cpu0}


def loadgen_process(conn: Any) -> None:
    """Runs each job it is sent and sends back its tally, until it gets None."""
    try:
        import uvloop

        uvloop.install()  # the same event loop the servers get
    except ImportError:
        pass
    while (job := conn.recv()) is not None:
        conn.send(asyncio.run(run_cell(job)))


# ---------------------------------------------------------------- the plain uvicorn server


def uvicorn_process(settings: Any, address: str, port: int) -> None:
    """The same app as Serve's replica runs, in one plain uvicorn worker, as a Ray driver."""
    import ray
    import uvicorn

    from serve_app.api import build_app
    from serve_app.platform import ray_token_auth

    ray_token_auth()
    ray.init(address=address, namespace=settings.ray_namespace, logging_level="ERROR", log_to_driver=False)
    uvicorn.Server(uvicorn.Config(build_app(settings), host="127.0.0.1", port=port, log_level="warning")).run()


def wait_ready(base: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/v1/health", timeout=5) as r:
                if json.load(r).get("ready"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{base} did not become ready in {timeout:.0f} s")
        time.sleep(0.3)


# ---------------------------------------------------------------- CPU accounting


def host_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def watched_pids(uvicorn_pid: int, loadgen_pid: int) -> dict[str, list[int]]:
    """The processes whose CPU each cell reports, by role."""
    import ray

    node = ray._private.worker._global_node
    table = ray._private.state.state.actor_table(None, actor_state_name="ALIVE")
    by_name: dict[str, list[int]] = {}
    for a in table.values():
        by_name.setdefault(a.get("Name") or "", []).append(a["Pid"])

    def named(prefix: str) -> list[int]:
        return [p for name, pids in by_name.items() if name.startswith(prefix) for p in pids]

    from eval_actors.control_plane import SCHEDULER

    proxies = named("SERVE_PROXY_ACTOR")  # Serve's proxies, or the HAProxy managers
    return {"uvicorn": [uvicorn_pid], "serve proxy": proxies,
            "haproxy": [c for p in proxies for c in children(p) if _comm(c) == "haproxy"],
            "serve replica": named("SERVE_REPLICA"), "serve controller": named("SERVE_CONTROLLER_ACTOR"),
            "scheduler": named(SCHEDULER),
            "ray gcs+raylet": [node.all_processes["gcs_server"][0].process.pid,
                               node.all_processes["raylet"][0].process.pid],
            "client": [loadgen_pid]}


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cpu_snapshot(pids: dict[str, list[int]]) -> dict[str, float]:
    return {role: sum(cpu_seconds(p) for p in ps) for role, ps in pids.items()}


# ---------------------------------------------------------------- the run


def quantile(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def make_job(endpoint: str, port: int, secret: str, target: str, clients: int, args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {secret}", "Host": f"127.0.0.1:{port}", "Accept": "application/json"}
    if endpoint == "get":
        method, path, body, expect = "GET", f"/api/v1/evaluations/{target}", b"", 200
    else:
        method, path, expect = "POST", "/api/v1/evaluations", 202
        body = json.dumps(spec_doc("bench-api-post", gpu=True)).encode()
        headers.update({"Content-Type": "application/json", "Content-Length": str(len(body))})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return {"host": "127.0.0.1", "port": port, "method": method, "path": path, "body": body, "expect": expect,
            "headers": {k: v for k, v in headers.items() if k not in ("Host", "Content-Length")},
            "request": head.encode() + body, "clients": clients, "warmup": args.warmup,
            "duration": args.duration, "client": args.client}


def measure(conn: Any, job: dict[str, Any], pids: dict[str, list[int]], profile: Path | None = None) -> dict[str, Any]:
    """One cell; with `profile` (a file), py-spy samples the process that answers (the
    Serve replica, or uvicorn) over the whole cell."""
    before, busy0 = cpu_snapshot(pids), host_busy()
    spy = None
    if profile is not None:
        answering = pids["uvicorn"] if job["server"] == "uvicorn" else pids["serve replica"]
        spy = py_spy(answering[0], job["warmup"] + job["duration"], profile, rate=200)
    conn.send(job)
    got = conn.recv()
    after, busy1 = cpu_snapshot(pids), host_busy()
    hot = {}
    if spy is not None:
        spy.wait(60)
        hot = hottest(profile, n=25) if profile.exists() else {}
    lat = sorted(got["latencies"])
    n = max(got["total"], 1)
    return {"rps": len(lat) / job["duration"], "p50_ms": quantile(lat, 0.5) * 1000,
            "p99_ms": quantile(lat, 0.99) * 1000, "max_ms": (lat[-1] * 1000 if lat else float("nan")),
            "ok": len(lat), "errors": got["errors"], "first_error": got["first_error"],
            "cpu_ms_per_request": {k: (after[k] - before[k]) * 1000 / n for k in after},
            "client_cpu_ms_per_request": got["client_cpu_s"] * 1000 / n,
            "host_busy": (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1), "profile": hot}


def run(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One ingress mode against uvicorn, on a Ray instance of its own started with that
    mode's environment (set here, before Ray or Serve is imported)."""
    from serve_app.ingress import ingress_env, replica_http_ports

    home = Path(tempfile.mkdtemp(prefix="pba-"))  # short: HAProxy's socket paths are under it
    os.environ.update(ingress_env(mode, stats_port=free_port(), metrics_port=free_port(), folder=home / "haproxy"))
    import ray
    from ray import serve

    from cluster.runtimes.simulated import SimulateRemoteRuntimes
    from cluster.state import StateStore
    from eval_actors import control_plane
    from proctor.settings import Settings
    from serve_app.deployment import APP_NAME, deployment
    from serve_app.platform import ray_token_auth

    load_before = os.getloadavg()[0]
    settings = Settings(home=home, results_uri=(home / "results").as_uri(), state_url=f"sqlite:///{home}/state.db",
                        ray_namespace="proctor-bench-api", rate_limit_per_s=0)
    ray_token_auth()
    spawn = multiprocessing.get_context("spawn")
    conn, child = spawn.Pipe()
    loadgen = spawn.Process(target=loadgen_process, args=(child,), daemon=True)
    server = None
    cells: list[dict[str, Any]] = []
    serve_port, uvicorn_port = free_port(), free_port()
    try:  # from Ray's start: a loaded host can time it out, and the folder must still go
        ray.init(address="local", num_cpus=args.cpus, namespace=settings.ray_namespace, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
        plane = control_plane.start(settings, runtime_factory=SimulateRemoteRuntimes())
        store = StateStore(settings.state)
        store.create_user(TOKEN_USER, "researcher")
        secret, _ = store.create_token(TOKEN_USER, "bench")
        store.close()
        target = plane.submit(spec_doc("bench-api-get", gpu=False), owner=TOKEN_USER)
        final = plane.wait(target, timeout=120)
        if final.status != "succeeded":
            raise SystemExit(f"the GET target {target} ended {final.status}: {final.error}")

        serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
        serve.run(deployment(settings), name=APP_NAME, route_prefix="/")
        server = spawn.Process(target=uvicorn_process, daemon=True,
                               args=(settings, ray.get_runtime_context().gcs_address, uvicorn_port))
        server.start()
        loadgen.start()
        wait_ready(f"http://127.0.0.1:{serve_port}")
        if mode == "direct":  # the replica's own server; Serve's proxy still answers serve_port
            (serve_port,) = replica_http_ports(APP_NAME)
            wait_ready(f"http://127.0.0.1:{serve_port}")
        wait_ready(f"http://127.0.0.1:{uvicorn_port}")
        pids = watched_pids(server.pid, loadgen.pid)
        ports = {"serve": serve_port, "uvicorn": uvicorn_port}
        order = ["serve", "uvicorn"]
        for endpoint in args.endpoints:
            for c in args.clients:
                for name in order:
                    log(f"  {mode:7s} {endpoint.upper():4s} {c:3d} clients  {name:7s} ...")
                    job = make_job(endpoint, ports[name], secret, target, c, args) | {"server": name}
                    spied = args.py_spy / f"{mode}-{name}-{endpoint}-{c}.txt" if args.py_spy else None
                    cell = measure(conn, job, pids, spied)
                    cell.update(mode=mode, endpoint=endpoint, clients=c, server=name)
                    cells.append(cell)
                    log(f"      {cell['rps']:8.1f} req/s  p50 {cell['p50_ms']:7.1f} ms  p99 {cell['p99_ms']:7.1f} ms"
                        f"  errors {cell['errors']}  host busy {cell['host_busy']:.0%}")
                order.reverse()
        status = ray.get(plane.scheduler.status.remote(), timeout=30)
    finally:
        if loadgen.is_alive():
            conn.send(None)
            loadgen.join(timeout=10)
        if server is not None:
            server.terminate()
            server.join(timeout=15)
            if server.is_alive():
                server.kill()
        if ray.is_initialized():
            try:
                serve.shutdown()
            except Exception:  # Serve never started
                pass
            control_plane.stop(settings)
            ray.shutdown()
        shutil.rmtree(home, ignore_errors=True)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host_cpus": os.cpu_count(),
            "modes": [mode], "ray_cpus": args.cpus, "client": args.client, "duration_s": args.duration, "warmup_s": args.warmup,
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "queued_after": status.get("queued_shards"), "cells": cells, "ratios": ratios(cells)}


def ratios(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """serve/uvicorn per (mode, endpoint, clients), each mode against the uvicorn run beside it."""
    by = {(c["mode"], c["endpoint"], c["clients"], c["server"]): c for c in cells}
    out = []
    for (mode, endpoint, clients, server), s in by.items():
        u = by.get((mode, endpoint, clients, "uvicorn"))
        if server != "serve" or u is None:
            continue
        out.append({"mode": mode, "endpoint": endpoint, "clients": clients, "serve_p99_ms": s["p99_ms"],
                    "throughput_serve_over_uvicorn": s["rps"] / u["rps"] if u["rps"] else float("nan"),
                    "p99_serve_over_uvicorn": s["p99_ms"] / u["p99_ms"] if u["p99_ms"] else float("nan"),
                    "throughput_goal_met": bool(u["rps"]) and s["rps"] / u["rps"] >= GOAL_RATIO,
                    "p99_goal_met": None if clients != GOAL_AT else s["p99_ms"] < GOAL_P99_MS})
    return out


def serve_cpu(c: dict[str, Any]) -> str:
    cpu = c["cpu_ms_per_request"]
    if c["server"] == "uvicorn":
        return f"uvicorn {cpu['uvicorn']:.2f}"
    front = {"proxy": f"proxy {cpu['serve proxy']:.2f}", "direct": "(no proxy)",
             "haproxy": f"haproxy {cpu['haproxy']:.2f} (+ manager {cpu['serve proxy']:.2f})"}[c["mode"]]
    return f"{front} + replica {cpu['serve replica']:.2f} (+ controller {cpu['serve controller']:.2f})"


def report(result: dict[str, Any]) -> None:
    for run_ in result["runs"]:
        print(f"API latency, mode {run_['modes'][0]}, {run_['date']}: {run_['host_cpus']} host CPUs "
              f"({run_['ray_cpus']} declared to Ray), client {run_['client']}, {run_['warmup_s']:g} s warm-up + "
              f"{run_['duration_s']:g} s measured per cell; load average {run_['load_before']:.1f} before, "
              f"{run_['load_after']:.1f} after; POSTed evaluations stay queued (1 x H100 on a cluster without "
              f"GPUs): {run_['queued_after']} at the end")
    print(f"{'mode':8s} {'endpoint':9s} {'clients':>7s} {'server':8s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'errors':>6s}  {'host':>4s}  CPU ms per request")
    for c in result["cells"]:
        cpu = c["cpu_ms_per_request"]
        print(f"{c['mode']:8s} {c['endpoint'].upper():9s} {c['clients']:7d} {c['server']:8s} {c['rps']:8.1f} "
              f"{c['p50_ms']:8.1f} {c['p99_ms']:8.1f} {c['errors']:6d}  {c['host_busy']:4.0%}  {serve_cpu(c)}; "
              f"scheduler {cpu['scheduler']:.2f}, ray {cpu['ray gcs+raylet']:.2f}, client "
              f"{c['client_cpu_ms_per_request']:.2f}" + (f"   first error: {c['first_error']}" if c["errors"] else ""))
    for c in result["cells"]:
        if c.get("profile"):
            cpu = c["cpu_ms_per_request"]["uvicorn" if c["server"] == "uvicorn" else "serve replica"]
            print(f"py-spy, {c['mode']} {c['endpoint'].upper()} {c['clients']} clients, {c['server']} "
                  f"({cpu:.2f} ms CPU per request, {c['profile']['samples'][0][1]:.0f} samples at 200 Hz), "
                  "inclusive, as ms per request:")
            print("  " + "; ".join(f"{fn} {share * cpu:.2f}" for fn, share in c["profile"]["all, inclusive"]))
            print("  self: " + "; ".join(f"{fn} {share * cpu:.2f}" for fn, share in c["profile"]["self"]))
    for r in result["ratios"]:
        goal = ("" if r["p99_goal_met"] is None else
                f";  serve p99 {r['serve_p99_ms']:.1f} ms {'<' if r['p99_goal_met'] else '>='} {GOAL_P99_MS:g} ms")
        print(f"ratio serve/uvicorn {r['mode']:8s} {r['endpoint'].upper():4s} {r['clients']:3d} clients: req/s "
              f"{r['throughput_serve_over_uvicorn']:.2f} (goal >= {GOAL_RATIO}: "
              f"{'met' if r['throughput_goal_met'] else 'NOT met'}), p99 {r['p99_serve_over_uvicorn']:.2f}{goal}")


def run_each(args: argparse.Namespace) -> dict[str, Any]:
    """Each mode in a process of its own (this script, `--modes <mode> --json`), one after
    the other; their runs gathered."""
    same = ["--duration", str(args.duration), "--warmup", str(args.warmup), "--clients",
            ",".join(map(str, args.clients)), "--endpoints", ",".join(args.endpoints), "--client", args.client,
            "--cpus", str(args.cpus)] + (["--py-spy", str(args.py_spy)] if args.py_spy else [])
    runs, cells = [], []
    for mode in args.modes:
        log(f"mode {mode}: a Ray instance of its own")
        done = subprocess.run([sys.executable, __file__, *same, "--modes", mode, "--json"], stdout=subprocess.PIPE,
                              text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"mode {mode}: the run exited with code {done.returncode} (its log is above)")
        one = json.loads(done.stdout)
        runs, cells = runs + one["runs"], cells + one["cells"]
    return {"runs": runs, "cells": cells, "ratios": ratios(cells)}


def gather(run_: dict[str, Any]) -> dict[str, Any]:
    """One mode's run as the report takes it."""
    cells = run_.pop("cells")
    return {"runs": [run_], "cells": cells, "ratios": ratios(cells)}


def strict(value: Any) -> Any:
    """`value` with NaN (no successful request) as null, which JSON has."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict(v) for v in value]
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measurement")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 50],
                    help="concurrent clients, comma-separated")
    ap.add_argument("--endpoints", type=lambda s: s.split(","), default=["get", "post"], help="get,post")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="raw: HTTP/1.1 over asyncio streams; httpx: httpx.AsyncClient")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs declared to Ray")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES),
                    help="Serve's ingress modes to measure, comma-separated: proxy, direct, haproxy")
    ap.add_argument("--py-spy", type=Path, metavar="DIR", help="profile the answering process of every cell "
                    "(py-spy, 200 Hz), keep the collapsed stacks in DIR and print where its CPU goes, per request")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the report")
    args = ap.parse_args()
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
        args.py_spy = args.py_spy.resolve()
    if set(args.endpoints) - {"get", "post"}:
        ap.error("--endpoints: get, post or both")
    if not args.modes or set(args.modes) - set(MODES):
        ap.error(f"--modes: one or more of {', '.join(MODES)}")
    if len(args.modes) > 1:
        result = run_each(args)
    elif args.json:  # Ray and Serve print to stdout too (from threads and processes): only the JSON goes there
        stdout = os.fdopen(os.dup(1), "w")
        sys.stdout.flush()
        os.dup2(2, 1)
        result = gather(run(args, args.modes[0]))
        stdout.write(json.dumps(strict(result), indent=2) + "\n")
        stdout.close()
        return
    else:
        result = gather(run(args, args.modes[0]))
    if args.json:
        print(json.dumps(strict(result), indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
