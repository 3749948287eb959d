"""The API served by Ray Serve on the session's Ray cluster (the `api` fixture in conftest),
and small helpers for the tests that call it."""

from __future__ import annotations

import time
from typing import Any

import httpx

USERS = [("vera", "viewer"), ("rita", "researcher"), ("rob", "researcher"), ("sam", "safety"), ("ada", "admin")]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def spec(name: str = "api", samples: int = 2, **sandbox: Any) -> dict[str, Any]:
    return {"name": name, "model": {"adapter": "reference"},
            "dataset": {"samples": [{"id": str(i), "input": f"{i}?", "target": str(i)} for i in range(samples)]},
            "scorers": [{"type": "exact"}], "sandbox": {"runtime": "gvisor", "memory": "256Mi", **sandbox}}


def wait_final(client: httpx.Client, token: str, eval_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        ev = client.get(f"/api/v1/evaluations/{eval_id}", headers=auth(token)).json()
        if ev["status"] in ("succeeded", "failed", "cancelled", "safety_stopped"):
            return ev
        assert time.monotonic() < deadline, ev
        time.sleep(0.3)


def stages_spec(name: str) -> dict[str, Any]:
    """Two samples in a shard each: the first goes through every stage, the second's setup fails."""
    body = spec(name, samples=2)
    body["shard_size"] = 1
    body["dataset"]["samples"][1]["setup"] = "echo broken >&2; exit 3"
    return body
