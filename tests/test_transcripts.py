"""Transcripts on storage (`cluster/transcripts.py`, `cluster/inspect_log.py`): shard logs and
the evaluation's merged log in Inspect AI's `.eval` format, on a folder and on S3 (moto's
server), read back exactly by Proctor and natively by Inspect's own readers, data frames
and `inspect view`."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from cluster.results import SampleRecord, conform, records_table
from cluster.transcripts import TranscriptStore, search, transcript_ref
from proctor.settings import Settings
from proctor.spec import parse_spec
from proctor.transcript import CutNote, Entry, SafetyAction, SampleTranscript, ToolCallView

EVAL = "ev-tx-1"
SPEC = parse_spec({"name": "transcripts-test", "model": {"adapter": "python", "callable": "proctor.scripted.file_agent:solve"},
                   "agentic": True, "dataset": {"samples": [{"id": s, "input": "go"} for s in ("a", "b/2", "c")]},
                   "scorers": [{"type": "includes"}]})


def conversation(sample_id: str, shard_id: str, secret: str = "TOKEN-7") -> SampleTranscript:
    """One sample's transcript with an entry of every kind and provenance."""
    t0 = 1_700_000_000.0
    entries = [
        Entry(n=0, at=t0, kind="message", provenance="sandbox", role="system", content="You can run shell commands."),
        Entry(n=1, at=t0 + 0.1, kind="message", provenance="sandbox", role="user", content=f"find {secret}"),
        Entry(n=2, at=t0 + 0.2, kind="model", provenance="sandbox", role="assistant", content="",
              tool_calls=[ToolCallView(id="call_1", function="bash", arguments='{"command": "grep -r TOKEN ."}')],
              usage={"input_tokens": 9, "output_tokens": 0, "calls": 1}, latency_s=0.25),
        Entry(n=3, at=t0 + 0.6, kind="tool", provenance="sandbox", role="tool", content="exit code 0\n" + "z" * 70_000,
              tool_call_id="call_1", function="bash", exit_code=0, timed_out=False, truncated=True,
              output_bytes=140_000, latency_s=0.4),
        Entry(n=4, at=t0 + 0.7, kind="model", provenance="gateway", role="assistant", content="curl http://x.example",
              usage={"input_tokens": 30, "output_tokens": 5, "calls": 1}, latency_s=1.5, call_id="gen-1", held=True),
        Entry(n=5, at=t0 + 0.8, kind="safety", provenance="guard", safety=SafetyAction(
            monitor="rules", rule="exfiltration", action="stop", message="sending data out", evidence=["curl http://x"],
            stopped=True, held=True, blocked_commands=["curl http://x.example"])),
        Entry(n=6, at=t0 + 0.9, kind="tool", provenance="sandbox", role="tool", content="exit code -9\n",
              tool_call_id="call_2", function="bash", exit_code=-9, timed_out=True, output_bytes=0, latency_s=20.0),
        Entry(n=7, at=t0 + 1.0, kind="cut", provenance="platform", content="the transcript reached max_bytes",
              cut=CutNote(reason="the transcript reached max_bytes", max_bytes=4096, max_entries=2000,
                          dropped_entries=3, dropped_bytes=9000)),
    ]
    return SampleTranscript(eval_id=EVAL, shard_id=shard_id, sample_id=sample_id, epoch=1, entries=entries, cut=True,
                            started_at=t0, completed_at=t0 + 1.0, stopped=True)


def record(sample_id: str, shard_id: str, score: float = 1.0) -> SampleRecord:
    return SampleRecord(shard_id=shard_id, sample_id=sample_id, epoch=1, input="go", target="t", output="done",
                        scores={"includes": score}, started_at=1_700_000_000.0, completed_at=1_700_000_002.0,
                        input_tokens=9, output_tokens=1, model_calls=2, turns=2)


def write(store: TranscriptStore, shard_id: str, samples: list[str], attempt: int = 0, status: str = "succeeded",
          quarantined: bool = False) -> str:
    return store.write_shard(eval_id=EVAL, spec=SPEC, shard_id=shard_id, attempt=attempt, status=status, error=None,
                             transcripts=[conversation(s, shard_id) for s in samples],
                             records=[record(s, shard_id) for s in samples], quarantined=quarantined)


SUMMARY = {"status": "succeeded", "samples": 3, "metrics": {"includes": {"mean": 1.0, "stderr": 0.0, "ci_low": 0.4,
                                                                            "ci_high": 1.0, "n": 3}},
           "usage": {"input_tokens": 27, "output_tokens": 3}, "timing": {}}


