"""The harness's service mode: a long-lived sandbox that runs the requests it is sent.

`python -m proctor.harness --service` reads `service` (its defaults) and then requests
(`proctor.requests`): `exec`, `read_file`, `write_file`, each run once on a thread of its
own so that a long command does not hold up the rest, each answered by `chunk`s and one
`result`. Commands run as `tools.run_process` runs a tool command: in a new session
(a timeout kills its process group), stdin from the request or closed, output capped.
Files are read and written by a child process that has become the request's user, so
that the sandbox's own permissions decide (a harness holding CAP_DAC_OVERRIDE would
read anything). stdin's end or `cancel` ends the harness, after killing the processes of
every user it ran commands as.
"""

from __future__ import annotations

import base64
import os
import posixpath
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

from pydantic import BaseModel

from proctor.harness.channel import Channel, clip
from proctor.harness.filesio import read_as, write_as
from proctor.harness.identity import Identity, UnknownUser, Users, resolve
from proctor.harness.tools import run_process
from proctor.requests import (
    PIECE_BYTES,
    REPLAYED,
    ChunkEvent,
    DataPiece,
    ExecRequest,
    MAX_WRITE_BYTES,
    ReadFileRequest,
    RequestFailed,
    ResultEvent,
    ServiceStart,
    WriteFileRequest,
    decode_service,
)

# an answer to send: an event's model and its fields, kept to be sent again to a repeated request
Answer: TypeAlias = tuple[type[BaseModel], dict[str, Any]]

NO_TIMEOUT_S = 365 * 24 * 3600.0
WORKERS = 64
MAX_SEEN = 100_000
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class _Inbox:
    """A request's stdin or content as its `data` pieces arrive; bounded."""

    def __init__(self, limit: int):
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.error: str | None = None
        self.complete = threading.Event()

    def add(self, piece: DataPiece) -> None:
        try:
            data = base64.b64decode(piece.data, validate=True)
        except ValueError:
            self.error = "a data piece is not base64"
            data = b""
        self.size += len(data)
        if self.size > self.limit:
            self.error = f"more than {self.limit} bytes"
        elif self.error is None:
            self.parts.append(data)
        if piece.eof:
            self.complete.set()

    def wait(self) -> bytes:
        """All of it, once `eof` came (or stdin ended). Raises `RequestFailed`."""
        self.complete.wait()
        if self.error is not None:
            raise RequestFailed("too_large" if "more than" in self.error else "bad_request", self.error)
        return b"".join(self.parts)


