"""A sample's transcript as Proctor records and serves it: an ordered list of entries.

Entries come from two sides, and each says which (`provenance`):

- `sandbox`: sent by the harness over the runner protocol (the messages the model starts
  from, the turns of a model run inside the sandbox, every tool result). Untrusted: bounded
  and checked outside, shown as the sandbox's word, never able to change a score.
- `gateway`: a model call answered by the model gateway outside the sandbox, with the
  usage and latency the gateway measured.
- `guard`: where the safety guard acted (a violation, a held answer, a blocked command,
  the stop).
- `platform`: the platform's own notes (the transcript was cut here, and how much was left
  out).

The sandbox can only ever produce `sandbox` entries: the protocol has no field for a
provenance, a safety action or a gateway figure, and the outside sets them.

These models are what the API answers, what `Client.transcript` returns and what the
dashboard draws; `cluster/transcripts.py` stores them as Inspect AI `.eval` logs.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .jsontypes import JsonObject

Kind = Literal["message", "model", "tool", "safety", "cut"]
Provenance = Literal["sandbox", "gateway", "guard", "platform"]
Where = Literal["live", "stored", "quarantine"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")  # a newer server may add fields


class ToolCallView(_Model):
    id: str
    function: str
    arguments: str = Field("", description="the call's JSON arguments, as text")


class SafetyAction(_Model):
    """A safety violation where it happened, and what the guard did about it."""

    monitor: str
    rule: str
    action: str = Field(description="stop, alert or record")
    message: str = ""
    evidence: list[str] = Field(default_factory=list, description="from the sandbox: untrusted")
    stopped: bool = Field(False, description="this violation stopped the sample (its sandbox was killed)")
    held: bool = Field(False, description="the model's answer was held back: the sandbox never received it")
    blocked_commands: list[str] = Field(default_factory=list, description="tool calls in a held answer")


class CutNote(_Model):
    """The transcript reached its bound here: what was left out after this point."""

    reason: str
    max_bytes: int
    max_entries: int
    dropped_entries: int = 0
    dropped_bytes: int = 0
    dropped_usage: dict[str, int] = Field(default_factory=dict, description="tokens and calls of the gateway "
                                                                            "calls left out")


class Entry(_Model):
    """One step of a sample's transcript."""

    n: int = Field(description="its place in the transcript, from 0")
    at: float = Field(description="unix seconds on the platform's clock, when it was received or made")
    kind: Kind
    provenance: Provenance
    role: str | None = Field(None, description="system, user, assistant or tool")
    content: str = Field("", description="the message, the model's text or the tool's output")
    tool_calls: list[ToolCallView] = Field(default_factory=list)
    tool_call_id: str | None = None
    function: str | None = None
    exit_code: int | None = None
    timed_out: bool | None = None
    truncated: bool | None = Field(None, description="the tool's output was cut at its cap")
    output_bytes: int | None = None
    clipped: bool | None = Field(None, description="this entry's text was cut to fit the transcript's bound")
    usage: dict[str, int] | None = Field(None, description="input_tokens, output_tokens (and calls)")
    latency_s: float | None = None
    call_id: str | None = Field(None, description="the gateway's id of the model call")
    error: str | None = None
    held: bool | None = Field(None, description="a gateway answer the safety guard held back")
    safety: SafetyAction | None = None
    cut: CutNote | None = None

    def facts(self) -> list[str]:
        """Its figures in words, for people: exit code, timeout, cuts, usage, latency, held
        back, error."""
        usage = self.usage or {}
        said = [(self.exit_code is not None, f"exit code {self.exit_code}"), (self.timed_out, "timed out"),
                (self.truncated, f"output cut at its cap ({self.output_bytes} bytes written)"),
                (self.clipped, "cut to fit the transcript's bound"),
                (bool(usage), f"{usage.get('input_tokens', 0)} tokens in, {usage.get('output_tokens', 0)} out"),
                (self.latency_s is not None, f"{self.latency_s or 0:.3f} s"),
                (self.held, "held back: the sandbox never received it"),
                (bool(self.error), f"error: {(self.error or '')[:300]}")]
        return [text for present, text in said if present]

    def text(self) -> str:
        """What a search looks in: the content, tool calls and safety details."""
        parts = [self.content, *(f"{c.function} {c.arguments}" for c in self.tool_calls)]
        if self.error:
            parts.append(self.error)
        if self.safety is not None:
            parts += [f"{self.safety.monitor}/{self.safety.rule}", self.safety.message, *self.safety.evidence,
                      *self.safety.blocked_commands]
        return "\n".join(p for p in parts if p)


