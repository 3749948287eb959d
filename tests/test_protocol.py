"""The runner protocol's hostile side: the parser refuses what it must and never crashes."""

from __future__ import annotations

import json
import tracemalloc

from proctor.protocol import (
    Cancel,
    EventParser,
    GenerateResult,
    LogEvent,
    decode_in,
    encode,
)


def line(**fields: object) -> bytes:
    return json.dumps({"v": 1, **fields}).encode() + b"\n"


def test_valid_events_parse_in_order() -> None:
    p = EventParser()
    events = p.feed(line(seq=0, type="log", message="hi") + line(seq=1, type="progress", completed=1, total=2)
                    + line(seq=2, type="done", status="ok", samples=1))
    assert [e.type for e in events] == ["log", "progress", "done"]
    assert p.rejected == 0 and p.done


def test_lines_split_across_chunks_are_joined() -> None:
    data = line(seq=0, type="log", message="x" * 1000)
    p = EventParser()
    got = []
    for i in range(0, len(data), 7):
        got += p.feed(data[i : i + 7])
    assert len(got) == 1 and got[0].message == "x" * 1000


def test_malformed_unknown_and_invalid_lines_are_rejected_and_recorded() -> None:
    p = EventParser()
    bad = [
        b"not json at all\n",
        b"[1, 2, 3]\n",
        line(seq=0, type="exfiltrate", data="x"),
        line(seq=0, type="log"),  # no message
        line(seq=0, type="sample", sample_id="a"),  # missing fields
        json.dumps({"v": 99, "seq": 0, "type": "log", "message": "m"}).encode() + b"\n",
        line(seq=0, type="log", message="m", extra_field=1),
        b"\xff\xfe\x00garbage\n",
        b"{" * 100_000 + b"\n",  # deep nesting
    ]
    for b in bad:
        assert p.feed(b) == []
    assert p.rejected == len(bad)
    reasons = [r.reason for r in p.rejections]
    assert any("not JSON" in r for r in reasons)
    assert any("unknown type 'exfiltrate'" in r for r in reasons)
    assert any("unsupported protocol version" in r for r in reasons)
    assert any(r.startswith("invalid log") for r in reasons)
    # still works afterwards
    assert [e.type for e in p.feed(line(seq=0, type="log", message="ok"))] == ["log"]


def test_oversized_line_is_dropped_without_growing_memory() -> None:
    p = EventParser(max_line_bytes=64 * 1024)
    chunk = b"x" * 65536
    tracemalloc.start()
    for _ in range(2000):  # 128 MiB without a newline
        p.feed(chunk)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 * 1024 * 1024
    assert p.feed(b"\n" + line(seq=0, type="log", message="after"))[0].message == "after"
    assert p.rejected == 1 and "oversized" in p.rejections[0].reason


def test_out_of_order_and_after_done_are_rejected() -> None:
    p = EventParser()
    p.feed(line(seq=5, type="log", message="a"))
    assert p.feed(line(seq=5, type="log", message="replay")) == []
    assert p.feed(line(seq=3, type="log", message="old")) == []
    p.feed(line(seq=6, type="done", status="ok"))
    assert p.feed(line(seq=7, type="log", message="late")) == []
    assert [r.reason.split(":")[0] for r in p.rejections] == ["out of order"] * 3


def test_rejections_kept_are_bounded() -> None:
    p = EventParser(max_rejections_kept=10)
    p.feed(b"junk\n" * 10_000)
    assert p.rejected == 10_000
    assert len(p.rejections) == 10


def test_last_line_without_newline_counts_at_end() -> None:
    p = EventParser()
    assert p.feed(line(seq=0, type="log", message="x").rstrip(b"\n")) == []
    assert [e.type for e in p.finish()] == ["log"]


def test_messages_into_the_sandbox_round_trip() -> None:
    assert decode_in(encode(Cancel(reason="stop"))) == Cancel(reason="stop")
    result = GenerateResult(id="c1", output="hello")
    assert decode_in(encode(result)) == result
    assert encode(LogEvent(seq=0, message="m")).endswith(b"\n")


def test_unknown_message_into_the_sandbox_is_refused() -> None:
    try:
        decode_in(b'{"v":1,"type":"shell","cmd":"rm -rf /"}')
    except ValueError as exc:
        assert "bad message" in str(exc)
    else:
        raise AssertionError("accepted an unknown message")


def test_version_2_reads_version_1_lines_and_a_transcript_only_from_version_2() -> None:
    p = EventParser()
    entry = {"kind": "message", "role": "user", "content": "hi"}
    got = p.feed(line(seq=0, type="log", message="old harness")  # version 1
                 + json.dumps({"v": 2, "seq": 1, "type": "transcript", "sample_id": "a", "epoch": 1,
                               "entry": entry}).encode() + b"\n"
                 + line(seq=2, type="transcript", sample_id="a", epoch=1, entry=entry)
                 + json.dumps({"v": True, "seq": 3, "type": "log", "message": "m"}).encode() + b"\n")
    assert [e.type for e in got] == ["log", "transcript"] and got[1].entry.content == "hi"
    assert [r.reason for r in p.rejections] == ["invalid transcript: needs protocol version 2, the line says 1",
                                                "unsupported protocol version 'True'"]


def test_malformed_and_oversized_transcript_events_are_rejected() -> None:
    p = EventParser(max_line_bytes=64 * 1024)
    base = {"v": 2, "type": "transcript", "sample_id": "a", "epoch": 1}
    bad = [
        {**base, "seq": 0, "entry": {"kind": "tool", "output": "x"}},  # no tool_call_id
        {**base, "seq": 1, "entry": {"kind": "model", "content": "x", "tool_calls": [{"id": "c"}] * 65}},
        {**base, "seq": 2, "epoch": 0, "entry": {"kind": "message", "role": "user", "content": "x"}},
        {**base, "seq": 3, "entry": {"kind": "tool", "tool_call_id": "c", "output": "x", "exit_code": 2**40}},
        {**base, "seq": 4, "entry": {"kind": "message", "role": "user", "content": "x" * 70_000}},  # over the line
    ]
    for b in bad:
        assert p.feed(json.dumps(b).encode() + b"\n") == []
    assert p.rejected == len(bad)
    assert sum(r.reason.startswith("invalid transcript") for r in p.rejections) == 4
    assert "oversized" in p.rejections[-1].reason


def test_messages_to_an_older_harness_are_written_in_its_version() -> None:
    from proctor.protocol import ShardMessage

    shard = ShardMessage(eval_id="e", shard_id="s", model={"adapter": "reference"}, scorers=[], samples=[],
                         transcript_max_bytes=1024)
    old = json.loads(encode(shard, 1))
    assert old["v"] == 1 and "transcript_max_bytes" not in old and old["eval_id"] == "e"
    assert json.loads(encode(shard))["transcript_max_bytes"] == 1024
    assert json.loads(encode(Cancel(reason="r"), 1)) == {"v": 1, "type": "cancel", "reason": "r"}
