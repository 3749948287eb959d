"""Streamed answers of the model gateway, in each provider's server-sent events.

The gateway never streams what it has not checked: it asks upstream for the whole answer
(without `stream`), meters it and applies the limits and the safety rules to all of it,
and only then plays the answer back as the stream the caller asked for. A held answer is
refused before the first event, as a non-streamed one is.

    OpenAI chat completions   `data: {chat.completion.chunk}` lines and `data: [DONE]`; the
                              usage in a last chunk with no choices when the request's
                              `stream_options.include_usage` is set
    Anthropic messages        `message_start`, per content block `content_block_start` /
                              `content_block_delta` / `content_block_stop`, `message_delta`
                              (stop reason, output tokens) and `message_stop`
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from starlette.responses import StreamingResponse

PIECE = 256  # characters of text per delta event


def stream_request(body: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """The request to send upstream (whole, not streamed), whether the caller asked for a
    stream, and (OpenAI) whether it asked for the usage in the stream."""
    if not body.get("stream"):
        return body, False, False
    options = body.get("stream_options")
    usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    upstream = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    return upstream, True, usage


def sse(events: Iterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


def _pieces(text: str) -> list[str]:
    return [text[i: i + PIECE] for i in range(0, len(text), PIECE)]


def _data(item: Any) -> bytes:
    return b"data: " + json.dumps(item, separators=(",", ":")).encode() + b"\n\n"


def openai_events(data: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """A whole chat completion `data` as the chunks OpenAI streams."""
    head = {"id": data.get("id", "chatcmpl-proctor"), "object": "chat.completion.chunk",
            "created": data.get("created", 0), "model": data.get("model", ""),
            "system_fingerprint": data.get("system_fingerprint")}
    if include_usage:
        head["usage"] = None

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _data({**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                           "finish_reason": finish}]})

    for choice in data["choices"]:
        index, message = choice.get("index", 0), choice["message"]
        yield chunk(index, {"role": message.get("role", "assistant"), "content": ""})
        for piece in _pieces(str(message.get("content") or "")):
            yield chunk(index, {"content": piece})
        if message.get("refusal"):
            yield chunk(index, {"refusal": str(message["refusal"])})
        for n, call in enumerate(message.get("tool_calls") or []):
            function = call.get("function") or {}
            yield chunk(index, {"tool_calls": [{"index": n, "id": call.get("id"), "type": call.get("type", "function"),
                                                "function": {"name": function.get("name"),
                                                             "arguments": function.get("arguments", "")}}]})
        yield chunk(index, {}, choice.get("finish_reason") or "stop")
    if include_usage:
        yield _data({**head, "choices": [], "usage": data.get("usage")})
    yield b"data: [DONE]\n\n"


def _event(kind: str, item: dict[str, Any]) -> bytes:
    return f"event: {kind}\n".encode() + _data({"type": kind, **item})


def anthropic_events(data: dict[str, Any]) -> Iterator[bytes]:
    """A whole message `data` as the events Anthropic streams."""
    usage = dict(data.get("usage") or {})
    output_tokens = int(usage.get("output_tokens", 0))
    message = {k: v for k, v in data.items() if k not in ("content", "stop_reason", "stop_sequence", "usage")}
    yield _event("message_start", {"message": {**message, "content": [], "stop_reason": None, "stop_sequence": None,
                                               "usage": {**usage, "output_tokens": 0}}})
    for index, block in enumerate(data.get("content") or []):
        kind = block.get("type")
        if kind == "text":
            yield _event("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
            for piece in _pieces(str(block.get("text", ""))):
                yield _event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": piece}})
        elif kind in ("tool_use", "server_tool_use"):
            yield _event("content_block_start", {"index": index, "content_block": {**block, "input": {}}})
            yield _event("content_block_delta", {"index": index, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(block.get("input", {}))}})
        elif kind == "thinking":
            yield _event("content_block_start", {"index": index, "content_block": {
                "type": "thinking", "thinking": "", "signature": ""}})
            for piece in _pieces(str(block.get("thinking", ""))):
                yield _event("content_block_delta", {"index": index, "delta": {"type": "thinking_delta",
                                                                                "thinking": piece}})
            if block.get("signature"):
                yield _event("content_block_delta", {"index": index, "delta": {
                    "type": "signature_delta", "signature": block["signature"]}})
        else:  # redacted thinking, tool results, ...: whole in their start event
            yield _event("content_block_start", {"index": index, "content_block": block})
        yield _event("content_block_stop", {"index": index})
    yield _event("message_delta", {"delta": {"stop_reason": data.get("stop_reason"),
                                             "stop_sequence": data.get("stop_sequence")},
                                   "usage": {"output_tokens": output_tokens}})
    yield _event("message_stop", {})