ENTRY_OVERHEAD = 160  # bytes an entry takes besides its texts, about


def entry_size(entry: Entry) -> int:
    """An entry's size as the bounds count it: the bytes of its texts (content, tool calls,
    error, safety details), and `ENTRY_OVERHEAD` for the rest. Cheap: it is counted for
    every entry a sandbox sends."""
    texts = [entry.content, entry.error or ""]
    texts += [t for c in entry.tool_calls for t in (c.id, c.function, c.arguments)]
    if entry.safety is not None:
        texts += [entry.safety.message, *entry.safety.evidence, *entry.safety.blocked_commands]
    return ENTRY_OVERHEAD + sum(len(t) if t.isascii() else len(t.encode("utf-8", "replace")) for t in texts)


class SampleTranscript(_Model):
    """One sample × epoch's transcript, whole."""

    eval_id: str
    shard_id: str
    sample_id: str
    epoch: int
    entries: list[Entry] = Field(default_factory=list)
    cut: bool = Field(False, description="it reached its bound; a `cut` entry says where")
    started_at: float | None = None
    completed_at: float | None = None
    stopped: bool = Field(False, description="a safety stop ended it")


class TranscriptPage(_Model):
    """A page of one sample's transcript, as `GET .../samples/{id}/transcript` answers."""

    eval_id: str
    sample_id: str
    epoch: int
    shard_id: str
    where: Where = Field(description="live: the sample's shard is running; stored: from the evaluation's log; "
                                     "quarantine: from a safety-stopped shard's log")
    total: int = Field(description="entries so far")
    offset: int
    next_offset: int | None = Field(None, description="pass as `offset` for the next page")
    cut: bool = False
    stopped: bool = False
    entries: list[Entry]


class TranscriptInfo(_Model):
    """A sample that has a transcript."""

    sample_id: str
    epoch: int
    shard_id: str
    where: Where
    entries: int


class TranscriptList(_Model):
    eval_id: str
    samples: list[TranscriptInfo]


class TranscriptMatch(_Model):
    """One entry where a searched text appears."""

    sample_id: str
    epoch: int
    shard_id: str
    where: Where
    n: int
    kind: Kind
    provenance: Provenance
    role: str | None = None
    excerpt: str = Field(description="the text around the first match in the entry")


class TranscriptSearch(_Model):
    eval_id: str
    pattern: str
    matches: list[TranscriptMatch]
    samples: int = Field(description="samples with at least one match (among those searched)")
    searched: int = Field(description="samples searched (the search stops once it has more matches than asked)")
    truncated: bool = Field(False, description="more matches exist than were returned")


def excerpt(text: str, pattern: str, around: int = 80) -> str | None:
    """The text around the first case-insensitive occurrence of `pattern`, or None."""
    found = re.search(re.escape(pattern), text, re.IGNORECASE) if pattern else None  # a literal: no backtracking
    if found is None:
        return None
    start, end = max(0, found.start() - around), min(len(text), found.end() + around)
    return ("…" if start else "") + text[start:end] + ("…" if end < len(text) else "")


def dump(entries: list[Entry]) -> list[JsonObject]:
    return [e.model_dump(mode="json", exclude_none=True) for e in entries]
