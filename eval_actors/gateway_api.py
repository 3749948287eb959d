"""The model gateway over HTTP, in the providers' own APIs, for Inspect workers.

An Inspect worker holds no provider key. Its provider base URLs point here:

    {url}/openai/v1/chat/completions      OpenAI-compatible chat completions
    {url}/anthropic/v1/messages           the Anthropic messages API

and its "API key" is the shard's grant token, which names the evaluation, the shard, the
upstream (base URL and the environment variable of the real key, read here) and the
limits. Each call is checked against the evaluation's usage limits before it is made
(the `ModelGateway`'s ledgers, shared with native shards), forwarded with the real key,
metered from the answer's usage, and its answer (text and tool calls) checked against the
safety rules: a held answer never reaches the worker, and a `stop` rule stops the shard
through its grant's guard. A streamed call (`stream: true`) is answered whole by upstream,
checked the same way, and only then streamed out (`gateway_stream`). What
cannot change on a retry (a limit reached, no key, a held answer) is answered 403, which the
providers' clients do not retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proctor.inspect_spec import InspectModel
from proctor.observability import REDACT
from proctor.policy import SafetyPolicy
from safety.guard import SafetyGuard

from .gateway import ModelGateway, UsageLedger
from .gateway_stream import anthropic_events, openai_events, sse, stream_request

log = logging.getLogger("proctor.gateway")

MAX_BODY = 8 * 1024**2


@dataclass
class GrantUsage(UsageLedger):
    """What one grant (one shard attempt) used; `held`: answers the safety rules held back."""

    held: int = 0


@dataclass
class Grant:
    """One shard attempt's right to call its model through the gateway."""

    token: str
    eval_id: str
    shard_id: str
    model: InspectModel
    limits: SafetyPolicy
    guard: SafetyGuard | None = None
    usage: GrantUsage = field(default_factory=GrantUsage)


