"""The double's `attach` subresource: an upgraded connection speaking v4.channel.k8s.io
(one leading byte per message: 0 stdin, 1 stdout, 2 stderr, 3 status), framed by the
`websockets` sans-I/O protocol on the handler's own socket."""

from __future__ import annotations

import base64
import hashlib
import json
import select
import socket
import ssl
import threading
import time
from typing import Any

from websockets.frames import Opcode
from websockets.protocol import Protocol, Side, State

PROTOCOL = "v4.channel.k8s.io"
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUCCESS = {"metadata": {}, "status": "Success"}
SEND_TIMEOUT_S = 30.0


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


class AttachSession:
    """stdin from the client into the container; its stdout/stderr out (from pump threads)."""

    def __init__(self, sock: socket.socket, container: Any, stdin_once: bool):
        self.sock = sock
        self.container = container
        self.stdin_once = stdin_once
        self.proto = Protocol(Side.SERVER, state=State.OPEN, max_size=None)
        self.lock = threading.Lock()
        self.finished = False

    def _flush(self) -> None:
        for data in self.proto.data_to_send():
            if data:
                self._send_all(data)
            else:
                self.sock.shutdown(socket.SHUT_WR)

    def _send_all(self, data: bytes) -> None:
        """Everything, however slowly the client reads, up to `SEND_TIMEOUT_S` without any
        progress (the socket's own 0.5 s timeout is the reader's poll, not a verdict on a
        busy client: sendall would give up, and the stream with it, mid-message)."""
        view = memoryview(data)
        give_up = time.monotonic() + SEND_TIMEOUT_S
        while view:
            try:
                sent = self.sock.send(view)
            except (socket.timeout, ssl.SSLWantWriteError):
                if time.monotonic() > give_up:
                    raise
                continue
            view = view[sent:]
            give_up = time.monotonic() + SEND_TIMEOUT_S

    def send(self, channel: int, data: bytes) -> None:
        with self.lock:
            if self.finished or self.proto.state is not State.OPEN:
                return
            try:
                self.proto.send_binary(bytes([channel]) + data)
                self._flush()
            except OSError:
                self.finished = True

    def finish(self, status: dict[str, Any] = SUCCESS) -> None:
        """The container ended: its status on channel 3, then a normal close."""
        with self.lock:
            if self.finished or self.proto.state is not State.OPEN:
                return
            self.finished = True
            try:
                self.proto.send_binary(b"\x03" + json.dumps(status).encode())
                self.proto.send_close(1000)
                self._flush()
            except OSError:
                pass

    def _pending(self) -> bool:
        """Decrypted bytes already buffered in the TLS layer (select cannot see them)."""
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0

    def serve(self) -> None:
        """Read the client's messages until it or the container goes (on the handler thread)."""
        self.sock.settimeout(0.5)
        waited = 0
        try:
            while self.proto.state is not State.CLOSED:
                # An SSL socket is not safe to read on one thread while another writes
                # (the pump threads' sends): wait for data outside the lock, read under it.
                with self.lock:
                    pending = self._pending()
                ready = pending or select.select([self.sock], [], [], 0.5)[0]
                if not ready:
                    waited += self.finished
                    if waited > 4:  # the client never answered our close
                        break
                    continue
                with self.lock:
                    try:
                        data = self.sock.recv(65536)
                    except (socket.timeout, ssl.SSLWantReadError):
                        continue  # a partial TLS record: the rest comes later
                    if data:
                        self.proto.receive_data(data)
                    else:
                        self.proto.receive_eof()
                    events = self.proto.events_received()
                    self._flush()
                for frame in events:
                    if frame.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT) and frame.data[:1] == b"\x00":
                        self._stdin(bytes(frame.data[1:]))
                if not data:
                    break
        except OSError:
            pass
        finally:
            self.finished = True
            if self.container.session is self:
                self.container.session = None
            if self.stdin_once:
                self._close_stdin()

    def _stdin(self, data: bytes) -> None:
        stdin = self.container.proc.stdin
        if stdin is None or self.container.stdin_closed:
            return
        try:
            stdin.write(data)
            stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def _close_stdin(self) -> None:
        self.container.stdin_closed = True
        try:
            self.container.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
