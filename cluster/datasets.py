"""Loading an evaluation's samples: inline, or a JSONL or Parquet file, local or on S3.

Every row is validated as a `proctor.spec.Sample`; a bad row fails with its line number
and the field. Samples without an id get their position.
"""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
from pydantic import ValidationError

from proctor.settings import Settings
from proctor.spec import Dataset, Sample, SpecError

from .storage import StorageError, read_bytes


def load_samples(dataset: Dataset, settings: Settings) -> list[Sample]:
    """The dataset's samples, with ids. Raises `SpecError` for bad rows, `StorageError`
    when the file cannot be read."""
    if dataset.samples is not None:
        samples = list(dataset.samples)
    else:
        assert dataset.path is not None
        data = read_bytes(dataset.path, settings)
        rows = _parquet_rows(data, dataset.path) if dataset.path.endswith(".parquet") else _jsonl_rows(data, dataset.path)
        samples = []
        for n, row in rows:
            try:
                samples.append(Sample.model_validate(row))
            except ValidationError as exc:
                err = SpecError.from_validation(exc)
                raise SpecError([(f"dataset.path:{n}.{f}", r) for f, r in err.errors], dataset.path) from None
    if dataset.limit:
        samples = samples[: dataset.limit]
    out = [s if s.id is not None else s.model_copy(update={"id": str(i)}) for i, s in enumerate(samples)]
    ids = [str(s.id) for s in out]
    if len(set(ids)) != len(ids):
        raise SpecError([("dataset", "sample ids must be unique")])
    return out


def _jsonl_rows(data: bytes, source: str) -> list[tuple[int, dict]]:
    rows = []
    for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise SpecError([(f"dataset.path:{n}", f"not JSON: {exc}")], source) from None
        if not isinstance(row, dict):
            raise SpecError([(f"dataset.path:{n}", "each line must be a JSON object")], source)
        rows.append((n, row))
    return rows


def _parquet_rows(data: bytes, source: str) -> list[tuple[int, dict]]:
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:
        raise StorageError(f"{source} is not a readable Parquet file: {exc}") from exc
    return [(n, {k: v for k, v in row.items() if v is not None}) for n, row in enumerate(table.to_pylist(), start=1)]
