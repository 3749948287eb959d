"""Scored samples as Parquet, and the evaluation's summary.

Layout under the results root (`file://…` or `s3://bucket/prefix`), hive-partitioned so
that pandas, DuckDB, Polars and Athena read the root as one table:

    <root>/eval_id=<id>/part-<shard id>-a<attempt>-<seq:05d>.parquet   written while it runs
    <root>/eval_id=<id>/data-<n>.parquet       the parts merged by compaction at the end
    <root>/eval_id=<id>/_summary.json          metrics per scorer with 95% CIs, counts, usage

Names starting with `_` or `.` (the summary, files being written) are not data: every
Parquet reader skips them. A part's name is a function of (shard, attempt, seq), so a
retried write replaces the same file; a new attempt of a shard writes new names, and the
older attempts' parts are deleted once it has finished (`cluster.aggregation`).

Rows are unique on (sample_id, epoch) once an evaluation is finished. While a shard is
re-run, rows of two attempts can both be on storage for a moment: `ResultsStore.read`
(and compaction) keep the row of the highest attempt, so readers through it never see a
sample twice.

Schema version 1 (`RESULTS_SCHEMA`), one row per sample per epoch. `eval_id` is the
partition column, so it is not stored inside the files. Columns:

| column | type | meaning |
|---|---|---|
| schema_version | int16 | 1 |
| shard_id | string | the shard that ran the sample |
| sample_id | string | the sample's id in the dataset |
| epoch | int32 | 1-based |
| input | string | the input as given to the model (chat inputs rendered as text) |
| target | string | the target (a list of targets joined by " | ") |
| output | string | the model's final output |
| score | float64 | the first scorer's value (null when the sample errored) |
| scores | map<string, float64> | every scorer's value by name |
| answers | map<string, string> | what each scorer extracted from the output |
| error | string | why the sample has no valid score, or null |
| started_at, completed_at | timestamp[us, UTC] | when the sample ran |
| duration_s | float64 | completed_at − started_at |
| input_tokens, output_tokens | int64 | token usage of the sample's model calls |
| model_calls | int32 | model calls made for the sample |
| turns | int32 | model turns in the tool loop |
| model | string | the model adapter and name (e.g. `reference`, `openai:gpt-4o`) |
| runtime | string | the sandbox runtime (`gvisor`, `bubblewrap`, …) |
| isolation | string | `strong`, or `weak` for bubblewrap |
| attempt | int32 | the shard's attempt that wrote the row, 1-based (added within version 1: files written before it read it as null, meaning 1) |
| failed_stage | string | the stage the sample's error happened in (`setup`, `eval`, `score`, `cleanup`), or null (added within version 1) |
| stages | map<string, float64> | seconds each stage of the sample took, as the harness measured them (added within version 1) |
| transcript | string | the Inspect AI `.eval` log holding the sample's transcript, relative to the results root (`cluster/transcripts.py`); read it with `inspect_ai.log.read_eval_log_sample(<root>/<transcript>, sample_id, epoch)`. Null when transcripts were off (added within version 1: files written before it read it as null) |

Version 1 only ever gains nullable columns at the end; renaming, retyping or removing a
column is version 2.
"""

from __future__ import annotations

import json
import math
import re
from itertools import chain
from operator import attrgetter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from proctor.settings import Settings

from .storage import (StorageError, delete_files, filesystem, is_s3, join, list_files, move, read_bytes, retried,
                      write_bytes)

RESULTS_SCHEMA_VERSION = 1

