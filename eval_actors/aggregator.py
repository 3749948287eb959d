"""The aggregator: a restartable Ray actor that turns streamed sample rows into Parquet.

It wraps `cluster.aggregation.Aggregator` (buffering, flush thresholds, part names,
compaction) and runs the parts it hands back as Ray tasks, in parallel.

Its methods take a shard's attempt as the rows' `attempt` column counts it (1-based); the
parts of an attempt are named by an aggregation attempt of their own (`streamed_attempt`,
`final_attempt`), which orders them. Nothing is lost or doubled when it dies: while a shard runs, its supervisor streams rows
(`add_records`, fire and forget) as a provisional attempt; when the shard ends, the
supervisor hands over the shard's complete rows (`finish_shard`, awaited until written)
as the final attempt, which supersedes the provisional parts. A restarted aggregator
may have lost unwritten provisional rows, never final ones; a re-run shard has a higher
attempt and supersedes both. Reads and compaction keep one row per (sample, epoch).

While the results store is away (a write still fails after `Settings.store_retry_s` of
retries), nothing fails: parts, artifacts, logs and summaries wait in the outbox on local
disk (`cluster/outbox.py`), which a loop drains in order once the store answers, also after
a restart of this actor. Finishing an evaluation waits for its entries to be written; one
whose store stays away past `Settings.store_outage_budget_s` fails with an error that says
so, and its entries are still written when the store returns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import ray

from cluster.aggregation import Aggregator as AggregationCore
from cluster.aggregation import write_part
from cluster.outbox import Outbox
from cluster.results import PART_RE, RESULTS_SCHEMA, parquet_bytes, summarize
from cluster.retry import backoff_s
from cluster.storage import StorageError, StoreUnavailableError, write_bytes
from cluster.transcripts import TranscriptStore
from proctor.bus_events import StoreEvent, event
from proctor.observability import observe_process, tracing
from proctor.settings import Settings

from .handles import ActorHandles
from .traces import child, traced

log = logging.getLogger("proctor.aggregator")
FLUSH_EVERY_S = 5.0
# part-writing tasks in flight at once: they ask for no CPU, so without a bound a burst of
# finishing shards makes Ray start a worker process (~120 MB each) for every waiting task
WRITES_IN_FLIGHT = 2 * (os.cpu_count() or 1)
DRAIN_EVERY_S = 1.0
EVAL_ID_RE = re.compile(r"/eval_id=([^/]+)/")
T = TypeVar("T")


def streamed_attempt(attempt: int) -> int:
    """The aggregation attempt (the parts' names) of rows streamed during a shard's
    `attempt` (1-based, as the rows' `attempt` column counts)."""
    return 2 * attempt - 1


def final_attempt(attempt: int) -> int:
    """The aggregation attempt of a shard's complete rows: supersedes the streamed ones."""
    return 2 * attempt


@ray.remote(num_cpus=0, max_retries=3)
def _write_part_task(job: Any, settings: Settings, trace: dict[str, str] | None = None) -> Any:
    observe_process(settings, "results-writer")
    with child("results.write_part", trace, eval_id=job.eval_id, shard_id=job.shard_id, rows=job.table.num_rows,
               reason=job.reason):
        try:
            return write_part(job, settings)
        except StoreUnavailableError as exc:  # returned, not raised: the aggregator spills the part
            return exc


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=1000)
class Aggregator:
    def __init__(self, settings: Settings, bus_name: str):
        observe_process(settings, "aggregator")
        self.settings = settings
        self.bus_name = bus_name
        self.actors = ActorHandles(settings.ray_namespace)
        self.core = AggregationCore(settings.results, settings)
        self.transcripts = TranscriptStore(settings.results, settings)
        self.lock = asyncio.Lock()
        self.finished: set[tuple[str, str, int]] = set()
        self.finalizing: dict[str, asyncio.Lock] = {}
        self.writes = asyncio.Semaphore(WRITES_IN_FLIGHT)
        self.outbox = Outbox.from_settings(settings)
        self.core.store.put = self._put
        self.core.unstored = lambda eval_id: [e.uri for e in self.outbox.entries(eval_id)]
        self.degraded = False
        loop = asyncio.get_event_loop()
        loop.create_task(self._flush_loop())
        loop.create_task(self._drain_loop())

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
        if not self.outbox.waiting():
            async with self.writes:
                written = await _write_part_task.remote(job, self.settings, tracing.carrier())
            if not isinstance(written, StoreUnavailableError):
                return written
            log.warning("%s: the results store is away; part %s waits in the outbox: %s", job.eval_id, job.uri, written)
        await asyncio.to_thread(self._spill, job.uri, parquet_bytes(job.table), job.eval_id)
        return None

    def _put(self, uri: str, data: bytes) -> None:
        """How the results store writes whole files here: straight to the store, or to the
        outbox while the store is away or earlier writes wait there (to keep their order)."""
        eval_id = m[1] if (m := EVAL_ID_RE.search(uri)) else ""
        if not self.outbox.waiting():
            try:
                write_bytes(uri, data, self.settings)
                return
            except StoreUnavailableError as exc:
                log.warning("the results store is away; %s waits in the outbox: %s", uri, exc)
        self._spill(uri, data, eval_id)

    def _spill(self, uri: str, data: bytes, eval_id: str) -> None:
        self.outbox.put(uri, data, eval_id)
        if not self.degraded:
            self.degraded = True
            self._publish_store(True)

    def _publish_store(self, degraded: bool) -> None:
        try:
            self.actors.get(self.bus_name).publish.remote([event(StoreEvent(store="results", degraded=degraded))])
        except Exception:  # the bus restarts: the next change says it again
            log.warning("could not publish that the results store is %s", "degraded" if degraded else "back")

    async def _drain_loop(self) -> None:
        while True:
            await asyncio.sleep(DRAIN_EVERY_S)
            try:
                await self.drain()
            except Exception:
                log.exception("draining the outbox failed")

    async def drain(self) -> dict[str, Any]:
        """Write what waits in the outbox, oldest first, as far as the store takes it."""
        if not self.outbox.waiting():
            return {"written": 0, "waiting": 0, "error": None}
        drained = await asyncio.to_thread(self.outbox.drain)
        if drained.written:
            log.info("%d writes left the outbox for the results store; %d wait", drained.written, drained.waiting)
        if self.degraded and not drained.waiting:
            self.degraded = False
            self._publish_store(False)
        return {"written": drained.written, "waiting": drained.waiting, "error": drained.error}

    async def store_status(self) -> dict[str, Any]:
        """The results store as `/health` and the dashboard show it: degraded while writes
        wait in the outbox."""
        return await asyncio.to_thread(self.outbox.status)

    async def _stored(self, eval_id: str) -> None:
        """Return once none of the evaluation's writes waits in the outbox; raises
        `StoreUnavailableError` while the store refuses them."""
        if await asyncio.to_thread(self.outbox.entries, eval_id):
            drained = await self.drain()
            waiting = await asyncio.to_thread(self.outbox.entries, eval_id)
            if waiting:
                raise StoreUnavailableError(f"{len(waiting)} writes of {eval_id} wait in the outbox "
                                            f"{self.outbox.folder}: {drained['error']}")

    async def _through_outage(self, eval_id: str, step: Callable[[], Awaitable[T]]) -> T:
        """`step()`, again (after this evaluation's waiting writes are stored) for as long as
        the store is away, up to `Settings.store_outage_budget_s` from when it went away."""
        first_failure: float | None = None
        attempt = 0
        while True:
            try:
                await self._stored(eval_id)
                return await step()
            except StorageError as exc:
                if not exc.transient:
                    raise
                now = time.time()
                first_failure = first_failure or now
                oldest = min((e.at for e in await asyncio.to_thread(self.outbox.entries)), default=now)
                away = now - min(first_failure, oldest)
                if away > self.settings.store_outage_budget_s:
                    waiting = await asyncio.to_thread(self.outbox.entries, eval_id)
                    raise StorageError(
                        f"the results store {self.settings.results} has been away for {away:.0f}s, past "
                        f"store_outage_budget_s ({self.settings.store_outage_budget_s:.0f}s): {exc}. "
                        f"{len(waiting)} of this evaluation's writes wait in {self.outbox.folder} and are "
                        "written when the store returns (or run `proctor results sync`)") from exc
                attempt += 1
                await asyncio.sleep(backoff_s(attempt, base_s=0.5, cap_s=10.0))

    async def add_records(self, eval_id: str, shard_id: str, attempt: int, records: list[Any],
                          scorer_names: list[str]) -> int:
        if (eval_id, shard_id, attempt) in self.finished:
            return 0
        async with self.lock:
            self.core.open(eval_id, scorer_names)
            jobs = self.core.add(eval_id, shard_id, streamed_attempt(attempt), records, row_attempt=attempt)
        await self._run(jobs)
        return len(records)

    @traced("aggregator.finish_shard")
    async def finish_shard(self, eval_id: str, shard_id: str, attempt: int, records: list[Any],
                           scorer_names: list[str]) -> int:
        """Write the shard's complete rows and drop what they supersede. Idempotent."""
        key = (eval_id, shard_id, attempt)
        if key in self.finished:
            return len(records)
        final = final_attempt(attempt)
        async with self.lock:
            self.core.open(eval_id, scorer_names)
            jobs = self.core.add(eval_id, shard_id, final, records, row_attempt=attempt)
            jobs += self.core.finish_shard(eval_id, shard_id, final)
        await self._run(jobs)
        if not await asyncio.to_thread(self.outbox.entries, eval_id):  # else compaction drops them later
            try:
                await asyncio.to_thread(self.core.drop_superseded, eval_id, shard_id, final)
            except StorageError as exc:  # superseded parts are skipped by readers and dropped by compaction
                log.warning("%s/%s: superseded parts not dropped yet: %s", eval_id, shard_id, exc)
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

    @traced("aggregator.quarantine_shard")
    async def quarantine_shard(self, eval_id: str, shard_id: str, attempt: int, records: list[Any],
                               scorer_names: list[str], artifacts: list[tuple[str, bytes]],
                               report: dict[str, Any]) -> int:
        """A safety-stopped shard: its rows are written as any shard's (so that the
        evaluation's bookkeeping stays whole), then moved with its artifacts to the
        quarantine prefix. Idempotent."""
        await self.finish_shard(eval_id, shard_id, attempt, records, scorer_names)
        # parts still waiting for the store go to the quarantine prefix, never to the results
        await asyncio.to_thread(self.outbox.retarget, eval_id,
                                lambda uri: self._quarantined(eval_id, shard_id, uri))
        moved = await self._through_outage(eval_id, lambda: asyncio.to_thread(
            self.core.store.quarantine_shard, eval_id, shard_id, artifacts, report))
        return len(moved)

    def _quarantined(self, eval_id: str, shard_id: str, uri: str) -> str | None:
        """Where a spilled part of `shard_id` goes when the shard is quarantined; None for others."""
        name = uri.rsplit("/", 1)[-1]
        m = PART_RE.match(name)
        if m is None or m["shard"] != shard_id or uri != self.core.store.part_uri(
                eval_id, shard_id, int(m["attempt"]), int(m["seq"])):
            return None
        return self.core.store.quarantine_uri(eval_id, shard_id, name)

    async def quarantine_artifacts(self, eval_id: str, shard_id: str, artifacts: list[tuple[str, bytes]],
                                   report: dict[str, Any]) -> int:
        """Artifacts the cleanup scan flagged: kept in the quarantine prefix, never published."""
        moved = await asyncio.to_thread(self.core.store.quarantine_artifacts, eval_id, shard_id, artifacts, report)
        return len(moved)

    async def store_logs(self, eval_id: str, shard_id: str, attempt: int, lines: list[dict[str, Any]]) -> int:
        await asyncio.to_thread(self.core.store.write_logs, eval_id, shard_id, attempt, lines)
        return len(lines)

    async def store_resources(self, eval_id: str, shard_id: str, attempt: int, samples: list[dict[str, Any]]) -> int:
        await asyncio.to_thread(self.core.store.write_resources, eval_id, shard_id, attempt, samples)
        return len(samples)

    @traced("aggregator.finalize")
    async def finalize(self, eval_id: str, scorer_names: list[str], extra: dict[str, Any],
                       by: dict[str, str] | None = None) -> dict[str, Any]:
        """Write what is left, compact the parts, and write the summary. Idempotent;
        calls for one evaluation run one at a time."""
        async with self.finalizing.setdefault(eval_id, asyncio.Lock()):
            return await self._through_outage(eval_id, lambda: self._finalize(eval_id, scorer_names, extra, by))

    async def _finalize(self, eval_id: str, scorer_names: list[str], extra: dict[str, Any],
                        by: dict[str, str] | None) -> dict[str, Any]:
        async with self.lock:
            self.core.open(eval_id, scorer_names)
            jobs = self.core.finish_evaluation(eval_id)
        await self._run(jobs)
        await self._stored(eval_id)  # the parts spilled while the store was away, before compacting
        if await asyncio.to_thread(self.core.store.parts, eval_id):
            await asyncio.to_thread(self.core.compact, eval_id)
            table = await asyncio.to_thread(self.core.store.read, eval_id)
        else:  # nothing ran (cancelled while queued): an empty table, still a summary
            table = RESULTS_SCHEMA.empty_table()
        summary = summarize(table, scorer_names, by=by)
        summary.update({"eval_id": eval_id, **extra})
        await asyncio.to_thread(self.core.store.write_summary, eval_id, summary)
        await self._stored(eval_id)  # the summary too, if it was spilled
        try:  # its shards' transcript logs become one; if not, they stay readable where they are
            await asyncio.to_thread(self.transcripts.merge, eval_id, summary)
        except Exception:
            log.exception("%s: the transcript logs of its shards were not merged", eval_id)
        self.finished = {k for k in self.finished if k[0] != eval_id}
        return {"summary": summary, "results_uri": self.core.store.eval_uri(eval_id)}
