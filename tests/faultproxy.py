"""A real TCP proxy that injects faults, for tests and benchmarks: put it in front of a
server (moto's S3 server, PostgreSQL) and switch its mode while clients talk through it.

    with FaultProxy(("127.0.0.1", s3.port)) as proxy:   # clients use proxy.endpoint
        proxy.set_mode("refuse")    # connections refused; open ones are reset
        proxy.set_mode("reset")     # connections accepted, then reset at once
        proxy.set_mode("stall")     # connections accepted, nothing goes through
        proxy.set_mode("pass")      # a healthy link again

`outage(seconds, mode)` is one of these for a while, on a timer thread. Every mode
change resets (or, for `stall`, freezes) the connections already open, as a server that
goes away does. Counters say what it did (`accepted`, `refused`, `reset`).
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from types import TracebackType
from typing import Literal

Mode = Literal["pass", "refuse", "reset", "stall"]


class FaultProxy:
    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.port = 0
        self.mode: Mode = "pass"
        self.accepted = self.refused = self.reset = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._listen()
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def set_mode(self, mode: Mode) -> None:
        with self._lock:
            previous, self.mode = self.mode, mode
            if mode in ("refuse", "reset"):
                for conn in list(self._conns):
                    _reset(conn)
                    self.reset += 1
                self._conns.clear()
            if mode == "refuse" and self._listener is not None:
                self._listener.close()
                self._listener = None
        if previous == "refuse" and mode != "refuse":
            self._listen()

    def outage(self, seconds: float, mode: Mode = "refuse") -> threading.Thread:
        """`mode` now, `pass` again after `seconds` (on a timer thread, returned)."""
        self.set_mode(mode)
        timer = threading.Timer(seconds, self.set_mode, args=("pass",))
        timer.daemon = True
        timer.start()
        return timer

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for conn in list(self._conns):
                _reset(conn)
            self._conns.clear()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------ internals

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:
            try:
                sock.bind((self.host, self.port))
                break
            except OSError:  # the port lingers a moment after a refuse
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.listen(128)
        sock.settimeout(0.1)
        self.port = sock.getsockname()[1]
        with self._lock:
            self._listener = sock

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            listener = self._listener
            if listener is None:
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                mode = self.mode
                self.accepted += 1
                if mode in ("refuse", "reset"):
                    self.reset += 1
                    _reset(client)
                    continue
                self._conns.add(client)
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            self._drop(client)
            return
        with self._lock:
            self._conns.add(upstream)
        pair = {client: upstream, upstream: client}
        try:
            while not self._stopped.is_set():
                if client not in self._conns or upstream not in self._conns:
                    return
                if self.mode == "stall":
                    time.sleep(0.05)
                    continue
                try:
                    ready, _, _ = select.select(list(pair), [], [], 0.1)
                    for sock in ready:
                        data = sock.recv(65536)
                        if not data:
                            return
                        if self.mode != "pass":
                            break
                        pair[sock].sendall(data)
                except (OSError, ValueError):
                    return
        finally:
            self._drop(client)
            self._drop(upstream)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.discard(sock)
        try:
            sock.close()
        except OSError:
            pass


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (linger 0), as a server that crashed."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
