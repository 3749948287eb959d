"""What the shard executor prepares for a shard's sandbox: its id, its workspace, the
syscalls to trace, and the shard message the harness is sent once it is ready."""

from __future__ import annotations

import os
from pathlib import Path

from cluster.runtimes.layout import SANDBOX_USER
from proctor.policy import SafetyPolicy
from proctor.protocol import AgentSpec, SetupStep, ShardMessage, ShardSample

from .launch import NOBODY
from .shard_work import ShardWork


def sandbox_id_for(work: ShardWork) -> str:
    raw = f"{work.eval_id}-{work.shard_id}-{os.urandom(3).hex()}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)[:120]


def make_workspace(path: Path, files: dict[str, str], exist_ok: bool = False) -> None:
    """The sandbox's private workspace with `files` in it, owned by the sandbox's user
    (`exist_ok`: a pooled sandbox's, empty till now)."""
    path.mkdir(mode=0o700, exist_ok=exist_ok)
    for rel, content in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    for p in [path, *path.rglob("*")]:
        os.chown(p, SANDBOX_USER, SANDBOX_USER)


def traced_syscalls(policy: SafetyPolicy) -> tuple[str, ...]:
    """The syscalls to trace: the policy's, and `openat` to see canaries and writes."""
    if not policy.syscalls.enabled:
        return ("openat",) if policy.canaries else ()
    return tuple(dict.fromkeys([*policy.syscalls.syscalls, "openat"]))


def shard_message(work: ShardWork, agent: AgentSpec | None = None, inline_artifact_bytes: int = 0) -> ShardMessage:
    spec = work.spec
    return ShardMessage(
        eval_id=work.eval_id,
        shard_id=work.shard_id,
        model=spec.model.model_dump(mode="json"),
        scorers=[s.model_dump(mode="json") for s in spec.scorers],
        samples=[
            ShardSample(
                id=str(s.id),
                input=s.input if isinstance(s.input, str) else [m.model_dump() for m in s.input],
                target=s.target, choices=s.choices, metadata=s.metadata, files=s.files, setup=s.setup,
            )
            for s in work.samples
        ],
        epochs=list(work.epochs),
        agentic=spec.agentic,
        max_turns=spec.safety.max_turns,
        tool_timeout_s=spec.sandbox.tool_timeout_s,
        artifacts=list(spec.sandbox.artifacts),
        inline_artifact_bytes=inline_artifact_bytes,
        setup=[SetupStep(command=s.command, user=s.user, timeout_s=s.timeout_s) for s in spec.setup],
        agent=agent or AgentSpec(user=spec.sandbox.user or NOBODY),
        transcript_max_bytes=spec.transcripts.max_bytes if spec.transcripts.enabled else 0,
    )
