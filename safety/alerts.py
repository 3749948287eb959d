"""Alerts: incidents sent to webhooks, retried with backoff, never blocking a supervisor.

`AlertSink.send(alert)` only queues; one background task delivers, with exponential
backoff (1, 2, 4, ... s, at most `MAX_ATTEMPTS` tries) per webhook. Two shapes: `json`
(the incident as it is) and `pagerduty` (PagerDuty Events API v2, `trigger`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

log = logging.getLogger("proctor.alerts")

MAX_QUEUED = 1000
MAX_ATTEMPTS = 6
TIMEOUT_S = 5.0
PD_SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}


@dataclass(frozen=True)
class Webhook:
    url: str
    shape: Literal["json", "pagerduty"] = "json"
    routing_key: str | None = None  # PagerDuty's integration key


@dataclass
class AlertSink:
    webhooks: list[Webhook]
    source: str = "proctor"
    queue: deque[tuple[Webhook, dict[str, Any], int]] = field(default_factory=deque)
    delivered: int = 0
    dropped: int = 0
    _wake: asyncio.Event | None = None
    _task: asyncio.Task[None] | None = None

    def send(self, alert: dict[str, Any]) -> None:
        """Queue `alert` (an incident as a dict) for every webhook. Never blocks, never raises."""
        for hook in self.webhooks:
            if len(self.queue) >= MAX_QUEUED:
                self.dropped += 1
                log.error("alert queue full: an alert to %s was dropped", hook.url)
                continue
            self.queue.append((hook, alert, 0))
        if self.webhooks:
            self._ensure_running()

    def _ensure_running(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._deliver())

    async def _deliver(self) -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
            while True:
                if not self.queue:
                    assert self._wake is not None
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                hook, alert, attempt = self.queue.popleft()
                try:
                    answer = await http.post(hook.url, json=self.body(hook, alert))
                    if answer.status_code >= 500 or answer.status_code == 429:
                        raise httpx.HTTPStatusError("retryable", request=answer.request, response=answer)
                    if answer.status_code >= 400:
                        log.error("webhook %s refused an alert: %s %s", hook.url, answer.status_code,
                                  answer.text[:200])
                    else:
                        self.delivered += 1
                except httpx.HTTPError as exc:
                    if attempt + 1 >= MAX_ATTEMPTS:
                        self.dropped += 1
                        log.error("alert to %s given up after %d tries: %s", hook.url, attempt + 1, exc)
                        continue
                    asyncio.get_running_loop().call_later(2 ** attempt, self._retry, hook, alert, attempt + 1)

    def _retry(self, hook: Webhook, alert: dict[str, Any], attempt: int) -> None:
        self.queue.append((hook, alert, attempt))
        self._ensure_running()

    def body(self, hook: Webhook, alert: dict[str, Any]) -> dict[str, Any]:
        if hook.shape == "json":
            return {"source": self.source, "type": "safety_incident", "incident": alert}
        summary = (f"[proctor] {alert.get('rule')} in evaluation {alert.get('eval_id')}: "
                   f"{(alert.get('evidence') or {}).get('message', '')}")[:1024]
        return {
            "routing_key": hook.routing_key or "",
            "event_action": "trigger",
            "dedup_key": f"proctor-{alert.get('eval_id')}-{alert.get('shard_id')}-{alert.get('rule')}",
            "payload": {"summary": summary, "source": self.source,
                        "severity": PD_SEVERITY.get(str(alert.get("severity")), "error"),
                        "component": str(alert.get("eval_id")), "group": "safety",
                        "class": str(alert.get("rule")), "custom_details": alert},
        }

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
