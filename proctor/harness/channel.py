"""The harness's end of the runner protocol: events out on stdout, messages in on stdin.

`Channel` numbers events under one lock (the run loop and the stdin reader thread both
write), keeps every event inside the protocol's limits (`fit_line`), hands each
`generate_result` to the thread waiting for it, and turns `cancel` into a flag that the
run loop checks between steps. `done` is written once; whatever comes after is dropped.

Each line goes out whole, in as many `write`s as the pipe takes (`_write_all`): in gVisor a
large write to the channel can be taken only in part, and Python's buffered writer then
lost the rest (a 200 KB sample event arrived cut at 64 KiB).

A cancel must end the harness within about a second. The run loop notices the flag
within 50 ms wherever it waits (a model call, a shell command); if it is stuck in code
that never looks (a Python policy busy in a loop), a watchdog writes `done` itself after
`grace_s` and calls `hard_exit`.
"""

from __future__ import annotations

import io
import os
import select
import threading
import time
from typing import Any, BinaryIO, Callable

from pydantic import BaseModel

from proctor.protocol import (
    MAX_LINE_BYTES,
    DoneEvent,
    GenerateEvent,
    GenerateResult,
    LogEvent,
    decode_in,
    encode,
)

TEXT_LIMIT = 256 * 1024


class Cancelled(Exception):
    """The supervisor sent `cancel`. Raised wherever the run loop waits; `runner` catches
    it and ends the shard with `done` status cancelled."""


class ChannelClosed(RuntimeError):
    """stdin ended while a model call waited for its `generate_result`. Caught by the run
    loop as that sample's error."""


def _fileno(out: BinaryIO) -> int | None:
    try:
        return out.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def clip(text: str, limit: int = TEXT_LIMIT) -> str:
    """`text` cut to at most `limit` characters, keeping its head and tail."""
    if len(text) <= limit:
        return text
    marker = f"\n[... {len(text) - limit} characters cut ...]\n"
    if limit <= len(marker) + 2:
        return text[:limit]
    marker = f"\n[... {len(text) - limit + len(marker)} characters cut ...]\n"
    keep = limit - len(marker)
    head = keep // 2
    return text[:head] + marker + text[len(text) - (keep - head):]


def _cap_strings(data: object, limit: int) -> object:
    if isinstance(data, str):
        return clip(data, limit)
    if isinstance(data, dict):
        return {k: _cap_strings(v, limit) for k, v in data.items()}
    if isinstance(data, list):
        return [_cap_strings(v, limit) for v in data]
    return data


def _longest_string(data: object) -> int:
    if isinstance(data, str):
        return len(data)
    if isinstance(data, dict):
        return max((_longest_string(v) for v in data.values()), default=0)
    if isinstance(data, list):
        return max((_longest_string(v) for v in data), default=0)
    return 0


def fit_line(event: BaseModel, max_bytes: int = MAX_LINE_BYTES) -> bytes:
    """The event's protocol line, its longest strings cut until it fits in `max_bytes`
    (escaping can make 256 KiB of text several times longer in JSON)."""
    line = encode(event)
    if len(line) <= max_bytes:
        return line
    data: object = event.model_dump()
    limit = _longest_string(data)
    while len(line) > max_bytes and limit > 64:
        limit //= 2
        data = _cap_strings(data, limit)
        line = encode(type(event).model_validate(data))
    return line


class _Waiter:
    def __init__(self) -> None:
        self.ready = threading.Event()
        self.result: GenerateResult | None = None


