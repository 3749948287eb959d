"""Model adapters: one interface in front of every kind of model the harness can run.

An adapter has two methods:

- `begin_sample(sample, epoch, workdir)`: called before each sample × epoch.
- `generate(messages, tools) -> Reply`: one model turn. `messages` are chat dicts
  (`role`, `content`, and OpenAI's `tool_calls` / `tool_call_id`); `tools` is a list
  of OpenAI function tools or None. Raises on a failed call (the sample's error) and
  `Cancelled` on cancel.

No adapter ever sees a sample's target except the reference model, which is an oracle
by design. `make_adapter` picks one from a validated `ModelSpec`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import itertools
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from proctor.harness.channel import Channel, clip
from proctor.harness.scorers import LETTERS, choice_letter, parse_number, targets
from proctor.jsontypes import JsonObject
from proctor.protocol import ShardSample, Usage
from proctor.spec import ModelSpec, OpenAIModel, PythonModel, ReferenceModel

MAX_MESSAGES = 1000


@dataclass(frozen=True)
class ToolCall:
    """A call of the bash tool. `problem` says why it cannot run (unknown tool, bad
    arguments); the model is told so instead of the command's output."""

    id: str
    command: str | None
    problem: str | None = None


@dataclass(frozen=True)
class Reply:
    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    via_gateway: bool = False  # answered by the model gateway, which records the turn outside


class ModelAdapter(Protocol):
    def begin_sample(self, sample: ShardSample, epoch: int, workdir: Path) -> None: ...

    def generate(self, messages: list[JsonObject], tools: list[JsonObject] | None) -> Reply: ...


class ModelError(RuntimeError):
    """A model call failed (the gateway's error, or a policy returned something unusable).
    Caught by the run loop as the sample's error."""


def word_count(messages: list[JsonObject]) -> int:
    return sum(len(str(m.get("content") or "").split()) for m in messages)


def parse_tool_calls(raw: object) -> list[ToolCall]:
    """Tool calls in OpenAI's format (`{"id", "type": "function", "function": {"name":
    "bash", "arguments": "{\\"command\\": ...}"}}`) or the short `{"id", "command"}`."""
    if not raw:
        return []
    if not isinstance(raw, list):
        return [ToolCall(_call_id(), None, "tool_calls must be a list")]
    calls = []
    for item in raw:
        if not isinstance(item, dict):
            calls.append(ToolCall(_call_id(), None, "a tool call must be an object"))
            continue
        call_id = str(item.get("id") or _call_id())[:128]
        if "command" in item:
            command = item["command"]
            calls.append(ToolCall(call_id, command, None) if isinstance(command, str)
                         else ToolCall(call_id, None, "'command' must be a string"))
            continue
        function = item.get("function")
        if not isinstance(function, dict):
            function = {}
        name = function.get("name")
        if name != "bash":
            calls.append(ToolCall(call_id, None, f"unknown tool {str(name)[:100]!r}; the only tool is 'bash'"))
            continue
        arguments = function.get("arguments")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            arguments = None
        command = arguments.get("command") if isinstance(arguments, dict) else None
        calls.append(ToolCall(call_id, command, None) if isinstance(command, str)
                     else ToolCall(call_id, None, "bash needs JSON arguments with a string 'command'"))
    return calls


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------- reference


