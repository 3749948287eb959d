"""The results table, its store on file:// and s3:// (a real moto server), the summary."""

from __future__ import annotations

import json
import math
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.results import (RESULTS_SCHEMA, ResultsStore, SampleRecord, deduplicate, mean_ci, records_table,
                             summarize, with_attempt, write_parquet)
from cluster.storage import StorageError, delete, filesystem, list_files, presigned_url, read_bytes, write_bytes
from proctor.settings import Settings


@pytest.fixture(params=["file", "s3"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """A fresh results root: a local folder, then a prefix on the session's S3 server."""
    if request.param == "file":
        return Settings(home=tmp_path, results_uri=(tmp_path / "results").as_uri())
    s3: Settings = request.getfixturevalue("s3_settings")
    return s3.model_copy(update={"results_uri": f"{s3.results}-{uuid.uuid4().hex[:8]}"})


def record(sample: str, epoch: int = 1, shard: str = "00000", **kw: object) -> SampleRecord:
    values: dict[str, object] = {
        "input": f"What is {sample}?", "target": "4", "output": "4", "scores": {"exact": 1.0, "f1": 0.5},
        "answers": {"exact": "4"}, "started_at": 1_700_000_000.25, "completed_at": 1_700_000_001.75,
        "input_tokens": 10, "output_tokens": 3, "model_calls": 1, "turns": 1,
        "model": "reference", "runtime": "gvisor", "isolation": "strong",
    }
    values.update(kw)
    return SampleRecord(shard, sample, epoch, **values)  # type: ignore[arg-type]


def test_records_table_holds_each_field_in_the_schema() -> None:
    table = records_table([record("a"), record("b", error="timeout", scores={})], ["f1", "exact"], attempt=3)
    assert table.schema == RESULTS_SCHEMA
    a, b = table.to_pylist()
    assert a["score"] == 0.5 and dict(a["scores"]) == {"exact": 1.0, "f1": 0.5}
    assert a["duration_s"] == 1.5 and a["started_at"].timestamp() == 1_700_000_000.25
    assert a["attempt"] == 3 and a["schema_version"] == 1
    assert b["score"] is None and b["error"] == "timeout"


def test_the_documented_schema_is_the_written_schema(settings: Settings) -> None:
    """cluster/results.py documents every column, its type and order; attempts and epochs
    count from 1, as documented."""
    from schemadoc import documented_columns, type_name

    documented = documented_columns()
    assert [(name, kind) for name, kind, _ in documented] == [(f.name, type_name(f.type)) for f in RESULTS_SCHEMA]
    meaning = {name: text for name, _, text in documented}
    assert "1-based" in meaning["attempt"] and "1-based" in meaning["epoch"]
    store = ResultsStore(settings.results, settings)
    store.write_shard("ev-doc", "00000", records_table([record("a")], ["exact"]))
    (row,) = store.read("ev-doc").to_pylist()
    assert row["attempt"] == 1 and row["epoch"] == 1 and row["schema_version"] == 1


def test_write_shard_twice_keeps_one_copy(settings: Settings) -> None:
    store = ResultsStore(settings.results, settings)
    table = records_table([record(str(i)) for i in range(5)], ["exact"])
    store.write_shard("ev-1", "00000", table)
    store.write_shard("ev-1", "00000", table)
    assert store.read("ev-1").num_rows == 5
    assert len(store.parts("ev-1")) == 1


def test_write_shard_of_a_new_attempt_replaces_the_earlier_one(settings: Settings) -> None:
    store = ResultsStore(settings.results, settings)
    store.write_shard("ev-1", "00000", records_table([record("a", output="old")], ["exact"]))
    store.write_shard("ev-1", "00000", records_table([record("a", output="new")], ["exact"]), attempt=2)
    rows = store.read("ev-1").to_pylist()
    assert [(r["output"], r["attempt"]) for r in rows] == [("new", 2)]
    assert [p.attempt for p in store.parts("ev-1")] == [2]


def test_read_keeps_the_highest_attempt_of_each_sample(settings: Settings) -> None:
    store = ResultsStore(settings.results, settings)
    first = records_table([record("a", output="a1"), record("b", output="b1")], ["exact"], attempt=1)
    second = records_table([record("a", output="a2")], ["exact"], attempt=2)
    write_parquet(first, store.part_uri("ev-1", "00000", 1, 0), settings)
    write_parquet(second, store.part_uri("ev-1", "00000", 2, 0), settings)
    outputs = sorted(store.read("ev-1")["output"].to_pylist())
    assert outputs == ["a2", "b1"]


def test_deduplicate_prefers_the_later_completion_within_an_attempt() -> None:
    table = records_table([record("a", output="early"), record("a", output="late", completed_at=1_700_000_009.0),
                           record("b")], ["exact"])
    assert deduplicate(table)["output"].to_pylist() == ["late", "4"]


def test_files_written_before_the_attempt_column_read_as_attempt_1(settings: Settings) -> None:
    store = ResultsStore(settings.results, settings)
    old = records_table([record("a")], ["exact"]).drop_columns(["attempt"])
    fs, path = filesystem(store.eval_uri("ev-old") + "/part-00000.parquet", settings)
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    pq.write_table(old, path, filesystem=fs)
    assert store.read("ev-old")["attempt"].to_pylist() == [1]


def test_summary_round_trips(settings: Settings) -> None:
    store = ResultsStore(settings.results, settings)
    uri = store.write_summary("ev-1", {"samples": 3, "metrics": {}})
    assert uri == store.eval_uri("ev-1") + "/_summary.json"
    assert store.read_summary("ev-1") == {"samples": 3, "metrics": {}}


def test_summary_is_not_read_as_data(settings: Settings) -> None:
    store = ResultsStore(settings.results, settings)
    store.write_shard("ev-1", "00000", records_table([record("a")], ["exact"]))
    store.write_summary("ev-1", {"samples": 1})
    assert store.read("ev-1").num_rows == 1


def wilson(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_summarize_matches_a_recomputation_with_pandas() -> None:
    records = [record(f"s{i}", epoch, scores={"exact": float(i % 3 == 0), "f1": (i % 7) / 7},
                      input_tokens=i, error="boom" if i % 11 == 0 else None)
               for i in range(60) for epoch in (1, 2)]
    table = records_table(records, ["exact", "f1"])
    category = {f"s{i}": ("math" if i % 2 else "code") for i in range(50)}
    summary = summarize(table, ["exact", "f1"], by=category, labels={"team": "red"})

    df = table.to_pandas()
    exact = df["scores"].map(lambda kv: dict(kv)["exact"])
    f1 = df["scores"].map(lambda kv: dict(kv)["f1"])
    assert summary["samples"] == len(df) == 120
    assert summary["errors"] == df["error"].notna().sum()
    assert summary["metrics"]["exact"]["mean"] == pytest.approx(exact.mean())
    low, high = wilson(exact.sum(), len(exact))
    assert (summary["metrics"]["exact"]["ci_low"], summary["metrics"]["exact"]["ci_high"]) == pytest.approx((low, high))
    half = 1.959964 * f1.std(ddof=1) / math.sqrt(len(f1))
    assert summary["metrics"]["f1"]["ci_low"] == pytest.approx(f1.mean() - half)
    assert summary["usage"]["input_tokens"] == df["input_tokens"].sum()
    assert summary["sample_seconds_total"] == pytest.approx(df["duration_s"].sum())
    assert summary["labels"] == {"team": "red"}
    groups = df["sample_id"].map(lambda s: category.get(s, "(none)"))
    assert set(summary["groups"]) == {"code", "math", "(none)"}
    for name, part in exact.groupby(groups):
        assert summary["groups"][name]["metrics"]["exact"]["mean"] == pytest.approx(part.mean())
        assert summary["groups"][name]["samples"] == len(part)
    json.dumps(summary)  # JSON as it is


def test_summarize_counts_a_missing_score_as_zero() -> None:
    table = records_table([record("a", scores={"exact": 1.0}), record("b", scores={}, error="crash")], ["exact"])
    assert summarize(table, ["exact"])["metrics"]["exact"]["mean"] == 0.5


def test_mean_ci_of_nothing_and_of_one_value() -> None:
    assert mean_ci([])["mean"] is None
    assert mean_ci([0.25]) == {"mean": 0.25, "stderr": 0.0, "ci_low": 0.25, "ci_high": 0.25, "n": 1}


def test_a_missing_bucket_is_a_storage_error_naming_the_uri(s3_settings: Settings) -> None:
    uri = "s3://no-such-bucket-here/results"
    table = records_table([record("a")], ["exact"])
    with pytest.raises(StorageError, match="s3://no-such-bucket-here/results/eval_id=ev-1/part"):
        ResultsStore(uri, s3_settings).write_shard("ev-1", "00000", table)
    with pytest.raises(StorageError, match=f"{uri}/eval_id=ev-1"):
        ResultsStore(uri, s3_settings).read("ev-1")
    with pytest.raises(StorageError, match=uri):
        list_files(uri, s3_settings)


def test_an_unreachable_endpoint_is_a_storage_error(s3_settings: Settings) -> None:
    from ports import free_port

    dead = s3_settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(StorageError, match="s3://"):
        write_bytes(f"s3://nowhere-{uuid.uuid4().hex[:6]}/x.json", b"{}", dead)


def test_an_unknown_scheme_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="use file:// or s3://"):
        ResultsStore("gs://bucket/results", Settings(home=tmp_path))


def test_presigned_url_downloads_the_object(s3_settings: Settings) -> None:
    uri = f"{s3_settings.results}/presign/{uuid.uuid4().hex}.txt"
    write_bytes(uri, b"hello from s3", s3_settings)
    url = presigned_url(uri, s3_settings, expires_s=60)
    assert url is not None and url.startswith(s3_settings.s3_endpoint_url or "")
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.read() == b"hello from s3"


def test_presigned_url_of_a_local_file_is_none(tmp_path: Path) -> None:
    assert presigned_url((tmp_path / "x").as_uri(), Settings(home=tmp_path)) is None


def test_list_and_delete_files_and_folders(settings: Settings) -> None:
    root = settings.results
    for name in ("a/1.bin", "a/b/2.bin", "c.bin"):
        write_bytes(f"{root}/{name}", b"xy", settings)
    assert [(f.uri.removeprefix(root), f.size) for f in list_files(root, settings)] == [
        ("/a/1.bin", 2), ("/a/b/2.bin", 2), ("/c.bin", 2)]
    delete(f"{root}/a", settings)
    delete(f"{root}/c.bin", settings)
    delete(f"{root}/c.bin", settings)  # twice: fine
    assert list_files(root, settings) == []
    assert read_bytes  # keep the import honest for the next line
    with pytest.raises(StorageError, match="c.bin"):
        read_bytes(f"{root}/c.bin", settings)


def test_write_parquet_replaces_a_file_whole(settings: Settings) -> None:
    uri = f"{settings.results}/t/part.parquet"
    write_parquet(records_table([record("a"), record("b")], ["exact"]), uri, settings)
    write_parquet(with_attempt(records_table([record("c")], ["exact"]), 2), uri, settings)
    fs, path = filesystem(uri, settings)
    table = pq.read_table(path, filesystem=fs)
    assert table["sample_id"].to_pylist() == ["c"] and table["attempt"].to_pylist() == [2]
    assert [f.uri for f in list_files(f"{settings.results}/t", settings)] == [uri]  # no temp file left
    assert isinstance(table, pa.Table) and not pd.isna(table["completed_at"][0].as_py())


def test_artifacts_and_logs_round_trip(settings: Settings) -> None:
    store = ResultsStore(settings.results, settings)
    assert store.artifacts("ev-a") == [] and store.read_logs("ev-a") == []
    store.write_artifact("ev-a", "00001", "s1-e1/out/answer.txt", b"42\n")
    store.write_artifact("ev-a", "00000", "s0-e1/answer.txt", b"7\n")
    found = store.artifacts("ev-a")
    assert [(p, n) for p, n, _ in found] == [("00000/s0-e1/answer.txt", 2), ("00001/s1-e1/out/answer.txt", 3)]
    assert read_bytes(store.artifact_uri("ev-a", found[1][0]), settings) == b"42\n"
    for bad in ["../x", "00000", "00000/../../etc", "00000//x", "00000/./x"]:
        with pytest.raises(ValueError):
            store.artifact_uri("ev-a", bad)
    url = presigned_url(found[0][2], settings)
    if url is not None:  # S3: the pre-signed URL downloads it without credentials
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.read() == b"7\n"
    store.write_logs("ev-a", "00000", 1, [{"n": 0, "ts": 2.0, "shard_id": "00000", "message": "second"}])
    store.write_logs("ev-a", "00001", 1, [{"n": 0, "ts": 1.0, "shard_id": "00001", "message": "first"}])
    write_bytes(f"{store.eval_uri('ev-a')}/_logs/00002-a1.jsonl", b'not json\n{"ts": 3.0, "message": "third"}\n',
                settings)
    assert [line["message"] for line in store.read_logs("ev-a")] == ["first", "second", "third"]
    assert store.parts("ev-a") == []  # logs and artifacts are not data parts
