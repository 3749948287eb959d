"""Starting, finding and talking to the control plane's named actors.

The control plane is a handful of detached, restartable named actors in one namespace:
the scheduler, the aggregator, the event bus and a pool of supervisors. `start` creates
whatever is missing (idempotent) and runs the scheduler's recovery (`launch` does the same
in two steps, so that the caller can work while the actors start); `ControlPlane` is
the handle that the CLI, the API and Ray jobs use to submit, wait and read.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from proctor.bus_events import read_events
from proctor.settings import Settings
from proctor.statuses import TERMINAL

from .handles import ActorHandles, ControlPlaneUnavailable, answer_blocking

SCHEDULER = "proctor-scheduler"
AGGREGATOR = "proctor-aggregator"
BUS = "proctor-events"
SUPERVISOR = "proctor-supervisor-{}"
START_TIMEOUT_S = 600.0  # new actors' worker processes start, and the scheduler recovers, within this


def supervisor_names(settings: Settings) -> list[str]:
    return [SUPERVISOR.format(i) for i in range(settings.supervisors)]


def start(settings: Settings, runtime_factory: Any = None) -> "ControlPlane":
    """Create the control plane's actors if they are missing, and start the scheduler.
    Needs `ray.init` done by the caller."""
    return launch(settings, runtime_factory).ready()


def launch(settings: Settings, runtime_factory: Any = None) -> "Launch":
    """Create the control plane's actors where they are missing, without waiting for them:
    their worker processes start while the caller does something else (`proctor up`
    deploys the API meanwhile). `Launch.ready()` waits for them and starts the scheduler."""
    from .aggregator import Aggregator
    from .events import EventBus
    from .scheduler import Scheduler
    from .supervisor import Supervisor

    ns = settings.ray_namespace
    opts = {"namespace": ns, "lifetime": "detached", "get_if_exists": True}
    bus = EventBus.options(name=BUS, **opts).remote(settings)
    aggregator = Aggregator.options(name=AGGREGATOR, **opts).remote(settings, BUS)
    names = supervisor_names(settings)
    for name in names:
        Supervisor.options(name=name, resources=dict(settings.supervisor_resources), **opts).remote(
            name, settings, SCHEDULER, AGGREGATOR, BUS, runtime_factory)
    scheduler = Scheduler.options(name=SCHEDULER, **opts).remote(settings, names, AGGREGATOR, BUS)
    return Launch(settings, scheduler, [bus.last_seq.remote(), aggregator.ping.remote()])


@dataclass
class Launch:
    """The control plane's actors, created; `ready` waits for them."""

    settings: Settings
    scheduler: Any
    pings: list[Any]

    def ready(self) -> "ControlPlane":
        """Wait for the event bus and the aggregator, then start the scheduler (its recovery)."""
        answer_blocking(self.pings, "the event bus or the aggregator", START_TIMEOUT_S)
        answer_blocking(self.scheduler.start.remote(), SCHEDULER, START_TIMEOUT_S)
        return ControlPlane(self.settings)


def stop(settings: Settings) -> list[str]:
    """Kill the control plane's actors (state stays in the store)."""
    gone = []
    actors = ActorHandles(settings.ray_namespace, ttl_s=0.0)
    for name in [SCHEDULER, AGGREGATOR, BUS, *supervisor_names(settings)]:
        try:
            ray.kill(actors.get(name), no_restart=True)
            gone.append(name)
        except ControlPlaneUnavailable:
            pass
    return gone


SUBMIT_TIMEOUT_S = 120.0  # the scheduler loads the dataset (or an Inspect task) before it answers
CANCEL_TIMEOUT_S = 120.0  # a cancel answers once the shards are stopped and the evaluation finished


@dataclass
class ControlPlane:
    """A client of the running control plane, from any process attached to the cluster.
    Its calls raise `ControlPlaneUnavailable` when an actor is missing or does not answer."""

    settings: Settings
    actors: ActorHandles = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.actors = ActorHandles(self.settings.ray_namespace)

    def actor(self, name: str) -> Any:
        return self.actors.get(name)

    @property
    def scheduler(self) -> Any:
        return self.actor(SCHEDULER)

    @property
    def bus(self) -> Any:
        return self.actor(BUS)

    def submit(self, spec: Any, owner: str = "local") -> str:
        doc = spec if isinstance(spec, dict) else spec.model_dump(mode="json")
        return answer_blocking(self.scheduler.submit.remote(doc, owner), SCHEDULER, SUBMIT_TIMEOUT_S)

    def store(self) -> Any:
        from cluster.state import StateStore

        return StateStore(self.settings.state, retry_s=self.settings.state_retry_s)

    def wait(self, eval_id: str, timeout: float | None = None, on_progress: Any = None) -> Any:
        """Block until the evaluation is terminal; return it (a `cluster.state.Evaluation`)."""
        store = self.store()
        try:
            return self._wait(store, eval_id, timeout, on_progress)
        finally:
            store.close()  # its pooled connections (PostgreSQL's would outlive the call)

    def _wait(self, store: Any, eval_id: str, timeout: float | None, on_progress: Any) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        after = 0
        while True:
            ev = store.get_evaluation(eval_id)
            if ev is not None and ev.status in TERMINAL:
                return ev
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{eval_id} is still {ev.status if ev else 'unknown'} after {timeout}s")
            try:
                got = answer_blocking(self.bus.read.remote(after, eval_id, 1.0, 1000, ("progress", "status")), BUS)
            except ControlPlaneUnavailable:  # the bus is gone or restarting:
                time.sleep(0.5)  # the store is the source of truth; keep polling it
                continue
            after = got["last_seq"]
            if on_progress is not None and ev is not None:
                on_progress(ev, read_events(got["events"]))

    async def wait_async(self, eval_id: str, timeout: float | None = None) -> Any:
        return await asyncio.to_thread(self.wait, eval_id, timeout)

    def cancel(self, eval_id: str, hard: bool = False) -> bool:
        return answer_blocking(self.scheduler.cancel.remote(eval_id, hard), SCHEDULER, CANCEL_TIMEOUT_S)

    def status(self) -> dict[str, Any]:
        return answer_blocking(self.scheduler.status.remote(), SCHEDULER)
