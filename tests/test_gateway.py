"""The model gateway against a real HTTP endpoint on 127.0.0.1 (a test double of an
OpenAI-compatible provider) that throttles, fails and drops connections on a script."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

from eval_actors.gateway import RETRY_ATTEMPTS, GatewayCall, OpenAIGateway
from httpjson import QuietHandler
from proctor.policy import SafetyPolicy
from proctor.protocol import GenerateEvent
from proctor.spec import OpenAIModel


class _Flaky(QuietHandler):
    """Answers each request with the next step of `script`: an HTTP status (429 carries
    `Retry-After: 0`), "reset" (the connection is dropped with a TCP RST), or 200."""

    script: list[Any] = []
    seen = 0

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        step = type(self).script.pop(0) if type(self).script else 200
        type(self).seen += 1
        if step == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        if step == 200:
            self.reply({"choices": [{"message": {"role": "assistant", "content": "4"}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
            return
        data = b'{"error": "busy"}'
        self.send_response(step)
        if step == 429:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def endpoint() -> Iterator[str]:
    _Flaky.script, _Flaky.seen = [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def ask(endpoint: str, gateway: OpenAIGateway) -> Any:
    call = GatewayCall("ev-g", "s0", OpenAIModel(adapter="openai", model="m", base_url=endpoint), SafetyPolicy(),
                       GenerateEvent(seq=0, id="c1", messages=[{"role": "user", "content": "2+2?"}]))

    async def go() -> Any:
        try:
            return await gateway.generate(call)
        finally:
            await gateway.aclose()

    return asyncio.run(go())


def test_a_throttled_failing_or_dropped_call_is_asked_again_and_counts_once(endpoint: str) -> None:
    _Flaky.script = [429, 503, "reset"]
    gateway = OpenAIGateway(retry_wait_s=0.01)
    result = ask(endpoint, gateway)
    assert result.error is None and result.output == "4"
    assert _Flaky.seen == 4
    ledger = gateway.ledger("ev-g")
    assert (ledger.calls, ledger.input_tokens, ledger.output_tokens) == (1, 3, 1)


def test_when_the_endpoint_keeps_failing_the_gateway_gives_up_saying_how(endpoint: str) -> None:
    _Flaky.script = [502] * RETRY_ATTEMPTS
    result = ask(endpoint, OpenAIGateway(retry_wait_s=0.01))
    assert _Flaky.seen == RETRY_ATTEMPTS
    assert result.error is not None and result.error.startswith("endpoint answered 502 (after 4 failed attempts")

    _Flaky.script, _Flaky.seen = ["reset"] * RETRY_ATTEMPTS, 0
    result = ask(endpoint, OpenAIGateway(retry_wait_s=0.01))
    assert _Flaky.seen == RETRY_ATTEMPTS
    assert result.error is not None and result.error.startswith("model endpoint unreachable (after 4 failed attempts")


def test_a_client_error_is_not_asked_again(endpoint: str) -> None:
    _Flaky.script = [400, 200]
    result = ask(endpoint, OpenAIGateway(retry_wait_s=0.01))
    assert _Flaky.seen == 1 and result.error is not None and result.error.startswith("endpoint answered 400:")
