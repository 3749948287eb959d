"""The model gateway: answers a sandbox's `generate` events from outside the sandbox.

API keys live here, never in a sandbox. Every call is logged with its evaluation's id,
counted against the evaluation's limits (calls, tokens, cost) before it is made, and
metered after. A refused or failed call becomes a `generate_result` with an `error`, so
the harness sees a clear message and the supervisor never raises.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import httpx

from proctor.protocol import GenerateEvent, GenerateResult, Usage
from proctor.policy import SafetyPolicy
from proctor.spec import OpenAIModel

log = logging.getLogger("proctor.gateway")


@dataclass
class UsageLedger:
    """What one evaluation has used through the gateway."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    refused: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class GatewayCall:
    eval_id: str
    shard_id: str
    model: Any  # the spec's model
    limits: SafetyPolicy
    event: GenerateEvent


class ModelGateway(ABC):
    """Answers model calls. Subclasses implement `_complete` for one provider shape."""

    def __init__(self, secret: Any = None, price_per_token_usd: float = 0.0):
        self._secret = secret or (lambda name: None)
        self.price = price_per_token_usd
        self.ledgers: dict[str, UsageLedger] = {}
        self.log: list[dict[str, Any]] = []  # a bounded record of calls, newest last
        self.max_log = 10_000

    def ledger(self, eval_id: str) -> UsageLedger:
        return self.ledgers.setdefault(eval_id, UsageLedger())

    async def generate(self, call: GatewayCall) -> GenerateResult:
        ledger = self.ledger(call.eval_id)
        refusal = self._refusal(ledger, call.limits)
        started = time.monotonic()
        if refusal:
            ledger.refused += 1
            result = GenerateResult(id=call.event.id, error=refusal)
        else:
            ledger.calls += 1
            try:
                result = await self._complete(call)
            except Exception as exc:  # a provider's failure is data for the harness
                result = GenerateResult(id=call.event.id, error=f"model call failed: {exc}")
            ledger.input_tokens += result.usage.input_tokens
            ledger.output_tokens += result.usage.output_tokens
            ledger.cost_usd += self.price * (result.usage.input_tokens + result.usage.output_tokens)
        entry = {
            "eval_id": call.eval_id, "shard_id": call.shard_id, "call_id": call.event.id,
            "seconds": round(time.monotonic() - started, 4), "usage": result.usage.model_dump(),
            "error": result.error,
        }
        self.log.append(entry)
        del self.log[: max(0, len(self.log) - self.max_log)]
        log.info("model call eval=%s shard=%s id=%s error=%s", call.eval_id, call.shard_id, call.event.id, result.error)
        return result

    @staticmethod
    def _refusal(ledger: UsageLedger, limits: SafetyPolicy) -> str | None:
        if ledger.calls >= limits.max_model_calls:
            return f"model-call limit reached: {limits.max_model_calls} calls (safety.max_model_calls)"
        if ledger.tokens >= limits.max_tokens:
            return f"token limit reached: {limits.max_tokens} tokens (safety.max_tokens)"
        if ledger.cost_usd >= limits.max_cost_usd:
            return f"cost limit reached: ${limits.max_cost_usd:g} (safety.max_cost_usd)"
        return None

    @abstractmethod
    async def _complete(self, call: GatewayCall) -> GenerateResult: ...

    async def aclose(self) -> None:
        pass


class OpenAIGateway(ModelGateway):
    """OpenAI-compatible chat completions (`POST {base_url}/chat/completions`)."""

    def __init__(self, secret: Any = None, timeout_s: float = 120.0, **kw: Any):
        super().__init__(secret, **kw)
        self.http = httpx.AsyncClient(timeout=timeout_s)

    async def _complete(self, call: GatewayCall) -> GenerateResult:
        model: OpenAIModel = call.model
        if not isinstance(model, OpenAIModel):
            return GenerateResult(id=call.event.id, error=f"the {model.adapter} adapter makes no gateway calls")
        headers = {}
        if model.api_key_env:
            key = self._secret(model.api_key_env)
            if not key:
                return GenerateResult(id=call.event.id, error=f"no API key: {model.api_key_env} is not set outside the sandbox")
            headers["Authorization"] = f"Bearer {key}"
        ev = call.event
        body: dict[str, Any] = {
            "model": model.model,
            "messages": [m.model_dump(exclude_none=True) for m in ev.messages],
            "max_tokens": min(ev.max_tokens or model.max_tokens, model.max_tokens),
            "temperature": model.temperature if ev.temperature is None else ev.temperature,
        }
        if ev.tools:
            body["tools"] = ev.tools
        resp = await self.http.post(f"{model.base_url}/chat/completions", json=body, headers=headers)
        if resp.status_code >= 400:
            return GenerateResult(id=ev.id, error=f"endpoint answered {resp.status_code}: {resp.text[:300]}")
        data = resp.json()
        message = data["choices"][0]["message"]
        usage = data.get("usage") or {}
        return GenerateResult(
            id=ev.id,
            output=message.get("content") or "",
            tool_calls=message.get("tool_calls") or [],
            usage=Usage(
                input_tokens=int(usage.get("prompt_tokens", 0)),
                output_tokens=int(usage.get("completion_tokens", 0)),
                calls=1,
            ),
        )

    async def aclose(self) -> None:
        await self.http.aclose()
