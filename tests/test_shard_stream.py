"""What a running shard streams (eval_actors/shard_stream.py), without Ray or a sandbox."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from eval_actors import shard_stream
from eval_actors.shard_stream import ShardStream
from proctor.bus_events import LogEvent, ShardEvent, event, parse_event, read_events


def stream(sent: list[list[Any]], published: list[Any]) -> ShardStream:
    return ShardStream("ev-1", "00000", 2, 5, add_records=sent.append, publish=published.extend)


def test_rows_go_in_batches_and_every_row_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(shard_stream.time, "monotonic", lambda: clock[0])
    sent: list[list[Any]] = []
    s = stream(sent, [])
    s.on_record("r1")  # the first goes at once
    s.on_record("r2")
    s.on_record("r3")  # within STREAM_EVERY_S: gathered
    clock[0] += shard_stream.STREAM_EVERY_S + 0.01
    s.on_record("r4")
    assert sent == [["r1"], ["r2", "r3", "r4"]] and s.done == 4 and s.pending == []


def test_log_lines_are_published_and_kept_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shard_stream, "MAX_LOG_LINES", 3)
    published: list[Any] = []
    s = stream([], published)
    for i in range(5):
        s.on_event(SimpleNamespace(type="log", level="info", message=f"line {i}" + "x" * 3000))
    assert len(published) == 5 and read_events(published) == published  # every line live, each a valid event
    line = parse_event(published[4])
    assert isinstance(line, LogEvent) and (line.n, line.attempt, line.eval_id) == (4, 2, "ev-1")
    assert len(line.message) == 2000
    kept = s.kept_logs()
    assert [k["n"] for k in kept] == [0, 1, 2, 5]
    assert kept[-1]["message"] == "proctor: 2 more log lines were not kept" and kept[-1]["level"] == "warning"


def test_progress_is_throttled_but_the_last_always_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(shard_stream.time, "monotonic", lambda: clock[0])
    published: list[Any] = []
    s = stream([], published)
    s.progressed(1)
    s.progressed(2)  # too soon
    s.progressed(5)  # the last: always
    assert [(p["done"], p["total"]) for p in published] == [(1, 5), (5, 5)]
    assert read_events(published) == published


def test_a_published_event_has_its_type_version_and_the_fields_given() -> None:
    data = event(ShardEvent(eval_id="ev-1", shard_id="00000", status="failed", error=None, samples=3))
    assert data == {"type": "shard", "v": 1, "eval_id": "ev-1", "shard_id": "00000", "status": "failed",
                    "error": None, "samples": 3}
    with pytest.raises(ValueError):
        ShardEvent(eval_id="ev-1", shard_id="00000", status="no-such-status")  # type: ignore[arg-type]
