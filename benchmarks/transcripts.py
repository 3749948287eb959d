"""Transcripts: what recording every sample's transcript costs, in time and in storage.

Two suites through the local evaluation driver (`run_evaluation`) in real gVisor sandboxes
(`GvisorRuntime`, ptrace): examples/agentic-files.yaml (6 samples through the tool loop)
and examples/arithmetic.yaml (240 samples, not agentic). For each, the wall time of the
whole evaluation with transcripts on (the default: the harness sends every message, model
turn and tool result; the executor checks and bounds them; each shard's Inspect `.eval`
log is written and the evaluation's merged at its end) against the same spec with
`transcripts: {enabled: false}` (the baseline), alternated, --repeats times; medians.
Also the bytes stored per sample: the evaluation's `.eval` log over its samples (the
Parquet rows beside it for scale), and the protocol lines the transcripts added.

Goal: overhead < 5%. Inspect AI is imported once before measuring (a process pays it
once; the platform's long-lived supervisors and aggregator do not pay it per evaluation).
Beside the wall time, the CPU seconds each evaluation took, of this process (the executor,
the recorder, the logs) and of its sandboxes (the runsc processes it started and reaped,
with what ran in them: `getrusage(RUSAGE_CHILDREN)`): on a machine others are loading, wall
times wander with their load, CPU seconds much less.

    .venv/bin/python benchmarks/transcripts.py [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from cluster.runtimes import GvisorRuntime
from eval_actors.local_run import run_evaluation
from localrun import gvisor_folder
from proctor.settings import Settings
from proctor.spec import load_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SUITES = ("agentic-files.yaml", "arithmetic.yaml")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


async def suite(name: str, settings: Settings, runtime: GvisorRuntime, repeats: int) -> dict[str, Any]:
    spec = load_spec(EXAMPLES / name)
    off_spec = spec.model_copy(update={"transcripts": spec.transcripts.model_copy(update={"enabled": False})})
    times: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    stored: list[dict[str, float]] = []
    for i in range(repeats):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            started, host, sandboxes = time.perf_counter(), time.process_time(), _children_cpu()
            result = await run_evaluation(spec if on else off_spec, settings, runtime=runtime)
            times[on].append(time.perf_counter() - started)
            cpu[on].append((time.process_time() - host, _children_cpu() - sandboxes))
            assert result.status == "succeeded", result.summary
            if on:
                folder = Path(result.results_uri.removeprefix("file://"))
                samples = result.summary["samples"]
                entries = sum(len(t.entries) for o in result.outcomes for t in o.transcripts)
                stored.append({"eval_bytes": _bytes(folder, "_transcripts/*.eval") / samples,
                               "parquet_bytes": _bytes(folder, "*.parquet") / samples,
                               "entries": entries / samples, "samples": samples})
    on, off = statistics.median(times[True]), statistics.median(times[False])
    last = stored[-1]
    host = {k: statistics.median(h for h, _ in v) for k, v in cpu.items()}
    boxes = {k: statistics.median(b for _, b in v) for k, v in cpu.items()}
    return {"suite": name, "on_s": on, "off_s": off, "overhead": on / off - 1, "repeats": repeats,
            "cpu_on_s": host[True] + boxes[True], "cpu_off_s": host[False] + boxes[False],
            "cpu_overhead": (host[True] + boxes[True]) / (host[False] + boxes[False]) - 1,
            "host_cpu_on_s": host[True], "host_cpu_off_s": host[False],
            "sandbox_cpu_on_s": boxes[True], "sandbox_cpu_off_s": boxes[False],
            "on_all_s": times[True], "off_all_s": times[False], "samples": last["samples"],
            "eval_bytes_per_sample": last["eval_bytes"], "parquet_bytes_per_sample": last["parquet_bytes"],
            "entries_per_sample": last["entries"]}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import inspect_ai.log  # noqa: F401 - imported once, as a long-lived process has it

    with gvisor_folder() as (settings, runtime):
        await run_evaluation(load_spec(EXAMPLES / "agentic-files.yaml"), settings, runtime=runtime)  # warm up
        figures = [await suite(name, settings, runtime, args.repeats) for name in SUITES]
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    for f in figures:
        print(f"{f['suite']} ({f['samples']} samples), median of {f['repeats']}: transcripts on {f['on_s']:.2f} s, "
              f"off {f['off_s']:.2f} s -> overhead {f['overhead']:+.1%}   (goal < 5%)")
        print(f"    CPU seconds: on {f['cpu_on_s']:.2f} (this process {f['host_cpu_on_s']:.2f}, sandboxes "
              f"{f['sandbox_cpu_on_s']:.2f}), off {f['cpu_off_s']:.2f} ({f['host_cpu_off_s']:.2f}, "
              f"{f['sandbox_cpu_off_s']:.2f}) -> {f['cpu_overhead']:+.1%}")
        print(f"    stored per sample: {f['eval_bytes_per_sample']:,.0f} bytes of .eval log "
              f"({f['entries_per_sample']:.1f} entries), beside {f['parquet_bytes_per_sample']:,.0f} bytes of Parquet")
        print(f"    runs on: {' '.join(f'{t:.2f}' for t in f['on_all_s'])}   off: "
              f"{' '.join(f'{t:.2f}' for t in f['off_all_s'])}")


if __name__ == "__main__":
    asyncio.run(main())
