"""The aggregator's logic, without Ray: scored samples in, Parquet parts out.

`Aggregator` buffers `SampleRecord`s per (evaluation, shard, attempt) and, when a buffer
holds enough rows or bytes or has waited long enough, turns it into a `WriteJob`: an
Arrow table and the URI of the part it becomes. The caller runs the jobs — `write_part`
is a plain function to ship to a Ray task, `run_jobs` runs a list on threads — so writes
go in parallel and the aggregator never blocks on storage while it buffers.

Idempotency (no sample row is ever counted twice):
- a part's URI is a function of (shard, attempt, seq): a retried job rewrites the same
  file, atomically (`cluster.results.write_parquet`);
- a sample (sample_id, epoch) sent twice keeps its last copy within a buffer; sent again
  after its part was written, the copy lands in a later part of the same attempt, and
  readers (`ResultsStore.read`) and `compact` keep one;
- a re-run shard has a higher attempt: its parts get new names, and once it has finished
  (`finish_shard`, its jobs run, then `drop_superseded`) the earlier attempts' parts are
  deleted. Until then `ResultsStore.read` keeps the row of the highest attempt;
- `compact` merges an evaluation's parts into a few `data-<n>.parquet` files, written
  before the parts are deleted, de-duplicated the same way.

Not thread-safe: one owner (an actor) calls it. Time comes from `clock`, so tests of
the age threshold need no sleeping.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from proctor.settings import Settings

from .results import (PART_RE, RESULTS_SCHEMA, PartFile, ResultsStore, SampleRecord, conform, deduplicate, records_table,
                      rows_to_keep, with_attempt, write_parquet)
from .storage import StorageError, filesystem, is_s3, join, retried, storage_errors

__all__ = ["AggregationError", "Aggregator", "Compaction", "FlushPolicy", "PartWritten", "ShardBuffer",
           "WriteJob", "compact", "run_jobs", "write_part"]


class AggregationError(RuntimeError):
    """The aggregator was used out of order (records for an evaluation it was not given,
    or for a shard under another shard's id; superseded parts dropped before their
    replacement was written).
    A bug in the caller: the supervisor and the aggregator actor let it propagate."""


@dataclass(frozen=True)
class FlushPolicy:
    """When a buffer becomes a part. Bytes are estimated from the records' strings."""

    max_rows: int = 50_000
    max_bytes: int = 64 * 2**20
    max_age_s: float = 30.0
    max_buffered_bytes: int = 512 * 2**20  # all buffers together: the largest flush first


@dataclass(frozen=True)
class WriteJob:
    """One part to write. Picklable: ship it to a Ray task with `write_part`."""

    uri: str
    table: pa.Table
    eval_id: str
    shard_id: str
    attempt: int
    seq: int
    reason: str  # rows | bytes | age | memory | flush | finish


@dataclass(frozen=True)
class PartWritten:
    uri: str
    rows: int
    seconds: float


def write_part(job: WriteJob, settings: Settings) -> PartWritten:
    """Write one job's part (atomically; again on a retry). Raises `StorageError`."""
    started = time.perf_counter()
    write_parquet(job.table, job.uri, settings)
    return PartWritten(job.uri, job.table.num_rows, time.perf_counter() - started)


def run_jobs(jobs: Sequence[WriteJob], settings: Settings, max_workers: int | None = None) -> list[PartWritten]:
    """Write `jobs` in parallel on threads (pyarrow encodes and uploads without the GIL).
    Every job is tried; then, if any failed, raises `StorageError` naming the first
    failure and the count. Running the same list again is safe."""
    if not jobs:
        return []
    workers = max_workers or min(len(jobs), 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="proctor-write") as pool:
        futures = [pool.submit(write_part, job, settings) for job in jobs]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise StorageError(f"{len(errors)} of {len(jobs)} parts not written; first: {errors[0]}") from errors[0]
    return [f.result() for f in futures]


Rows = Sequence[SampleRecord] | pa.Table


