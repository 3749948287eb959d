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
| `transcript` | (version 2) one entry of a sample's transcript: `sample_id`, `epoch`, `entry` (a `message`, a `model` turn or a `tool` result) |
| `done`     | `status` (ok/error/cancelled), `error`, `samples`              |

Into the sandbox (supervisor → harness): first `shard` (the work: model, scorers,
samples, epochs — sent over the channel, never written to a file the model could read),
then `generate_result` (`id`, `output`, `tool_calls`, `usage`, `error`) and `cancel`
(`reason`).

The first outbound event is a `log` whose message starts with `harness ready`; `done` is
the last. The outside treats the sandbox as hostile: `EventParser` rejects malformed,
oversized, unknown and out-of-order lines, records each rejection (bounded), and never
raises on input. Its memory is bounded by `max_line_bytes` whatever the sandbox writes.

Versions: every line carries the version it was written in. Version 2 added the
`transcript` event and the shard's `transcript_max_bytes`; a reader of version 2 takes
lines of versions 1 and 2 (`PROTOCOL_VERSIONS`), and an event type only from the version
that introduced it (`SINCE`): a `transcript` line that says version 1 is refused. The
harness's first line (`harness ready`) says its version, and the outside writes to it in
that version (`encode(message, version)`): an older harness (a pod's image) gets the
messages it knows, and sends no transcript.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal, TypeAlias, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from proctor.jsontypes import JsonObject

if TYPE_CHECKING:
    from proctor.requests import ChunkEvent, ResultEvent

PROTOCOL_VERSION: Final = 2
PROTOCOL_VERSIONS = (1, 2)  # what this side reads
MAX_LINE_BYTES = 1024 * 1024
_TEXT = 256 * 1024  # longest text field accepted from a sandbox


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1, 2] = PROTOCOL_VERSION


class _Out(_Msg):
    seq: int = Field(ge=0)


# ---------------------------------------------------------------- out of the sandbox


Stage = Literal["setup", "eval", "score", "cleanup"]
STAGES: tuple[str, ...] = ("setup", "eval", "score", "cleanup")


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
    stages: dict[Stage, float] = Field(default_factory=dict, description="seconds each stage the sample went "
                                       "through took (as the harness measured them)")
    failed_stage: Stage | None = Field(None, description="the stage the sample's error happened in")


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
    tool_calls: list[JsonObject] | None = None


class GenerateEvent(_Out):
    type: Literal["generate"] = "generate"
    id: str = Field(max_length=128)
    messages: list[ChatTurn] = Field(max_length=1000)
    tools: list[JsonObject] = Field(default_factory=list, max_length=32)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)


