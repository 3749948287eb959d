"""Emergency stop: request -> every sandbox of the evaluation dead, idle and with the CPUs saturated.

The whole platform on one local Ray instance (the control plane, the Serve API), real
gVisor sandboxes. Each run submits an evaluation of --shards shards whose samples take
0.3 s each and answer with the time they finished (`time.time()` inside the sandbox),
waits until every shard's sandbox runs and rows flow, then sends
`POST /api/v1/evaluations/{id}/stop` and watches from outside, every 5 ms, for the
evaluation's sandboxes: its cgroups (`proctor/*--<eval id>-*`) with a process left, and
runsc processes naming it. Figures, per condition (idle; saturated: --burners busy
`python -c 'while 1: pass'` processes, 3x a 2-core host's CPUs, for the whole condition):

  dead    request -> no process of the evaluation's sandboxes left (p50, p99, max)
  answer  request -> the API's answer
  late    rows counted as results (no error) whose sample finished after the request
  status  the evaluations' final statuses

The watcher reads only /proc and /sys/fs/cgroup, so the same file measures any tree of
Proctor: it imports the platform from `--tree` (default: the checkout it is in, ahead of
the virtual environment's editable install; its Ray workers too, through PYTHONPATH), and
`--baseline-tree DIR` runs it first on the code in DIR (e.g. a checkout of main) and
prints both and the ratios. The benchmark's own process (the client that sends the stop,
and the watcher) runs at `--nice` (-15), set once the platform has started (Ray's
processes keep theirs; the burners run at 0): the user's client is not on the saturated
host, and a watcher that waits for a CPU would measure itself. `--nice 0` runs it at
everyone's priority (figures are then upper bounds).

    .venv/bin/python benchmarks/stop_latency.py [--runs 10] [--shards 2] [--burners 6] [--cpus 8] \
        [--nice -15] [--ingress haproxy|proxy] [--baseline-tree DIR] [--json]

Goal: dead p99 < 1 s with the host saturated 3x.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

CGROUPS = Path("/sys/fs/cgroup")
POLICY = "import time\ndef answer(messages, **kw):\n    time.sleep(0.3)\n    return repr(time.time())\n"
TERMINAL = ("succeeded", "failed", "cancelled", "safety_stopped")
FINAL_WITHIN_S = 120.0  # after this the run records the evaluation's status as it is, and goes on
SAMPLES_PER_SHARD = 400  # 2 minutes of samples: the stop always comes first


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def alive(eval_id: str) -> int:
    """Processes of the evaluation's sandboxes on this host (cgroups and runsc's own)."""
    count = 0
    for parent in (CGROUPS / "proctor", CGROUPS / "unified" / "proctor", CGROUPS / "pids" / "proctor"):
        for group in parent.glob(f"*--{eval_id}-*") if parent.is_dir() else ():
            try:
                count += len((group / "cgroup.procs").read_text().split())
            except OSError:
                pass
    prefix = f"{eval_id}-".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"runsc" in a for a in argv) and b"delete" not in argv and any(prefix in a for a in argv):
            count += 1
    return count


def quantile(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


def spec(name: str, shards: int) -> dict[str, Any]:
    n = shards * SAMPLES_PER_SHARD
    return {"name": name, "model": {"adapter": "python", "callable": "policy:answer"},
            "dataset": {"samples": [{"id": str(i), "input": f"{i}?", "target": str(i)} for i in range(n)]},
            "scorers": [{"type": "exact"}], "shard_size": SAMPLES_PER_SHARD,
            "sandbox": {"runtime": "gvisor", "memory": "256Mi", "cpus": 0.5, "timeout_s": 600,
                        "files": {"policy.py": POLICY}}}


def one_run(client: Any, token: str, store: Any, shards: int, name: str, home: Path) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    eval_id = client.post("/api/v1/evaluations", json=spec(name, shards), headers=headers).json()["id"]
    deadline = time.monotonic() + 300
    while True:
        running = [s for s in store.shards(eval_id) if s.status == "running"]
        if len(running) == shards and store.get_evaluation(eval_id).done_units >= 0 and alive(eval_id):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{eval_id}: its shards did not all run within 300 s")
        time.sleep(0.2)
    time.sleep(4.0)  # rows flow
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        asked_wall, asked = time.time(), time.monotonic()
        answer = pool.submit(lambda: (client.post(f"/api/v1/evaluations/{eval_id}/stop", headers=headers),
                                      time.monotonic()))
        while alive(eval_id):
            time.sleep(0.005)
        dead = time.monotonic() - asked
        response, answered = answer.result()
    if response.status_code != 200:
        raise SystemExit(f"the stop of {eval_id} answered {response.status_code}: {response.text}")
    reached = _marked(home / "stopping" / eval_id) - asked_wall  # NaN on a tree without stop markers
    log(f"    {eval_id}: dead {dead * 1000:.0f} ms (the stop reached the API after {reached * 1000:.0f} ms), "
        f"answer {(answered - asked) * 1000:.0f} ms")
    deadline = time.monotonic() + FINAL_WITHIN_S
    while (status := store.get_evaluation(eval_id).status) not in TERMINAL:
        if time.monotonic() > deadline:  # a figure too: the stop did not end it
            status = f"{status} {FINAL_WITHIN_S:g} s after the stop"
            break
        time.sleep(0.3)
    rows = client.get(f"/api/v1/evaluations/{eval_id}/results", params={"limit": 1000},
                      headers=headers).json().get("rows", [])
    counted = [r for r in rows if not r.get("error")]
    late = [r for r in counted if _finished(r) >= asked_wall]
    return {"eval_id": eval_id, "dead_s": dead, "answer_s": answered - asked, "reached_s": reached, "status": status,
            "counted": len(counted), "late_counted": len(late)}


def _renice_self(nice: int) -> None:
    """Every thread of this process at `nice` (threads made later inherit it)."""
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
        except OSError as exc:
            log(f"  the benchmark keeps its priority: {exc}")
            return


def _default_nice() -> None:
    os.setpriority(os.PRIO_PROCESS, 0, 0)


def _marked(path: Path) -> float:
    """When the platform recorded the stop (its stop marker, `cluster/stopping.py`)."""
    try:
        return float(path.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")


def _finished(row: dict[str, Any]) -> float:
    try:
        return float(row.get("output") or 0)
    except ValueError:
        return 0.0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import ray
    from ray import serve

    from cluster.state import StateStore
    from eval_actors import control_plane
    from proctor.settings import Settings
    from serve_app.deployment import APP_NAME, deployment

    home = Path(tempfile.mkdtemp(prefix="pbs-"))
    home.chmod(0o711)
    settings = Settings(home=home, results_uri=(home / "results").as_uri(), state_url=f"sqlite:///{home}/state.db",
                        ray_namespace="proctor-bench-stop", rate_limit_per_s=0)
    port = _free_port()
    conditions: dict[str, list[dict[str, Any]]] = {}
    burners: list[subprocess.Popen[bytes]] = []
    try:
        if args.ingress == "haproxy":  # as `proctor up` runs it: in the Ray processes' environment from their start
            from serve_app.ingress import ingress_env

            os.environ.update(ingress_env("haproxy", stats_port=_free_port(), metrics_port=_free_port(),
                                          folder=home / "haproxy"))
        ray.init(address="local", num_cpus=args.cpus, namespace=settings.ray_namespace, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
        control_plane.start(settings)
        store = StateStore(settings.state)
        store.create_user("bench", "admin")
        token, _ = store.create_token("bench", "bench")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(settings), name=APP_NAME, route_prefix="/")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        _renice_self(args.nice)
        one_run(client, token, store, 1, "warm-up", home)
        for condition in ("idle", "saturated"):
            if condition == "saturated":
                burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"], preexec_fn=_default_nice)
                           for _ in range(args.burners)]
            runs = conditions[condition] = []
            for i in range(args.runs):
                run = one_run(client, token, store, args.shards, f"stop-{condition}-{i}", home)
                runs.append(run)
                log(f"  {condition:9s} run {i + 1:2d}: dead {run['dead_s'] * 1000:7.0f} ms  answer "
                    f"{run['answer_s'] * 1000:7.0f} ms  {run['status']}  late rows counted {run['late_counted']}")
            for burner in burners:
                burner.kill()
                burner.wait()
            burners = []
        client.close()
        store.close()
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
        if ray.is_initialized():
            try:
                serve.shutdown()
            except Exception:  # Serve never started
                pass
            control_plane.stop(settings)
            ray.shutdown()
        shutil.rmtree(home, ignore_errors=True)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host_cpus": os.cpu_count(),
            "runs": args.runs, "shards": args.shards, "burners": args.burners,
            "conditions": {c: summary(runs) for c, runs in conditions.items()}}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    dead = [r["dead_s"] for r in runs]
    answer = [r["answer_s"] for r in runs]
    reached = [r["reached_s"] for r in runs if r["reached_s"] == r["reached_s"]]
    statuses: dict[str, int] = {}
    for r in runs:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {"dead_p50_s": quantile(dead, 0.5), "dead_p99_s": quantile(dead, 0.99), "dead_max_s": max(dead),
            "answer_p50_s": quantile(answer, 0.5), "answer_p99_s": quantile(answer, 0.99),
            "reached_p50_s": quantile(reached, 0.5),
            "late_counted": sum(r["late_counted"] for r in runs), "counted": sum(r["counted"] for r in runs),
            "statuses": statuses, "runs": runs}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(label: str, result: dict[str, Any]) -> None:
    print(f"{label}: {result['runs']} runs per condition, {result['shards']} shards each, "
          f"{result['burners']} burners on {result['host_cpus']} CPUs")
    for condition, s in result["conditions"].items():
        print(f"  {condition:9s} dead p50 {s['dead_p50_s'] * 1000:7.0f} ms  p99 {s['dead_p99_s'] * 1000:7.0f} ms  "
              f"max {s['dead_max_s'] * 1000:7.0f} ms | answer p50 {s['answer_p50_s'] * 1000:7.0f} ms  "
              f"p99 {s['answer_p99_s'] * 1000:7.0f} ms | reached the API p50 {s['reached_p50_s'] * 1000:6.0f} ms | late rows counted {s['late_counted']} of "
              f"{s['counted']} | {s['statuses']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="stops per condition")
    ap.add_argument("--shards", type=int, default=2, help="shards (sandboxes) per evaluation")
    ap.add_argument("--burners", type=int, default=6, help="busy processes in the saturated condition")
    ap.add_argument("--cpus", type=int, default=8, help="CPUs declared to Ray (admission, not the host's)")
    ap.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                    help="Serve's ingress: HAProxy (what `proctor up` runs) or Serve's Python proxy")
    ap.add_argument("--nice", type=int, default=-15, help="the benchmark's own priority (client and watcher)")
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="the checkout of Proctor to measure (default: this file's)")
    ap.add_argument("--baseline-tree", type=Path, help="measure the code in this tree first, as the baseline")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tree = str(args.tree.resolve())
    sys.path.insert(0, tree)
    os.environ["PYTHONPATH"] = tree  # the Ray workers it starts import the same code
    baseline = None
    if args.baseline_tree is not None:
        log(f"baseline: the code in {args.baseline_tree}")
        argv = [sys.executable, __file__, "--json", "--runs", str(args.runs), "--shards", str(args.shards),
                "--burners", str(args.burners), "--cpus", str(args.cpus), "--nice", str(args.nice),
                "--ingress", args.ingress, "--tree", str(args.baseline_tree.resolve())]
        baseline = json.loads(subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout)
        log("this tree")
    result = measure(args)
    if args.json:
        print(json.dumps(result if baseline is None else {"baseline": baseline, "this": result}, indent=2))
        return
    if baseline is not None:
        report(f"baseline ({args.baseline_tree})", baseline)
    report("this tree", result)
    if baseline is not None:
        for condition in result["conditions"]:
            b, t = baseline["conditions"][condition], result["conditions"][condition]
            print(f"  ratio baseline/this, {condition}: dead p50 {b['dead_p50_s'] / t['dead_p50_s']:.1f}x  "
                  f"p99 {b['dead_p99_s'] / t['dead_p99_s']:.1f}x  answer p50 "
                  f"{b['answer_p50_s'] / t['answer_p50_s']:.1f}x")
    print("goal: dead p99 < 1 s saturated")


if __name__ == "__main__":
    main()
