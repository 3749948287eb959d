"""The harness's side of transcripts (`proctor/harness/transcript.py`): a real harness
process sends each sample's messages, model turns and tool results as `transcript`
events, within the shard's bound, and none when the shard asks for none."""

from __future__ import annotations

import json

from test_harness import assert_valid_stream, file_agent, of_type, shard, start_harness  # noqa: F401 - a fixture


def entries(events: list[dict], sample_id: str | None = None) -> list[dict]:
    return [e["entry"] for e in of_type(events, "transcript") if sample_id in (None, e["sample_id"])]


def test_an_agentic_sample_sends_its_whole_conversation(start_harness):
    sample = {"id": "s", "input": "Write hello into out.txt", "metadata": {"commands": ["echo hello > out.txt",
                                                                                      "cat out.txt; exit 3"]}}
    harness = start_harness(shard([sample], model=file_agent(), agentic=True, transcript_max_bytes=1024**2))
    events = harness.finish()
    got = entries(events, "s")
    assert [(e["kind"], e.get("role")) for e in got] == [
        ("message", "system"), ("message", "user"), ("model", None), ("tool", None), ("model", None), ("tool", None),
        ("model", None)]
    first_call = got[2]["tool_calls"][0]
    assert json.loads(first_call["arguments"]) == {"command": "echo hello > out.txt"} and first_call["id"] == "call_1"
    assert (got[3]["tool_call_id"], got[3]["exit_code"], got[3]["timed_out"]) == ("call_1", 0, False)
    assert (got[5]["exit_code"], got[5]["output"]) == (3, "exit code 3\nhello\n")
    assert got[6]["content"] == "done" and got[6]["usage"]["calls"] == 1 and got[6]["latency_s"] >= 0
    first_transcript = next(i for i, e in enumerate(events) if e["type"] == "transcript")
    assert first_transcript < next(i for i, e in enumerate(events) if e["type"] == "sample")  # sent as it happens
    assert_valid_stream(harness)


def test_a_truncated_or_timed_out_tool_is_said_so(start_harness):
    commands = ["head -c 100000 /dev/zero | tr '\\0' x", "sleep 5"]
    sample = {"id": "t", "input": "go", "metadata": {"commands": commands}}
    harness = start_harness(shard([sample], model=file_agent(), agentic=True, tool_timeout_s=0.5,
                                  transcript_max_bytes=1024**2))
    tools = [e for e in entries(harness.finish()) if e["kind"] == "tool"]
    assert tools[0]["truncated"] and tools[0]["output_bytes"] == 100000 and "output cut" in tools[0]["output"]
    assert tools[1]["timed_out"] and "timed out" in tools[1]["output"]


def test_nothing_is_sent_when_the_shard_asks_for_none(start_harness):
    harness = start_harness(shard([{"id": "a", "input": "1", "target": "1"}]))
    events = harness.finish()
    assert of_type(events, "transcript") == [] and of_type(events, "sample")


def test_a_sample_stops_sending_past_its_bound(start_harness):
    sample = {"id": "big", "input": "go", "metadata": {"commands": ["head -c 60000 /dev/zero | tr '\\0' y"] * 8}}
    harness = start_harness(shard([sample, {"id": "next", "input": "go", "metadata": {"commands": ["true"]}}],
                                  model=file_agent(), agentic=True, max_turns=10, transcript_max_bytes=100_000))
    events = harness.finish()
    sent = entries(events, "big")
    assert 2 <= len([e for e in sent if e["kind"] == "tool"]) <= 3  # the one crossing the bound is the last
    assert sum(len(e.get("output", "")) for e in sent) < 200_000
    assert [e["kind"] for e in entries(events, "next")][:2] == ["message", "message"]  # the next starts afresh


def test_a_gateway_models_turns_are_left_to_the_gateway(start_harness):
    model = {"adapter": "openai", "model": "gpt-x", "base_url": "https://api.example.com/v1"}
    harness = start_harness(shard([{"id": "m", "input": "2+2?", "target": "4"}], model=model,
                                  transcript_max_bytes=1024**2))
    call = harness.until(lambda e: e["type"] == "generate")
    harness.send({"v": 2, "type": "generate_result", "id": call["id"], "output": "4"})
    got = entries(harness.finish())
    assert [e["kind"] for e in got] == ["message"]  # the user's question; the answer is the gateway's to record
