"""Safety: time from a violation to a dead sandbox, and what the monitors cost.

Two measurements, in real gVisor sandboxes (`GvisorRuntime`, ptrace), through the local
evaluation driver (`run_evaluation`: the shard executor with its safety guard):

  stop latency — every sample of examples/red-team.yaml run as its own evaluation,
                 --rounds times (default 5 x 10 samples = 50 runs). Per run: from the
                 moment a monitor or rule reported the violation (`Violation.detected`)
                 to the moment the sandbox was dead (its process reaped after the kill),
                 as the guard records it (`kill_s`). Also counted: runs that ended
                 `safety_stopped` by the expected rule (contained and caught).
  overhead     — the benign suites (examples/arithmetic.yaml, examples/agentic-files.yaml)
                 with the monitors on (the default strict policy: resource monitor,
                 gVisor syscall tracing, canaries, text rules) against the same with
                 them off (`monitored=False`, the baseline only), alternating, --repeats
                 times; medians of wall time.

  under load   — with --burners N, the stop latency again with N busy processes
                 (`python -c 'while 1: pass'`) beside it: 6 saturate a 2-core host 3x.

Goals: p99 stop latency under 1 s (idle and saturated); overhead under 10%.

    .venv/bin/python benchmarks/safety_stop.py [--rounds 5] [--repeats 5] [--burners 6] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cluster.runtimes import GvisorRuntime
from eval_actors.local_run import run_evaluation
from localrun import gvisor_folder
from proctor.settings import Settings
from proctor.spec import load_spec, parse_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def stop_latency(settings: Settings, runtime: GvisorRuntime, rounds: int) -> dict[str, Any]:
    suite = yaml.safe_load((EXAMPLES / "red-team.yaml").read_text())
    kills: list[float] = []
    caught = runs = 0
    misses: list[str] = []
    for _ in range(rounds):
        for sample in suite["dataset"]["samples"]:
            spec = parse_spec({**suite, "name": f"rt-{sample['id']}", "dataset": {"samples": [sample]}})
            result = await run_evaluation(spec, settings, runtime=runtime)
            runs += 1
            [outcome] = result.outcomes
            stop = outcome.safety.stopped_by or {}
            if outcome.status == "safety_stopped" and f"{stop.get('monitor')}/{stop.get('rule')}" == \
                    sample["metadata"]["expect"]:
                caught += 1
            else:
                misses.append(f"{sample['id']}: {outcome.status} {stop.get('monitor')}/{stop.get('rule')}")
            if outcome.safety.kill_s is not None:
                kills.append(outcome.safety.kill_s)
    return {"runs": runs, "caught": caught, "misses": misses, "kills": len(kills),
            "p50_ms": 1000 * statistics.median(kills), "p99_ms": 1000 * percentile(kills, 0.99),
            "max_ms": 1000 * max(kills)}


async def overhead(settings: Settings, runtime: GvisorRuntime, repeats: int) -> dict[str, Any]:
    specs = [load_spec(EXAMPLES / "arithmetic.yaml"), load_spec(EXAMPLES / "agentic-files.yaml")]
    times: dict[bool, list[float]] = {True: [], False: []}
    incidents = 0
    for i in range(repeats):
        for monitored in ((True, False) if i % 2 == 0 else (False, True)):
            t0 = time.perf_counter()
            for spec in specs:
                result = await run_evaluation(spec, settings, runtime=runtime, monitored=monitored)
                assert result.status == "succeeded", result.summary
                incidents += sum(len(o.safety.violations) for o in result.outcomes)
            times[monitored].append(time.perf_counter() - t0)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"on_s": on, "off_s": off, "overhead": on / off - 1, "benign_incidents": incidents,
            "repeats": repeats}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--burners", type=int, default=0, help="also measure the stop with N busy processes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with gvisor_folder() as (settings, runtime):
        await run_evaluation(load_spec(EXAMPLES / "arithmetic.yaml"), settings, runtime=runtime)  # warm up
        stops = await stop_latency(settings, runtime, args.rounds)
        loaded = None
        if args.burners:
            burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.burners)]
            try:
                loaded = await stop_latency(settings, runtime, args.rounds)
            finally:
                for burner in burners:
                    burner.kill()
                    burner.wait()
        cost = await overhead(settings, runtime, args.repeats)
    if args.json:
        print(json.dumps({"stop": stops, "stop_saturated": loaded, "overhead": cost}, indent=2))
        return
    print(f"red-team runs: {stops['runs']}, contained and stopped by the expected rule: {stops['caught']}"
          + (f"  (misses: {'; '.join(stops['misses'])})" if stops["misses"] else ""))
    print(f"violation -> sandbox dead over {stops['kills']} stops: p50 {stops['p50_ms']:.1f} ms, "
          f"p99 {stops['p99_ms']:.1f} ms, max {stops['max_ms']:.1f} ms   (goal: p99 < 1000 ms)")
    if loaded is not None:
        print(f"  with {args.burners} busy processes: caught {loaded['caught']} of {loaded['runs']}, "
              f"p50 {loaded['p50_ms']:.1f} ms, p99 {loaded['p99_ms']:.1f} ms, max {loaded['max_ms']:.1f} ms, "
              f"ratio p99 saturated/idle {loaded['p99_ms'] / stops['p99_ms']:.1f}x")
    print(f"benign suites (arithmetic + agentic-files), median of {cost['repeats']}: monitors on {cost['on_s']:.2f} s, "
          f"off {cost['off_s']:.2f} s -> overhead {cost['overhead']:+.1%}   (goal < 10%); "
          f"violations on the benign suites: {cost['benign_incidents']}")


if __name__ == "__main__":
    asyncio.run(main())
