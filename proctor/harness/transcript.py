"""The harness's side of transcripts: each sample's conversation, sent as it happens.

For every sample × epoch the run loop hands `TranscriptWriter` the messages the model
starts from, each turn of a model run inside the sandbox (its text, tool calls, usage and
latency) and each tool result (the output the model reads back, its exit code, whether it
timed out or was cut); each becomes one `transcript` event (protocol version 2). A gateway
model's turns are not sent: the gateway records them outside, where their figures can be
trusted.

Bounded: once a sample's entries pass about `max_bytes` (the shard's
`transcript_max_bytes`), nothing more of that sample is sent; the outside keeps its own,
exact bound and says in the transcript where it cut. With `max_bytes` 0 nothing is sent.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from proctor.harness.channel import Channel, clip
from proctor.jsontypes import JsonObject
from proctor.protocol import TranscriptEvent

if TYPE_CHECKING:
    from proctor.harness.adapters import Reply, ToolCall
    from proctor.harness.tools import CommandResult

ENTRY_OVERHEAD = 96  # bytes of an entry besides its texts, roughly


class TranscriptWriter:
    def __init__(self, channel: Channel, max_bytes: int):
        self.channel = channel
        self.max_bytes = max_bytes
        self.key: tuple[str, int] | None = None
        self.sent = 0

    def begin(self, sample_id: str, epoch: int) -> None:
        """The next entries belong to this sample × epoch."""
        self.key, self.sent = (sample_id[:1024], epoch), 0

    def messages(self, messages: list[JsonObject]) -> None:
        """The system and user messages a model starts from."""
        for m in messages:
            if m.get("role") in ("system", "user"):
                self._send({"kind": "message", "role": m["role"], "content": clip(str(m.get("content") or ""))})

    def model(self, reply: Reply, latency_s: float) -> None:
        """A model's answer; none for a gateway model (recorded outside)."""
        if getattr(reply, "via_gateway", False):
            return
        calls = [{"id": c.id[:128], "function": "bash" if c.command is not None else "(invalid)",
                  "arguments": clip(json.dumps({"command": c.command}) if c.command is not None else c.problem or "")}
                 for c in reply.tool_calls[:64]]
        self._send({"kind": "model", "content": clip(reply.text), "tool_calls": calls, "usage": reply.usage,
                    "latency_s": max(0.0, latency_s)})

    def tool(self, call: ToolCall, result: CommandResult | None, content: str, latency_s: float = 0.0) -> None:
        """A tool call's result: `result` is the command's `CommandResult`, None when the
        call could not run (`content` then says why)."""
        entry: JsonObject = {"kind": "tool", "tool_call_id": call.id[:128], "output": clip(content),
                                 "latency_s": max(0.0, latency_s)}
        if result is None:
            entry["error"] = clip(content)
        else:
            entry.update(exit_code=result.exit_code, timed_out=result.timed_out, truncated=result.truncated,
                         output_bytes=result.output_bytes)
        self._send(entry)

    def _send(self, entry: JsonObject) -> None:
        if self.key is None or self.max_bytes <= 0 or self.sent > self.max_bytes:
            return
        self.sent += ENTRY_OVERHEAD + _text_bytes(entry)
        self.channel.emit(TranscriptEvent, sample_id=self.key[0], epoch=self.key[1], entry=entry)


def _text_bytes(entry: JsonObject) -> int:
    texts = [entry.get("content"), entry.get("output"), entry.get("error")]
    texts += [c["arguments"] for c in entry.get("tool_calls") or []]
    return sum(len(t.encode("utf-8", "replace")) for t in texts if isinstance(t, str))
