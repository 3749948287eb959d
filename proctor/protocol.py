"""The runner protocol: the sandbox's one channel to the outside.

JSON lines over the sandbox's stdin and stdout, one object a line, UTF-8, each with
`"v": PROTOCOL_VERSION`, a `"type"` and (outbound) a strictly increasing `"seq"`.

Out of the sandbox (harness → supervisor):

| type       | fields                                                         |
|------------|----------------------------------------------------------------|
| `log`      | `level` (debug/info/warning/error), `message`                  |
| `progress` | `completed`, `total` (units of sample × epoch)                 |
| `sample`   | one scored sample: `sample_id`, `epoch`, `input`, `target`, `output`, `scores`, `error`, timings, `usage`, `turns` |
| `metric`   | `name`, `value`                                                |
| `artifact` | `path` (relative to the workspace), `size`, `sha256`; `data` (base64) when asked to inline |
| `generate` | a model call for the gateway: `id`, `messages`, `tools`, `max_tokens`, `temperature` |
| `done`     | `status` (ok/error/cancelled), `error`, `samples`              |

Into the sandbox (supervisor → harness): first `shard` (the work: model, scorers,
samples, epochs — sent over the channel, never written to a file the model could read),
then `generate_result` (`id`, `output`, `tool_calls`, `usage`, `error`) and `cancel`
(`reason`).

The first outbound event is a `log` whose message starts with `harness ready`; `done` is
the last. The outside treats the sandbox as hostile: `EventParser` rejects malformed,
oversized, unknown and out-of-order lines, records each rejection (bounded), and never
raises on input. Its memory is bounded by `max_line_bytes` whatever the sandbox writes.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 1024 * 1024
_TEXT = 256 * 1024  # longest text field accepted from a sandbox


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1] = PROTOCOL_VERSION


class _Out(_Msg):
    seq: int = Field(ge=0)


# ---------------------------------------------------------------- out of the sandbox


class LogEvent(_Out):
    type: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str = Field(max_length=_TEXT)


class ProgressEvent(_Out):
    type: Literal["progress"] = "progress"
    completed: int = Field(ge=0)
    total: int = Field(ge=0)


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    input_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(0, ge=0)
    calls: int = Field(0, ge=0)


class Score(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    value: float
    answer: str | None = Field(None, max_length=_TEXT)
    explanation: str | None = Field(None, max_length=_TEXT)


class SampleEvent(_Out):
    type: Literal["sample"] = "sample"
    sample_id: str = Field(max_length=1024)
    epoch: int = Field(ge=1)
    input: str = Field(max_length=_TEXT)
    target: str = Field(max_length=_TEXT)
    output: str = Field(max_length=_TEXT)
    scores: dict[str, Score] = Field(default_factory=dict, max_length=64)
    error: str | None = Field(None, max_length=_TEXT)
    started_at: float = 0.0
    completed_at: float = 0.0
    usage: Usage = Field(default_factory=Usage)
    turns: int = Field(0, ge=0)


class MetricEvent(_Out):
    type: Literal["metric"] = "metric"
    name: str = Field(max_length=256)
    value: float


INLINE_ARTIFACT_BYTES = 512 * 1024  # one piece of an inlined artifact's content: base64, it fits one protocol line
MAX_ARTIFACT_BYTES = 16 * 1024**2  # the largest artifact the host keeps


class ArtifactEvent(_Out):
    type: Literal["artifact"] = "artifact"
    path: str = Field(max_length=1024)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    data: str | None = Field(None, max_length=(INLINE_ARTIFACT_BYTES + 2) // 3 * 4,
                             description="a piece of the content, base64, when the shard asked for inline "
                                         "artifacts (its workspace is not on the supervisor's host: a pod); "
                                         "a larger file comes in several events, in order")
    offset: int = Field(0, ge=0, description="where this piece of `data` starts in the file")


class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=_TEXT)
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class GenerateEvent(_Out):
    type: Literal["generate"] = "generate"
    id: str = Field(max_length=128)
    messages: list[ChatTurn] = Field(max_length=1000)
    tools: list[dict[str, Any]] = Field(default_factory=list, max_length=32)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)


class DoneEvent(_Out):
    type: Literal["done"] = "done"
    status: Literal["ok", "error", "cancelled"]
    error: str | None = Field(None, max_length=_TEXT)
    samples: int = Field(0, ge=0)


OutEvent = Annotated[
    Union[LogEvent, ProgressEvent, SampleEvent, MetricEvent, ArtifactEvent, GenerateEvent, DoneEvent],
    Field(discriminator="type"),
]
OUT_TYPES = ("log", "progress", "sample", "metric", "artifact", "generate", "done")
_out_adapter: TypeAdapter[Any] = TypeAdapter(OutEvent)


# ---------------------------------------------------------------- into the sandbox


class GenerateResult(_Msg):
    type: Literal["generate_result"] = "generate_result"
    id: str
    output: str = ""
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    error: str | None = None


class ShardSample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    input: str | list[dict[str, Any]]
    target: str | list[str] = ""
    choices: list[str] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)


class ShardMessage(_Msg):
    """The first message into the sandbox: what to run. `model` and `scorers` are the
    spec's own dictionaries (`proctor.spec` validates them again inside)."""

    type: Literal["shard"] = "shard"
    eval_id: str
    shard_id: str
    model: dict[str, Any]
    scorers: list[dict[str, Any]]
    samples: list[ShardSample]
    epochs: list[int] = Field(default_factory=lambda: [1])
    agentic: bool = False
    max_turns: int = 20
    tool_timeout_s: float = 60.0
    artifacts: list[str] = Field(default_factory=list)
    inline_artifact_bytes: int = Field(0, ge=0, description="the host cannot read the workspace: send artifacts' "
                                       "content in their events, in pieces of INLINE_ARTIFACT_BYTES, up to this "
                                       "many bytes in all (0: the host reads the files itself)")