@pytest.fixture
def folder(tmp_path: Path) -> TranscriptStore:
    return TranscriptStore((tmp_path / "results").as_uri(), Settings(home=tmp_path))


@contextlib.contextmanager
def quiet_pandas() -> Iterator[None]:
    """Inspect's data frames call a pandas API that pandas 3.1 deprecates: not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The inplace keyword in DataFrame.drop_duplicates")
        yield


def test_shard_logs_merge_into_the_evaluations_log_which_inspect_reads(folder: TranscriptStore,
                                                                       tmp_path: Path) -> None:
    from inspect_ai.log import list_eval_logs, read_eval_log, read_eval_log_sample, read_eval_log_sample_summaries

    write(folder, "00000", ["a", "b/2"])
    write(folder, "00001", ["c"])
    assert len(folder.shard_logs(EVAL)) == 2
    uri = folder.merge(EVAL, SUMMARY)
    path = uri.removeprefix("file://")
    assert uri == folder.uri(transcript_ref(EVAL, "00000", False)) and Path(path).is_file()
    assert not Path(folder.shards_uri(EVAL).removeprefix("file://")).exists()  # the shard logs are gone

    log = read_eval_log(path)
    assert (log.status, log.eval.task, log.eval.model, len(log.samples)) == \
        ("success", "transcripts-test", "python/proctor.scripted.file_agent:solve", 3)
    assert log.eval.viewer.trust_content is False  # a sandbox's text is shown as text
    assert log.results.scores[0].metrics["mean"].value == 1.0 and log.results.total_samples == 3
    assert len(read_eval_log_sample_summaries(path)) == 3
    s = read_eval_log_sample(path, id="b/2", epoch=1)
    assert [type(m).__name__ for m in s.messages] == ["ChatMessageSystem", "ChatMessageUser", "ChatMessageAssistant",
                                                      "ChatMessageTool", "ChatMessageAssistant", "ChatMessageTool"]
    assert s.messages[2].tool_calls[0].arguments == {"command": "grep -r TOKEN ."}
    assert [e.event for e in s.events] == ["model", "tool", "model", "info", "tool", "info"]
    model, tool, gateway, safety, timed_out, cut = s.events
    assert model.output.usage.input_tokens == 9 and model.output.time == 0.25
    assert tool.truncated == (140_000, 64 * 1024) and tool.result.startswith("exit code 0") and len(tool.result) > 70_000
    assert gateway.metadata["proctor"]["provenance"] == "gateway" and gateway.metadata["proctor"]["held"] is True
    assert safety.source == "proctor/safety" and safety.data["safety"]["rule"] == "exfiltration"
    assert timed_out.error.type == "timeout" and cut.data["cut"]["dropped_entries"] == 3
    assert s.scores["includes"].value == 1.0 and s.output.completion == "done"
    assert s.model_usage["python/proctor.scripted.file_agent:solve"].input_tokens == 30  # the gateway's figures
    [listed] = list_eval_logs(str(tmp_path / "results"))
    assert listed.task == "transcripts-test"

    from inspect_ai.analysis import evals_df, events_df, messages_df, samples_df

    with quiet_pandas():
        assert len(evals_df(path)) == 1 and len(samples_df(path)) == 3
        assert len(messages_df(path)) == 15 and len(events_df(path)) == 18  # 5 messages a sample: its last model call


def test_proctor_reads_back_exactly_what_it_wrote(folder: TranscriptStore) -> None:
    write(folder, "00000", ["a", "b/2"])
    before, where = folder.read(EVAL, "b/2", 1, quarantine=False)  # from the shard log: the evaluation runs
    assert where == "stored"
    folder.merge(EVAL, SUMMARY)
    after, _ = folder.read(EVAL, "b/2", 1, quarantine=False)
    original = conversation("b/2", "00000")
    for got in (before, after):
        assert [e.model_dump() for e in got.entries] == [e.model_dump() for e in original.entries]
        assert (got.cut, got.stopped, got.shard_id) == (True, True, "00000")
    assert folder.read(EVAL, "b/2", 2, quarantine=False) is None
    assert {(s.sample_id, s.entries) for s in folder.listing(EVAL, False)} == {("a", 8), ("b/2", 8)}


def test_a_later_attempt_replaces_an_earlier_one(folder: TranscriptStore) -> None:
    write(folder, "00000", ["a"], attempt=0, status="failed")
    [first] = folder.shard_logs(EVAL)
    folder.write_shard(eval_id=EVAL, spec=SPEC, shard_id="00000", attempt=1, status="succeeded", error=None,
                       transcripts=[SampleTranscript(eval_id=EVAL, shard_id="00000", sample_id="a", epoch=1)],
                       records=[record("a", "00000")], quarantined=False)
    assert [log.uri for log in folder.shard_logs(EVAL)] == [first.uri.replace("/a0.eval", "/a1.eval")]
    t, _ = folder.read(EVAL, "a", 1, quarantine=False)
    assert t.entries == []  # attempt 1's


def test_a_quarantined_shards_transcripts_are_kept_apart(folder: TranscriptStore) -> None:
    write(folder, "00000", ["a"])
    uri = write(folder, "00001", ["c"], status="safety_stopped", quarantined=True)
    assert uri == folder.uri(transcript_ref(EVAL, "00001", True)) and "/_quarantine/" in uri
    assert folder.read(EVAL, "c", 1, quarantine=False) is None  # not without the right
    t, where = folder.read(EVAL, "c", 1, quarantine=True)
    assert where == "quarantine" and t.stopped and folder.quarantined(EVAL, "c", 1)
    folder.merge(EVAL, SUMMARY)
    assert [s.sample_id for s in folder.listing(EVAL, False)] == ["a"]  # the merge leaves quarantine alone
    assert {s.sample_id: s.where for s in folder.listing(EVAL, True)} == {"a": "stored", "c": "quarantine"}


def test_search_finds_samples_and_turns(folder: TranscriptStore) -> None:
    write(folder, "00000", ["a", "b/2"])
    write(folder, "00001", ["c"], status="safety_stopped", quarantined=True)
    found = search(EVAL, "token-7", folder.transcripts(EVAL, False), limit=10)
    assert {(m.sample_id, m.n, m.kind) for m in found.matches} == {("a", 1, "message"), ("b/2", 1, "message")}
    assert (found.samples, found.searched, found.truncated) == (2, 2, False)
    assert "find TOKEN-7" in found.matches[0].excerpt
    blocked = search(EVAL, "curl http://x.example", folder.transcripts(EVAL, True), limit=10)
    assert {(m.sample_id, m.kind) for m in blocked.matches} >= {("c", "safety"), ("c", "model")}
    assert search(EVAL, "grep", folder.transcripts(EVAL, False), limit=1).truncated


def test_rows_name_their_transcript_and_old_rows_read_as_none() -> None:
    rows = [SampleRecord(shard_id="00000", sample_id="a", epoch=1, input="", target="", output="",
                         transcript=transcript_ref(EVAL, "00000", False))]
    table = records_table(rows, ["exact"])
    assert table["transcript"].to_pylist() == [f"eval_id={EVAL}/_transcripts/{EVAL}.eval"]
    old = conform(table.drop_columns(["transcript"]))
    assert old["transcript"].to_pylist() == [None] and old.schema.field("transcript").type == pa.string()


def test_on_s3_with_ranged_reads(s3_server: Any, tmp_path: Path) -> None:
    from inspect_ai.log import read_eval_log_sample

    settings = s3_server.settings("tx-results")
    store = TranscriptStore(settings.results, settings)
    write(store, "00000", ["a", "b/2"])
    write(store, "00001", ["c"], status="safety_stopped", quarantined=True)
    assert store.read(EVAL, "a", 1, quarantine=False)[1] == "stored"
    uri = store.merge(EVAL, SUMMARY)
    assert uri.startswith("s3://") and store.shard_logs(EVAL) == []
    t, where = store.read(EVAL, "b/2", 1, quarantine=False)
    assert where == "stored" and t.entries[3].truncated and len(t.entries) == 8
    assert store.read(EVAL, "c", 1, quarantine=True)[1] == "quarantine"
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_server.bucket)["Contents"]}
    assert f"tx-results/eval_id={EVAL}/_transcripts/{EVAL}.eval" in keys
    assert f"tx-results/_quarantine/eval_id={EVAL}/00001/transcript.eval" in keys
    assert not any(".shards/" in k for k in keys)
    local = tmp_path / "copy.eval"  # readable by Inspect as it is: the same bytes
    s3_server.client().download_file(s3_server.bucket, f"tx-results/eval_id={EVAL}/_transcripts/{EVAL}.eval",
                                     str(local))
    assert read_eval_log_sample(str(local), id="a", epoch=1).events[3].data["safety"]["stopped"] is True
