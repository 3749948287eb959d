"""The run loop: every sample × epoch of a shard, through the model, the tool loop and
the scorers, reported as it completes.

A sample whose model call or scorer raises is still reported, with `error` set; the
shard goes on. `run_shard` ends with `done`: ok when every sample was attempted,
cancelled on a `cancel`, error on anything unexpected.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from hashlib import sha1
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from proctor.harness.adapters import ModelAdapter, Reply, ToolCall, make_adapter
from proctor.harness.channel import Cancelled, Channel, clip
from proctor.harness.identity import Identity, UnknownUser, Users, resolve
from proctor.harness.scorers import LETTERS, Score, Scorer, build_scorer
from proctor.harness.stages import SampleStages
from proctor.harness.tools import BASH_TOOL, run_command, tool_message_content
from proctor.harness.transcript import TranscriptWriter
from proctor.protocol import INLINE_ARTIFACT_BYTES, MAX_ARTIFACT_BYTES, ArtifactEvent, MetricEvent, ProgressEvent, SampleEvent, ShardMessage, ShardSample, Usage
from proctor.jsontypes import JsonObject
from proctor.spec import ModelSpec, ScorerSpec, SpecError

AGENT_SYSTEM_PROMPT = (
    "You can run shell commands with the bash tool; they run in your working directory. "
    "When you are done, give your final answer without calling a tool."
)
_ROLES = ("system", "user", "assistant", "tool")
MAX_SCORERS = 64
MAX_ARTIFACTS_PER_SAMPLE = 32


def validate_shard(shard: ShardMessage) -> tuple[ModelSpec, list[ScorerSpec]]:
    """The shard's model and scorer specs, validated again. Raises `SpecError`."""
    errors: list[tuple[str, str]] = []
    model = None
    try:
        model = TypeAdapter(ModelSpec).validate_python(shard.model)
    except ValidationError as exc:
        errors += [(f"model.{f}", r) for f, r in SpecError.from_validation(exc).errors]
    scorers = []
    for i, raw in enumerate(shard.scorers):
        try:
            scorers.append(TypeAdapter(ScorerSpec).validate_python(raw))
        except ValidationError as exc:
            errors += [(f"scorers.{i}.{f}", r) for f, r in SpecError.from_validation(exc).errors]
    if len(shard.scorers) > MAX_SCORERS:
        errors.append(("scorers", f"{len(shard.scorers)} scorers; a sample event holds at most {MAX_SCORERS}"))
    if errors or model is None:  # no model: its errors are there
        raise SpecError(errors, "shard")
    return model, scorers


def sample_dir_name(sample_id: str, epoch: int) -> str:
    """`<id>-e<epoch>`, the id kept to [A-Za-z0-9._-]; a hash tells apart ids that differ
    only in the characters replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)[:100]
    if safe != sample_id or safe.strip(".") == "":
        safe = f"{safe}-{sha1(sample_id.encode()).hexdigest()[:8]}"
    return f"{safe}-e{epoch}"


def prepare_workdir(workspace: Path, sample: ShardSample, epoch: int) -> Path:
    """Create the sample's directory and write its files. Raises `ValueError` on a path
    that would leave it."""
    workdir = workspace / sample_dir_name(sample.id, epoch)
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir.resolve()
    for rel, content in sample.files.items():
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts:
            raise ValueError(f"sample file {rel!r} must be a relative path inside the workspace, without '..'")
        target = workdir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.resolve().is_relative_to(root):
            raise ValueError(f"sample file {rel!r} leads outside the sample directory")
        target.write_text(content)
    return workdir


def render_input(sample: ShardSample) -> str:
    if isinstance(sample.input, str):
        return sample.input
    return "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in sample.input)


def render_target(sample: ShardSample) -> str:
    return sample.target if isinstance(sample.target, str) else " | ".join(sample.target)


def initial_messages(sample: ShardSample, agentic: bool) -> list[JsonObject]:
    """The chat a model starts from; choices are listed under the last user message."""
    if isinstance(sample.input, str):
        messages = [{"role": "user", "content": sample.input}]
    else:
        messages = []
        for i, raw in enumerate(sample.input):
            role = raw.get("role")
            if role not in _ROLES:
                raise ValueError(f"input message {i}: role {role!r} is not one of {', '.join(_ROLES)}")
            messages.append({"role": role, "content": str(raw.get("content") or "")})
    if sample.choices:
        listed = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(sample.choices))
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        extra = f"{listed}\n\nAnswer with the letter of the correct choice."
        if last_user is None:
            messages.append({"role": "user", "content": extra})
        else:
            messages[last_user]["content"] += "\n\n" + extra
    if agentic and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": AGENT_SYSTEM_PROMPT})
    return messages


@dataclass
class Conversation:
    """One sample's dealings with the model so far; kept when the model raises."""

    output: str = ""
    turns: int = 0
    usage: Usage = field(default_factory=Usage)

    def add(self, reply: Reply) -> None:
        self.output = reply.text
        self.turns += 1
        u = reply.usage
        self.usage = Usage(
            input_tokens=self.usage.input_tokens + u.input_tokens,
            output_tokens=self.usage.output_tokens + u.output_tokens,
            calls=self.usage.calls + u.calls,
        )


