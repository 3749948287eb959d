"""Test doubles of two provider APIs on 127.0.0.1: OpenAI chat completions and Anthropic
messages. No real provider can be reached from a test; these answer in the providers'
shapes (with usage), record every request (its headers and body), and answer `answers`
in turn (a text, or a dict naming a tool call: {"tool": "bash", "args": {...}}), then
`default`."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class ProviderDouble:
    """Both APIs on one port: `{url}/v1/chat/completions` and `{url}/v1/messages`."""

    def __init__(self, key: str = "sk-double-secret-key") -> None:
        self.key = key
        self.requests: list[dict[str, Any]] = []
        self.answers: list[Any] = []
        self.default = "the double's answer"
        self.usage = (11, 7)
        app = Starlette(routes=[Route("/v1/chat/completions", self._openai, methods=["POST"]),
                                Route("/v1/messages", self._anthropic, methods=["POST"])])
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)

    def _next(self) -> Any:
        return self.answers.pop(0) if self.answers else self.default

    async def _openai(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append({"api": "openai", "headers": dict(request.headers), "body": body})
        if request.headers.get("authorization") != f"Bearer {self.key}":
            return JSONResponse({"error": {"message": f"bad key {request.headers.get('authorization')}",
                                           "type": "authentication_error"}}, status_code=401)
        answer = self._next()
        message: dict[str, Any] = {"role": "assistant", "content": answer if isinstance(answer, str) else None}
        if isinstance(answer, dict):
            import json

            message["tool_calls"] = [{"id": "call_1", "type": "function", "function": {
                "name": answer["tool"], "arguments": json.dumps(answer["args"])}}]
        return JSONResponse({
            "id": "chatcmpl-double", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if isinstance(answer, dict) else "stop"}],
            "usage": {"prompt_tokens": self.usage[0], "completion_tokens": self.usage[1],
                      "total_tokens": sum(self.usage)}})

    async def _anthropic(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append({"api": "anthropic", "headers": dict(request.headers), "body": body})
        if request.headers.get("x-api-key") != self.key:
            return JSONResponse({"type": "error", "error": {"type": "authentication_error",
                                                            "message": "bad key"}}, status_code=401)
        answer = self._next()
        content = ([{"type": "text", "text": answer}] if isinstance(answer, str) else
                   [{"type": "tool_use", "id": "toolu_1", "name": answer["tool"], "input": answer["args"]}])
        return JSONResponse({
            "id": "msg_double", "type": "message", "role": "assistant", "model": body["model"], "content": content,
            "stop_reason": "end_turn" if isinstance(answer, str) else "tool_use", "stop_sequence": None,
            "usage": {"input_tokens": self.usage[0], "output_tokens": self.usage[1]}})