class TranscriptToolCall(BaseModel):
    """A tool call as the model asked for it: `arguments` is its JSON text."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(max_length=128)
    function: str = Field(max_length=128)
    arguments: str = Field(max_length=_TEXT)


class TranscriptMessage(BaseModel):
    """A message the model starts from (the system prompt, the sample's input)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["message"] = "message"
    role: Literal["system", "user"]
    content: str = Field(max_length=_TEXT)


class TranscriptModelTurn(BaseModel):
    """One answer of a model run inside the sandbox (a gateway model's turns are recorded
    outside, by the gateway): its text, tool calls, usage and latency, as the sandbox
    measured them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["model"] = "model"
    content: str = Field(max_length=_TEXT)
    tool_calls: list[TranscriptToolCall] = Field(default_factory=list, max_length=64)
    usage: Usage = Field(default_factory=Usage)
    latency_s: float = Field(0.0, ge=0, le=7 * 24 * 3600)


class TranscriptToolResult(BaseModel):
    """What one tool call returned: the output the model reads back (cut at the tool's
    output cap), its exit code, whether it timed out or its output was truncated."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["tool"] = "tool"
    tool_call_id: str = Field(max_length=128)
    function: str = Field("bash", max_length=128)
    output: str = Field(max_length=_TEXT)
    exit_code: int | None = Field(None, ge=-(2**31), le=2**31 - 1, description="None: the call could not run")
    timed_out: bool = False
    truncated: bool = Field(False, description="the output was cut at the tool's output cap")
    output_bytes: int = Field(0, ge=0, description="bytes the command wrote in all")
    latency_s: float = Field(0.0, ge=0, le=7 * 24 * 3600)
    error: str | None = Field(None, max_length=_TEXT, description="why the call could not run")


TranscriptEntry = Annotated[Union[TranscriptMessage, TranscriptModelTurn, TranscriptToolResult],
                            Field(discriminator="kind")]


class TranscriptEvent(_Out):
    """One entry of a sample's transcript, sent as it happens (version 2). Untrusted: the
    outside bounds, checks and labels it (`provenance: sandbox`)."""

    type: Literal["transcript"] = "transcript"
    sample_id: str = Field(max_length=1024)
    epoch: int = Field(ge=1)
    entry: TranscriptEntry


class DoneEvent(_Out):
    type: Literal["done"] = "done"
    status: Literal["ok", "error", "cancelled"]
    error: str | None = Field(None, max_length=_TEXT)
    samples: int = Field(0, ge=0)


OutEvent = Annotated[
    Union[LogEvent, ProgressEvent, SampleEvent, MetricEvent, ArtifactEvent, GenerateEvent, TranscriptEvent,
          DoneEvent],
    Field(discriminator="type"),
]
OUT_TYPES = ("log", "progress", "sample", "metric", "artifact", "generate", "transcript", "done")
SINCE = {"transcript": 2}  # an event type newer than version 1: the version that introduced it
_out_adapter: TypeAdapter[Any] = TypeAdapter(OutEvent)  # validates to an OutEvent (mypy cannot read the Annotated union)
# what `EventParser` returns: an event of a shard, or of a service (`proctor.requests`, whose
# parser reads that union instead)
ParsedEvent: TypeAlias = Union[LogEvent, ProgressEvent, SampleEvent, MetricEvent, ArtifactEvent, GenerateEvent,
                               TranscriptEvent, DoneEvent, "ChunkEvent", "ResultEvent"]


# ---------------------------------------------------------------- into the sandbox


class GenerateResult(_Msg):
    type: Literal["generate_result"] = "generate_result"
    id: str
    output: str = ""
    tool_calls: list[JsonObject] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    error: str | None = None


class ShardSample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    input: str | list[JsonObject]
    target: str | list[str] = ""
    choices: list[str] | None = None
    metadata: JsonObject = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    setup: str | None = Field(None, description="this sample's own setup script (after the shard's setup steps)")


class SetupStep(BaseModel):
    """A command of the setup stage, run in the sample's folder before the agent starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    command: str
    user: str = Field("root", description="a user of the sandbox's image: a name, 'uid' or 'uid:gid'")
    timeout_s: float = Field(60.0, gt=0)


class AgentSpec(BaseModel):
    """Who the agent's tool commands run as, and their whole environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    user: str = Field("nobody", description="a user of the sandbox's image: a name, 'uid' or 'uid:gid'; never root")
    env: dict[str, str] = Field(default_factory=dict)


class ShardMessage(_Msg):
    """The first message into the sandbox: what to run. `model` and `scorers` are the
    spec's own dictionaries (`proctor.spec` validates them again inside)."""

    FIELDS_SINCE: ClassVar[dict[str, int]] = {"transcript_max_bytes": 2}
    type: Literal["shard"] = "shard"
    eval_id: str
    shard_id: str
    model: JsonObject
    scorers: list[JsonObject]
    samples: list[ShardSample]
    epochs: list[int] = Field(default_factory=lambda: [1])
    agentic: bool = False
    max_turns: int = 20
    tool_timeout_s: float = 60.0
    artifacts: list[str] = Field(default_factory=list)
    inline_artifact_bytes: int = Field(0, ge=0, description="the host cannot read the workspace: send artifacts' "
                                       "content in their events, in pieces of INLINE_ARTIFACT_BYTES, up to this "
                                       "many bytes in all (0: the host reads the files itself)")
    setup: list[SetupStep] = Field(default_factory=list, description="the setup stage of every sample")
    agent: AgentSpec = Field(default_factory=AgentSpec)
    transcript_max_bytes: int = Field(0, ge=0, description="(version 2) send each sample's transcript entries, "
                                      "up to about this many bytes a sample (0: send none)")


class Cancel(_Msg):
    type: Literal["cancel"] = "cancel"
    reason: str = "cancelled"


InMessage = Annotated[Union[ShardMessage, GenerateResult, Cancel], Field(discriminator="type")]
_in_adapter: TypeAdapter[ShardMessage | GenerateResult | Cancel] = TypeAdapter(InMessage)


def encode(message: BaseModel, version: int = PROTOCOL_VERSION) -> bytes:
    """One protocol line, newline included, in `version`: for an older reader, marked with
    its version and without the fields it does not know (`FIELDS_SINCE`)."""
    if version >= PROTOCOL_VERSION:
        return message.model_dump_json(exclude_none=False).encode() + b"\n"
    newer = {name for name, since in getattr(type(message), "FIELDS_SINCE", {}).items() if since > version}
    return json.dumps({**message.model_dump(mode="json", exclude=newer), "v": version}).encode() + b"\n"


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
    # what it accepts: a shard's events, or another conversation's (`proctor.requests`)
    types: tuple[str, ...] = OUT_TYPES
    # `_out_adapter`, or `proctor.requests.service_out_adapter` for a service: the one type
    # both have in common is Any, and `_parse` checks what it needs (`seq`, `type`)
    adapter: TypeAdapter[Any] = _out_adapter
    rejections: deque[Rejection] = field(default_factory=deque)
    rejected: int = 0
    accepted: int = 0
    done: bool = False
    _buf: bytearray = field(default_factory=bytearray)
    _discarding: bool = False
    _last_seq: int = -1
    _line_no: int = 0

    def feed(self, chunk: bytes) -> list[ParsedEvent]:
        events: list[ParsedEvent] = []
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

    def finish(self) -> list[ParsedEvent]:
        """End of stream: a last line without a newline still counts."""
        if self._buf and not self._discarding:
            event = self._parse(bytes(self._buf))
            self._buf.clear()
            return [event] if event is not None else []
        return []

    def _parse(self, line: bytes) -> ParsedEvent | None:
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
        if kind not in self.types:
            self._reject(f"unknown type {str(kind)[:40]!r}", line)
            return None
        version = data.get("v")
        if type(version) is not int or version not in PROTOCOL_VERSIONS:
            self._reject(f"unsupported protocol version {str(version)[:20]!r}", line)
            return None
        if version < SINCE.get(kind, 1):
            self._reject(f"invalid {kind}: needs protocol version {SINCE[kind]}, the line says {version}", line)
            return None
        try:
            event: ParsedEvent = self.adapter.validate_python(data)
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
