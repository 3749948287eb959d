"""`proctor up` and `proctor down` on a warm machine, against a bare Ray head of the same shape.

proctor: `.venv/bin/proctor up --json` until it returns (it returns once the API answers
ready and the dashboard answers; both are checked right after), then `proctor down`
until it returns; each a fresh process, as a user runs them, with a private home and
free ports.
baseline: the same `ray start --head` that `up` runs (`cluster.localray.start`: the same
flags, ports, temp folder and environment), and its stop as `down` does it (the
session's processes killed, and waited for): what `up` and `down` cost at least.

One warm-up round of each is not counted (Python's and Ray's files in the page cache,
Gradio's first import compiled); then the rounds alternate. Prints every round, the
medians, proctor/baseline, and the steps of `up` (its `took_s`). Goals (issue 18): up
<= 10 s, down <= 5 s. Leaves nothing behind: both sides are stopped and the folder
removed in a `finally`.

    .venv/bin/python benchmarks/platform_up.py [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from cluster import localray
from proctor.settings import load_settings
from serve_app.platform import ray_bin, ray_env, ray_token_auth

PROCTOR = Path(sys.executable).parent / "proctor"


def free_port() -> int:
    """A free port outside Ray's worker port range (10002-19999)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def proctor_round(env: dict[str, str]) -> dict[str, Any]:
    started = time.monotonic()
    up = subprocess.run([str(PROCTOR), "up", "--json"], env=env, capture_output=True, text=True, timeout=600)
    up_s = time.monotonic() - started
    if up.returncode != 0:
        raise SystemExit(f"proctor up failed ({up.returncode}): {up.stderr[-2000:]}")
    info = json.loads(up.stdout)
    ready = answers(f"{info['api']}/api/v1/health") and answers(info["dashboard_ui"])
    started = time.monotonic()
    down = subprocess.run([str(PROCTOR), "down"], env=env, capture_output=True, text=True, timeout=600)
    down_s = time.monotonic() - started
    if down.returncode != 0:
        raise SystemExit(f"proctor down failed ({down.returncode}): {down.stderr[-2000:]}")
    return {"up_s": up_s, "down_s": down_s, "answered_on_return": ready, "took_s": info.get("took_s", {})}


def baseline_round(folder: Path, port: int, dashboard_port: int) -> dict[str, Any]:
    started = time.monotonic()
    head = localray.start(ray_bin(), port, dashboard_port, folder, ray_env(load_settings()))
    start_s = time.monotonic() - started
    started = time.monotonic()
    localray.stop(head)
    return {"up_s": start_s, "down_s": time.monotonic() - started}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ray_token_auth()  # the token both sides use (made once, in ~/.ray)
    load_before = os.getloadavg()[0]
    folder = Path(tempfile.mkdtemp(prefix="proctor-bench-up-"))
    env = {**os.environ, "PROCTOR_HOME": str(folder / "home"), "PROCTOR_CONFIG_DIR": str(folder / "config"),
           "PROCTOR_RAY_PORT": str(free_port()), "PROCTOR_RAY_DASHBOARD_PORT": str(free_port()),
           "PROCTOR_API_PORT": str(free_port()), "PROCTOR_UI_PORT": str(free_port()),
           "PROCTOR_HAPROXY_STATS_PORT": str(free_port()), "PROCTOR_HAPROXY_METRICS_PORT": str(free_port())}
    bare_ports = (free_port(), free_port())
    rounds: dict[str, list[dict[str, Any]]] = {"proctor": [], "baseline": []}
    try:
        folder.chmod(0o711)
        baseline_round(folder / "bare-ray", *bare_ports)  # warm-up, not counted
        proctor_round(env)
        for i in range(args.rounds):
            rounds["baseline"].append(baseline_round(folder / "bare-ray", *bare_ports))
            rounds["proctor"].append(proctor_round(env))
            if not args.json:
                b, p = rounds["baseline"][-1], rounds["proctor"][-1]
                print(f"round {i + 1}: proctor up {p['up_s']:.2f} s, down {p['down_s']:.2f} s "
                      f"(API and dashboard answered on return: {p['answered_on_return']}); "
                      f"bare ray start {b['up_s']:.2f} s, stop {b['down_s']:.2f} s", flush=True)
    finally:
        subprocess.run([str(PROCTOR), "down"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(folder, ignore_errors=True)
    median = {side: {k: statistics.median(r[k] for r in rs) for k in ("up_s", "down_s")} for side, rs in rounds.items()}
    steps = {k: statistics.median(r["took_s"].get(k, 0.0) for r in rounds["proctor"])
             for k in rounds["proctor"][0]["took_s"]}
    report = {"rounds": args.rounds, "cpus": os.cpu_count(), "load_before": load_before,
              "load_after": os.getloadavg()[0], "median": median, "up_steps_s": steps,
              "ratio_up": median["proctor"]["up_s"] / median["baseline"]["up_s"],
              "ratio_down": median["proctor"]["down_s"] / median["baseline"]["down_s"],
              "all_answered_on_return": all(r["answered_on_return"] for r in rounds["proctor"])}
    if args.json:
        print(json.dumps({**report, "each": rounds}, indent=2))
        return
    p, b = median["proctor"], median["baseline"]
    print(f"\n{args.rounds} rounds, {report['cpus']} CPUs, load average {load_before:.1f} before, "
          f"{report['load_after']:.1f} after")
    print(f"up:   proctor {p['up_s']:.2f} s, bare ray start {b['up_s']:.2f} s -> ratio {report['ratio_up']:.2f}"
          f"   (goal: up <= 10 s)")
    print(f"down: proctor {p['down_s']:.2f} s, bare stop {b['down_s']:.2f} s -> ratio {report['ratio_down']:.2f}"
          f"   (goal: down <= 5 s)")
    print("up's steps (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))


if __name__ == "__main__":
    main()
