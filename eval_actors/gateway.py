"""The model gateway: answers a sandbox's `generate` events from outside the sandbox.

API keys live here, never in a sandbox. Every call is logged with its evaluation's id,
counted against the evaluation's limits (calls, tokens, cost) before it is made, and
metered after. A refused or failed call becomes a `generate_result` with an `error`, so
the harness sees a clear message and the supervisor never raises.

An endpoint that throttles (429), fails (5xx) or drops the connection is asked again, up
to `RETRY_ATTEMPTS` times with exponential backoff and jitter (a `Retry-After` it sends is
honoured up to `RETRY_MAX_WAIT_S`), all within `RETRY_BUDGET_S`; retries count as one call
against the evaluation's limits. When it gives up, the error says how many attempts failed
and how, and the harness records it as the sample's error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from proctor.observability import REDACT, tracing
from proctor.protocol import GenerateEvent, GenerateResult, Usage
from proctor.policy import SafetyPolicy
from proctor.spec import OpenAIModel
from safety.violations import Action, Violation

log = logging.getLogger("proctor.gateway")
RETRY_ATTEMPTS = 4
RETRY_BUDGET_S = 60.0
RETRY_MAX_WAIT_S = 20.0
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


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


@dataclass(frozen=True)
class LimitRefusal:
    """A call the gateway refused because its evaluation reached a usage limit of its
    safety policy. Not raised: the shard executor and the HTTP gateway read it to record a
    `usage` violation, and the harness sees `message` as the call's error."""

    rule: Literal["model-call", "token", "cost"]  # the usage rule it breaks
    message: str

    def violation(self, action: Action) -> Violation:
        """The `usage/<rule>` violation it makes, acted on with `action` (the policy's `usage_action`)."""
        return Violation("usage", self.rule, action, self.message, (self.message,))


@dataclass(frozen=True)
class GatewayAnswer:
    """A call's answer for the harness, and the refusal it is when the gateway refused it."""

    result: GenerateResult
    refusal: LimitRefusal | None = None


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
        """The answer to `call` for the harness (a refused or failed call has an `error`)."""
        return (await self.answer(call)).result

    async def answer(self, call: GatewayCall) -> GatewayAnswer:
        """`generate`'s answer, with the refusal it is when a limit was reached."""
        ledger = self.ledger(call.eval_id)
        refusal = self.refusal(ledger, call.limits)
        started = time.monotonic()
        span = tracing.start("gateway.generate", kind="client", eval_id=call.eval_id, shard_id=call.shard_id,
                             call_id=call.event.id, model=getattr(call.model, "model", None) or call.model.adapter)
        if refusal:
            ledger.refused += 1
            result = GenerateResult(id=call.event.id, error=refusal.message)
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
        span.set(input_tokens=result.usage.input_tokens, output_tokens=result.usage.output_tokens,
                 refused=refusal is not None)
        span.end(error=result.error)
        return GatewayAnswer(result, refusal)

    @staticmethod
    def refusal(ledger: UsageLedger, limits: SafetyPolicy) -> LimitRefusal | None:
        """Why the next call of the evaluation whose use is `ledger` is refused; None if it may go."""
        if ledger.calls >= limits.max_model_calls:
            return LimitRefusal("model-call", f"model-call limit reached: {limits.max_model_calls} calls "
                                "(safety.max_model_calls)")
        if ledger.tokens >= limits.max_tokens:
            return LimitRefusal("token", f"token limit reached: {limits.max_tokens} tokens (safety.max_tokens)")
        if ledger.cost_usd >= limits.max_cost_usd:
            return LimitRefusal("cost", f"cost limit reached: ${limits.max_cost_usd:g} (safety.max_cost_usd)")
        return None

    @abstractmethod
    async def _complete(self, call: GatewayCall) -> GenerateResult: ...

    async def aclose(self) -> None:
        pass


class OpenAIGateway(ModelGateway):
    """OpenAI-compatible chat completions (`POST {base_url}/chat/completions`)."""

    def __init__(self, secret: Any = None, timeout_s: float = 120.0, retry_wait_s: float = 0.5, **kw: Any):
        super().__init__(secret, **kw)
        self.http = httpx.AsyncClient(timeout=timeout_s)
        self.retry_wait_s = retry_wait_s  # the first retry's pause; each next one doubles

    async def _complete(self, call: GatewayCall) -> GenerateResult:
        model: OpenAIModel = call.model
        if not isinstance(model, OpenAIModel):
            return GenerateResult(id=call.event.id, error=f"the {model.adapter} adapter makes no gateway calls")
        headers = {}
        if model.api_key_env:
            key = self._secret(model.api_key_env)
            if not key:
                return GenerateResult(id=call.event.id, error=f"no API key: {model.api_key_env} is not set outside the sandbox")
            REDACT.add(key)  # never logged, whatever shape it has
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
        resp, failures = await self._post(f"{model.base_url}/chat/completions", body, headers)
        tried = f" (after {len(failures)} failed attempts: {', '.join(failures)})" if failures else ""
        if resp is None:
            return GenerateResult(id=ev.id, error=f"model endpoint unreachable{tried}")
        if resp.status_code >= 400:  # a provider may echo the key: it must not reach the sandbox
            text = resp.text.replace(headers["Authorization"][7:], "[REDACTED]") if headers else resp.text
            return GenerateResult(id=ev.id, error=f"endpoint answered {resp.status_code}{tried}: {text[:300]}")
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

    async def _post(self, url: str, body: dict[str, Any], headers: dict[str, str]
                    ) -> tuple[httpx.Response | None, list[str]]:
        """The endpoint's answer, asked again while it throttles, fails or drops the
        connection (see the module's doc), and the failed attempts (status codes, error
        names). The answer is None when the last attempt got none."""
        started = time.monotonic()
        failures: list[str] = []
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            wait = min(RETRY_MAX_WAIT_S, self.retry_wait_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            try:
                resp = await self.http.post(url, json=body, headers=headers)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                failures.append(type(exc).__name__)
            else:
                if resp.status_code not in RETRY_STATUSES:
                    return resp, failures
                failures.append(str(resp.status_code))
                wait = max(wait, min(RETRY_MAX_WAIT_S, _retry_after(resp) or 0.0))
                if attempt == RETRY_ATTEMPTS or time.monotonic() - started + wait > RETRY_BUDGET_S:
                    return resp, failures  # its status and body say what went wrong
            if attempt == RETRY_ATTEMPTS or time.monotonic() - started + wait > RETRY_BUDGET_S:
                break
            await asyncio.sleep(wait)
        return None, failures

    async def aclose(self) -> None:
        await self.http.aclose()


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return max(0.0, float(resp.headers.get("retry-after", "")))
    except ValueError:
        return None
