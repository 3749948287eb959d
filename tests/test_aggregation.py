"""The aggregator: buffers, thresholds, parts, idempotency and compaction, on file://
and on s3:// (a real moto server)."""

from __future__ import annotations

import math
import pickle
import uuid
from pathlib import Path

import pandas as pd
import pytest

from cluster.aggregation import AggregationError, Aggregator, FlushPolicy, WriteJob, run_jobs, write_part
from cluster.results import ResultsStore, SampleRecord, records_table, summarize
from cluster.storage import StorageError, filesystem
from proctor.settings import Settings

SCORERS = ["exact", "f1"]


@pytest.fixture(params=["file", "s3"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """A fresh results root: a local folder, then a prefix on the session's S3 server."""
    if request.param == "file":
        return Settings(home=tmp_path, results_uri=(tmp_path / "results").as_uri())
    s3: Settings = request.getfixturevalue("s3_settings")
    return s3.model_copy(update={"results_uri": f"{s3.results}-{uuid.uuid4().hex[:8]}"})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def records(shard: str, samples: range, epochs: int = 1, output: str = "4") -> list[SampleRecord]:
    return [
        SampleRecord(shard, f"s{i:04d}", epoch, f"What is {i} plus {epoch}? Answer with a number only.", str(i),
                     output, {"exact": float(i % 3 == 0), "f1": (i % 5) / 5}, {"exact": output},
                     error="sandbox timeout" if i % 17 == 0 else None,
                     started_at=1_700_000_000 + i, completed_at=1_700_000_002 + i, input_tokens=20 + i,
                     output_tokens=3, model_calls=1, turns=1, model="reference", runtime="gvisor",
                     isolation="strong")
        for i in samples for epoch in range(1, epochs + 1)
    ]


def read_root(settings: Settings) -> pd.DataFrame:
    """The whole results root as one hive-partitioned table, as any reader would see it."""
    fs, path = filesystem(settings.results, settings)
    return pd.read_parquet(path, filesystem=fs)


def run_evaluation(agg: Aggregator, eval_id: str, shards: int, per_shard: int, epochs: int) -> None:
    agg.open(eval_id, SCORERS)
    for s in range(shards):
        shard = f"{s:05d}"
        batch = records(shard, range(s * per_shard, (s + 1) * per_shard), epochs)
        for i in range(0, len(batch), 7):  # as they stream in from the sandbox
            run_jobs(agg.add(eval_id, shard, 1, batch[i : i + 7]), agg.settings)
        run_jobs(agg.finish_shard(eval_id, shard, 1), agg.settings)
        agg.drop_superseded(eval_id, shard, 1)
    run_jobs(agg.finish_evaluation(eval_id), agg.settings)


def test_rows_equal_samples_times_epochs_and_summary_matches_pandas(settings: Settings) -> None:
    agg = Aggregator(settings.results, settings, FlushPolicy(max_rows=40))
    run_evaluation(agg, "ev-a", shards=3, per_shard=30, epochs=2)
    table = agg.store.read("ev-a")
    summary = summarize(table, SCORERS, by={f"s{i:04d}": "odd" if i % 2 else "even" for i in range(90)})

    df = read_root(settings)
    df = df[df["eval_id"] == "ev-a"]
    assert len(df) == 90 * 2 == table.num_rows
    assert not df.duplicated(["sample_id", "epoch"]).any()
    exact = df["scores"].map(lambda kv: dict(kv)["exact"])
    f1 = df["scores"].map(lambda kv: dict(kv)["f1"])
    assert summary["samples"] == len(df)
    assert summary["errors"] == df["error"].notna().sum()
    assert summary["metrics"]["exact"]["mean"] == pytest.approx(exact.mean())
    assert summary["metrics"]["f1"]["mean"] == pytest.approx(f1.mean())
    assert summary["metrics"]["f1"]["stderr"] == pytest.approx(f1.std(ddof=1) / math.sqrt(len(f1)))
    assert summary["usage"]["input_tokens"] == df["input_tokens"].sum()
    assert summary["sample_seconds_total"] == pytest.approx(df["duration_s"].sum())
    parity = df["sample_id"].str[1:].astype(int) % 2
    for name, part in exact.groupby(parity.map({0: "even", 1: "odd"})):
        assert summary["groups"][name]["metrics"]["exact"]["mean"] == pytest.approx(part.mean())


def test_running_the_same_jobs_again_does_not_duplicate_rows(settings: Settings) -> None:
    agg = Aggregator(settings.results, settings, FlushPolicy(max_rows=10))
    agg.open("ev-b", SCORERS)
    jobs = agg.add("ev-b", "00000", 1, records("00000", range(25)))
    jobs += agg.finish_shard("ev-b", "00000", 1)
    run_jobs(jobs, settings)
    run_jobs(jobs, settings)  # a retried flush
    write_part(pickle.loads(pickle.dumps(jobs[0])), settings)  # as a Ray task would receive it
    assert [j.seq for j in jobs] == [0, 1, 2]
    assert len(read_root(settings)) == 25
    assert len(agg.store.parts("ev-b")) == 3


def test_a_sample_sent_twice_in_one_attempt_is_kept_once(settings: Settings) -> None:
    agg = Aggregator(settings.results, settings)
    agg.open("ev-c", SCORERS)
    agg.add("ev-c", "00000", 1, records("00000", range(5)))
    agg.add("ev-c", "00000", 1, records("00000", range(3), output="again"))
    run_jobs(agg.finish_shard("ev-c", "00000", 1), settings)
    df = read_root(settings)
    assert len(df) == 5 and (df["output"] == "again").sum() == 3


def test_a_rerun_shard_replaces_the_rows_of_its_earlier_attempt(settings: Settings) -> None:
    agg = Aggregator(settings.results, settings, FlushPolicy(max_rows=8))
    agg.open("ev-d", SCORERS)
    run_jobs(agg.add("ev-d", "00000", 1, records("00000", range(20), output="first")), settings)
    run_jobs(agg.add("ev-d", "00001", 1, records("00001", range(20, 30))), settings)
    run_jobs(agg.finish_shard("ev-d", "00001", 1), settings)
    # attempt 1 of shard 00000 dies; attempt 2 runs it again
    run_jobs(agg.add("ev-d", "00000", 2, records("00000", range(12), output="second")), settings)
    mid = agg.store.read("ev-d").to_pandas()  # between the re-run and the cleanup
    assert not mid.duplicated(["sample_id", "epoch"]).any()
    # attempt 1 wrote s0000-s0015 (its last 4 rows were still buffered), attempt 2 s0000-s0007 so far
    assert len(mid) == 16 + 10 and (mid["output"] == "second").sum() == 8
    run_jobs(agg.add("ev-d", "00000", 2, records("00000", range(12, 20), output="second")), settings)
    run_jobs(agg.finish_shard("ev-d", "00000", 2), settings)
    dropped = agg.drop_superseded("ev-d", "00000", 2)
    assert dropped and all("-a1-" in uri for uri in dropped)
    df = read_root(settings)
    assert len(df) == 30
    assert set(df[df["shard_id"] == "00000"]["output"]) == {"second"}
    assert set(df[df["shard_id"] == "00000"]["attempt"]) == {2}


def test_streamed_then_complete_rows_of_one_attempt_read_as_that_attempt(settings: Settings) -> None:
    """The supervisor writes a shard's rows twice (streamed, then complete), as two
    aggregation attempts that order the parts; the rows carry the shard's own attempt."""
    agg = Aggregator(settings.results, settings)
    agg.open("ev-r", SCORERS)
    run_jobs(agg.add("ev-r", "00000", 1, records("00000", range(3)), row_attempt=1), settings)
    run_jobs(agg.flush("ev-r"), settings)
    run_jobs(agg.add("ev-r", "00000", 2, records("00000", range(5)), row_attempt=1), settings)
    run_jobs(agg.finish_shard("ev-r", "00000", 2), settings)
    assert all("-a1-" in uri for uri in agg.drop_superseded("ev-r", "00000", 2))
    df = read_root(settings)
    assert len(df) == 5 and set(df["attempt"]) == {1}
    assert [p.attempt for p in agg.store.parts("ev-r")] == [2]  # the parts keep their own order


def test_records_of_a_superseded_attempt_are_dropped(settings: Settings) -> None:
    agg = Aggregator(settings.results, settings)
    agg.open("ev-e", SCORERS)
    agg.add("ev-e", "00000", 1, records("00000", range(4), output="first"))
    agg.add("ev-e", "00000", 2, records("00000", range(4), output="second"))
    assert agg.add("ev-e", "00000", 1, records("00000", range(4, 6))) == []
    assert agg.stale_records == 2 and agg.buffered_rows == 4
    run_jobs(agg.finish_evaluation("ev-e"), settings)
    assert set(read_root(settings)["output"]) == {"second"}


def test_superseded_parts_stay_until_their_replacement_is_written(settings: Settings) -> None:
    agg = Aggregator(settings.results, settings)
    agg.open("ev-f", SCORERS)
    agg.add("ev-f", "00000", 1, records("00000", range(3)))
    run_jobs(agg.finish_shard("ev-f", "00000", 1), settings)
    agg.add("ev-f", "00000", 2, records("00000", range(3)))
    agg.finish_shard("ev-f", "00000", 2)  # its job not run yet
    with pytest.raises(AggregationError, match="part-00000-a2-00000.parquet is not written"):
        agg.drop_superseded("ev-f", "00000", 2)
    assert len(read_root(settings)) == 3


def test_a_restarted_aggregator_continues_the_part_numbers(settings: Settings) -> None:
    first = Aggregator(settings.results, settings)
    first.open("ev-g", SCORERS)
    run_jobs(first.add("ev-g", "00000", 1, records("00000", range(3))) + first.flush(), settings)
    second = Aggregator(settings.results, settings)  # the actor was rebuilt
    second.open("ev-g", SCORERS)
    jobs = second.add("ev-g", "00000", 1, records("00000", range(3, 6))) + second.flush()
    assert [j.seq for j in jobs] == [1]
    run_jobs(jobs, settings)
    assert len(read_root(settings)) == 6


def test_compaction_leaves_few_files_with_the_same_rows(settings: Settings) -> None:
    agg = Aggregator(settings.results, settings, FlushPolicy(max_rows=9))
    run_evaluation(agg, "ev-h", shards=4, per_shard=25, epochs=2)
    before = agg.store.read("ev-h").to_pandas().sort_values(["sample_id", "epoch"]).reset_index(drop=True)
    assert len(agg.store.parts("ev-h")) > 20
    result = agg.compact("ev-h", target_rows=120)
    assert result.rows == 200 and len(result.files) == 2
    assert [p.uri.rsplit("/", 1)[1] for p in agg.store.parts("ev-h")] == ["data-0.parquet", "data-1.parquet"]
    after = read_root(settings).drop(columns=["eval_id"]).sort_values(["sample_id", "epoch"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(after, before)
    again = agg.compact("ev-h")  # nothing new: nothing rewritten
    assert again.files == result.files and again.removed == 0 and again.rows == 200


def test_compaction_removes_doubles_left_by_an_interrupted_rerun(settings: Settings) -> None:
    agg = Aggregator(settings.results, settings)
    agg.open("ev-i", SCORERS)
    run_jobs(agg.add("ev-i", "00000", 1, records("00000", range(10), output="first")) + agg.flush(), settings)
    run_jobs(agg.add("ev-i", "00000", 2, records("00000", range(6), output="second")) + agg.flush(), settings)
    assert len(read_root(settings)) == 16  # raw files hold both attempts for a moment
    result = agg.compact("ev-i")
    df = read_root(settings)
    assert result.rows == len(df) == 10 and len(result.files) == 1
    assert (df["output"] == "second").sum() == 6
    run_jobs(agg.add("ev-i", "00000", 2, records("00000", range(6, 10), output="second")) + agg.flush(), settings)
    assert agg.compact("ev-i").files[-1].endswith("data-1.parquet")  # a new name, never an overwrite
    assert set(read_root(settings)["output"]) == {"second"}


def test_compaction_of_an_evaluation_with_buffered_rows_is_refused(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, results_uri=tmp_path.as_uri())
    agg = Aggregator(settings.results, settings)
    agg.open("ev-j", SCORERS)
    agg.add("ev-j", "00000", 1, records("00000", range(2)))
    with pytest.raises(AggregationError, match="finish_evaluation"):
        agg.compact("ev-j")


def make(policy: FlushPolicy, tmp_path: Path, clock: FakeClock | None = None) -> Aggregator:
    settings = Settings(home=tmp_path, results_uri=tmp_path.as_uri())
    agg = Aggregator(settings.results, settings, policy, clock=clock or FakeClock())
    agg.open("ev", SCORERS)
    return agg


def test_rows_threshold_flushes_parts_of_at_most_max_rows(tmp_path: Path) -> None:
    agg = make(FlushPolicy(max_rows=100), tmp_path)
    assert agg.add("ev", "00000", 1, records("00000", range(99))) == []
    jobs = agg.add("ev", "00000", 1, records("00000", range(99, 350)))
    assert [(j.table.num_rows, j.reason) for j in jobs] == [(100, "rows"), (100, "rows"), (100, "rows")]
    assert agg.buffered_rows == 50


def test_bytes_threshold_flushes_a_buffer_of_large_rows(tmp_path: Path) -> None:
    agg = make(FlushPolicy(max_bytes=20_000), tmp_path)
    big = [SampleRecord("00000", f"s{i}", 1, "x" * 1000, "t", "y" * 1000) for i in range(30)]
    jobs = agg.add("ev", "00000", 1, big)
    assert [j.reason for j in jobs] == ["bytes"] and 9 <= jobs[0].table.num_rows <= 30


def test_age_threshold_flushes_without_sleeping(tmp_path: Path) -> None:
    clock = FakeClock()
    agg = make(FlushPolicy(max_age_s=30), tmp_path, clock)
    agg.add("ev", "00000", 1, records("00000", range(3)))
    clock.now += 29
    assert agg.due() == []
    agg.add("ev", "00001", 1, records("00001", range(3, 5)))
    clock.now += 1
    jobs = agg.due()
    assert [(j.shard_id, j.reason, j.table.num_rows) for j in jobs] == [("00000", "age", 3)]
    clock.now += 30
    assert [j.shard_id for j in agg.add("ev", "00001", 1, [])] == ["00001"]  # checked on add too


def test_memory_cap_flushes_the_largest_buffers(tmp_path: Path) -> None:
    agg = make(FlushPolicy(max_buffered_bytes=40_000), tmp_path)
    assert agg.add("ev", "00000", 1, records("00000", range(100))) == []
    assert agg.add("ev", "00001", 1, records("00001", range(100, 110))) == []
    jobs = agg.add("ev", "00002", 1, records("00002", range(110, 250)))
    assert [(j.shard_id, j.reason) for j in jobs] == [("00002", "memory"), ("00000", "memory")]
    assert agg.buffered_rows == 10 and agg.buffered_bytes <= 20_000


def test_records_for_an_unknown_evaluation_or_under_another_shard_are_refused(tmp_path: Path) -> None:
    agg = make(FlushPolicy(), tmp_path)
    with pytest.raises(AggregationError, match=r"ev-x is not open here: call Aggregator.open"):
        agg.add("ev-x", "00000", 1, records("00000", range(1)))
    with pytest.raises(AggregationError, match="shard '00000' was sent as shard '00001'"):
        agg.add("ev", "00001", 1, records("00000", range(1)))


def test_a_failed_write_is_a_storage_error_naming_the_part(s3_settings: Settings) -> None:
    settings = s3_settings.model_copy(update={"results_uri": "s3://no-such-bucket-here/results"})
    agg = Aggregator(settings.results, settings)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        agg.open("ev", SCORERS)
    job = WriteJob(ResultsStore(settings.results, settings).part_uri("ev", "00000", 1, 0),
                   records_table(records("00000", range(1)), SCORERS), "ev", "00000", 1, 0, "flush")
    with pytest.raises(StorageError, match=r"1 of 1 parts not written; first: cannot write "
                                           r"s3://no-such-bucket-here/results/eval_id=ev/part-00000-a1-00000"):
        run_jobs([job], settings)


def test_tables_converted_by_the_sender_are_buffered_like_records(settings: Settings) -> None:
    agg = Aggregator(settings.results, settings, FlushPolicy(max_rows=6))
    agg.open("ev-k", SCORERS)
    batch = records_table(records("00000", range(10)), SCORERS)
    jobs = agg.add("ev-k", "00000", 1, batch)
    jobs += agg.add("ev-k", "00000", 1, records_table(records("00000", range(2), output="again"), SCORERS))
    jobs += agg.finish_shard("ev-k", "00000", 1)
    assert [j.table.num_rows for j in jobs] == [6, 6]
    run_jobs(jobs, settings)
    # s0000 and s0001 came again after their part was written: a later part holds the copy
    assert len(read_root(settings)) == 12
    assert sorted(agg.store.read("ev-k")["output"].to_pylist()).count("again") == 2
    assert agg.store.read("ev-k").num_rows == 10
    agg.compact("ev-k")
    df = read_root(settings)
    assert len(df) == 10 and (df["output"] == "again").sum() == 2
    with pytest.raises(AggregationError, match="shard '00000' was sent as shard '00001'"):
        agg.add("ev-k", "00001", 1, batch)


def test_records_after_the_evaluation_finished_are_dropped(settings: Settings) -> None:
    agg = Aggregator(settings.results, settings)
    agg.open("ev-l", SCORERS)
    agg.add("ev-l", "00000", 1, records("00000", range(3)))
    run_jobs(agg.finish_evaluation("ev-l"), settings)
    agg.compact("ev-l")
    agg.open("ev-l", SCORERS)  # a late caller: nothing re-opens
    assert agg.add("ev-l", "00000", 1, records("00000", range(3, 5))) == []
    assert agg.finish_shard("ev-l", "00000", 1) == [] and agg.finish_evaluation("ev-l") == []
    assert agg.stale_records == 2 and agg.buffered_rows == 0
    agg.open("ev-l", SCORERS, reopen=True)  # resumed on purpose
    run_jobs(agg.add("ev-l", "00000", 2, records("00000", range(3, 5))) + agg.flush(), settings)
    assert len(agg.store.read("ev-l")) == 5


def test_a_retried_finish_writes_the_rows_once(settings: Settings) -> None:
    agg = Aggregator(settings.results, settings, FlushPolicy(max_rows=4))
    agg.open("ev-m", SCORERS)
    agg.add("ev-m", "00000", 1, records("00000", range(3)))
    run_jobs(agg.finish_shard("ev-m", "00000", 1), settings)
    lost = agg.add("ev-m", "00000", 2, records("00000", range(6))) + agg.finish_shard("ev-m", "00000", 2)
    run_jobs(lost[:1], settings)  # the second write failed; the caller retries the whole finish
    with pytest.raises(AggregationError, match="part-00000-a2-00001.parquet is not written"):
        agg.drop_superseded("ev-m", "00000", 2)
    retry = agg.add("ev-m", "00000", 2, records("00000", range(6))) + agg.finish_shard("ev-m", "00000", 2)
    assert [j.seq for j in retry] == [2, 3]
    run_jobs(retry, settings)
    assert [u.rsplit("/", 1)[1] for u in agg.drop_superseded("ev-m", "00000", 2)] == ["part-00000-a1-00000.parquet"]
    table = agg.store.read("ev-m")
    assert table.num_rows == 6 and set(table["attempt"].to_pylist()) == {2}
    agg.compact("ev-m")
    assert len(read_root(settings)) == 6