class Channel:
    """Protocol I/O of one harness process. Thread-safe."""

    def __init__(
        self,
        out: BinaryIO,
        first_seq: int = 0,
        grace_s: float = 0.8,
        hard_exit: Callable[[int], None] | None = None,
    ):
        self._out = out
        self._fd = _fileno(out)
        self._lock = threading.Lock()
        self._seq = first_seq
        self._done = False
        self._waiters: dict[str, _Waiter] = {}
        self._waiters_lock = threading.Lock()
        self._closed = False
        self._grace_s = grace_s
        self._hard_exit = hard_exit
        self.cancelled = threading.Event()
        self.cancel_reason = "cancelled"
        self._watchdog_lock = threading.Lock()
        self._watchdog_armed = False

    # ------------------------------------------------------------ out

    def emit(self, event_type: type[BaseModel], **fields: Any) -> bool:  # fields: of `event_type`, which checks them
        """Write one event with the next seq. False (and nothing written) after `done`."""
        with self._lock:
            if self._done:
                return False
            event = event_type(seq=self._seq, **fields)
            self._write_all(fit_line(event))
            self._seq += 1
            if event_type is DoneEvent:
                self._done = True
            return True

    def _write_all(self, data: bytes) -> None:
        """Write all of `data`: the stream's own buffer first (keeping the order), then the
        line straight to its file descriptor, however many writes that takes."""
        self._out.flush()
        if self._fd is None:
            self._out.write(data)
            self._out.flush()
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:
                select.select([], [self._fd], [], 1.0)

    def log(self, level: str, message: str) -> None:
        self.emit(LogEvent, level=level, message=clip(message))

    def done(self, status: str, error: str | None = None, samples: int = 0) -> bool:
        """The last event. True if this call wrote it."""
        return self.emit(DoneEvent, status=status, error=None if error is None else clip(error), samples=samples)

    @property
    def finished(self) -> bool:
        return self._done

    def check_cancelled(self) -> None:
        """Raises `Cancelled` once the supervisor has sent `cancel`."""
        if self.cancelled.is_set():
            raise Cancelled(self.cancel_reason)

    # ------------------------------------------------------------ model calls

    def request(self, call_id: str, **fields: Any) -> GenerateResult:  # fields: of a GenerateEvent
        """Emit a `generate` event and block until its `generate_result` arrives.

        Raises `Cancelled` on cancel and `ChannelClosed` if stdin ends first.
        """
        waiter = _Waiter()
        with self._waiters_lock:
            if self._closed:
                raise ChannelClosed("stdin is closed; no generate_result can arrive")
            self._waiters[call_id] = waiter
        try:
            self.check_cancelled()
            self.emit(GenerateEvent, id=call_id, **fields)
            waiter.ready.wait()
        finally:
            with self._waiters_lock:
                self._waiters.pop(call_id, None)
        self.check_cancelled()
        if waiter.result is None:
            raise ChannelClosed(f"stdin closed before the generate_result for {call_id!r} arrived")
        return waiter.result

    # ------------------------------------------------------------ in

    def start_reader(self, stream: BinaryIO) -> threading.Thread:
        """Read the messages after `shard` from `stream` on a daemon thread, and arm the
        cancel watchdog on another. Both start now, before anything of the shard runs: a
        sandbox whose processes later take every slot of its pids limit cannot keep the
        harness from its threads."""
        self._arm_watchdog()
        thread = threading.Thread(target=self._read, args=(stream,), name="proctor-stdin", daemon=True)
        thread.start()
        return thread

    def _read(self, stream: BinaryIO) -> None:
        try:
            for raw in iter(stream.readline, b""):
                if raw.strip():
                    self._receive(raw)
        except (OSError, ValueError) as exc:
            self.log("warning", f"stopped reading stdin: {exc}")
        finally:
            self._close()

    def _receive(self, raw: bytes) -> None:
        try:
            message = decode_in(raw)
        except Exception as exc:  # noqa: BLE001 - a bad line must never stop the reader
            self.log("warning", f"ignored a line on stdin ({exc}): {raw[:200].decode('utf-8', 'replace')!r}")
            return
        if message.type == "generate_result":
            with self._waiters_lock:
                waiter = self._waiters.get(message.id)
            if waiter is None:
                self.log("warning", f"ignored a generate_result for unknown call {message.id[:128]!r}")
                return
            waiter.result = message
            waiter.ready.set()
        elif message.type == "cancel":
            self.cancel(message.reason)
        else:
            self.log("warning", "ignored a second shard message; a harness runs one shard")

    def cancel(self, reason: str) -> None:
        """Set the cancel flag, wake every waiting model call, and arm the watchdog."""
        if self.cancelled.is_set():
            return
        self.cancel_reason = reason or "cancelled"
        self.cancelled.set()
        self._wake_all()
        self._arm_watchdog()

    def _arm_watchdog(self) -> None:
        """Start the thread that ends the shard `grace_s` after a cancel (once)."""
        with self._watchdog_lock:
            if self._watchdog_armed:
                return
            self._watchdog_armed = True
        threading.Thread(target=self._watchdog, name="proctor-cancel-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        self.cancelled.wait()
        time.sleep(self._grace_s)
        if self.done("cancelled", error=self.cancel_reason) and self._hard_exit is not None:
            self._hard_exit(0)

    def _close(self) -> None:
        with self._waiters_lock:
            self._closed = True
        self._wake_all()

    def _wake_all(self) -> None:
        with self._waiters_lock:
            waiters = list(self._waiters.values())
        for waiter in waiters:
            waiter.ready.set()