def approx_bytes(records: Rows) -> int:
    """A cheap estimate of the rows' size in Arrow (records: from a few of them)."""
    if isinstance(records, pa.Table):
        return records.nbytes
    if not records:
        return 0
    probe = records[:: max(1, len(records) // 8)]
    sizes = [120 + len(r.input) + len(r.output) + len(r.target) + len(r.sample_id) + len(r.error or "")
             + 24 * len(r.scores) + sum(len(k) + len(v) + 8 for k, v in r.answers.items()) for r in probe]
    return len(records) * sum(sizes) // len(sizes)


@dataclass
class ShardBuffer:
    """The not yet written rows of one (evaluation, shard, attempt). Pure: no I/O.

    Holds the chunks as they came (records, or tables already in `RESULTS_SCHEMA`);
    `take` converts, concatenates and de-duplicates them in one go."""

    eval_id: str
    shard_id: str
    attempt: int  # names and orders the parts
    next_seq: int = 0
    row_attempt: int | None = None  # the rows' `attempt` column; `attempt` if None
    chunks: list[Rows] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0
    first_at: float | None = None

    def add(self, chunk: Rows, now: float) -> None:
        if isinstance(chunk, pa.Table):
            ids = pc.min_max(chunk["shard_id"]).as_py() if len(chunk) else {}
            bad = next((v for v in ids.values() if v != self.shard_id), None)
        else:
            bad = next((r.shard_id for r in chunk if r.shard_id != self.shard_id), None)
        if bad is not None:
            raise AggregationError(f"a sample of shard {bad!r} was sent as shard {self.shard_id!r} of "
                                   f"{self.eval_id}; send each shard's records with its id")
        if len(chunk):
            self.chunks.append(chunk)
            self.rows += len(chunk)
            self.bytes += approx_bytes(chunk)
            if self.first_at is None:
                self.first_at = now

    def take(self, scorer_names: list[str], uri: Callable[[int], str], reason: str) -> WriteJob | None:
        """Everything buffered as the next part's job (a sample sent twice: its last
        copy), and an empty buffer; None if empty."""
        if not self.chunks:
            return None
        tables = [c if isinstance(c, pa.Table) else records_table(c, scorer_names) for c in self.chunks]
        # one chunk per column: a table of many small chunks is slow to ship to a Ray task
        row_attempt = self.attempt if self.row_attempt is None else self.row_attempt
        table = deduplicate(with_attempt(pa.concat_tables(tables).combine_chunks(), row_attempt))
        job = WriteJob(uri(self.next_seq), table, self.eval_id, self.shard_id, self.attempt, self.next_seq, reason)
        self.next_seq += 1
        self.chunks, self.rows, self.bytes, self.first_at = [], 0, 0, None
        return job


@dataclass
class _Evaluation:
    scorer_names: list[str]
    next_seq: dict[tuple[str, int], int]  # from the parts already stored: after a restart
    seq_floor: int = 0  # the first seq of a (shard, attempt) not in next_seq
    latest: dict[str, int] = field(default_factory=dict)  # shard -> highest attempt seen
    finished: set[tuple[str, int]] = field(default_factory=set)
    issued: dict[tuple[str, int], list[str]] = field(default_factory=dict)


class Aggregator:
    """Buffers scored samples and hands back the parts to write (see the module's doc)."""

    def __init__(self, root_uri: str, settings: Settings, policy: FlushPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.store = ResultsStore(root_uri, settings)
        self.settings = settings
        self.policy = policy or FlushPolicy()
        self.clock = clock
        self.stale_records = 0  # records of a superseded attempt or a finished evaluation: dropped
        self._evals: dict[str, _Evaluation] = {}
        self._finished: set[str] = set()  # evaluations past finish_evaluation
        self._buffers: dict[tuple[str, str, int], ShardBuffer] = {}
        # URIs of parts written but not yet on the store (they wait in an outbox): named like stored ones
        self.unstored: Callable[[str], list[str]] = lambda eval_id: []

    @property
    def buffered_rows(self) -> int:
        return sum(b.rows for b in self._buffers.values())

    @property
    def buffered_bytes(self) -> int:
        return sum(b.bytes for b in self._buffers.values())

    def open(self, eval_id: str, scorer_names: list[str], *, reopen: bool = False) -> None:
        """Start taking records for `eval_id`. Parts already stored (a restarted
        aggregator) are listed once, so new parts never reuse their names. Opening an
        open evaluation, or one past `finish_evaluation`, does nothing (late records for
        it are dropped) unless `reopen`. With the store away, new parts are numbered from
        the time in milliseconds: after any a former run wrote. Raises `StorageError`."""
        if eval_id in self._evals or (eval_id in self._finished and not reopen):
            return
        self._finished.discard(eval_id)
        seqs: dict[tuple[str, int], int] = {}
        floor = 0
        try:
            names = [p.uri.rsplit("/", 1)[-1] for p in self.store.parts(eval_id) if p.shard_id is not None]
        except StorageError as exc:
            if not exc.transient:
                raise
            names, floor = [], int(time.time() * 1000)
        for name in [*names, *(u.rsplit("/", 1)[-1] for u in self.unstored(eval_id))]:
            if m := PART_RE.match(name):
                key = (m["shard"], int(m["attempt"]))
                seqs[key] = max(seqs.get(key, floor), int(m["seq"]) + 1)
        self._evals[eval_id] = _Evaluation(list(scorer_names), seqs, floor)

    def add(self, eval_id: str, shard_id: str, attempt: int, records: Iterable[SampleRecord] | pa.Table, *,
            row_attempt: int | None = None) -> list[WriteJob]:
        """Buffer scored records of one shard's attempt; returns the parts now due.

        `attempt` names and orders the parts; the rows' `attempt` column is `row_attempt`
        (the shard's attempt as users count it), or `attempt` when not given. A caller
        that writes one attempt's rows twice (streamed, then complete) gives the two
        writes different `attempt`s and the same `row_attempt`.

        `records` may also be a table in `RESULTS_SCHEMA` (`records_table` of a batch):
        a supervisor that converts its own samples takes that work off the aggregator.
        Records of an earlier attempt than the shard's latest, or of an evaluation past
        `finish_evaluation`, are dropped (`stale_records`). Records for an attempt that
        has finished re-open it, as a retried finish: send all its rows again; their
        parts get new numbers and readers keep one copy of each sample."""
        if eval_id in self._finished:
            self.stale_records += len(records) if isinstance(records, pa.Table) else sum(1 for _ in records)
            return []
        ev = self._evaluation(eval_id)
        latest = ev.latest.get(shard_id, 0)
        if attempt < latest:
            self.stale_records += len(records) if isinstance(records, pa.Table) else sum(1 for _ in records)
            return []
        if (shard_id, attempt) in ev.finished:  # a retried finish: the attempt takes rows again
            ev.finished.discard((shard_id, attempt))
            ev.issued.pop((shard_id, attempt), None)
        if attempt > latest:  # a re-run: the earlier attempts' unwritten rows are superseded
            ev.latest[shard_id] = attempt
            for old in range(1, attempt):
                self._buffers.pop((eval_id, shard_id, old), None)
        key = (eval_id, shard_id, attempt)
        buf = self._buffers.get(key)
        if buf is None:
            first_seq = ev.next_seq.get((shard_id, attempt), ev.seq_floor)
            buf = self._buffers[key] = ShardBuffer(eval_id, shard_id, attempt, first_seq, row_attempt)
        now, jobs, start = self.clock(), [], 0
        if isinstance(records, pa.Table):
            rows = records if records.schema.equals(RESULTS_SCHEMA) else conform(records)
        else:
            rows = list(records)
        while True:  # parts of at most max_rows rows
            room = max(1, self.policy.max_rows - buf.rows)
            buf.add(rows[start : start + room], now)
            start += room
            if reason := self._due(buf, now):
                jobs.append(self._take(buf, reason))
            if start >= len(rows):
                break
        if self.buffered_bytes > self.policy.max_buffered_bytes:
            for b in sorted(self._buffers.values(), key=lambda b: -b.bytes):
                if self.buffered_bytes <= self.policy.max_buffered_bytes // 2:
                    break
                if b.chunks:
                    jobs.append(self._take(b, "memory"))
        return jobs

    def due(self) -> list[WriteJob]:
        """The parts due by age: call it every few seconds."""
        now = self.clock()
        return [self._take(b, "age") for b in list(self._buffers.values())
                if b.first_at is not None and now - b.first_at >= self.policy.max_age_s]

    def flush(self, eval_id: str | None = None) -> list[WriteJob]:
        """Everything buffered (for one evaluation, or all) as parts, now."""
        return [self._take(b, "flush") for b in list(self._buffers.values())
                if b.rows and eval_id in (None, b.eval_id)]

    def finish_shard(self, eval_id: str, shard_id: str, attempt: int) -> list[WriteJob]:
        """The shard's attempt is complete: its last part. Run the jobs, then call
        `drop_superseded` to delete the parts of its earlier attempts."""
        if eval_id in self._finished:
            return []
        ev = self._evaluation(eval_id)
        ev.finished.add((shard_id, attempt))
        buf = self._buffers.pop((eval_id, shard_id, attempt), None)
        job = buf.take(ev.scorer_names, self._uri_for(buf, ev), "finish") if buf else None
        return [job] if job else []

    def drop_superseded(self, eval_id: str, shard_id: str, attempt: int) -> list[str]:
        """Delete the parts of `shard_id`'s attempts before `attempt`, after checking that
        every part issued for `attempt` is stored. Returns the URIs deleted. Raises
        `AggregationError` if a part is missing (its job has not run), `StorageError`."""
        parts = self.store.parts(eval_id)
        stored = {p.uri for p in parts}
        issued = [] if eval_id in self._finished else self._evaluation(eval_id).issued.get((shard_id, attempt), [])
        missing = [u for u in issued if u not in stored]
        if missing:
            raise AggregationError(f"{missing[0]} is not written ({len(missing)} parts of shard {shard_id!r} "
                                   f"attempt {attempt}); run its jobs before dropping earlier attempts")
        old: list[PartFile] = [p for p in parts if p.shard_id == shard_id and p.attempt < attempt]
        self.store.delete_parts(old)
        return [p.uri for p in old]

    def finish_evaluation(self, eval_id: str) -> list[WriteJob]:
        """The last parts of `eval_id`; the aggregator then forgets its buffers and drops
        records that come later. Run the jobs, then `compact`."""
        jobs = self.flush(eval_id)
        self._evals.pop(eval_id, None)
        self._finished.add(eval_id)
        for key in [k for k in self._buffers if k[0] == eval_id]:
            del self._buffers[key]
        return jobs

    def compact(self, eval_id: str, *, target_rows: int = 1_000_000, target_bytes: int = 128 * 2**20) -> Compaction:
        """Merge the evaluation's parts into a few data files (see `compact`). Refuses
        while the evaluation still has buffered rows."""
        if any(b.rows for b in list(self._buffers.values()) if b.eval_id == eval_id):  # list: from a thread
            raise AggregationError(f"{eval_id} still has buffered rows: write finish_evaluation's jobs, "
                                   "then compact")
        return compact(self.store, eval_id, target_rows=target_rows, target_bytes=target_bytes)

    def _evaluation(self, eval_id: str) -> _Evaluation:
        try:
            return self._evals[eval_id]
        except KeyError:
            raise AggregationError(f"evaluation {eval_id} is not open here: call "
                                   "Aggregator.open(eval_id, scorer_names) first") from None

    def _due(self, buf: ShardBuffer, now: float) -> str | None:
        p = self.policy
        if buf.rows >= p.max_rows:
            return "rows"
        if buf.bytes >= p.max_bytes:
            return "bytes"
        if buf.first_at is not None and now - buf.first_at >= p.max_age_s:
            return "age"
        return None

    def _uri_for(self, buf: ShardBuffer, ev: _Evaluation) -> Callable[[int], str]:
        def uri(seq: int) -> str:
            u = self.store.part_uri(buf.eval_id, buf.shard_id, buf.attempt, seq)
            ev.issued.setdefault((buf.shard_id, buf.attempt), []).append(u)
            ev.next_seq[(buf.shard_id, buf.attempt)] = seq + 1
            return u
        return uri

    def _take(self, buf: ShardBuffer, reason: str) -> WriteJob:
        ev = self._evaluation(buf.eval_id)
        job = buf.take(ev.scorer_names, self._uri_for(buf, ev), reason)
        assert job is not None
        return job


@dataclass(frozen=True)
class Compaction:
    """What `compact` left: the evaluation's data files and their rows."""

    files: list[str]  # the data files that now hold the evaluation
    rows: int
    removed: int  # parts (and earlier data files) deleted


_KEYS = ["sample_id", "epoch", "attempt", "completed_at"]


def compact(store: ResultsStore, eval_id: str, *, target_rows: int = 1_000_000, target_bytes: int = 128 * 2**20,
            row_group_rows: int = 128 * 1024, readers: int = 4) -> Compaction:
    """Merge the evaluation's parts (and earlier data files) into as few `data-<n>.parquet`
    files as the targets allow, one row per (sample_id, epoch), then delete the inputs.

    Memory holds the key columns of every row plus a few files, not the evaluation. The
    new files have new names and are complete before any input is deleted, so a crash
    at any point leaves every row readable once (`ResultsStore.read` de-duplicates);
    running it again finishes the job. A plain function: it can run in a Ray task.
    Raises `StorageError`."""
    inputs = store.parts(eval_id)
    if not any(p.shard_id is not None for p in inputs):  # nothing new since the last one
        return Compaction([p.uri for p in inputs], sum(_rows(store, p) for p in inputs), 0)
    with ThreadPoolExecutor(readers, thread_name_prefix="proctor-compact") as pool:
        keys = list(pool.map(lambda p: _read(store, p, columns=_KEYS), inputs))
        keep = _keep_per_file(keys)
        first = 1 + max((p.seq for p in inputs if p.shard_id is None), default=-1)  # never reuse a name
        sink = _DataFiles(store, eval_id, target_rows, target_bytes, row_group_rows, first)
        for i, table in enumerate(_prefetch(pool, [lambda p=p: _read(store, p) for p in inputs], readers)):
            sink.write(table if keep[i] is None else table.take(pa.array(keep[i])))
        files = sink.close()
    store.delete_parts(inputs)
    return Compaction(files, sink.rows, len(inputs))


def _read(store: ResultsStore, part: PartFile, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(part.uri, store.settings)
    table = retried("read", part.uri, store.settings,
                    lambda: pq.read_table(path, filesystem=fs, schema=RESULTS_SCHEMA, columns=columns))
    return table if columns else conform(table)


def _rows(store: ResultsStore, part: PartFile) -> int:
    fs, path = filesystem(part.uri, store.settings)
    return retried("read", part.uri, store.settings, lambda: pq.ParquetFile(path, filesystem=fs).metadata.num_rows)


def _keep_per_file(keys: list[pa.Table]) -> list[np.ndarray | None]:
    """For each file, the indices of its rows to keep (None: all of them)."""
    counts = [k.num_rows for k in keys]
    keep = rows_to_keep(pa.concat_tables(keys)) if keys else None
    if keep is None:
        return [None] * len(keys)
    starts = np.cumsum([0, *counts])
    return [keep[(keep >= a) & (keep < b)] - a for a, b in zip(starts[:-1], starts[1:])]


def _prefetch(pool: ThreadPoolExecutor, loads: list[Callable[[], pa.Table]], ahead: int) -> Iterator[pa.Table]:
    window: deque[Future[pa.Table]] = deque()
    for load in loads:
        window.append(pool.submit(load))
        if len(window) > ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


class _DataFiles:
    """Rolls rows into data-<n>.parquet files of at most target_rows rows / ~target_bytes."""

    def __init__(self, store: ResultsStore, eval_id: str, target_rows: int, target_bytes: int,
                 row_group_rows: int, first: int):
        self.store, self.eval_id = store, eval_id
        self.target_rows, self.target_bytes, self.row_group_rows = target_rows, target_bytes, row_group_rows
        self.n, self.rows, self.files = first, 0, []
        self.pending: list[pa.Table] = []
        self.stream = self.writer = self.fs = None
        self.in_file, self.path, self.final = 0, "", ""

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        if sum(t.num_rows for t in self.pending) >= self.row_group_rows:
            self._drain()

    def close(self) -> list[str]:
        self._drain()
        if self.writer is None and not self.files:  # no rows at all: keep the schema readable
            self._open()
            self.writer.write_table(RESULTS_SCHEMA.empty_table())
        self._finish()
        return self.files

    def _drain(self) -> None:
        table = pa.concat_tables(self.pending) if self.pending else RESULTS_SCHEMA.empty_table()
        self.pending = []
        while table.num_rows:
            if self.writer is None:
                self._open()
            chunk = table.slice(0, self.target_rows - self.in_file)
            with storage_errors("write", self.files[-1]):
                self.writer.write_table(chunk, row_group_size=self.row_group_rows)
            self.in_file += chunk.num_rows
            self.rows += chunk.num_rows
            table = table.slice(chunk.num_rows)
            if self.in_file >= self.target_rows or self.stream.tell() >= self.target_bytes:
                self._finish()

    def _open(self) -> None:
        uri = join(self.store.eval_uri(self.eval_id), f"data-{self.n}.parquet")
        self.n += 1
        fs, path = filesystem(uri, self.store.settings)
        self.final = path
        self.path = path if is_s3(uri) else path.rpartition("/")[0] + "/.tmp-" + path.rpartition("/")[2]
        with storage_errors("write", uri):
            self.stream = fs.open_output_stream(self.path)
            self.writer = pq.ParquetWriter(self.stream, RESULTS_SCHEMA, compression="zstd")
        self.fs = fs
        self.files.append(uri)
        self.in_file = 0

    def _finish(self) -> None:
        if self.writer is None:
            return
        with storage_errors("write", self.files[-1]):
            self.writer.close()
            self.stream.close()
            if self.path != self.final:
                self.fs.move(self.path, self.final)
        self.writer = self.stream = None