class Cancel(_Msg):
    type: Literal["cancel"] = "cancel"
    reason: str = "cancelled"


InMessage = Annotated[Union[ShardMessage, GenerateResult, Cancel], Field(discriminator="type")]
_in_adapter: TypeAdapter[Any] = TypeAdapter(InMessage)


def encode(message: BaseModel) -> bytes:
    """One protocol line, newline included."""
    return message.model_dump_json(exclude_none=False).encode() + b"\n"


def decode_in(line: bytes | str) -> ShardMessage | GenerateResult | Cancel:
    """Parse a message to the harness. Raises `ValueError` on anything else (the harness
    trusts its supervisor, but still refuses what it does not understand)."""
    try:
        return _in_adapter.validate_json(line)
    except ValidationError as exc:
        raise ValueError(f"bad message to the harness: {exc.errors()[0]['msg']}") from None


# ---------------------------------------------------------------- the hostile side


@dataclass(frozen=True)
class Rejection:
    """A line from a sandbox that the parser refused, kept as evidence (truncated)."""

    reason: str
    excerpt: str
    line_no: int


@dataclass
class EventParser:
    """Turns bytes from a sandbox into validated events. Never raises on input.

    Feed it chunks with `feed()`; it returns the events they completed. A line longer than
    `max_line_bytes` is dropped as it streams (memory stays bounded), and recorded.
    """

    max_line_bytes: int = MAX_LINE_BYTES
    max_rejections_kept: int = 100
    rejections: deque[Rejection] = field(default_factory=deque)
    rejected: int = 0
    accepted: int = 0
    done: bool = False
    _buf: bytearray = field(default_factory=bytearray)
    _discarding: bool = False
    _last_seq: int = -1
    _line_no: int = 0

    def feed(self, chunk: bytes) -> list[Any]:
        events: list[Any] = []
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            piece = chunk[start:] if nl < 0 else chunk[start:nl]
            if self._discarding:
                pass
            elif len(self._buf) + len(piece) > self.max_line_bytes:
                self._reject(f"oversized: longer than {self.max_line_bytes} bytes", bytes(self._buf[:200]) + piece[:200], 1)
                self._buf.clear()
                self._discarding = True
            else:
                self._buf += piece
            if nl < 0:
                return events
            if self._discarding:
                self._discarding = False
                self._line_no += 1
            else:
                event = self._parse(bytes(self._buf))
                self._buf.clear()
                if event is not None:
                    events.append(event)
            start = nl + 1

    def finish(self) -> list[Any]:
        """End of stream: a last line without a newline still counts."""
        if self._buf and not self._discarding:
            event = self._parse(bytes(self._buf))
            self._buf.clear()
            return [event] if event is not None else []
        return []

    def _parse(self, line: bytes) -> Any:
        self._line_no += 1
        if not line.strip():
            return None
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):
            self._reject("malformed: not JSON", line)
            return None
        if not isinstance(data, dict):
            self._reject("malformed: not a JSON object", line)
            return None
        kind = data.get("type")
        if kind not in OUT_TYPES:
            self._reject(f"unknown type {str(kind)[:40]!r}", line)
            return None
        if data.get("v") != PROTOCOL_VERSION:
            self._reject(f"unsupported protocol version {str(data.get('v'))[:20]!r}", line)
            return None
        try:
            event = _out_adapter.validate_python(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"][1:])
            self._reject(f"invalid {kind}: {where}: {err['msg']}", line)
            return None
        if self.done:
            self._reject(f"out of order: {kind} after done", line)
            return None
        if event.seq <= self._last_seq:
            self._reject(f"out of order: seq {event.seq} after {self._last_seq}", line)
            return None
        self._last_seq = event.seq
        if event.type == "done":
            self.done = True
        self.accepted += 1
        return event

    def _reject(self, reason: str, line: bytes, ahead: int = 0) -> None:
        self.rejected += 1
        excerpt = line[:200].decode("utf-8", "replace")
        self.rejections.append(Rejection(reason, excerpt, self._line_no + ahead))
        while len(self.rejections) > self.max_rejections_kept:
            self.rejections.popleft()