class GatewayServer:
    """Serves the provider APIs on 127.0.0.1 for the Inspect workers of one supervisor."""

    def __init__(self, gateway: ModelGateway, timeout_s: float = 120.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.gateway = gateway
        self.grants: dict[str, Grant] = {}
        self.http = httpx.AsyncClient(timeout=timeout_s, transport=transport)
        self.url: str | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.app = Starlette(routes=[
            Route("/openai/v1/chat/completions", self._openai, methods=["POST"]),
            Route("/anthropic/v1/messages", self._anthropic, methods=["POST"]),
        ])

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        """Listen on a free port of 127.0.0.1 (once); returns the base URL."""
        if self.url is not None:
            return self.url
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait({self._task}, timeout=5)
        self._server = self._task = self.url = None
        await self.http.aclose()

    def admit(self, eval_id: str, shard_id: str, model: InspectModel, limits: SafetyPolicy,
              guard: SafetyGuard | None = None) -> Grant:
        grant = Grant(f"proctor-{secrets.token_urlsafe(24)}", eval_id, shard_id, model, limits, guard)
        self.grants[grant.token] = grant
        return grant

    def revoke(self, grant: Grant) -> None:
        self.grants.pop(grant.token, None)

    def environment(self, grant: Grant) -> dict[str, str]:
        """The worker's environment for its provider: base URLs here, the grant as the key."""
        assert self.url is not None, "start() the gateway first"
        return {"OPENAI_BASE_URL": f"{self.url}/openai/v1", "OPENAI_API_KEY": grant.token,
                "ANTHROPIC_BASE_URL": f"{self.url}/anthropic", "ANTHROPIC_API_KEY": grant.token}

    # ------------------------------------------------------------ the two APIs

    async def _openai(self, request: Request) -> Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return await self._call(request, token, "openai", _openai_error, _openai_answer,
                                lambda up: (f"{up}/chat/completions", {}), "Authorization", "Bearer ",
                                lambda data, usage: sse(openai_events(data, usage)))

    async def _anthropic(self, request: Request) -> Response:
        # Anthropic's clients send the key as x-api-key, or (2.x) as a bearer token
        token = (request.headers.get("x-api-key", "")
                 or request.headers.get("authorization", "").removeprefix("Bearer ")).strip()
        version = request.headers.get("anthropic-version", "2023-06-01")
        return await self._call(request, token, "anthropic", _anthropic_error, _anthropic_answer,
                                lambda up: (f"{up}/v1/messages", {"anthropic-version": version}), "x-api-key", "",
                                lambda data, _usage: sse(anthropic_events(data)))

    async def _call(self, request: Request, token: str, provider: str, error: Callable[[int, str], JSONResponse],
                    answer: Callable[[dict[str, Any]], tuple[str, list[str], int, int]],
                    target: Callable[[str], tuple[str, dict[str, str]]], key_header: str,
                    key_prefix: str, streamed: Callable[[dict[str, Any], bool], Response]) -> Response:
        grant = self.grants.get(token)
        if grant is None:
            return error(401, "unknown or expired Proctor gateway grant")
        if grant.model.provider != provider:
            return error(400, f"this evaluation's model is {grant.model.model!r}; the gateway does not "
                         f"serve it through the {provider} API")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return error(413, f"request body over {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return error(400, "the request body is not a JSON object")
        body, stream, stream_usage = stream_request(body)  # upstream answers whole: checked before it streams
        model_name = grant.model.model.partition("/")[2]
        if body.get("model") != model_name:
            return error(400, f"model {body.get('model')!r} is not this evaluation's model {model_name!r}")
        ledger = self.gateway.ledger(grant.eval_id)
        refusal = self.gateway.refusal(ledger, grant.limits)
        if refusal is not None:
            ledger.refused += 1
            grant.usage.refused += 1
            if grant.guard is not None:
                grant.guard.report(refusal.violation(grant.limits.usage_action))
            return error(403, refusal.message)  # not 429: the providers' clients retry that, and a limit does not lift
        headers: dict[str, str] = {}
        key_env = grant.model.key_env
        key = self.gateway._secret(key_env) if key_env else None
        if key_env and not key:
            return error(403, f"no API key: {key_env} is not set where the gateway runs")
        if key:
            REDACT.add(key)
            headers[key_header] = key_prefix + key
        url, extra = target(grant.model.upstream or "")
        headers.update(extra)
        ledger.calls += 1
        grant.usage.calls += 1
        started = time.monotonic()
        try:
            resp = await self.http.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            return self._logged(grant, started, error(502, f"the {provider} endpoint could not be reached: "
                                                      f"{type(exc).__name__}"), (0, 0))
        if resp.status_code >= 400:  # a provider may echo the key: it must not reach the worker
            text = resp.text.replace(key, "[REDACTED]") if key else resp.text
            return self._logged(grant, started, error(resp.status_code, f"endpoint answered "
                                                      f"{resp.status_code}: {text[:300]}"), (0, 0))
        try:
            data = resp.json()
            text, commands, tokens_in, tokens_out = answer(data)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return self._logged(grant, started, error(502, f"the {provider} endpoint's answer is not "
                                                      f"understood: {exc}"), (0, 0))
        ledger.input_tokens += tokens_in
        ledger.output_tokens += tokens_out
        ledger.cost_usd += self.gateway.price * (tokens_in + tokens_out)
        grant.usage.input_tokens += tokens_in
        grant.usage.output_tokens += tokens_out
        if self._held(grant, text, commands):
            grant.usage.held += 1
            return self._logged(grant, started, error(403, "the model's answer was held back by Proctor's safety "
                                                      "rules"), (tokens_in, tokens_out))
        return self._logged(grant, started, streamed(data, stream_usage) if stream else JSONResponse(data),
                            (tokens_in, tokens_out))

    def _held(self, grant: Grant, text: str, commands: list[str]) -> bool:
        guard = grant.guard
        if guard is None:
            return False
        found = guard.observe("generation", text)
        for command in commands:
            found += guard.observe("command", command)
        return guard.policy.hold_generations and guard.blocks(found)

    def _logged(self, grant: Grant, started: float, response: Response, tokens: tuple[int, int]) -> Response:
        entry = {"eval_id": grant.eval_id, "shard_id": grant.shard_id, "call_id": None,
                 "seconds": round(time.monotonic() - started, 4),
                 "usage": {"input_tokens": tokens[0], "output_tokens": tokens[1], "calls": 1},
                 "error": None if response.status_code < 400 else json.loads(response.body)["error"]["message"]}
        self.gateway.log.append(entry)
        del self.gateway.log[: max(0, len(self.gateway.log) - self.gateway.max_log)]
        log.info("model call eval=%s shard=%s status=%d", grant.eval_id, grant.shard_id, response.status_code)
        return response


# ---------------------------------------------------------------- provider shapes


_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 403: "permission_error"}


def _openai_error(status: int, message: str) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": None}}, status_code=status)


def _anthropic_error(status: int, message: str) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "invalid_request_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)


def _openai_answer(data: dict[str, Any]) -> tuple[str, list[str], int, int]:
    message = data["choices"][0]["message"]
    commands = [str((c.get("function") or {}).get("arguments", "")) for c in message.get("tool_calls") or []]
    usage = data.get("usage") or {}
    return (str(message.get("content") or ""), commands, int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)))


def _anthropic_answer(data: dict[str, Any]) -> tuple[str, list[str], int, int]:
    blocks = data["content"]
    text = "".join(str(b.get("text", "")) for b in blocks if b.get("type") == "text")
    commands = [json.dumps(b.get("input", {})) for b in blocks if b.get("type") == "tool_use"]
    usage = data.get("usage") or {}
    return text, commands, int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
