"""Starting, finding and talking to the control plane's named actors.

The control plane is a handful of detached, restartable named actors in one namespace:
the scheduler, the aggregator, the event bus and a pool of supervisors. `start` creates
whatever is missing (idempotent) and runs the scheduler's recovery; `ControlPlane` is
the handle that the CLI, the API and Ray jobs use to submit, wait and read.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import ray

from proctor.settings import Settings

SCHEDULER = "proctor-scheduler"
AGGREGATOR = "proctor-aggregator"
BUS = "proctor-events"
SUPERVISOR = "proctor-supervisor-{}"
TERMINAL = ("succeeded", "failed", "cancelled", "safety_stopped")


def supervisor_names(settings: Settings) -> list[str]:
    return [SUPERVISOR.format(i) for i in range(settings.supervisors)]


def start(settings: Settings, runtime_factory: Any = None) -> "ControlPlane":
    """Create the control plane's actors if they are missing, and start the scheduler.
    Needs `ray.init` done by the caller."""
    from .aggregator import Aggregator
    from .events import EventBus
    from .scheduler import Scheduler
    from .supervisor import Supervisor

    ns = settings.ray_namespace
    opts = {"namespace": ns, "lifetime": "detached", "get_if_exists": True}
    bus = EventBus.options(name=BUS, **opts).remote()
    aggregator = Aggregator.options(name=AGGREGATOR, **opts).remote(settings, BUS)
    names = supervisor_names(settings)
    for name in names:
        Supervisor.options(name=name, **opts).remote(name, settings, SCHEDULER, AGGREGATOR, BUS, runtime_factory)
    scheduler = Scheduler.options(name=SCHEDULER, **opts).remote(settings, names, AGGREGATOR, BUS)
    ray.get([bus.last_seq.remote(), aggregator.ping.remote()])
    ray.get(scheduler.start.remote())
    return ControlPlane(settings)


def stop(settings: Settings) -> list[str]:
    """Kill the control plane's actors (state stays in the store)."""
    gone = []
    for name in [SCHEDULER, AGGREGATOR, BUS, *supervisor_names(settings)]:
        try:
            ray.kill(ray.get_actor(name, namespace=settings.ray_namespace), no_restart=True)
            gone.append(name)
        except ValueError:
            pass
    return gone


@dataclass
class ControlPlane:
    """A client of the running control plane, from any process attached to the cluster."""

    settings: Settings

    def actor(self, name: str) -> Any:
        return ray.get_actor(name, namespace=self.settings.ray_namespace)

    @property
    def scheduler(self) -> Any:
        return self.actor(SCHEDULER)

    @property
    def bus(self) -> Any:
        return self.actor(BUS)

    def submit(self, spec: Any, owner: str = "local") -> str:
        doc = spec if isinstance(spec, dict) else spec.model_dump(mode="json")
        return ray.get(self.scheduler.submit.remote(doc, owner))

    def store(self) -> Any:
        from cluster.state import StateStore

        return StateStore(self.settings.state)

    def wait(self, eval_id: str, timeout: float | None = None, on_progress: Any = None) -> Any:
        """Block until the evaluation is terminal; return it (a `cluster.state.Evaluation`)."""
        store = self.store()
        deadline = None if timeout is None else time.monotonic() + timeout
        after = 0
        while True:
            ev = store.get_evaluation(eval_id)
            if ev is not None and ev.status in TERMINAL:
                return ev
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{eval_id} is still {ev.status if ev else 'unknown'} after {timeout}s")
            try:
                got = ray.get(self.bus.read.remote(after, eval_id, 1.0, 1000, ("progress", "status")))
            except (ray.exceptions.RayActorError, ValueError):  # the bus is gone or restarting:
                time.sleep(0.5)  # the store is the source of truth; keep polling it
                continue
            after = got["last_seq"]
            if on_progress is not None and ev is not None:
                on_progress(ev, got["events"])

    async def wait_async(self, eval_id: str, timeout: float | None = None) -> Any:
        return await asyncio.to_thread(self.wait, eval_id, timeout)

    def cancel(self, eval_id: str, hard: bool = False) -> bool:
        return ray.get(self.scheduler.cancel.remote(eval_id, hard))

    def status(self) -> dict[str, Any]:
        return ray.get(self.scheduler.status.remote())
