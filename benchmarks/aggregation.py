"""Writing results through the aggregator against one direct Parquet write, on S3.

The same 1,000,000 rows (input ~60 characters, output ~20, target ~5, a scores map with
2 entries, two epochs per sample, 10 shards) end in Parquet on a moto S3 server on
127.0.0.1, started here as in the tests. Two inputs, each measured both ways:

  --input records  the aggregator gets `SampleRecord`s, 1,000 at a time, round-robin over
                   the shards, and converts them itself; direct = `records_table` of all
                   records + ONE `pyarrow.parquet.write_table` (its write alone is printed
                   too: most of both times is Python objects -> Arrow).
  --input arrow    the senders (supervisors) have converted each batch already; direct =
                   ONE `write_table` of the same rows as one table, built before the clock.

  aggregation — `Aggregator.add` per batch; each part it hands back (every `--flush-rows`
                rows of a shard) is written at once by a Ray task (`--executor ray`, the
                default; `ray.init(address="local", num_cpus=--workers)`) or a thread
                (`--executor threads`) while more rows are buffered; then `finish_shard`
                and `drop_superseded` for every shard. Compaction of the parts into data
                files is timed on its own, outside the ratio.

Prints both times, rows/s, and the ratio direct_time / aggregation_time (goal >= 0.7).

    .venv/bin/python benchmarks/aggregation.py [--rows 1000000] [--executor ray|threads]
        [--input records|arrow|both] [--flush-rows 50000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from s3server import MotoS3Server  # noqa: E402

from cluster.aggregation import Aggregator, FlushPolicy, WriteJob, compact, write_part  # noqa: E402
from cluster.results import ResultsStore, SampleRecord, records_table  # noqa: E402
from cluster.storage import delete, filesystem  # noqa: E402
from proctor.settings import Settings  # noqa: E402

SCORERS = ["exact", "f1"]


def make_records(rows: int, shards: int) -> list[list[SampleRecord]]:
    """`rows` records split evenly over `shards` shards, two epochs per sample."""
    per_shard: list[list[SampleRecord]] = [[] for _ in range(shards)]
    for i in range(rows):
        s, (n, epoch) = i % shards, divmod(i // shards, 2)
        a, b = (i * 7919) % 9973, (i * 104729) % 8191
        answer = str(a + b).rjust(5, "0")
        output = f"The answer is {a + b}."[:20].ljust(20)
        per_shard[s].append(SampleRecord(
            f"{s:05d}", f"q-{s:03d}-{n:07d}", epoch + 1,
            f"Question {n:07d}: what is {a:4d} plus {b:4d}? Reply with a number.", answer, output,
            {"exact": float(output.strip().endswith(f"{a + b}.")), "f1": (i % 10) / 10},
            started_at=1_700_000_000 + i / 1000, completed_at=1_700_000_001 + i / 1000,
            input_tokens=24, output_tokens=6, model_calls=1, turns=1,
            model="reference", runtime="gvisor", isolation="strong",
        ))
    return per_shard


def submitter(executor: str, settings: Settings, workers: int) -> tuple[Callable[[WriteJob], Any], Callable[[list[Any]], None], Callable[[], None]]:
    """(submit a job, wait for submitted jobs, shut down) for Ray tasks or threads."""
    if executor == "ray":
        import ray

        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        task = ray.remote(num_cpus=1, max_retries=3)(write_part)
        settings_ref = ray.put(settings)
        return (lambda job: task.remote(job, settings_ref)), ray.get, ray.shutdown
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers)
    return (lambda job: pool.submit(write_part, job, settings)), (lambda fs: [f.result() for f in fs]), pool.shutdown


def batches(per_shard: list[list[SampleRecord]], arrow: bool) -> list[tuple[str, Any]]:
    """The stream the aggregator receives: batches of 1,000 records, round-robin over
    shards; as tables when the senders convert them (`--input arrow`)."""
    longest = max(len(r) for r in per_shard)
    out = []
    for start in range(0, longest, 1000):
        for s, recs in enumerate(per_shard):
            chunk = recs[start : start + 1000]
            out.append((f"{s:05d}", records_table(chunk, SCORERS) if arrow else chunk))
    return out


def run_aggregation(stream: list[tuple[str, Any]], shards: int, settings: Settings, eval_id: str, flush_rows: int,
                    submit: Callable[[WriteJob], Any], wait: Callable[[list[Any]], None]) -> tuple[float, int]:
    started = time.perf_counter()
    agg = Aggregator(settings.results, settings, FlushPolicy(max_rows=flush_rows, max_bytes=2**40,
                                                              max_buffered_bytes=2**40))
    agg.open(eval_id, SCORERS)
    pending = []
    for shard, chunk in stream:
        pending.extend(submit(job) for job in agg.add(eval_id, shard, 1, chunk))
    for s in range(shards):
        pending.extend(submit(job) for job in agg.finish_shard(eval_id, f"{s:05d}", 1))
    wait(pending)
    for s in range(shards):
        agg.drop_superseded(eval_id, f"{s:05d}", 1)
    return time.perf_counter() - started, len(pending)


def run_direct(stream: list[tuple[str, Any]], settings: Settings, eval_id: str) -> tuple[float, float]:
    """(records_table + write_table, write_table alone) for records; for tables, the one
    table is built before the clock starts: both times are write_table's."""
    if isinstance(stream[0][1], pa.Table):
        table = pa.concat_tables([chunk for _, chunk in stream]).combine_chunks()
        started = time.perf_counter()
    else:
        started = time.perf_counter()
        table = records_table([r for _, chunk in stream for r in chunk], SCORERS)
    converted = time.perf_counter()
    fs, root = filesystem(settings.results, settings)
    pq.write_table(table, f"{root}/eval_id={eval_id}/direct.parquet", filesystem=fs, compression="zstd")
    done = time.perf_counter()
    return done - started, done - converted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--flush-rows", type=int, default=50_000)
    parser.add_argument("--executor", choices=["ray", "threads"], default="ray")
    parser.add_argument("--workers", type=int, default=2, help="Ray CPUs or threads writing parts")
    parser.add_argument("--input", choices=["records", "arrow", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; medians are printed")
    args = parser.parse_args()

    per_shard = make_records(args.rows, args.shards)
    modes = ["records", "arrow"] if args.input == "both" else [args.input]
    with MotoS3Server(bucket="proctor-bench") as server:
        settings = server.settings("bench")
        t0 = time.perf_counter()
        submit, wait, shutdown = submitter(args.executor, settings, args.workers)
        warm = records_table(per_shard[0][:10], SCORERS)  # workers up, modules imported
        wait([submit(WriteJob(f"{settings.results}/warmup/{i}.parquet", warm, "warmup", "w", 1, i, "warmup"))
              for i in range(2 * args.workers)])
        print(f"{args.executor} ready in {time.perf_counter() - t0:.1f}s (not timed)")
        try:
            results = {mode: measure(mode, per_shard, settings, args, submit, wait) for mode in modes}
        finally:
            shutdown()
    print(f"rows {args.rows:,}  shards {args.shards}  parts of {args.flush_rows:,} rows written by "
          f"{args.workers} {'Ray tasks' if args.executor == 'ray' else 'threads'}  (medians of {args.repeats})")
    for mode, (direct, write, agg, compaction, files) in results.items():
        what = "records_table + one write_table" if mode == "records" else "one write_table"
        print(f"[input {mode}] direct ({what}): {direct:.2f}s  {args.rows / direct:,.0f} rows/s"
              + (f"  (write_table alone {write:.2f}s)" if mode == "records" else ""))
        print(f"[input {mode}] aggregation (add, parallel parts, finish): {agg:.2f}s  {args.rows / agg:,.0f} rows/s"
              f"  | compaction afterwards {compaction:.2f}s -> {files} file(s), not in the ratio")
        print(f"[input {mode}] ratio direct_time / aggregation_time: {direct / agg:.2f} (goal >= 0.7)"
              + (f"; against write_table alone: {write / agg:.2f}" if mode == "records" else ""))


def measure(mode: str, per_shard: list[list[SampleRecord]], settings: Settings, args: argparse.Namespace,
            submit: Callable[[WriteJob], Any], wait: Callable[[list[Any]], None]) -> tuple[float, ...]:
    stream = batches(per_shard, arrow=mode == "arrow")
    times: list[tuple[float, float, float, float, int]] = []
    for i in range(args.repeats):
        eval_direct, eval_agg = f"direct-{mode}-{i}", f"agg-{mode}-{i}"
        d, w = run_direct(stream, settings, eval_direct)
        a, parts = run_aggregation(stream, args.shards, settings, eval_agg, args.flush_rows, submit, wait)
        c0 = time.perf_counter()
        result = compact(ResultsStore(settings.results, settings), eval_agg)
        c = time.perf_counter() - c0
        assert result.rows == args.rows, result
        times.append((d, w, a, c, len(result.files)))
        print(f"[input {mode}] run {i + 1}: direct {d:.2f}s (write {w:.2f}s)  aggregation {a:.2f}s in {parts} parts"
              f"  compaction {c:.2f}s")
        delete(f"{settings.results}/eval_id={eval_direct}", settings)
        delete(f"{settings.results}/eval_id={eval_agg}", settings)
    return tuple(statistics.median(t[k] for t in times) for k in range(4)) + (times[0][4],)


if __name__ == "__main__":
    main()