RESULTS_SCHEMA = pa.schema([
    ("schema_version", pa.int16()),
    ("shard_id", pa.string()),
    ("sample_id", pa.string()),
    ("epoch", pa.int32()),
    ("input", pa.string()),
    ("target", pa.string()),
    ("output", pa.string()),
    ("score", pa.float64()),
    ("scores", pa.map_(pa.string(), pa.float64())),
    ("answers", pa.map_(pa.string(), pa.string())),
    ("error", pa.string()),
    ("started_at", pa.timestamp("us", tz="UTC")),
    ("completed_at", pa.timestamp("us", tz="UTC")),
    ("duration_s", pa.float64()),
    ("input_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("model_calls", pa.int32()),
    ("turns", pa.int32()),
    ("model", pa.string()),
    ("runtime", pa.string()),
    ("isolation", pa.string()),
    ("attempt", pa.int32()),
    ("failed_stage", pa.string()),
    ("stages", pa.map_(pa.string(), pa.float64())),
    ("transcript", pa.string()),
])
ADDED_COLUMNS = ("failed_stage", "stages", "transcript")  # nullable columns added within version 1, after attempt

ROW_KEY = ("sample_id", "epoch")
PART_RE = re.compile(r"^part-(?P<shard>.+)-a(?P<attempt>\d+)-(?P<seq>\d+)\.parquet$")
DATA_RE = re.compile(r"^data-(?P<n>\d+)\.parquet$")


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """One row of the results table. Slotted: the aggregator reads millions of them."""

    shard_id: str
    sample_id: str
    epoch: int
    input: str
    target: str
    output: str
    scores: dict[str, float] = field(default_factory=dict)
    answers: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    started_at: float = 0.0
    completed_at: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    model_calls: int = 0
    turns: int = 0
    model: str = ""
    runtime: str = ""
    isolation: str = ""
    failed_stage: str | None = None
    stages: dict[str, float] = field(default_factory=dict)
    transcript: str | None = None  # where its transcript is, relative to the results root

    def row(self, scorer_order: list[str], attempt: int = 1) -> dict[str, Any]:
        return records_table([self], scorer_order, attempt).to_pylist()[0]


def records_table(records: Sequence[SampleRecord], scorer_order: list[str], attempt: int = 1) -> pa.Table:
    """The rows of `records` in `RESULTS_SCHEMA`, built column by column.

    Fast on purpose (the aggregator converts every sample here): one pass per column, no
    per-row containers (they would also wake the cyclic garbage collector), numbers
    through numpy."""
    n = len(records)

    def strings(name: str) -> list[Any]:
        return list(map(attrgetter(name), records))

    def numbers(name: str, dtype: type) -> np.ndarray:
        return np.fromiter(map(attrgetter(name), records), dtype, n)

    def first_score(r: SampleRecord) -> float | None:
        if r.error and not r.scores:
            return None
        for name in scorer_order:
            if name in r.scores:
                return r.scores[name]
        return None

    started, completed = numbers("started_at", np.float64), numbers("completed_at", np.float64)
    ran = started != 0
    columns = {
        "schema_version": np.full(n, RESULTS_SCHEMA_VERSION, np.int16),
        "score": [first_score(r) for r in records],
        "scores": _map_array(strings("scores"), pa.float64()),
        "answers": _map_array(strings("answers"), pa.string()),
        "stages": _map_array(strings("stages"), pa.float64()),
        "started_at": pa.array(np.round(started * 1e6).astype(np.int64), mask=~ran),
        "completed_at": pa.array(np.round(completed * 1e6).astype(np.int64), mask=completed == 0),
        "duration_s": pa.array(np.maximum(0.0, completed - started), mask=~ran),
        "attempt": np.full(n, attempt, np.int32),
    }
    for name in ("epoch", "input_tokens", "output_tokens", "model_calls", "turns"):
        columns[name] = numbers(name, np.int64)
    arrays = []
    for f in RESULTS_SCHEMA:
        values = columns.get(f.name)
        if values is None:  # a string column: often one value per shard (shard_id, model, runtime)
            values = strings(f.name)
            if n and values.count(values[0]) == n:
                values = pa.repeat(pa.scalar(values[0], f.type), n)
        arrays.append(values.cast(f.type) if isinstance(values, pa.Array) else pa.array(values, f.type))
    return pa.Table.from_arrays(arrays, schema=RESULTS_SCHEMA)


def _map_array(maps: list[dict[str, Any]], value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(maps) + 1, np.int32)
    np.cumsum(np.fromiter(map(len, maps), np.int32, len(maps)), out=offsets[1:])
    keys = pa.array(list(chain.from_iterable(maps)), pa.string())
    values = pa.array(list(chain.from_iterable(map(dict.values, maps))), value_type)
    return pa.MapArray.from_arrays(pa.array(offsets), keys, values, type=pa.map_(pa.string(), value_type))


def conform(table: pa.Table) -> pa.Table:
    """`table` in `RESULTS_SCHEMA`: files written before `attempt` existed read as attempt 1,
    and the columns added since as null."""
    for name in ADDED_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, RESULTS_SCHEMA.field(name).type))
    if "attempt" not in table.column_names:
        table = table.append_column("attempt", pa.array(np.ones(table.num_rows, np.int32)))
    else:
        table = table.set_column(table.schema.get_field_index("attempt"), "attempt",
                                 table["attempt"].fill_null(1).cast(pa.int32()))
    return table.select(RESULTS_SCHEMA.names).cast(RESULTS_SCHEMA)