class ShardRun:
    def __init__(self, shard: ShardMessage, channel: Channel, workspace: Path, adapter: ModelAdapter,
                 scorers: list[Scorer], users: Users | None = None, agent: Identity | None = None):
        self.shard = shard
        self.inline_left = shard.inline_artifact_bytes  # artifact content still to send in events (pods)
        self.channel = channel
        self.workspace = workspace
        self.adapter = adapter
        self.scorers = scorers
        self.users = users or Users(sandboxed=False)
        self.agent = agent or Identity(os.geteuid(), os.getegid(), "self")
        self.agent_env = agent_env(shard)
        self.agent_ran = False  # a process of the agent's user may be alive (killed before scoring)
        self.completed = 0
        self.values: dict[str, list[float]] = {s.name: [] for s in scorers}
        self.transcript = TranscriptWriter(channel, shard.transcript_max_bytes)

    def run(self) -> None:
        total = len(self.shard.samples) * len(self.shard.epochs)
        for epoch in self.shard.epochs:
            for sample in self.shard.samples:
                self.channel.check_cancelled()
                self.run_sample(sample, epoch)
                self.completed += 1
                self.channel.emit(ProgressEvent, completed=self.completed, total=total)
        for name, values in self.values.items():
            if values:
                self.channel.emit(MetricEvent, name=f"{name}/mean"[:256], value=sum(values) / len(values))

    def run_sample(self, sample: ShardSample, epoch: int) -> None:
        started = time.time()
        self.transcript.begin(sample.id, epoch)
        conversation = Conversation()
        errors: list[str] = []
        stages = SampleStages()
        scores = self.attempt(sample, epoch, conversation, errors, stages)
        with stages.timed("cleanup"):
            self.report_artifacts(sample, epoch)
        self.channel.emit(
            SampleEvent,
            sample_id=sample.id[:1024],
            epoch=epoch,
            input=clip(render_input(sample)),
            target=clip(render_target(sample)),
            output=clip(conversation.output),
            scores={
                name: {"value": s.value, "answer": _clip_or_none(s.answer), "explanation": _clip_or_none(s.explanation)}
                for name, s in scores.items()
            },
            error=clip("; ".join(errors)) if errors else None,
            started_at=started,
            completed_at=time.time(),
            usage=conversation.usage,
            turns=conversation.turns,
            stages=stages.seconds,
            failed_stage=stages.failed,
        )

    def report_artifacts(self, sample: ShardSample, epoch: int) -> None:
        """One `artifact` event per regular file matching the shard's patterns (bounded)."""
        if not self.shard.artifacts:
            return
        workdir = self.workspace / sample_dir_name(sample.id, epoch)
        seen: set[Path] = set()
        for pattern in self.shard.artifacts:
            for path in sorted(workdir.glob(pattern))[:MAX_ARTIFACTS_PER_SAMPLE]:
                if path in seen or path.is_symlink() or not path.is_file() or len(seen) >= MAX_ARTIFACTS_PER_SAMPLE:
                    continue
                seen.add(path)
                digest = hashlib.sha256()
                size = path.stat().st_size
                inline = self.shard.inline_artifact_bytes > 0 and size <= min(self.inline_left, MAX_ARTIFACT_BYTES)
                content = bytearray()
                with path.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                        if inline and len(content) <= size:
                            content += block
                named = str(path.relative_to(self.workspace))[:1024]
                if not inline or len(content) != size:  # too large for what is left, or it changed meanwhile
                    self.channel.emit(ArtifactEvent, path=named, size=size, sha256=digest.hexdigest())
                    continue
                self.inline_left -= size
                for offset in range(0, max(size, 1), INLINE_ARTIFACT_BYTES):  # in order; one even when empty
                    piece = base64.b64encode(content[offset:offset + INLINE_ARTIFACT_BYTES]).decode()
                    self.channel.emit(ArtifactEvent, path=named, size=size, sha256=digest.hexdigest(),
                                      data=piece, offset=offset)

    def attempt(self, sample: ShardSample, epoch: int, conversation: Conversation, errors: list[str],
                stages: SampleStages) -> dict[str, Score]:
        """Prepare and set up, converse, score; each failure is appended to `errors` and
        names its stage. Every process of the agent's user is dead before scoring."""
        with stages.timed("setup"):
            try:
                workdir = prepare_workdir(self.workspace, sample, epoch)
                self.users.give(workdir, self.agent)
            except (OSError, ValueError) as exc:
                return stages.fail("setup", errors, f"sample files: {exc}")
            problem = self.set_up(sample, workdir)
        if problem:
            return stages.fail("setup", errors, problem)
        with stages.timed("eval"):
            try:
                self.adapter.begin_sample(sample, epoch, workdir)
                limit_error = self.converse(sample, conversation, workdir)
            except Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - a failing model is this sample's error
                return stages.fail("eval", errors, f"model: {_describe(exc)}")
            finally:
                self.end_agent()
        if limit_error:
            stages.fail("eval", errors, limit_error)
        with stages.timed("score"):
            scores = self.score(conversation.output, sample, workdir, errors)
        if len(scores) < len(self.scorers):
            stages.failed = stages.failed or "score"
        return scores

    def end_agent(self) -> None:
        """Kill every process of the agent's user (the eval stage is over)."""
        if not self.agent_ran:
            return
        self.agent_ran = False
        left = self.users.kill_agent(self.agent)
        if left:
            self.channel.log("warning", f"{left} processes of the agent's user outlived the kill")

    def set_up(self, sample: ShardSample, workdir: Path) -> str | None:
        """The setup stage: the shard's setup steps, then the sample's own script, in the
        sample's folder. Returns why it failed, with the failing command's output."""
        steps = [(step.command, step.user, step.timeout_s) for step in self.shard.setup]
        if sample.setup:
            steps.append((sample.setup, "root", self.shard.tool_timeout_s))
        for command, user, timeout in steps:
            self.channel.check_cancelled()
            try:
                identity = resolve(user)
            except UnknownUser as exc:
                return f"setup failed: {exc}"
            as_user = self.users.popen_args(identity)
            self.agent_ran = self.agent_ran or identity.uid == self.agent.uid
            result = run_command(command, workdir, timeout, self.channel.cancelled, env=self.agent_env,
                                 as_user=as_user)
            if result.timed_out or result.exit_code != 0:
                why = f"timed out after {timeout:g}s" if result.timed_out else f"exited with code {result.exit_code}"
                return clip(f"setup failed: {command[:200]!r} {why}: {result.output.strip()[-4000:]}")
        return None

    def converse(self, sample: ShardSample, conversation: Conversation, workdir: Path) -> str | None:
        """Run the model to its final answer; returns the turn-limit error, if reached."""
        agentic = self.shard.agentic
        messages = initial_messages(sample, agentic)
        self.transcript.messages(messages)
        turns = self.shard.max_turns if agentic else 1
        for _ in range(turns):
            self.channel.check_cancelled()
            asked = time.monotonic()
            reply = self.adapter.generate(messages, [BASH_TOOL] if agentic else None)
            self.transcript.model(reply, time.monotonic() - asked)
            conversation.add(reply)
            if not agentic or not reply.tool_calls:
                return None
            messages.append({
                "role": "assistant",
                "content": reply.text,
                "tool_calls": [
                    {"id": c.id, "type": "function",
                     "function": {"name": "bash", "arguments": json.dumps({"command": c.command or ""})}}
                    for c in reply.tool_calls
                ],
            })
            for call in reply.tool_calls:
                messages.append({"role": "tool", "tool_call_id": call.id, "content": clip(self.run_tool(call, workdir))})
        return f"turn limit reached ({turns})"

    def run_tool(self, call: ToolCall, workdir: Path) -> str:
        if call.command is None:
            self.transcript.tool(call, None, f"error: {call.problem}")
            return f"error: {call.problem}"
        self.channel.check_cancelled()
        self.channel.log("info", f"tool: {call.command[:500]}")
        timeout = self.shard.tool_timeout_s
        self.agent_ran = True
        started = time.monotonic()
        try:
            result = run_command(call.command, workdir, timeout, self.channel.cancelled, env=self.agent_env,
                                 as_user=self.users.popen_args(self.agent))
        except OSError as exc:  # e.g. the sandbox's processes hold every slot of its pids limit
            self.channel.log("warning", f"tool: the command could not start: {exc}")
            self.transcript.tool(call, None, f"error: the command could not start: {exc}")
            return f"error: the command could not start: {exc}"
        content = tool_message_content(result, timeout)
        self.transcript.tool(call, result, content, time.monotonic() - started)
        return content

    def score(self, output: str, sample: ShardSample, workdir: Path, errors: list[str]) -> dict[str, Score]:
        scores = {}
        for scorer in self.scorers:
            try:
                scores[scorer.name] = scorer.score(output, sample, workdir)
            except Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - a failing scorer is this sample's error
                errors.append(f"scorer {scorer.name}: {_describe(exc)}")
            else:
                self.values[scorer.name].append(scores[scorer.name].value)
        return scores


