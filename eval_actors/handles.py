"""One way to reach the control plane's named actors: a handle cache and calls with a deadline.

The scheduler, the supervisors and the API all find their peers by name (`control_plane.py`).
`ray.get_actor` is a blocking GCS round trip (~0.3-0.5 ms), so `ActorHandles` keeps a handle
for `ttl_s`: a restarted actor keeps its name and handle, a replaced one is found again once
the entry is older than that. `call` awaits one remote call with a timeout.

Either raises `ControlPlaneUnavailable` when the actor is not running, has died, or did not
answer in time (`answer_blocking` is the same for callers outside an event loop). An
error the actor's method itself raised (a `SpecError` of a bad spec, say)
is not converted: it reaches the caller as Ray delivers it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import ray

from proctor.settings import Settings

HANDLE_TTL_S = 1.0  # how long a handle is kept before the name is looked up again
CALL_TIMEOUT_S = 30.0  # the default deadline of one remote call


class ControlPlaneUnavailable(Exception):
    """A control-plane actor is not running, died, or did not answer in time: the same call
    may succeed once Ray has restarted it. The API answers it with 503 and `Retry-After`
    (`serve_app/errors.py`); actors catch it where a peer may be restarting."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name} {reason}; is the platform up (`proctor up`)?")
        self.name, self.reason = name, reason


class ActorHandles:
    """Handles of named actors in one namespace, each kept `ttl_s` (`clock`: monotonic seconds)."""

    def __init__(self, namespace: str, ttl_s: float = HANDLE_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.namespace, self.ttl_s, self.clock = namespace, ttl_s, clock
        self._kept: dict[str, tuple[Any, float]] = {}

    def get(self, name: str) -> Any:
        """The actor's handle. Raises `ControlPlaneUnavailable` when no actor has that name."""
        now = self.clock()
        hit = self._kept.get(name)
        if hit is not None and now - hit[1] < self.ttl_s:
            return hit[0]
        try:
            handle = ray.get_actor(name, namespace=self.namespace)
        except ValueError:  # Ray's answer for a name no live actor has
            self._kept.pop(name, None)
            raise ControlPlaneUnavailable(name, "is not running") from None
        self._kept[name] = (handle, now)
        return handle

    def forget(self, name: str) -> None:
        """Drop the kept handle: the next `get` looks the name up again."""
        self._kept.pop(name, None)

    async def call(self, name: str, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S, **kwargs: Any) -> Any:
        """`await <name>.<method>.remote(*args, **kwargs)`, within `timeout` seconds. Raises
        `ControlPlaneUnavailable` (the actor is missing, dead, or too slow), or what the
        method raised."""
        ref = getattr(self.get(name), method).remote(*args, **kwargs)
        try:
            return await answer(ref, name, timeout)
        except ControlPlaneUnavailable:
            self.forget(name)  # it may have been replaced: look it up afresh next time
            raise


async def answer(ref: Any, name: str, timeout: float = CALL_TIMEOUT_S) -> Any:
    """The value of one remote call's `ref`, within `timeout` seconds. Raises
    `ControlPlaneUnavailable` when the actor died or was too slow, or what the method raised."""
    try:
        return await asyncio.wait_for(_awaited(ref), timeout)
    except asyncio.TimeoutError:
        raise ControlPlaneUnavailable(name, f"did not answer within {timeout:g} s") from None
    except ray.exceptions.RayActorError as exc:  # it died, or is restarting (ActorUnavailableError)
        raise ControlPlaneUnavailable(name, f"is unavailable ({type(exc).__name__})") from exc


def outage_timeout(settings: Settings) -> float:
    """The deadline of a call that writes to the results store: the aggregator rides out an
    outage of up to `Settings.store_outage_budget_s` before it answers."""
    return float(settings.store_outage_budget_s) + 10 * CALL_TIMEOUT_S


def answer_blocking(ref: Any, name: str, timeout: float = CALL_TIMEOUT_S) -> Any:
    """`answer` for a caller outside an event loop (the CLI, a Ray job): `ray.get` with a timeout."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise ControlPlaneUnavailable(name, f"did not answer within {timeout:g} s") from None
    except ray.exceptions.RayActorError as exc:
        raise ControlPlaneUnavailable(name, f"is unavailable ({type(exc).__name__})") from exc


async def _awaited(ref: Any) -> Any:
    return await ref