def with_attempt(table: pa.Table, attempt: int) -> pa.Table:
    """`table` (in `RESULTS_SCHEMA`) with every row's `attempt` set to `attempt`."""
    return table.set_column(table.schema.get_field_index("attempt"), "attempt",
                            pa.array(np.full(table.num_rows, attempt, np.int32)))


def deduplicate(table: pa.Table) -> pa.Table:
    """One row per (sample_id, epoch): the highest attempt's, then the latest completed,
    then the last in the table. Keeps the order of the rows it keeps."""
    keep = rows_to_keep(table)
    return table if keep is None else table.take(pa.array(keep))


def rows_to_keep(keys: pa.Table) -> np.ndarray | None:
    """The sorted indices of the rows `deduplicate` keeps, or None when the rows are
    already unique. `keys` needs sample_id, epoch, attempt and completed_at."""
    if keys.num_rows == 0 or keys.select(list(ROW_KEY)).group_by(list(ROW_KEY)).aggregate([]).num_rows \
            == keys.num_rows:
        return None
    order = pa.table({
        "sample_id": keys["sample_id"], "epoch": keys["epoch"],
        "attempt": keys["attempt"].fill_null(1), "completed_at": keys["completed_at"],
        "row": pa.array(np.arange(keys.num_rows, dtype=np.int64)),
    }).sort_by([("sample_id", "ascending"), ("epoch", "ascending"), ("attempt", "descending"),
                ("completed_at", "descending"), ("row", "descending")])  # exact ties: the last copy
    first = order.group_by(list(ROW_KEY), use_threads=False).aggregate([("row", "first")])
    return np.sort(first["row_first"].to_numpy())


def part_name(shard_id: str, attempt: int, seq: int) -> str:
    return f"part-{shard_id}-a{attempt}-{seq:05d}.parquet"


@dataclass(frozen=True)
class PartFile:
    """A data file of one evaluation: a part (shard, attempt, seq) or a compacted file."""

    uri: str
    size: int
    shard_id: str | None = None  # None for data-<n>.parquet
    attempt: int = 0
    seq: int = 0  # n for data-<n>.parquet


def write_parquet(table: pa.Table, uri: str, settings: Settings) -> None:
    """Write `table` to `uri` so that no reader sees half of it: a hidden temp file and a
    rename locally; on S3 one upload, which becomes visible only when complete.
    Rewriting the same URI replaces the file. Raises `StorageError`."""
    fs, path = filesystem(uri, settings)

    def writing() -> None:
        if is_s3(uri):
            pq.write_table(table, path, filesystem=fs, compression="zstd")
            return
        parent, _, name = path.rpartition("/")
        fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{name}"
        pq.write_table(table, tmp, filesystem=fs, compression="zstd")
        fs.move(tmp, path)

    retried("write", uri, settings, writing)