def draw(seed: int, sample_id: str, epoch: int) -> float:
    """A reproducible number in [0, 1) for one (seed, sample, epoch)."""
    digest = hashlib.sha256(f"{seed}\x00{sample_id}\x00{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def correct_answer(sample: ShardSample) -> str:
    target = (targets(sample) or [""])[0]
    if sample.choices:
        return choice_letter(target, sample.choices) or target
    return target


def wrong_answer(sample: ShardSample) -> str:
    """An answer that exact, includes, numeric and choice scorers all mark wrong."""
    target = (targets(sample) or [""])[0]
    letter = choice_letter(target, sample.choices) if sample.choices else None
    if letter is not None:
        count = max(len(sample.choices or []), 2)
        return LETTERS[(LETTERS.index(letter) + 1) % count]
    number = parse_number(target)
    if number is not None:
        wrong = number + max(1.0, abs(number))
        candidate = str(int(wrong)) if wrong.is_integer() and abs(wrong) < 1e15 else repr(wrong)
    else:
        candidate = "wrong: " + target[::-1]
    every = [t.casefold() for t in targets(sample) if t]
    got = parse_number(candidate)
    if all(t not in candidate.casefold() and (got is None or got != parse_number(t)) for t in every):
        return candidate
    unused = next((c for c in "#%@~^|<>" if all(c not in t for t in every)), "\u2205")
    return unused * (len(target) + 1)


class ReferenceAdapter:
    """THE REFERENCE MODEL: a deterministic built-in oracle, not a real model.

    It answers every sample with its target (the target's letter for a choice sample),
    except where `draw(seed, sample id, epoch) < error_rate`, where it answers wrongly on
    purpose. It exists to exercise the platform end to end; its scores measure nothing.
    Tokens are counted as whitespace-separated words.
    """

    def __init__(self, spec: ReferenceModel):
        self._spec = spec
        self._sample: ShardSample | None = None
        self._epoch = 1

    def begin_sample(self, sample: ShardSample, epoch: int, workdir: Path) -> None:
        self._sample, self._epoch = sample, epoch

    def answer(self, sample: ShardSample, epoch: int) -> str:
        if draw(self._spec.seed, sample.id, epoch) < self._spec.error_rate:
            return wrong_answer(sample)
        return correct_answer(sample)

    def generate(self, messages: list[JsonObject], tools: list[JsonObject] | None) -> Reply:
        if self._sample is None:
            raise ModelError("the reference model needs begin_sample() before generate()")
        text = self.answer(self._sample, self._epoch)
        return Reply(text, [], Usage(input_tokens=word_count(messages), output_tokens=len(text.split()), calls=1))


# ---------------------------------------------------------------- python


class PythonAdapter:
    """Calls `module:function` in the harness process, once a turn:
    `fn(messages, sample={id, input, choices, metadata}, workdir=str, **params)`.

    The function returns the final answer as a `str`, or a dict
    `{"content": str, "tool_calls": [{"id": str, "command": str}, ...]}` (OpenAI-style
    tool calls are accepted too). It never receives the target. The workspace root and the
    current sample's directory are on `sys.path`, so a policy may ship as a sample file.
    """

    def __init__(self, spec: PythonModel, workspace: Path):
        self._spec = spec
        self._view: JsonObject = {}
        self._workdir: Path = workspace
        self._sample_path: str | None = None
        root = str(workspace)
        if root not in sys.path:
            sys.path.insert(0, root)

    def begin_sample(self, sample: ShardSample, epoch: int, workdir: Path) -> None:
        self._view = {"id": sample.id, "input": sample.input, "choices": sample.choices, "metadata": sample.metadata}
        self._workdir = workdir
        if self._sample_path in sys.path:
            sys.path.remove(self._sample_path)
        self._sample_path = str(workdir)
        sys.path.insert(0, self._sample_path)
        importlib.invalidate_caches()

    def _function(self) -> Callable[..., Any]:  # the spec's own callable: its signature is the user's
        module_name, _, name = self._spec.callable.partition(":")
        try:
            function: object = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as exc:
            raise ModelError(f"cannot load {self._spec.callable}: {exc}") from exc
        if not callable(function):
            raise ModelError(f"{self._spec.callable} is not callable")
        return function

    def generate(self, messages: list[JsonObject], tools: list[JsonObject] | None) -> Reply:
        result = self._function()(
            copy.deepcopy(messages), sample=copy.deepcopy(self._view), workdir=str(self._workdir), **self._spec.params
        )
        if isinstance(result, str):
            text, calls = result, []
        elif isinstance(result, dict):
            text, calls = str(result.get("content") or ""), parse_tool_calls(result.get("tool_calls"))
        else:
            raise ModelError(
                f"{self._spec.callable} returned {type(result).__name__}; "
                "return a str or a dict with 'content' and 'tool_calls'"
            )
        return Reply(text, calls, Usage(input_tokens=word_count(messages), output_tokens=len(text.split()), calls=1))


# ---------------------------------------------------------------- openai


def fit_messages(messages: list[JsonObject], limit: int = MAX_MESSAGES) -> list[JsonObject]:
    """At most `limit` messages: the opening ones (before the first assistant turn) and
    the most recent, never starting the recent part with an orphaned tool result."""
    if len(messages) <= limit:
        return messages
    opening = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
    opening = min(opening, limit // 2)
    recent = messages[len(messages) - (limit - opening):]
    while recent and recent[0].get("role") == "tool":
        recent = recent[1:]
    return messages[:opening] + recent


class OpenAIAdapter:
    """A model behind an OpenAI-compatible endpoint, reached through the model gateway
    outside the sandbox: each turn is a `generate` event answered by a `generate_result`.
    The sandbox never holds the endpoint's key."""

    def __init__(self, spec: OpenAIModel, channel: Channel):
        self._spec = spec
        self._channel = channel
        self._prefix = f"gen-{uuid.uuid4().hex[:8]}"
        self._count = itertools.count(1)

    def begin_sample(self, sample: ShardSample, epoch: int, workdir: Path) -> None:
        pass

    def generate(self, messages: list[JsonObject], tools: list[JsonObject] | None) -> Reply:
        result = self._channel.request(
            f"{self._prefix}-{next(self._count)}",
            messages=[{**m, "content": clip(str(m.get("content") or ""))} for m in fit_messages(messages)],
            tools=tools or [],
            max_tokens=self._spec.max_tokens,
            temperature=self._spec.temperature,
        )
        if result.error:
            raise ModelError(f"model call failed: {result.error}")
        usage = result.usage if result.usage.calls else result.usage.model_copy(update={"calls": 1})
        return Reply(result.output, parse_tool_calls(result.tool_calls), usage, via_gateway=True)


def make_adapter(spec: ModelSpec, channel: Channel, workspace: Path) -> ModelAdapter:
    """The adapter for a validated `ModelSpec`."""
    if isinstance(spec, ReferenceModel):
        return ReferenceAdapter(spec)
    if isinstance(spec, PythonModel):
        return PythonAdapter(spec, workspace)
    if isinstance(spec, OpenAIModel):
        return OpenAIAdapter(spec, channel)
    raise TypeError(f"no adapter for {type(spec).__name__}")
