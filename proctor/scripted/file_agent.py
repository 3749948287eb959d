"""A scripted agent for file tasks: not a model, a script.

Each sample's `metadata["commands"]` lists the shell commands that solve it. The agent
issues them as `bash` tool calls, one a turn, in order, then answers
`metadata.get("answer", "done")`. It knows which turn it is by counting the tool results
already in the chat, so it needs no state of its own.
"""

from __future__ import annotations

from proctor.jsontypes import JsonObject


def solve(messages: list[JsonObject], sample: JsonObject, workdir: str, **params: object) -> str | JsonObject:
    metadata = sample.get("metadata") or {}
    commands = metadata.get("commands") or []
    if isinstance(commands, str):
        commands = [commands]
    done = sum(1 for m in messages if m.get("role") == "tool")
    if done < len(commands):
        return {"content": "", "tool_calls": [{"id": f"call_{done + 1}", "command": str(commands[done])}]}
    return str(metadata.get("answer", "done"))