def parquet_bytes(table: pa.Table) -> bytes:
    """`table` as the bytes of the Parquet file `write_parquet` writes (for the outbox)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


class ResultsStore:
    """Writes and reads one results root."""

    def __init__(self, root_uri: str, settings: Settings):
        self.root_uri = root_uri.rstrip("/")
        self.settings = settings
        self.fs, self.root = filesystem(self.root_uri, settings)
        # how whole files (artifacts, logs, reports, summaries) are written; the aggregator
        # puts its outbox in between (`eval_actors/aggregator.py`)
        self.put: Callable[[str, bytes], None] = lambda uri, data: write_bytes(uri, data, settings)

    def eval_uri(self, eval_id: str) -> str:
        return join(self.root_uri, f"eval_id={eval_id}")

    def part_uri(self, eval_id: str, shard_id: str, attempt: int, seq: int) -> str:
        return join(self.eval_uri(eval_id), part_name(shard_id, attempt, seq))

    def write_shard(self, eval_id: str, shard_id: str, table: pa.Table, attempt: int = 1) -> str:
        """Write (or rewrite) one shard's whole result as its only part, then delete the
        parts of its earlier attempts. Idempotent: a retry replaces, never adds.
        Returns the part's URI. Raises `StorageError`."""
        uri = self.part_uri(eval_id, shard_id, attempt, 0)
        write_parquet(with_attempt(conform(table), attempt), uri, self.settings)
        if attempt > 1:
            self.delete_parts([p for p in self.parts(eval_id) if p.shard_id == shard_id and p.attempt < attempt])
        return uri

    def parts(self, eval_id: str) -> list[PartFile]:
        """The evaluation's data files (parts and compacted files), sorted by name."""
        found = []
        for f in list_files(self.eval_uri(eval_id), self.settings):
            name = f.uri.rsplit("/", 1)[-1]
            if m := PART_RE.match(name):
                found.append(PartFile(f.uri, f.size, m["shard"], int(m["attempt"]), int(m["seq"])))
            elif m := DATA_RE.match(name):
                found.append(PartFile(f.uri, f.size, seq=int(m["n"])))
        return found

    def delete_parts(self, parts: Sequence[PartFile]) -> None:
        delete_files([p.uri for p in parts], self.settings)

    def read(self, eval_id: str) -> pa.Table:
        """Every row of the evaluation, one per (sample_id, epoch) (see the module's doc).
        Raises `StorageError` when the evaluation has no folder or a file is unreadable."""
        path = join(self.root, f"eval_id={eval_id}")
        table = retried("read", self.eval_uri(eval_id), self.settings,
                        lambda: pq.read_table(path, filesystem=self.fs, schema=RESULTS_SCHEMA))
        return deduplicate(conform(table))

    def write_artifact(self, eval_id: str, shard_id: str, path: str, data: bytes) -> str:
        """Keep one artifact under `_artifacts/` (ignored by Parquet readers). Returns its URI."""
        uri = join(self.eval_uri(eval_id), "_artifacts", shard_id, path)
        self.put(uri, data)
        return uri

    def artifacts(self, eval_id: str) -> list[tuple[str, int, str]]:
        """The evaluation's artifacts as (path `<shard_id>/<relative path>`, size, URI)."""
        base = join(self.eval_uri(eval_id), "_artifacts")
        return [(f.uri[len(base) + 1:], f.size, f.uri) for f in list_files(base, self.settings)]

    def artifact_uri(self, eval_id: str, path: str) -> str:
        """The URI of artifact `path` (as `artifacts` names it). Raises `ValueError` for a
        path that would leave the evaluation's artifacts."""
        parts = path.split("/")
        if len(parts) < 2 or any(p in ("", ".", "..") for p in parts) or "\\" in path or "\x00" in path:
            raise ValueError(f"{path!r} is not an artifact path (<shard_id>/<relative path>)")
        return join(self.eval_uri(eval_id), "_artifacts", *parts)

    def write_logs(self, eval_id: str, shard_id: str, attempt: int, lines: Sequence[dict[str, Any]]) -> str:
        """Keep one shard attempt's log lines as JSON lines under `_logs/`. Returns the URI."""
        uri = join(self.eval_uri(eval_id), "_logs", f"{shard_id}-a{attempt}.jsonl")
        data = "".join(json.dumps(line, default=str) + "\n" for line in lines)
        self.put(uri, data.encode())
        return uri

    def read_logs(self, eval_id: str) -> list[dict[str, Any]]:
        """Every kept log line of the evaluation, oldest first. Lines that do not parse
        (they came from a sandbox through the supervisor, but files can be damaged) are skipped."""
        lines: list[dict[str, Any]] = []
        for f in list_files(join(self.eval_uri(eval_id), "_logs"), self.settings):
            for raw in read_bytes(f.uri, self.settings, limit=256 * 1024**2).splitlines():
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(line, dict):
                    lines.append(line)
        lines.sort(key=lambda line: (line.get("ts") or 0, str(line.get("shard_id")), line.get("n") or 0))
        return lines

    def write_resources(self, eval_id: str, shard_id: str, attempt: int, samples: Sequence[dict[str, Any]]) -> str:
        """Keep one shard attempt's resource use over time (the guard's samples) under `_resources/`."""
        uri = join(self.eval_uri(eval_id), "_resources", f"{shard_id}-a{attempt}.json")
        self.put(uri, json.dumps({"shard_id": shard_id, "attempt": attempt, "samples": list(samples)}).encode())
        return uri

    def read_resources(self, eval_id: str) -> list[dict[str, Any]]:
        """Every ended shard attempt's kept resource samples: [{shard_id, attempt, samples}].
        A file that does not parse is skipped (its numbers came from a sandbox's runtime)."""
        found = []
        for f in list_files(join(self.eval_uri(eval_id), "_resources"), self.settings):
            try:
                kept = json.loads(read_bytes(f.uri, self.settings, limit=64 * 1024**2))
            except ValueError:
                continue
            if isinstance(kept, dict) and isinstance(kept.get("samples"), list):
                found.append({"shard_id": str(kept.get("shard_id")), "attempt": kept.get("attempt"),
                              "samples": [x for x in kept["samples"] if isinstance(x, dict)]})
        return found

    # ---------------------------------------------------------------- quarantine

    def quarantine_uri(self, eval_id: str, *parts: str) -> str:
        """Where a safety-stopped shard's rows, artifacts and report go: a prefix apart from
        the results (`_quarantine/`, which Parquet readers of the root skip), readable
        through the API by the safety and admin roles only."""
        return join(self.root_uri, "_quarantine", f"eval_id={eval_id}", *parts)

    def quarantine_shard(self, eval_id: str, shard_id: str, artifacts: Sequence[tuple[str, bytes]],
                         report: dict[str, Any]) -> list[str]:
        """Move the shard's stored rows (every part) and its artifacts to the quarantine
        prefix, with its incident report. Idempotent. Returns the quarantined URIs."""
        moved = []
        for part in [p for p in self.parts(eval_id) if p.shard_id == shard_id]:
            uri = self.quarantine_uri(eval_id, shard_id, part.uri.rsplit("/", 1)[-1])
            move(part.uri, uri, self.settings)
            moved.append(uri)
        return moved + self.quarantine_artifacts(eval_id, shard_id, artifacts, report, "report.json")

    def quarantine_artifacts(self, eval_id: str, shard_id: str, artifacts: Sequence[tuple[str, bytes]],
                             report: dict[str, Any], report_name: str = "artifacts-report.json") -> list[str]:
        """Keep artifacts in the quarantine prefix (not published), with a report of why.
        Idempotent. Returns the quarantined URIs."""
        moved, lost = [], []
        for path, data in artifacts:
            uri = self.quarantine_uri(eval_id, shard_id, "artifacts", path)
            try:
                self.put(uri, data)
            except StorageError as exc:  # the report says so; the rest of the evidence is kept
                lost.append({"path": path, "error": str(exc)})
                continue
            moved.append(uri)
        if lost:
            report = {**report, "artifacts_not_kept": lost}
        self.put(self.quarantine_uri(eval_id, shard_id, report_name),
                 json.dumps(report, indent=2, default=str).encode())
        return moved

    def quarantined(self, eval_id: str) -> list[tuple[str, int, str]]:
        """What is quarantined for the evaluation: (path `<shard_id>/...`, size, URI)."""
        base = self.quarantine_uri(eval_id)
        return [(f.uri[len(base) + 1:], f.size, f.uri) for f in list_files(base, self.settings)]

    def write_summary(self, eval_id: str, summary: dict[str, Any]) -> str:
        uri = join(self.eval_uri(eval_id), "_summary.json")
        self.put(uri, json.dumps(summary, indent=2, default=str).encode())
        return uri

    def read_summary(self, eval_id: str) -> dict[str, Any]:
        uri = join(self.eval_uri(eval_id), "_summary.json")
        try:
            return json.loads(read_bytes(uri, self.settings))
        except ValueError as exc:
            raise StorageError(f"cannot read {uri}: {exc}") from exc


