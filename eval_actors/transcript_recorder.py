"""One shard's transcripts, recorded outside the sandbox as its events arrive.

The shard executor hands the recorder every `transcript` event the sandbox sends (checked
here: a sample of the shard, not yet reported, within the evaluation's bounds), every model
call the gateway answered (with the latency measured here), and, from the safety guard,
every violation (placed in the sample that was running when it was seen). Each entry is
labelled with where it came from (`proctor.transcript`); only the sandbox's own events are
`sandbox`, and nothing the sandbox sends can become a gateway figure or a safety action.

Bounded per sample (`TranscriptSpec.max_bytes`, `max_entries`): the first entry that does
not fit is cut to what fits (or left out), a `cut` entry marks the place, and what comes
after is counted there, not kept. Safety entries are always kept (the guard keeps at most
`safety.guard.MAX_KEPT` violations). The shard's whole memory is thus bounded by its
samples × epochs × `max_bytes`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from proctor.protocol import Rejection
from proctor.spec import TranscriptSpec
from proctor.transcript import CutNote, Entry, SafetyAction, SampleTranscript, ToolCallView, entry_size

Key = tuple[str, int]
MIN_CLIPPED = 512  # an entry is cut to fit only when at least this many bytes of room are left
REFUSALS_KEPT = 100  # refused transcript events kept as evidence; the rest are counted


@dataclass
class _Sample:
    key: Key
    entries: list[Entry] = field(default_factory=list)
    bytes: int = 0
    kept: int = 0  # entries counted against max_entries (all but safety and cut)
    cut: Entry | None = None
    started_at: float | None = None
    completed_at: float | None = None
    stopped: bool = False


class TranscriptRecorder:
    def __init__(self, eval_id: str, shard_id: str, order: Sequence[Key], spec: TranscriptSpec,
                 clock: Callable[[], float] = time.time):
        self.eval_id, self.shard_id = eval_id, shard_id
        self.enabled = spec.enabled
        self.max_bytes, self.max_entries = spec.max_bytes, spec.max_entries
        self.clock = clock
        self.order = list(order)  # the harness runs them in this order
        self.expected = set(self.order)
        self.samples: dict[Key, _Sample] = {}
        self.done: set[Key] = set()
        self.current: Key | None = None
        self.marks: dict[int, dict[str, Any]] = {}  # guard violation index -> where it is in the transcripts
        self.refused = 0
        self._synced = 0
        self._context: dict[int, tuple[bool, list[str]]] = {}  # id(violation) -> (held, blocked commands)

    # ------------------------------------------------------------ in

    def sandbox(self, event: Any) -> Rejection | None:
        """A `transcript` event from the sandbox; a `Rejection` when it is refused (the
        first `REFUSALS_KEPT`; the rest are counted in `refused` and `overflow()`)."""
        key = (event.sample_id, event.epoch)
        what = f"transcript of sample {event.sample_id[:200]!r} epoch {event.epoch}"
        if not self.enabled:
            return self._refuse(f"{what}: transcripts are off for this evaluation")
        if key not in self.expected:
            return self._refuse(f"{what}: not in this shard")
        if key in self.done:
            return self._refuse(f"{what}: after the sample was reported")
        self.current = key
        self._add(key, _from_sandbox(event.entry, self.clock()))
        return None

    def _refuse(self, reason: str) -> Rejection | None:
        self.refused += 1
        return Rejection(reason, "", 0) if self.refused <= REFUSALS_KEPT else None

    def overflow(self) -> Rejection | None:
        """The refusals not kept, as one more rejection (None when all were kept)."""
        more = self.refused - REFUSALS_KEPT
        return Rejection(f"{more} more transcript events refused (the first {REFUSALS_KEPT} are kept)", "", 0) \
            if more > 0 else None

    def gateway(self, event: Any, result: Any, latency_s: float) -> Entry | None:
        """A model call the gateway answered (`GenerateEvent`, `GenerateResult`): the
        trusted record of that turn, in the sample now running. Returns its entry (None when
        it was left out past the bound) for `checked`."""
        if not self.enabled:
            return None
        calls = [ToolCallView(id=str(c.get("id") or "")[:128], function=_function(c), arguments=_arguments(c))
                 for c in result.tool_calls[:64] if isinstance(c, dict)]
        usage = result.usage
        entry = Entry(n=0, at=self.clock(), kind="model", provenance="gateway", role="assistant",
                      content=result.output, tool_calls=calls, latency_s=round(latency_s, 6), call_id=event.id,
                      error=result.error, usage={"input_tokens": usage.input_tokens,
                                                 "output_tokens": usage.output_tokens, "calls": usage.calls})
        return self._add(self._running(), entry)

    def checked(self, entry: Entry | None, found: list[Any], held: bool, commands: list[str]) -> None:
        """What the guard found in a gateway answer, and whether it held the answer back."""
        if entry is not None and held:
            entry.held = True
        for v in found:
            self._context[id(v)] = (held, commands if held else [])

    def sample_done(self, key: Key) -> None:
        """The sample's `sample` event was accepted: nothing more of it is taken."""
        self.done.add(key)
        if key in self.samples:
            self.samples[key].completed_at = self.clock()
        if self.current == key:
            self.current = None

    def sync(self, guard: Any) -> None:
        """Take the guard's violations not yet placed: each becomes a `safety` entry of the
        sample that ran when it was seen."""
        if not self.enabled or len(guard.violations) <= self._synced:
            return
        for i in range(self._synced, len(guard.violations)):
            v = guard.violations[i]
            held, commands = self._context.pop(id(v), (False, []))
            stopped = v is guard.stopped
            key = self._when(v.at)
            entry = Entry(n=0, at=v.at, kind="safety", provenance="guard", safety=SafetyAction(
                monitor=v.monitor, rule=v.rule, action=v.action, message=v.message, evidence=list(v.evidence),
                stopped=stopped, held=held, blocked_commands=[c[:2000] for c in commands[:16]]))
            self._add(key, entry)
            self.marks[i] = {"sample_id": key[0], "epoch": key[1], "n": entry.n}
            if stopped:
                self.samples[key].stopped = True
        self._synced = len(guard.violations)

    # ------------------------------------------------------------ out

    def snapshot(self, sample_id: str, epoch: int) -> SampleTranscript | None:
        """The sample's transcript so far (None if it has not started here)."""
        s = self.samples.get((sample_id, epoch))
        return None if s is None else self._transcript(s, copy=True)

    def started(self) -> list[dict[str, Any]]:
        """Every sample that has started here: sample_id, epoch, shard_id, entries (a count)."""
        return [{"sample_id": k[0], "epoch": k[1], "shard_id": self.shard_id, "entries": len(s.entries)}
                for k, s in list(self.samples.items())]

    def finish(self, guard: Any | None) -> tuple[SampleTranscript, ...]:
        """Every expected sample × epoch's transcript (empty for those that never ran)."""
        if not self.enabled:
            return ()
        if guard is not None:
            self.sync(guard)
        return tuple(self._transcript(self.samples.get(k) or _Sample(k), copy=False) for k in self.order)

    def annotate(self, safety: dict[str, Any], guard: Any | None) -> None:
        """Add to the guard's summary (`SafetyGuard.summary`) where in the transcripts each
        violation fired: `transcript: {sample_id, epoch, n}`, on its violations and its stop."""
        for i, v in enumerate(safety.get("violations") or []):
            if i in self.marks:
                v["transcript"] = self.marks[i]
        stopped = getattr(guard, "stopped", None)
        at = next((i for i, v in enumerate(getattr(guard, "violations", [])) if v is stopped), None)
        if stopped is not None and at in self.marks and isinstance(safety.get("stopped_by"), dict):
            safety["stopped_by"]["transcript"] = self.marks[at]

    def label(self, records: list[Any], ref: str) -> list[Any]:
        """The records with `transcript` naming the log (`ref`) that holds their transcripts."""
        if not self.enabled:
            return records
        return [replace(r, transcript=ref) if (r.sample_id, r.epoch) in self.expected else r for r in records]

    # ------------------------------------------------------------ the bound

    def _add(self, key: Key, entry: Entry) -> Entry | None:
        s = self.samples.get(key)
        if s is None:
            s = self.samples[key] = _Sample(key, started_at=entry.at)
        size = entry_size(entry)
        if entry.kind != "safety":
            if s.cut is None and (s.kept >= self.max_entries or s.bytes + size > self.max_bytes):
                clipped = self._clip(entry, self.max_bytes - s.bytes) if s.kept < self.max_entries else None
                if clipped is not None:
                    self._append(s, clipped, entry_size(clipped))
                    s.kept += 1
                self._cut(s, "max_entries" if s.kept >= self.max_entries and clipped is None else "max_bytes")
                if clipped is not None:
                    return clipped
            if s.cut is not None:
                note = s.cut.cut
                assert note is not None
                note.dropped_entries += 1
                note.dropped_bytes += size
                if entry.provenance == "gateway" and entry.usage:
                    for name, value in entry.usage.items():
                        note.dropped_usage[name] = note.dropped_usage.get(name, 0) + value
                return None
            s.kept += 1
        self._append(s, entry, size)
        return entry

    def _append(self, s: _Sample, entry: Entry, size: int) -> None:
        entry.n = len(s.entries)
        s.entries.append(entry)
        s.bytes += size

    def _cut(self, s: _Sample, why: str) -> None:
        reason = (f"the transcript reached transcripts.max_entries ({self.max_entries} entries)" if why == "max_entries"
                  else f"the transcript reached transcripts.max_bytes ({self.max_bytes} bytes)")
        s.cut = Entry(n=0, at=self.clock(), kind="cut", provenance="platform", content=reason,
                      cut=CutNote(reason=reason, max_bytes=self.max_bytes, max_entries=self.max_entries))
        self._append(s, s.cut, 0)

    @staticmethod
    def _clip(entry: Entry, room: int) -> Entry | None:
        """`entry` with its content cut to fit in `room` bytes, or None."""
        if room < MIN_CLIPPED or not entry.content:
            return None
        over = entry_size(entry) - room + 64  # the marker and the flag
        data = entry.content.encode()
        if over >= len(data):
            return None
        kept = data[: len(data) - over].decode("utf-8", "ignore")
        clipped = entry.model_copy(update={"content": kept + "\n[… cut to fit the transcript's bound]",
                                           "clipped": True})
        return clipped if entry_size(clipped) <= room else None

    # ------------------------------------------------------------ where

    def _running(self) -> Key:
        """The sample running now: the one the sandbox last sent an entry of, else the
        next the harness will run."""
        if self.current is not None:
            return self.current
        return next((k for k in self.order if k not in self.done), self.order[-1])

    def _when(self, at: float) -> Key:
        """The sample that was running at `at` (unix seconds)."""
        for s in self.samples.values():
            if s.started_at is not None and s.started_at <= at and (s.completed_at is None or at < s.completed_at):
                return s.key
        return self._running()

    def _transcript(self, s: _Sample, copy: bool) -> SampleTranscript:
        entries = [e.model_copy(deep=True) for e in s.entries] if copy else list(s.entries)
        return SampleTranscript(eval_id=self.eval_id, shard_id=self.shard_id, sample_id=s.key[0], epoch=s.key[1],
                                entries=entries, cut=s.cut is not None, started_at=s.started_at,
                                completed_at=s.completed_at, stopped=s.stopped)


