"""The shell tool a model uses in an agentic shard, and the command runner beneath it.

Every command runs as `/bin/sh -c COMMAND` in the sample's directory, in a new session
(so a timeout or a cancel kills it and all its children), with stdin closed or fed from
a pipe (never the harness's own stdin, which is the protocol channel), and with its
output capped: the rest is read and thrown away so the command never blocks on a full
pipe.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Mapping

from proctor.harness.channel import Cancelled

OUTPUT_CAP = 64 * 1024
_POLL_S = 0.05
_DRAIN_S = 0.5

BASH_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "bash",
        "description": (
            "Run a shell command with /bin/sh in your working directory. "
            "Returns the exit code and the combined stdout and stderr (first 64 KiB)."
        ),
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "the shell command to run"}},
            "required": ["command"],
        },
    },
}


@dataclass(frozen=True)
class CommandResult:
    """What a command did. `exit_code` is negative when a signal ended it."""

    exit_code: int
    output: str
    stderr: str
    timed_out: bool
    output_bytes: int

    @property
    def truncated(self) -> bool:
        return self.output_bytes > OUTPUT_CAP


class _Capture(threading.Thread):
    def __init__(self, stream: IO[bytes], cap: int):
        super().__init__(name="proctor-capture", daemon=True)
        self._stream = stream
        self._cap = cap
        self._lock = threading.Lock()
        self._data = bytearray()
        self.total = 0

    def run(self) -> None:
        try:
            for chunk in iter(lambda: self._stream.read1(65536), b""):
                with self._lock:
                    self.total += len(chunk)
                    room = self._cap - len(self._data)
                    if room > 0:
                        self._data += chunk[:room]
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        with self._lock:
            return bytes(self._data).decode("utf-8", "replace")


def run_command(
    command: str,
    cwd: Path,
    timeout_s: float,
    cancelled: threading.Event | None = None,
    *,
    merge_stderr: bool = True,
    stdin_data: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cap: int = OUTPUT_CAP,
) -> CommandResult:
    """Run `command` to its end or its deadline.

    Raises `Cancelled` (after killing the command's process group) when `cancelled` is set
    while it runs. With `merge_stderr`, `output` holds stdout and stderr interleaved and
    `stderr` is empty.
    """
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command],
        cwd=cwd,
        stdin=subprocess.DEVNULL if stdin_data is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        start_new_session=True,
        env=None if env is None else dict(env),
    )
    captures = [_Capture(proc.stdout, cap)] + ([] if merge_stderr else [_Capture(proc.stderr, cap)])
    for capture in captures:
        capture.start()
    if stdin_data is not None:
        threading.Thread(target=_feed, args=(proc.stdin, stdin_data), daemon=True).start()
    try:
        timed_out = _wait(proc, time.monotonic() + timeout_s, cancelled)
    finally:
        for capture in captures:
            capture.join(_DRAIN_S)
        if not any(c.is_alive() for c in captures):
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    stderr = captures[1].text() if len(captures) > 1 else ""
    return CommandResult(proc.returncode, captures[0].text(), stderr, timed_out, captures[0].total)


def _wait(proc: subprocess.Popen[bytes], deadline: float, cancelled: threading.Event | None) -> bool:
    """Wait for `proc`; True if it was killed at `deadline`. Raises `Cancelled` after
    killing it when `cancelled` is set."""
    while True:
        try:
            proc.wait(timeout=_POLL_S)
            return False
        except subprocess.TimeoutExpired:
            pass
        if cancelled is not None and cancelled.is_set():
            _kill(proc)
            raise Cancelled("cancelled while a command ran")
        if time.monotonic() >= deadline:
            _kill(proc)
            return True


def _feed(pipe: IO[bytes], data: bytes) -> None:
    try:
        pipe.write(data)
    except (BrokenPipeError, OSError, ValueError):
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def tool_message_content(result: CommandResult, timeout_s: float) -> str:
    """What the model reads back: `exit code N`, a line break, then the output."""
    head = f"exit code {result.exit_code}"
    if result.timed_out:
        head += f" (killed: timed out after {timeout_s:g}s)"
    body = result.output
    if result.truncated:
        body += f"\n[output cut at {OUTPUT_CAP} of {result.output_bytes} bytes]"
    return f"{head}\n{body}"
