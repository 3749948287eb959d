"""The aggregator: a restartable Ray actor that turns streamed sample rows into Parquet.

It wraps `cluster.aggregation.Aggregator` (buffering, flush thresholds, part names,
compaction) and runs the parts it hands back as Ray tasks, in parallel.

Nothing is lost or doubled when it dies: while a shard runs, its supervisor streams rows
(`add_records`, fire and forget) as a provisional attempt; when the shard ends, the
supervisor hands over the shard's complete rows (`finish_shard`, awaited until written)
as the final attempt, which supersedes the provisional parts. A restarted aggregator
may have lost unwritten provisional rows, never final ones; a re-run shard has a higher
attempt and supersedes both. Reads and compaction keep one row per (sample, epoch).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import ray

from cluster.aggregation import Aggregator as AggregationCore
from cluster.aggregation import write_part
from cluster.results import RESULTS_SCHEMA, summarize
from cluster.storage import StorageError
from proctor.settings import Settings

log = logging.getLogger("proctor.aggregator")
FLUSH_EVERY_S = 5.0
# part-writing tasks in flight at once: they ask for no CPU, so without a bound a burst of
# finishing shards makes Ray start a worker process (~120 MB each) for every waiting task
WRITES_IN_FLIGHT = 2 * (os.cpu_count() or 1)


def streamed_attempt(attempt: int) -> int:
    """The aggregation attempt of rows streamed during a shard's `attempt` (0-based)."""
    return 2 * attempt + 1


def final_attempt(attempt: int) -> int:
    """The aggregation attempt of a shard's complete rows: supersedes the streamed ones."""
    return 2 * attempt + 2


@ray.remote(num_cpus=0, max_retries=3)
def _write_part_task(job: Any, settings: Settings) -> Any:
    return write_part(job, settings)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=1000)
class Aggregator:
    def __init__(self, settings: Settings, bus_name: str):
        self.settings = settings
        self.bus_name = bus_name
        self.core = AggregationCore(settings.results, settings)
        self.lock = asyncio.Lock()
        self.finished: set[tuple[str, str, int]] = set()
        self.finalizing: dict[str, asyncio.Lock] = {}
        self.writes = asyncio.Semaphore(WRITES_IN_FLIGHT)
        asyncio.get_event_loop().create_task(self._flush_loop())

    async def ping(self) -> bool:
        return True

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            try:
                async with self.lock:
                    jobs = self.core.due()
                await self._run(jobs)
            except Exception:
                log.exception("periodic flush failed")

    async def _run(self, jobs: list[Any]) -> None:
        if jobs:
            await asyncio.gather(*(self._write(job) for job in jobs))

    async def _write(self, job: Any) -> Any:
        async with self.writes:
            return await _write_part_task.remote(job, self.settings)

    async def add_records(self, eval_id: str, shard_id: str, attempt: int, records: list[Any],
                          scorer_names: list[str]) -> int:
        if (eval_id, shard_id, attempt) in self.finished:
            return 0
        async with self.lock:
            self.core.open(eval_id, scorer_names)
            jobs = self.core.add(eval_id, shard_id, streamed_attempt(attempt), records)
        await self._run(jobs)
        return len(records)

    async def finish_shard(self, eval_id: str, shard_id: str, attempt: int, records: list[Any],
                           scorer_names: list[str]) -> int:
        """Write the shard's complete rows and drop what they supersede. Idempotent."""
        key = (eval_id, shard_id, attempt)
        if key in self.finished:
            return len(records)
        final = final_attempt(attempt)
        async with self.lock:
            self.core.open(eval_id, scorer_names)
            jobs = self.core.add(eval_id, shard_id, final, records)
            jobs += self.core.finish_shard(eval_id, shard_id, final)
        await self._run(jobs)
        await asyncio.to_thread(self.core.drop_superseded, eval_id, shard_id, final)
        self.finished.add(key)
        return len(records)

    async def store_artifacts(self, eval_id: str, shard_id: str, artifacts: list[tuple[str, bytes]]) -> int:
        """Keep the shard's artifacts; one that cannot be written is logged and skipped (the
        shard's rows and state do not hang on it). Returns how many were kept."""
        kept = 0
        for path, data in artifacts:
            try:
                await asyncio.to_thread(self.core.store.write_artifact, eval_id, shard_id, path, data)
                kept += 1
            except StorageError as exc:
                log.error("%s/%s: artifact %r not kept: %s", eval_id, shard_id, path, exc)
        return kept

    async def quarantine_shard(self, eval_id: str, shard_id: str, attempt: int, records: list[Any],
                               scorer_names: list[str], artifacts: list[tuple[str, bytes]],
                               report: dict[str, Any]) -> int:
        """A safety-stopped shard: its rows are written as any shard's (so that the
        evaluation's bookkeeping stays whole), then moved with its artifacts to the
        quarantine prefix. Idempotent."""
        await self.finish_shard(eval_id, shard_id, attempt, records, scorer_names)
        moved = await asyncio.to_thread(self.core.store.quarantine_shard, eval_id, shard_id, artifacts, report)
        return len(moved)

    async def store_logs(self, eval_id: str, shard_id: str, attempt: int, lines: list[dict[str, Any]]) -> int:
        await asyncio.to_thread(self.core.store.write_logs, eval_id, shard_id, attempt, lines)
        return len(lines)

    async def store_resources(self, eval_id: str, shard_id: str, attempt: int, samples: list[dict[str, Any]]) -> int:
        await asyncio.to_thread(self.core.store.write_resources, eval_id, shard_id, attempt, samples)
        return len(samples)

    async def finalize(self, eval_id: str, scorer_names: list[str], extra: dict[str, Any],
                       by: dict[str, str] | None = None) -> dict[str, Any]:
        """Write what is left, compact the parts, and write the summary. Idempotent;
        calls for one evaluation run one at a time."""
        async with self.finalizing.setdefault(eval_id, asyncio.Lock()):
            return await self._finalize(eval_id, scorer_names, extra, by)

    async def _finalize(self, eval_id: str, scorer_names: list[str], extra: dict[str, Any],
                        by: dict[str, str] | None) -> dict[str, Any]:
        async with self.lock:
            self.core.open(eval_id, scorer_names)
            jobs = self.core.finish_evaluation(eval_id)
        await self._run(jobs)
        if await asyncio.to_thread(self.core.store.parts, eval_id):
            await asyncio.to_thread(self.core.compact, eval_id)
            table = await asyncio.to_thread(self.core.store.read, eval_id)
        else:  # nothing ran (cancelled while queued): an empty table, still a summary
            table = RESULTS_SCHEMA.empty_table()
        summary = summarize(table, scorer_names, by=by)
        summary.update({"eval_id": eval_id, **extra})
        await asyncio.to_thread(self.core.store.write_summary, eval_id, summary)
        self.finished = {k for k in self.finished if k[0] != eval_id}
        return {"summary": summary, "results_uri": self.core.store.eval_uri(eval_id)}
