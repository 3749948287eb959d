"""A cancel that arrives while the scheduler hands a shard over.

An admission takes the shard off the queue at once and hands it to a supervisor on a task
of its own, a moment later. A cancel in between found it neither queued nor at a
supervisor, and the shard then ran to its end (test_client's cancel right after submit
waited 60 s for an evaluation still running). The scheduler's own code runs here on a
real SQLite store; Ray's actor calls go to `ActorCallsDouble`, which records them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from apiserver import spec
from cluster.state import NewShard, StateStore
from eval_actors.admission import Running
from eval_actors.capacity import Demand, Node
from eval_actors.prewarm import PoolPlanner
from eval_actors.scheduler import Scheduler
from eval_actors.shard_queue import QueuedShard, ShardQueue
from eval_actors.state_calls import ThreadedStore
from eval_actors.traces import SchedulerTraces
from proctor.settings import Settings
from proctor.spec import parse_spec

SUPERVISOR = "proctor-supervisor-0"


class ActorCallsDouble:
    """Stands in for `ActorHandles`: records each call as it reaches its actor;
    `on_run_shard` runs while a `run_shard` is on its way (what arrives before it)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.on_run_shard: Any = None

    def get(self, name: str) -> Any:
        return SimpleNamespace(publish=SimpleNamespace(remote=lambda events: None))

    async def call(self, name: str, method: str, *args: Any, timeout: float = 0, **kwargs: Any) -> Any:
        if method == "run_shard" and self.on_run_shard is not None:
            await self.on_run_shard()  # (it reaches the supervisor after whatever happened meanwhile)
        self.calls.append((name, method, *map(str, args)))
        if method == "finalize":
            return {"summary": {"samples": 0}, "results_uri": None}
        return True


def scheduler(tmp_path: Path) -> tuple[Any, StateStore, ActorCallsDouble]:
    """The scheduler's class, not as a Ray actor, with one queued evaluation of one shard."""
    settings = Settings(home=tmp_path, state_url=f"sqlite:///{tmp_path / 'state.db'}",
                        results_uri=(tmp_path / "results").as_uri())
    store = StateStore(settings.state)
    doc = parse_spec(spec("cancel-race", samples=1)).model_dump(mode="json")
    store.create_evaluation("ev-race", owner="rita", name="cancel-race", spec=doc, model="reference",
                            runtime="gvisor", shards=[NewShard("s0", ["0"], 1, {"cpus": 1.0})])
    sch = object.__new__(Scheduler.__ray_metadata__.modified_class)
    actors = ActorCallsDouble()
    sch.__dict__.update(
        settings=settings, store=store, db=ThreadedStore(store), traces=SchedulerTraces(store), queue=ShardQueue(),
        running={}, supervisor_names=[SUPERVISOR], aggregator_name="proctor-aggregator", bus_name="proctor-bus",
        reasons={}, cancelling={}, admitted_total=0, finishing=set(), down=set(), actors=actors,
        pools=PoolPlanner([SUPERVISOR], 0))
    return sch, store, actors


def admitted(sch: Any) -> tuple[QueuedShard, Node, Running]:
    """What `_admit` does for the shard before its start task runs."""
    demand = Demand(1.0, 0, 0, None)
    q = QueuedShard("ev-race", "s0", "rita", 0, demand)
    entry = sch.running[("ev-race", "s0")] = Running("ev-race", "s0", "rita", demand, "node-1", None, -1)
    return q, Node("node-1", 2.0, 1e9, 0.0, None), entry


def test_a_cancel_before_the_hand_over_cancels_the_shard_and_the_evaluation(tmp_path: Path) -> None:
    sch, store, actors = scheduler(tmp_path)

    async def scenario() -> None:
        q, node, entry = admitted(sch)
        assert await sch.cancel("ev-race") is True
        await sch._start_shard(q, node, entry)

    asyncio.run(scenario())
    assert not [c for c in actors.calls if c[1] == "run_shard"], actors.calls
    [shard] = store.shards("ev-race")
    assert (shard.status, shard.error) == ("cancelled", "cancelled before it ran")
    assert store.get_evaluation("ev-race").status == "cancelled"
    assert sch.running == {}
    store.close()


def test_a_cancel_during_the_hand_over_reaches_the_supervisor_after_the_shard(tmp_path: Path) -> None:
    sch, store, actors = scheduler(tmp_path)

    async def scenario() -> None:
        q, node, entry = admitted(sch)
        actors.on_run_shard = lambda: sch.cancel("ev-race")  # arrives while run_shard is on its way
        await sch._start_shard(q, node, entry)

    asyncio.run(scenario())
    methods = [c[1] for c in actors.calls]
    assert methods.count("run_shard") == 1
    assert "cancel" in methods[methods.index("run_shard") + 1:], actors.calls  # after the shard reached it
    assert ("proctor-supervisor-0", "cancel", "ev-race", "s0", "False") in actors.calls
    store.close()
