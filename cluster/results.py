"""Scored samples as Parquet, and the evaluation's summary.

Layout under the results root (`file://…` or `s3://bucket/prefix`), hive-partitioned so
that pandas, DuckDB, Polars and Athena read the root as one table:

    <root>/eval_id=<id>/part-<shard id>.parquet   one file per shard (rewritten whole: idempotent)
    <root>/eval_id=<id>/_summary.json             metrics per scorer with 95% CIs, counts, usage

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
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from proctor.settings import Settings

from .storage import StorageError, filesystem, join

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
])


@dataclass(frozen=True)
class SampleRecord:
    """One row of the results table."""

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

    def row(self, scorer_order: list[str]) -> dict[str, Any]:
        first = next((self.scores[n] for n in scorer_order if n in self.scores), None)
        return {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "shard_id": self.shard_id,
            "sample_id": self.sample_id,
            "epoch": self.epoch,
            "input": self.input,
            "target": self.target,
            "output": self.output,
            "score": None if self.error and not self.scores else first,
            "scores": list(self.scores.items()),
            "answers": list(self.answers.items()),
            "error": self.error,
            "started_at": _ts(self.started_at),
            "completed_at": _ts(self.completed_at),
            "duration_s": max(0.0, self.completed_at - self.started_at) if self.started_at else None,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "model_calls": self.model_calls,
            "turns": self.turns,
            "model": self.model,
            "runtime": self.runtime,
            "isolation": self.isolation,
        }


def _ts(t: float) -> datetime | None:
    return datetime.fromtimestamp(t, tz=timezone.utc) if t else None


def records_table(records: list[SampleRecord], scorer_order: list[str]) -> pa.Table:
    return pa.Table.from_pylist([r.row(scorer_order) for r in records], schema=RESULTS_SCHEMA)


class ResultsStore:
    """Writes and reads one results root."""

    def __init__(self, root_uri: str, settings: Settings):
        self.root_uri = root_uri.rstrip("/")
        self.fs, self.root = filesystem(self.root_uri, settings)

    def eval_uri(self, eval_id: str) -> str:
        return join(self.root_uri, f"eval_id={eval_id}")

    def _eval_dir(self, eval_id: str) -> str:
        return join(self.root, f"eval_id={eval_id}")

    def write_shard(self, eval_id: str, shard_id: str, table: pa.Table) -> str:
        """Write (or rewrite) one shard's part. Idempotent: a retry replaces, never adds.
        Returns the part's URI."""
        name = f"part-{shard_id}.parquet"
        path = join(self._eval_dir(eval_id), name)
        tmp = join(self._eval_dir(eval_id), f"_tmp-{name}")
        try:
            self.fs.create_dir(self._eval_dir(eval_id), recursive=True)
            pq.write_table(table, tmp, filesystem=self.fs, compression="zstd")
            self.fs.move(tmp, path)
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"cannot write {join(self.eval_uri(eval_id), name)}: {exc}") from exc
        return join(self.eval_uri(eval_id), name)

    def read(self, eval_id: str) -> pa.Table:
        try:
            return pq.read_table(self._eval_dir(eval_id), filesystem=self.fs, schema=RESULTS_SCHEMA)
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"cannot read {self.eval_uri(eval_id)}: {exc}") from exc

    def write_summary(self, eval_id: str, summary: dict[str, Any]) -> str:
        path = join(self._eval_dir(eval_id), "_summary.json")
        try:
            with self.fs.open_output_stream(path) as f:
                f.write(json.dumps(summary, indent=2, default=str).encode())
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc}") from exc
        return join(self.eval_uri(eval_id), "_summary.json")

    def read_summary(self, eval_id: str) -> dict[str, Any]:
        path = join(self._eval_dir(eval_id), "_summary.json")
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc


def summarize(table: pa.Table, scorer_names: list[str]) -> dict[str, Any]:
    """Metrics per scorer (mean, standard error, 95% CI), per-label counts, usage.

    Samples that errored without a score count as 0 for every scorer: an evaluation does
    not look better because its model crashed."""
    rows = table.to_pylist()
    n = len(rows)
    metrics: dict[str, Any] = {}
    for name in scorer_names:
        values = [dict(r["scores"] or []).get(name, 0.0) for r in rows]
        metrics[name] = mean_ci(values)
    durations = [r["duration_s"] for r in rows if r["duration_s"] is not None]
    return {
        "samples": n,
        "errors": sum(1 for r in rows if r["error"]),
        "metrics": metrics,
        "usage": {
            "input_tokens": sum(r["input_tokens"] or 0 for r in rows),
            "output_tokens": sum(r["output_tokens"] or 0 for r in rows),
            "model_calls": sum(r["model_calls"] or 0 for r in rows),
        },
        "sample_seconds_total": round(sum(durations), 3),
        "runtimes": sorted({r["runtime"] for r in rows if r["runtime"]}),
        "isolation": sorted({r["isolation"] for r in rows if r["isolation"]}),
    }


def mean_ci(values: list[float], z: float = 1.959964) -> dict[str, float | int | None]:
    """Mean with a 95% confidence interval: Wilson's for 0/1 scores, normal otherwise."""
    n = len(values)
    if n == 0:
        return {"mean": None, "stderr": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = sum(values) / n
    if all(v in (0.0, 1.0) for v in values):
        denom = 1 + z * z / n
        centre = (mean + z * z / (2 * n)) / denom
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / denom
        stderr = math.sqrt(mean * (1 - mean) / n)
        low, high = centre - half, centre + half
    else:
        var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
        stderr = math.sqrt(var / n)
        low, high = mean - z * stderr, mean + z * stderr
    return {"mean": mean, "stderr": stderr, "ci_low": low, "ci_high": high, "n": n}
