"""The shell tool a model uses in an agentic shard, and the command runner beneath it.

Every command runs as `/bin/sh -c COMMAND` in the sample's directory, in a new session
(so a timeout or a cancel kills it and all its children), with stdin closed or fed from
a pipe (never the harness's own stdin, which is the protocol channel), and with its
output capped: the rest is read and thrown away so the command never blocks on a full
pipe.

The runner needs no thread or process of the harness's own: it feeds and reads the
command's pipes from the calling thread. A sandbox whose processes have taken every slot
of its pids limit (a loop of background commands) cannot keep the harness from working:
the next command fails to start, and the model reads why.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Mapping

from proctor.harness.channel import Cancelled
from proctor.jsontypes import JsonObject

if TYPE_CHECKING:
    from proctor.harness.identity import UserArgs

OUTPUT_CAP = 64 * 1024
_POLL_S = 0.05
_DRAIN_S = 0.5  # read this long after the command exits: its background children may hold the pipe

BASH_TOOL: JsonObject = {
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


class _Capture:
    """What one pipe carried: the first `cap` bytes, and the count of all of them."""

    def __init__(self, cap: int):
        self._cap = cap
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self._cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]


@dataclass(frozen=True)
class ProcessResult:
    """What a process did, in bytes: the first `cap` bytes of each stream and their totals."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    stdout_bytes: int
    stderr_bytes: int


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
    as_user: UserArgs | None = None,
) -> CommandResult:
    """Run `command` to its end or its deadline.

    Raises `OSError` when the command cannot start (e.g. no process slot is left), and
    `Cancelled` (after killing the command's process group) when `cancelled` is set while
    it runs. With `merge_stderr`, `output` holds stdout and stderr interleaved and
    `stderr` is empty. `as_user`: `Popen`'s user arguments (`identity.Users.popen_args`).
    """
    r = run_process(["/bin/sh", "-c", command], cwd, timeout_s, cancelled, merge_stderr=merge_stderr,
                    stdin_data=stdin_data, env=env, cap=cap, as_user=as_user)
    return CommandResult(r.exit_code, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace"),
                         r.timed_out, r.stdout_bytes)


def run_process(
    argv: list[str],
    cwd: Path,
    timeout_s: float,
    cancelled: threading.Event | None = None,
    *,
    merge_stderr: bool = False,
    stdin_data: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cap: int = OUTPUT_CAP,
    as_user: UserArgs | None = None,
) -> ProcessResult:
    """`run_command` for an argv, in bytes (the same errors)."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL if stdin_data is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        start_new_session=True,
        env=None if env is None else dict(env),
        **(as_user or {}),
    )
    captures = {proc.stdout: _Capture(cap)}
    if not merge_stderr:
        captures[proc.stderr] = _Capture(cap)
    deadline = time.monotonic() + timeout_s
    try:
        timed_out = _pump(proc, captures, stdin_data, deadline, cancelled)
        if not timed_out and proc.returncode is None:  # it closed its output but runs on
            timed_out = _wait(proc, deadline, cancelled)
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    out, err = captures[proc.stdout], captures.get(proc.stderr)
    return ProcessResult(proc.returncode, bytes(out.data), bytes(err.data) if err else b"", timed_out, out.total,
                         err.total if err else 0)


# `captures` is keyed by the command's open pipes, which Popen types as Optional
def _pump(proc: subprocess.Popen[bytes], captures: dict[Any, _Capture], stdin_data: bytes | None,
          deadline: float, cancelled: threading.Event | None) -> bool:
    """Feed stdin and read the output pipes until they close, or `_DRAIN_S` after the
    command exits. True if it was killed at `deadline`. Raises `Cancelled`."""
    with selectors.DefaultSelector() as sel:
        for stream in captures:
            os.set_blocking(stream.fileno(), False)
            sel.register(stream, selectors.EVENT_READ)
        pending = memoryview(stdin_data or b"")
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        exited_at = None
        while sel.get_map():
            now = time.monotonic()
            if cancelled is not None and cancelled.is_set():
                _kill(proc)
                raise Cancelled("cancelled while a command ran")
            if proc.returncode is None and now >= deadline:
                _kill(proc)
                return True
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at >= _DRAIN_S:
                break
            for key, _ in sel.select(_POLL_S):
                stream = key.fileobj
                if proc.stdin is not None and stream is proc.stdin:
                    pending = _feed(sel, proc.stdin, pending)
                    continue
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if chunk:
                    captures[stream].add(chunk)
                else:
                    sel.unregister(stream)
    return False


def _feed(sel: selectors.BaseSelector, pipe: IO[bytes], pending: memoryview) -> memoryview:
    """Write what the pipe takes now; close it when all is written or the command left."""
    try:
        pending = pending[os.write(pipe.fileno(), pending):] if pending else pending
    except BlockingIOError:
        return pending
    except OSError:  # the command closed its stdin (BrokenPipeError): it needs no more
        pending = pending[len(pending):]
    if not pending:
        sel.unregister(pipe)
        pipe.close()
    return pending


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