class Service:
    def __init__(self, start: ServiceStart, channel: Channel, users: Users):
        self.start = start
        self.channel = channel
        self.users = users
        self.default_user = resolve(start.user)
        self.ran_as: set[Identity] = {self.default_user}
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="proctor-request")
        self.lock = threading.Lock()
        self.seen: OrderedDict[str, list[Answer] | None] = OrderedDict()
        self.inboxes: dict[str, _Inbox] = {}
        self.cancelled = threading.Event()

    # ------------------------------------------------------------ the loop

    def serve(self, stdin: BinaryIO) -> int:
        """Until stdin ends (what is in flight then still finishes and answers) or `cancel`
        comes (what is in flight is killed)."""
        cancelled = False
        try:
            for raw in iter(stdin.readline, b""):
                if raw.strip() and not self._receive(raw):
                    cancelled = True
                    break
        finally:
            if cancelled:
                self.cancelled.set()
            with self.lock:
                for inbox in self.inboxes.values():
                    if not inbox.complete.is_set():
                        inbox.error = "the channel closed before all of it came"
                        inbox.complete.set()
            self.pool.shutdown(wait=not cancelled, cancel_futures=cancelled)
            for identity in self.ran_as:
                if not identity.is_root:
                    self.users.kill_agent(identity)
        return 0

    def _receive(self, raw: bytes) -> bool:
        """Take one line; False when the service is to end."""
        try:
            message = decode_service(raw)
        except ValueError as exc:
            self.channel.log("warning", clip(f"ignored a line on stdin ({exc}): {raw[:200]!r}", 2000))
            return True
        if message.type == "cancel":
            return False
        if message.type == "data":
            with self.lock:
                inbox = self.inboxes.get(message.id)
            if inbox is not None:
                inbox.add(message)
            return True
        if message.type == "service":
            self.channel.log("warning", "ignored a second service message")
            return True
        with self.lock:
            if message.id in self.seen:  # a repeat: answered again, never run again
                kept = self.seen[message.id]
                if kept:
                    for kind, fields in kept:
                        self.channel.emit(kind, **fields)
                elif kept is not None:  # finished, its answer not kept (a file's content, or long ago)
                    self.channel.emit(ResultEvent, id=message.id, ok=False, error="duplicate",
                                      message=f"request {message.id} already ran; its result is no longer kept")
                return True  # still running: its answer comes once
            self.seen[message.id] = None
            while len(self.seen) > MAX_SEEN:
                self.seen.popitem(last=False)
            if isinstance(message, WriteFileRequest) or getattr(message, "input", False):
                self.inboxes[message.id] = _Inbox(MAX_WRITE_BYTES)
        self.pool.submit(self._run, message)
        return True

    def _run(self, message: ExecRequest | ReadFileRequest | WriteFileRequest) -> None:
        kept: list[Answer] = []
        try:
            if isinstance(message, ExecRequest):
                kept = self._exec(message)
            elif isinstance(message, ReadFileRequest):
                kept = self._read(message)  # its content is not kept: a repeat is refused as a duplicate
            elif isinstance(message, WriteFileRequest):
                kept = self._write(message)
        except RequestFailed as exc:
            kept = [(ResultEvent, dict(id=message.id, ok=False, error=exc.kind, message=clip(str(exc), 8000)))]
        except Exception as exc:  # noqa: BLE001 - every request gets its answer
            kept = [(ResultEvent, dict(id=message.id, ok=False, error="failed",
                                       message=clip(f"{type(exc).__name__}: {exc}", 8000)))]
        with self.lock:  # kept before it is sent: a repeat that comes after the answer gets it again
            self.inboxes.pop(message.id, None)
            if message.id in self.seen:
                small = sum(len(f.get("data", "")) for _, f in kept) <= 16 * 1024**2
                self.seen[message.id] = kept if small and not isinstance(message, ReadFileRequest) else []
            for old in [k for k, v in self.seen.items() if v][:-REPLAYED]:
                self.seen[old] = []
        for kind, fields in kept:
            self.channel.emit(kind, **fields)

    # ------------------------------------------------------------ requests

    def _identity(self, user: str | None) -> Identity:
        if user is None:
            return self.default_user
        try:
            identity = resolve(user)
        except UnknownUser as exc:
            raise RequestFailed("unknown_user", str(exc)) from None
        self.ran_as.add(identity)
        return identity

    def _path(self, path: str, cwd: str | None = None) -> str:
        if "\0" in path:
            raise RequestFailed("bad_request", "a path with a NUL character")
        return posixpath.normpath(posixpath.join(cwd or self.start.cwd, path))

    def _exec(self, req: ExecRequest) -> list[Answer]:
        identity = self._identity(req.user)
        stdin = self.inboxes[req.id].wait() if req.input else None
        cwd = self._path(req.cwd) if req.cwd else self.start.cwd
        env = {"PATH": DEFAULT_PATH, "HOME": self.start.cwd, "LANG": "C.UTF-8", **self.start.env, **req.env}
        if not os.path.isdir(cwd):
            return [(ResultEvent, dict(id=req.id, ok=True, returncode=126,
                                       message=f"the working folder {cwd} does not exist"))]
        try:
            r = run_process(req.argv, Path(cwd), req.timeout_s or NO_TIMEOUT_S, self.cancelled, stdin_data=stdin,
                            env=env, cap=req.output_limit, as_user=self.users.popen_args(identity))
        except PermissionError as exc:
            raise RequestFailed("permission", f"cannot run {req.argv[0]}: {exc}") from None
        except (FileNotFoundError, NotADirectoryError) as exc:
            return [(ResultEvent, dict(id=req.id, ok=True, returncode=127, message=clip(str(exc), 8000)))]
        except OSError as exc:
            raise RequestFailed("failed", f"the command could not start: {exc}") from None
        kept: list[Answer] = []
        for stream, data in (("stdout", r.stdout), ("stderr", r.stderr)):
            for at in range(0, len(data), PIECE_BYTES):
                kept.append((ChunkEvent, dict(id=req.id, stream=stream,
                                              data=base64.b64encode(data[at:at + PIECE_BYTES]).decode())))
        kept.append((ResultEvent, dict(id=req.id, ok=True, returncode=r.exit_code, timed_out=r.timed_out,
                                       stdout_bytes=r.stdout_bytes, stderr_bytes=r.stderr_bytes)))
        return kept

    def _read(self, req: ReadFileRequest) -> list[Answer]:
        """Streams the content in `chunk`s as it is read; returns the `result`."""
        identity = self._identity(None)
        path = self._path(req.path)

        def piece(data: bytes) -> None:
            self.channel.emit(ChunkEvent, id=req.id, stream="file", data=base64.b64encode(data).decode())

        size = read_as(self.users.popen_args(identity), path, req.limit, piece, PIECE_BYTES)
        return [(ResultEvent, dict(id=req.id, ok=True, size=size))]

    def _write(self, req: WriteFileRequest) -> list[Answer]:
        identity = self._identity(None)
        content = self.inboxes[req.id].wait()
        path = self._path(req.path)
        write_as(self.users.popen_args(identity), path, content)
        return [(ResultEvent, dict(id=req.id, ok=True, size=len(content)))]


def serve(start: ServiceStart, channel: Channel, stdin: BinaryIO, sandboxed: bool) -> int:
    """Serve requests until stdin ends or `cancel` comes."""
    users = Users(sandboxed)
    try:
        service = Service(start, channel, users)
    except UnknownUser as exc:
        channel.log("error", f"service: {exc}")
        return 2
    workdir = Path(start.cwd)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if workdir.resolve() == Path("/workspace") and not service.default_user.is_root:
            users.give(workdir, service.default_user)
    except OSError as exc:
        channel.log("warning", f"working folder {workdir}: {exc}")
    channel.log("info", f"service ready: user {service.default_user.name}, working folder {start.cwd}")
    return service.serve(stdin)