def agent_env(shard: ShardMessage) -> dict[str, str]:
    """The whole environment of the agent's commands, setup steps and command scorers:
    what the host gave (the image's), with a PATH, a HOME and a locale when it gave none.
    Nothing of the harness's own (its PYTHONPATH, its Python)."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/workspace",
           "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
    env.update(shard.agent.env)
    return env


def run_shard(shard: ShardMessage, channel: Channel, workspace: Path, sandboxed: bool = False) -> int:
    """Run the shard and end with `done`. Returns the process's exit code: 0 for ok and
    cancelled, 1 for an unexpected error, 2 for a shard whose specs do not validate.
    `sandboxed`: the harness runs in a sandbox of its own (`identity.Users`)."""
    try:
        model_spec, scorer_specs = validate_shard(shard)
        agent = resolve(shard.agent.user)
        if agent.is_root:
            raise SpecError([("agent.user", "the agent never runs as root; give an unprivileged user")], "shard")
    except (SpecError, UnknownUser) as exc:
        channel.done("error", error=str(exc))
        return 2
    users = Users(sandboxed)
    if sandboxed and not users.switching:
        channel.log("warning", "the harness cannot change user here: the agent's commands run as its own user")
    run = None
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        if users.switching:
            os.chown(workspace, agent.uid, agent.gid)
        adapter = make_adapter(model_spec, channel, workspace)
        env = agent_env(shard)
        scorers = [build_scorer(s, channel.cancelled, env) for s in scorer_specs]
        run = ShardRun(shard, channel, workspace, adapter, scorers, users, agent)
        run.run()
    except Cancelled:
        channel.done("cancelled", error=channel.cancel_reason, samples=run.completed if run else 0)
        return 0
    except Exception as exc:  # noqa: BLE001 - the shard's last word must be `done`
        channel.done("error", error=f"harness failed: {_describe(exc)}", samples=run.completed if run else 0)
        return 1
    channel.done("ok", samples=run.completed)
    return 0


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _clip_or_none(text: str | None) -> str | None:
    return None if text is None else clip(text)