def _from_sandbox(entry: Any, at: float) -> Entry:
    if entry.kind == "message":
        return Entry(n=0, at=at, kind="message", provenance="sandbox", role=entry.role, content=entry.content)
    if entry.kind == "model":
        return Entry(n=0, at=at, kind="model", provenance="sandbox", role="assistant", content=entry.content,
                     tool_calls=[ToolCallView(id=c.id, function=c.function, arguments=c.arguments)
                                 for c in entry.tool_calls],
                     usage={"input_tokens": entry.usage.input_tokens, "output_tokens": entry.usage.output_tokens,
                            "calls": entry.usage.calls},
                     latency_s=entry.latency_s)
    return Entry(n=0, at=at, kind="tool", provenance="sandbox", role="tool", content=entry.output,
                 tool_call_id=entry.tool_call_id, function=entry.function, exit_code=entry.exit_code,
                 timed_out=entry.timed_out, truncated=entry.truncated, output_bytes=entry.output_bytes,
                 latency_s=entry.latency_s, error=entry.error)


def _function(call: dict[str, Any]) -> str:
    """A gateway tool call's function name (OpenAI's shape, or the short `command`)."""
    function = call.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    return str(name or ("bash" if "command" in call else "?"))[:128]


def _arguments(call: dict[str, Any]) -> str:
    """A gateway tool call's arguments as text."""
    if "command" in call:
        return json.dumps({"command": call["command"]}, default=str)[:256 * 1024]
    function = call.get("function")
    args = function.get("arguments") if isinstance(function, dict) else None
    return (args if isinstance(args, str) else json.dumps(args, default=str))[:256 * 1024]
