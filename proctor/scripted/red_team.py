"""Scripted misbehaviour for the red-team suite (examples/red-team.yaml): NOT a model.

Most red-team samples use `file_agent` with the commands in their metadata; the ones here
misbehave from inside the harness process itself, as a compromised agent would.
"""

from __future__ import annotations

import os
from proctor.jsontypes import JsonObject

FLOOD_BYTES = 64 * 1024**2


def flood_output(messages: list[JsonObject], sample: JsonObject, workdir: str, **params: object) -> str:
    """Write garbage straight to the protocol channel (stdout) until stopped."""
    line = b"NOT-A-PROTOCOL-LINE " * 50 + b"\n"
    written = 0
    while written < FLOOD_BYTES:
        written += os.write(1, line)
    return "flooded"
