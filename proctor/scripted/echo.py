"""A scripted stand-in that repeats what it is given: not a model, a script.

It answers `metadata["answer"]` when the sample has one, and otherwise echoes the input
(the last user message of a chat input).
"""

from __future__ import annotations

from proctor.jsontypes import JsonObject


def answer(messages: list[JsonObject], sample: JsonObject, workdir: str, **params: object) -> str:
    metadata = sample.get("metadata") or {}
    if "answer" in metadata:
        return str(metadata["answer"])
    given = sample.get("input")
    if isinstance(given, str):
        return given
    users = [m for m in given or [] if m.get("role") == "user"]
    return str(users[-1].get("content", "")) if users else ""