UNGROUPED = "(none)"


def summarize(table: pa.Table, scorer_names: list[str], *, by: Mapping[str, str] | None = None,
              labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Metrics per scorer (mean, standard error, 95% CI), error counts, usage and timing.

    `by` maps sample ids to a group (e.g. the sample's `category` metadata, or its task):
    the summary then has the same counts and metrics per group under `groups` (samples
    not in `by` fall in "(none)"). `labels` (the evaluation's) are copied as they are.

    Samples that errored without a score count as 0 for every scorer: an evaluation does
    not look better because its model crashed."""
    summary = _counts(table, scorer_names)
    durations = table["duration_s"].drop_null()
    started, completed = pc.min(table["started_at"]).as_py(), pc.max(table["completed_at"]).as_py()
    total = float(pc.sum(durations).as_py() or 0.0)
    summary.update({
        "sample_seconds_total": round(total, 3),
        "timing": {
            "sample_seconds_total": round(total, 3),
            "sample_seconds_mean": round(total / len(durations), 3) if len(durations) else None,
            "sample_seconds_max": pc.max(durations).as_py(),
            "first_started_at": started.isoformat() if started else None,
            "last_completed_at": completed.isoformat() if completed else None,
            "span_s": round((completed - started).total_seconds(), 3) if started and completed else None,
        },
        "runtimes": sorted(v for v in pc.unique(table["runtime"]).to_pylist() if v),
        "isolation": sorted(v for v in pc.unique(table["isolation"]).to_pylist() if v),
    })
    if labels is not None:
        summary["labels"] = dict(labels)
    if by is not None:
        groups = np.array([by.get(s, UNGROUPED) for s in table["sample_id"].to_pylist()], dtype=object)
        summary["groups"] = {
            str(g): _counts(table.filter(pa.array(groups == g)), scorer_names)
            for g in sorted(set(groups.tolist()), key=str)
        }
    return summary


def _counts(table: pa.Table, scorer_names: list[str]) -> dict[str, Any]:
    error = table["error"]
    return {
        "samples": table.num_rows,
        "errors": len(pc.filter(error, pc.greater(pc.utf8_length(error), 0))),
        "metrics": {name: mean_ci(scorer_values(table, name)) for name in scorer_names},
        "usage": {
            name: int(pc.sum(table[name]).as_py() or 0)
            for name in ("input_tokens", "output_tokens", "model_calls", "turns")
        },
    }


def scorer_values(table: pa.Table, name: str) -> np.ndarray:
    """Each row's value of scorer `name`, 0.0 where it has none."""
    if table.num_rows == 0:
        return np.zeros(0)
    values = pc.map_lookup(table["scores"], pa.scalar(name), "last")
    return values.fill_null(0.0).to_numpy().astype(float)


def mean_ci(values: Sequence[float] | np.ndarray, z: float = 1.959964) -> dict[str, float | int | None]:
    """Mean with a 95% confidence interval: Wilson's for 0/1 scores, normal otherwise."""
    v = np.asarray(values, dtype=float)
    n = int(v.size)
    if n == 0:
        return {"mean": None, "stderr": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = float(v.mean())
    if bool(np.isin(v, (0.0, 1.0)).all()):
        denom = 1 + z * z / n
        centre = (mean + z * z / (2 * n)) / denom
        half = z * math.sqrt(max(0.0, mean * (1 - mean)) / n + z * z / (4 * n * n)) / denom
        stderr = math.sqrt(max(0.0, mean * (1 - mean)) / n)
        low, high = centre - half, centre + half
    else:
        stderr = math.sqrt(float(v.var(ddof=1)) / n) if n > 1 else 0.0
        low, high = mean - z * stderr, mean + z * stderr
    return {"mean": mean, "stderr": stderr, "ci_low": low, "ci_high": high, "n": n}
