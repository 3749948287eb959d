"""A pod's attached stdin/stdout/stderr: the sandbox's one channel, through the API server.

The `attach` subresource over a WebSocket speaking `v4.channel.k8s.io`: every binary
message starts with one byte naming its stream — 0 stdin (to the pod), 1 stdout, 2 stderr,
3 the kubelet's final status (JSON) — and the rest is that stream's bytes. The pod has no
network of its own; this connection goes from Proctor to the API server, which relays it
to the kubelet. Authentication is the client configuration's: a bearer token (refreshed by
its hook, e.g. an exec plugin's or the service account's), client certificates and the
cluster's CA.

Raises `SandboxError` when the stream cannot be opened (the API server's status message
included); once open, a broken stream simply ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

from kubernetes import client
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from proctor.jsontypes import JsonObject

from .base import SandboxError

log = logging.getLogger("proctor.kubernetes")
PROTOCOL = Subprotocol("v4.channel.k8s.io")
STDIN, STDOUT, STDERR, STATUS = 0, 1, 2, 3
FRAME_BYTES = 256 * 1024  # stdin goes out in messages of at most this size


def attach_url(cfg: client.Configuration, namespace: str, pod: str, container: str) -> str:
    query = urlencode({"container": container, "stdin": "true", "stdout": "true", "stderr": "true", "tty": "false"})
    base = cfg.host.rstrip("/")
    scheme, _, rest = base.partition("://")
    ws = {"https": "wss", "http": "ws"}.get(scheme, scheme)
    return f"{ws}://{rest}/api/v1/namespaces/{namespace}/pods/{pod}/attach?{query}"


def tls_context(cfg: client.Configuration) -> ssl.SSLContext | None:
    if not cfg.host.startswith("https"):
        return None
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
    if getattr(cfg, "ca_cert_data", None):
        ctx.load_verify_locations(cadata=cfg.ca_cert_data)
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    if not cfg.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def auth_headers(cfg: client.Configuration) -> dict[str, str]:
    token = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
    if token:
        return {"Authorization": token}
    if cfg.username:
        basic = cfg.get_basic_auth_token()
        if basic is not None:  # always, with a user name
            return {"Authorization": basic}
    return {}


class AttachRefused(SandboxError):
    """The API server answered the attach request with an HTTP error (`status`). Caught by
    the pod sandbox, which retries it like an API call when the status says that may help."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class PodChannel:
    """One open attach stream. `write` sends stdin; `frames` yields (stream, bytes)."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.status: JsonObject | None = None
        self._writing = asyncio.Lock()  # a line goes in several messages: one writer at a time

    @classmethod
    async def open(cls, cfg: client.Configuration, namespace: str, pod: str, container: str,
                   timeout_s: float = 30.0) -> "PodChannel":
        url = attach_url(cfg, namespace, pod, container)
        extra: dict[str, Any] = {}  # for connect()'s **kwargs (its own are typed one by one): ssl, server_hostname
        ctx = tls_context(cfg)
        if ctx is not None:
            extra["ssl"] = ctx
            if cfg.tls_server_name:
                extra["server_hostname"] = cfg.tls_server_name
        try:
            ws = await connect(
                url, subprotocols=[PROTOCOL], additional_headers=auth_headers(cfg), compression=None,
                proxy=cfg.proxy or None, open_timeout=timeout_s, ping_interval=20, ping_timeout=60,
                close_timeout=1, max_size=8 * 1024**2, user_agent_header="proctor", **extra,
            )
        except InvalidStatus as exc:
            raise AttachRefused(f"kubernetes API: attach pod/{pod}: {_status_text(exc)}",
                                exc.response.status_code) from exc
        except (InvalidHandshake, OSError, asyncio.TimeoutError) as exc:
            raise SandboxError(f"kubernetes API: attach pod/{pod}: {type(exc).__name__}: {exc}") from exc
        if ws.subprotocol != PROTOCOL:
            await ws.close()
            raise SandboxError(f"kubernetes API: attach pod/{pod}: the server does not speak {PROTOCOL}")
        return cls(ws)

    async def write(self, data: bytes) -> bool:
        """Send `data` to the pod's stdin; False once the stream is closed."""
        async with self._writing:
            try:
                for i in range(0, max(len(data), 1), FRAME_BYTES):
                    await self.ws.send(bytes([STDIN]) + data[i:i + FRAME_BYTES])
            except ConnectionClosed:
                return False
        return True

    async def frames(self) -> AsyncIterator[tuple[int, bytes]]:
        """(stream, bytes) of stdout, stderr and status until the stream closes."""
        try:
            async for message in self.ws:
                data = message.encode() if isinstance(message, str) else message
                if not data:
                    continue
                if data[0] == STATUS:
                    try:
                        self.status = json.loads(data[1:] or b"{}")
                    except ValueError:
                        self.status = {"status": "Failure", "message": data[1:200].decode("utf-8", "replace")}
                    continue
                yield data[0], data[1:]
        except ConnectionClosed as exc:
            log.info("attach stream closed: %s", exc)  # e.g. a keepalive ping that got no answer
            return

    async def close(self) -> None:
        await self.ws.close()


def _status_text(exc: InvalidStatus) -> str:
    response = exc.response
    message = ""
    try:
        message = json.loads(response.body or b"{}").get("message", "")
    except (ValueError, AttributeError):
        message = (response.body or b"")[:300].decode("utf-8", "replace")
    return f"{response.status_code} {message or response.reason_phrase}"
