"""The scheduler's recovery: what it rebuilds from the state store and Ray after a restart,
and the reconciliation of its running shards with the supervisors that run them (a
supervisor that died, or whose node was lost, has its shards retried elsewhere).

A mixin of `scheduler.Scheduler` (the Ray actor), kept apart for its size: it reads and
writes the scheduler's queue, running shards and orphans, declared below.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import placement_group_table, remove_placement_group

from cluster.state import RetriesExhaustedError
from proctor.bus_events import ShardEvent, event
from proctor.statuses import TERMINAL

from .admission import PG_PREFIX, Running, pg_name, queued_shard
from .capacity import Demand
from .lost_work import supervisors_live

if TYPE_CHECKING:
    from .handles import ActorHandles
    from .shard_queue import ShardQueue
    from .state_calls import ThreadedStore
    from .traces import SchedulerTraces

log = logging.getLogger("proctor.scheduler")

RECONCILE_S = 2.0
PLACEMENT_TIMEOUT_S = 30.0
# at recovery, a supervisor that does not answer is taken to run nothing (its shards are retried): a busy
# or restarting one is waited for, up to this
RECOVER_TIMEOUT_S = 120.0


def remove_group(pg: Any) -> None:
    if pg is not None:
        remove_placement_group(pg)


class Recovery:
    """Recovery and reconciliation of `Scheduler` (its attributes, set by its `__init__`)."""

    supervisor_names: list[str]
    actors: ActorHandles
    db: ThreadedStore
    queue: ShardQueue
    running: dict[tuple[str, str], Running]
    orphans: dict[tuple[str, str], float]
    cancelling: dict[str, str]
    down: set[str]
    traces: SchedulerTraces

    def _publish(self, events: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    async def _maybe_finish(self, eval_id: str) -> None:
        raise NotImplementedError

    async def shard_finished(self, eval_id: str, shard_id: str, attempt: int | None = None) -> None:
        raise NotImplementedError

    async def recover(self) -> None:
        """Rebuild from the store and Ray: re-queue queued shards, adopt running shards a
        supervisor still runs, retry or fail the rest, drop orphaned placement groups,
        and finish evaluations whose shards all ended."""
        pgs = {info["name"]: pid for pid, info in placement_group_table().items()
               if info.get("name", "").startswith(PG_PREFIX) and info.get("state") != "REMOVED"}
        live: dict[tuple[str, str], str] = {}
        for name in self.supervisor_names:
            try:
                for eval_id, shard_id in await self.actors.call(name, "running_shards", timeout=RECOVER_TIMEOUT_S):
                    live[(eval_id, shard_id)] = name
            except Exception:
                pass
        kept: set[str] = set()
        for ev in await self.db.active_evaluations():
            for shard in await self.db.shards(ev.id):
                key = (ev.id, shard.shard_id)
                if shard.status == "queued":
                    self.queue.push(queued_shard(ev, shard))
                elif shard.status in ("scheduled", "running"):
                    name = pg_name(ev.id, shard.shard_id, shard.attempt)
                    demand = Demand.from_resources(shard.resources)
                    if key in live and (name in pgs or not demand.gpus):
                        pg = ray.util.get_placement_group(name) if demand.gpus else None
                        self.running[key] = Running(ev.id, shard.shard_id, ev.owner, demand,
                                                    shard.placement or "", pg, shard.attempt, live[key],
                                                    time.monotonic())
                        kept.add(name)
                    else:
                        await self._retry_or_fail(ev, shard, "its supervisor or sandbox was lost")
            await self._maybe_finish(ev.id)
        for name in set(pgs) - kept:
            try:
                remove_placement_group(ray.util.get_placement_group(name))
            except Exception:
                pass
        log.info("recovered: %d queued, %d running", len(self.queue), len(self.running))

    async def _retry_or_fail(self, ev: Any, shard: Any, why: str) -> None:
        try:
            retried = await self.db.transition_shard(ev.id, shard.shard_id, "queued", expect=("scheduled", "running"),
                                                  error=f"retried: {why}")
        except RetriesExhaustedError:
            retried = False
        self.traces.shard_ended(ev.id, shard, "queued" if retried else "failed", why, attempt=shard.attempt)
        if retried:
            fresh = await self.db.shard(ev.id, shard.shard_id)
            self.queue.push(queued_shard(ev, fresh))
            self._publish([event(ShardEvent(eval_id=ev.id, shard_id=shard.shard_id, status="queued", reason=why))])
        else:
            await self.db.transition_shard(ev.id, shard.shard_id, "failed", expect=("scheduled", "running"),
                                        error=f"{why}; no attempts left")

    async def _reconcile_running(self) -> None:
        """A shard whose supervisor no longer runs it is retried: the supervisor died, or
        the node it ran on was lost (its actor restarts elsewhere, or waits for a node that
        can hold it: `down`, given no new shards meanwhile)."""
        live, self.down = await supervisors_live(self.actors.get, self.supervisor_names)
        if live is None:
            return  # a supervisor is slow to answer; look again on the next round
        now = time.monotonic()
        for shard in await self.db.shards_by_status(("scheduled", "running")):
            key = (shard.eval_id, shard.shard_id)
            if key in self.running or key in live or key in self.queue:
                continue
            # in the store as running, but no placement here and no supervisor has it
            self.orphans.setdefault(key, now)
            if now - self.orphans[key] > RECONCILE_S * 3:
                self.orphans.pop(key, None)
                ev = await self.db.get_evaluation(shard.eval_id)
                if ev is not None:
                    await self._retry_or_fail(ev, shard, "no supervisor runs it")
                    await self._maybe_finish(shard.eval_id)
        for key, r in list(self.running.items()):
            # a shard still being placed (no supervisor yet) is its `_start_shard`'s to retry;
            # it is reclaimed here only if that task died (well after the placement timeout)
            grace = RECONCILE_S * 3 if r.supervisor else PLACEMENT_TIMEOUT_S + RECONCILE_S * 3
            if key in live or now - r.since < grace:
                continue
            shard = await self.db.shard(r.eval_id, r.shard_id)
            if shard is None or shard.status in TERMINAL or shard.status == "queued":
                await self.shard_finished(r.eval_id, r.shard_id)
                continue
            self.running.pop(key, None)
            remove_group(r.pg)
            ev = await self.db.get_evaluation(r.eval_id)
            if r.eval_id in self.cancelling:
                await self.db.transition_shard(r.eval_id, r.shard_id, "cancelled", expect=("scheduled", "running"),
                                            error="cancelled")
            else:
                await self._retry_or_fail(ev, shard, "its supervisor was lost")
            await self._maybe_finish(r.eval_id)
