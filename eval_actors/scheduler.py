"""The scheduler: a named, restartable Ray actor that admits shards to capacity.

It splits each submitted evaluation into shards (stored), queues them (`shard_queue`),
and on every tick admits, in queue order, the shards whose CPU, memory and GPUs fit on
one node (`capacity`). A shard that asks for GPUs gets a Ray placement group pinned to its
node, so Ray itself holds the GPU reservation and can never oversubscribe a GPU (nor give
it to another Ray task); after a restart those groups are matched against Ray's own
placement-group table. A CPU/memory-only shard gets no placement group: Ray places groups
one at a time, more slowly the more a node holds (~8/s at 4,000), which would bound a
cluster to a few thousand concurrent shards. Its CPU and memory are accounted from the
shards the scheduler runs, which are rebuilt from the state store and the supervisors'
live shards after a restart, so the accounting cannot outlive what really runs.
A GPU demand that does not fit reserves its GPU type for the rest of the pass, so smaller
shards cannot starve it by fragmentation.

All durable state is in the state store: on start the scheduler re-queues what was
queued and reconciles what was running with the supervisors (`recovery.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from cluster.datasets import load_samples
from cluster.inspect_tasks import describe_task
from cluster.state import StateError, StateStore
from proctor.bus_events import ShardEvent, StatusEvent, WaitingEvent, event
from proctor.jsontypes import JsonObject
from proctor.observability import observe_process, tracing
from proctor.settings import Settings
from proctor.spec import parse_spec
from proctor.statuses import TERMINAL

from .admission import (
    RELEASE_S,
    Running,
    in_flight,
    occupied,
    pg_name,
    plan_admissions,
    queued_shard,
    released_view,
    resources_of,
    split_shards,
)
from .capacity import Demand, Node, capacity_summary
from .finish import all_ended, final_status, shard_errors, summary_fields
from .handles import ActorHandles, ControlPlaneUnavailable, outage_timeout
from .killswitch import marks_of
from .local_run import new_eval_id
from .metrics import record_submission
from .prewarm import PREWARM_EVERY_S, PoolPlanner
from .recovery import PLACEMENT_TIMEOUT_S, RECONCILE_S, Recovery, remove_group
from .shard_work import model_label
from .shard_queue import QueuedShard, ShardQueue
from .state_calls import ThreadedStore
from .traces import SchedulerTraces

log = logging.getLogger("proctor.scheduler")

TICK_S = 0.1
MAX_ADMITS_PER_TICK = 256
# placement groups being created at once: Ray places them one by one, more slowly the more a
# node holds (a few per second with thousands), so an unbounded burst would time out and churn
MAX_PLACING = 32
MAX_HANDING_OVER = 1024  # shards admitted but not yet taken by a supervisor
HAND_OVER_TIMEOUT_S = 60.0  # a supervisor takes a shard (it answers at once; the shard runs on)
CANCEL_TIMEOUT_S = 30.0  # a supervisor's cancel (a hard one answers once the sandbox is dead, within 10 s)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=1000)
class Scheduler(Recovery):
    def __init__(self, settings: Settings, supervisor_names: list[str], aggregator_name: str, bus_name: str):
        observe_process(settings, "scheduler")
        self.settings = settings
        self.store = StateStore(settings.state, retry_s=settings.state_retry_s)
        self.db = ThreadedStore(self.store)  # what the event loop calls: a locked database never blocks it
        self.traces = SchedulerTraces(self.store)
        self.queue = ShardQueue()
        self.running: dict[tuple[str, str], Running] = {}
        self.supervisor_names = supervisor_names
        self.aggregator_name = aggregator_name
        self.bus_name = bus_name
        self.reasons: dict[str, str | None] = {}
        self.cancelling: dict[str, str] = {}  # eval id -> final status once its shards end
        self.wake = asyncio.Event()
        self.started = False
        self.admitted_total = 0
        self._nodes: list[Node] = []
        self._nodes_at = 0.0
        self._starting: asyncio.Task[Any] | None = None
        self._starts: set[asyncio.Task[None]] = set()
        self.finishing: set[str] = set()
        self.down: set[str] = set()  # supervisors whose actor died (restarting, or waiting for a node)
        self.orphans: dict[tuple[str, str], float] = {}
        self.actors = ActorHandles(settings.ray_namespace)
        self.releasing: deque[tuple[float, str, Demand]] = deque()  # (removed at, node, demand)
        self.pools = PoolPlanner(supervisor_names, settings.pool_size)  # warm sandboxes ahead of the queue
        self._prewarming: asyncio.Task[None] | None = None
        self._prewarmed_at = 0.0
        # an async actor's __init__ runs on its event loop: start (and recover) at once,
        # also after Ray restarts this actor
        self._starting = asyncio.get_event_loop().create_task(self.start())

    # ------------------------------------------------------------ events

    def _publish(self, events: list[JsonObject]) -> None:
        try:
            self.actors.get(self.bus_name).publish.remote(events)
        except ControlPlaneUnavailable:
            pass  # the bus is restarting; events are a live view, the store has the state

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> dict[str, Any]:
        """Recover and start admitting (once); later calls wait for that and report."""
        if not self.started:
            self.started = True
            try:
                await self.recover()
            finally:
                asyncio.get_running_loop().create_task(self._loop())
        elif self._starting is not None and asyncio.current_task() is not self._starting:
            await asyncio.shield(self._starting)
        return await self.status()

    async def _loop(self) -> None:
        last_reconcile = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), TICK_S)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            try:
                self._prewarm()
                await self._admit()
                if time.monotonic() - last_reconcile > RECONCILE_S:
                    last_reconcile = time.monotonic()
                    await self._reconcile_running()
            except Exception:  # the loop must outlive any one bad tick
                log.exception("scheduler tick failed")

    # ------------------------------------------------------------ submit / cancel

    async def submit(self, spec_doc: dict[str, Any], owner: str, eval_id: str | None = None,
                     trace: dict[str, str] | None = None) -> str:
        """Validate, split into shards, store as queued, enqueue. Raises `SpecError`.
        `trace`: the caller's span (a W3C carrier), which the evaluation's trace joins."""
        started = time.time()
        spec = parse_spec(spec_doc)
        if spec.inspect is not None:  # load the task (in a worker) for its samples; SpecError names it
            spec = await describe_task(spec)
            assert spec.inspect is not None and spec.inspect.resolved is not None
            sample_ids, epochs = spec.inspect.resolved.sample_ids, spec.inspect.resolved.epochs
        else:
            assert spec.dataset is not None
            sample_ids = [str(s.id) for s in load_samples(spec.dataset, self.settings)]
            epochs = spec.epochs
        eval_id = eval_id or new_eval_id()
        shards = split_shards(sample_ids, epochs, spec.shard_size, resources_of(spec))
        runtime = spec.sandbox.runtime if spec.sandbox.runtime != "auto" else self.settings.runtime
        trace_context = self.traces.submitted(trace, eval_id)
        await self.db.create_evaluation(
            id=eval_id, owner=owner, name=spec.name, spec=spec.model_dump(mode="json"), priority=spec.priority,
            labels=spec.labels, model=model_label(spec), runtime=runtime, shards=shards, trace_context=trace_context,
        )
        submitting = self.traces.submit_span(trace_context, started, eval_id=eval_id, shards=len(shards), owner=owner)
        log.info("evaluation %s submitted by %s: %d shards", spec.name, owner, len(shards), extra={"eval_id": eval_id})
        submitting.end()
        demand = Demand.from_resources(resources_of(spec))
        for shard in shards:
            self.queue.push(QueuedShard(eval_id, shard.shard_id, owner, spec.priority, demand))
        record_submission()
        self._publish([event(StatusEvent(eval_id=eval_id, status="queued", owner=owner, name=spec.name))])
        self.wake.set()
        return eval_id

    async def cancel(self, eval_id: str, hard: bool = False, status: str = "cancelled") -> bool:
        """Cancel an evaluation: queued shards go at once; running ones are cancelled
        (`hard`: killed at once, the emergency stop). Idempotent."""
        ev = await self.db.get_evaluation(eval_id)
        if ev is None or ev.status in TERMINAL:
            return False
        self.cancelling[eval_id] = status
        for q in self.queue.remove_evaluation(eval_id):
            await self._cancel_unstarted(q)
        calls = [self.actors.call(r.supervisor, "cancel", eval_id, r.shard_id, hard, timeout=CANCEL_TIMEOUT_S)
                 for r in list(self.running.values()) if r.eval_id == eval_id and r.supervisor]
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)
        await self._maybe_finish(eval_id)
        return True

    async def _cancel_unstarted(self, q: QueuedShard) -> None:
        """A shard cancelled before any supervisor had it: its warm-sandbox claim let go."""
        self.pools.claimed.pop((q.eval_id, q.shard_id), None)
        await self.db.transition_shard(q.eval_id, q.shard_id, "cancelled", expect="queued",
                                       error="cancelled before it ran")
        self.traces.cancelled_in_queue(q)

    async def stop_all(self, hard: bool = True) -> list[str]:
        ids = {r.eval_id for r in self.running.values()} | {e for e, _ in list(self.queue._index)}
        for eval_id in ids:
            await self.cancel(eval_id, hard=hard)
        return sorted(ids)

    # ------------------------------------------------------------ admission

    def _prewarm(self) -> None:
        """Every PREWARM_EVERY_S, beside the ticks: tell the supervisors what to keep warm."""
        if self.pools.size <= 0 or time.monotonic() - self._prewarmed_at < PREWARM_EVERY_S:
            return
        if self._prewarming is not None and not self._prewarming.done():
            return
        self._prewarmed_at = time.monotonic()
        self._prewarming = asyncio.get_running_loop().create_task(
            self.pools.refresh(self.queue, self._node_view(pooled=False), self.actors.get))

    def _node_view(self, pooled: bool = True) -> list[Node]:
        if time.monotonic() - self._nodes_at > 2.0 or not self._nodes:
            self._nodes = [Node.from_ray(n["NodeID"], n["Resources"]) for n in ray.nodes() if n.get("Alive")]
            self._nodes_at = time.monotonic()
        nodes = occupied(self._nodes, self.running.values())
        if pooled:  # warm sandboxes hold their node's capacity like shards
            self.pools.count_reserved(nodes)
        return nodes

    def _claim_warm(self, q: QueuedShard, nodes: list[Node], released: dict[str, Node]) -> None:
        """A warm sandbox's capacity becomes the CPU shard's (once), before it is placed."""
        if (q.eval_id, q.shard_id) not in self.pools.claimed:
            self.pools.claim(q.eval_id, q.shard_id, q.demand, nodes, list(released.values()))

    async def _admit(self) -> None:
        if not len(self.queue):
            return
        running_by_owner, handing_over, placing = in_flight(self.running.values())
        room = min(MAX_ADMITS_PER_TICK, MAX_HANDING_OVER - handing_over)
        gpu_room = MAX_PLACING - placing
        if room <= 0:
            return  # the next tick looks again
        nodes = self._node_view()
        plan = plan_admissions(self.queue.candidates(running_by_owner), nodes, released_view(nodes, self.releasing),
                               room, gpu_room, self._claim_warm)
        for q, node in plan.admits:
            self.queue.remove(q.eval_id, q.shard_id)
        for q, node in plan.admits:  # placement and hand-over run beside the next ticks
            # held from this moment (its attempt is known once its task reads the store): the
            # next tick's view counts it before that task has run
            entry = self.running[(q.eval_id, q.shard_id)] = Running(q.eval_id, q.shard_id, q.owner, q.demand,
                                                                    node.node_id, None, -1, since=time.monotonic())
            task = asyncio.get_running_loop().create_task(
                self.traces.admission(self._start_shard(q, node, entry), q, node))
            self._starts.add(task)
            task.add_done_callback(self._starts.discard)
        for eval_id, reason in plan.wait_reasons(self.reasons).items():
            if self.reasons.get(eval_id) != reason:
                self.reasons[eval_id] = reason
                await self.db.update_evaluation(eval_id, wait_reason=reason)
                if reason:
                    self._publish([event(WaitingEvent(eval_id=eval_id, reason=reason))])
            if reason is None:
                self.reasons.pop(eval_id, None)

    async def _start_shard(self, q: QueuedShard, node: Node, entry: Running) -> None:
        key = (q.eval_id, q.shard_id)
        shard = await self.db.shard(q.eval_id, q.shard_id)
        if shard is None or shard.status != "queued":
            if self.running.get(key) is entry:
                self.running.pop(key, None)
            return
        if self.running.get(key) is not entry:
            return
        pg = None
        if q.demand.gpus:
            pg = placement_group([q.demand.bundle()], strategy="STRICT_PACK", lifetime="detached",
                                 name=pg_name(q.eval_id, q.shard_id, shard.attempt),
                                 bundle_label_selector=[{"ray.io/node-id": node.node_id}])
        entry.pg, entry.attempt, entry.since = pg, shard.attempt, time.monotonic()
        if pg is not None:
            try:
                await asyncio.wait_for(pg.ready(), PLACEMENT_TIMEOUT_S)
            except (asyncio.TimeoutError, Exception) as exc:  # Ray could not place it after all
                if self.running.get(key) is not entry:
                    return  # reconciliation took it over meanwhile (and removed the group)
                log.warning("placement of %s/%s failed: %s; re-queued", q.eval_id, q.shard_id, exc)
                remove_placement_group(pg)
                self.running.pop(key, None)
                self.queue.push(q)
                return
            if self.running.get(key) is not entry:
                return  # reconciliation took it over while it was placed (it removed the group, re-queued it)
        if q.eval_id in self.cancelling:  # cancelled after its admission took it off the queue
            remove_group(pg)
            self.running.pop(key, None)
            await self._cancel_unstarted(q)
            await self._maybe_finish(q.eval_id)
            return
        if not await self.db.transition_shard(q.eval_id, q.shard_id, "scheduled", expect="queued",
                                           placement=node.node_id):
            remove_group(pg)
            self.running.pop(key, None)
            return
        self.admitted_total += 1
        if await self.db.transition_evaluation(q.eval_id, "scheduled", expect="queued"):
            self._publish([event(StatusEvent(eval_id=q.eval_id, status="scheduled"))])
        supervisor = self.pools.claimed.pop((q.eval_id, q.shard_id), None) or self._pick_supervisor()
        self.running[key].supervisor = supervisor
        self.running[key].since = float("inf")  # not reconciled before the supervisor has it
        self._publish([event(ShardEvent(eval_id=q.eval_id, shard_id=q.shard_id, status="scheduled", node=node.node_id,
                                        demand=q.demand.describe(), supervisor=supervisor,
                                        wait_s=round(time.time() - q.queued_at, 3)))])
        try:
            await self.actors.call(supervisor, "run_shard", q.eval_id, q.shard_id, shard.attempt,
                                   timeout=HAND_OVER_TIMEOUT_S)
        except Exception as exc:  # the supervisor is gone: reconciliation retries the shard
            log.warning("supervisor %s did not take %s/%s: %s", supervisor, q.eval_id, q.shard_id, exc)
        else:
            if q.eval_id in self.cancelling:  # a cancel while it was handed over may have reached
                # the supervisor before the shard did (an emergency stop's marker stops it anyway)
                try:
                    await self.actors.call(supervisor, "cancel", q.eval_id, q.shard_id, False,
                                           timeout=CANCEL_TIMEOUT_S)
                except Exception as exc:  # gone meanwhile: reconciliation ends the shard
                    log.warning("cancel of %s/%s at %s failed: %s", q.eval_id, q.shard_id, supervisor, exc)
        if self.running.get(key) is entry:
            entry.since = time.monotonic()

    def _pick_supervisor(self) -> str:
        up = [n for n in self.supervisor_names if n not in self.down] or self.supervisor_names
        load = {name: 0 for name in up}
        for r in self.running.values():
            if r.supervisor in load:
                load[r.supervisor] += 1
        return min(load, key=lambda n: (load[n], n))

    # ------------------------------------------------------------ completion

    async def shard_finished(self, eval_id: str, shard_id: str, attempt: int | None = None) -> None:
        """Told by a supervisor once a shard's outcome is in the store. Idempotent. With
        `attempt` (the store's, of the run that ended), a later attempt that already runs
        keeps its place (and its GPUs): the attempt that ended was retried while it ran."""
        r = self.running.get((eval_id, shard_id))
        if r is not None and (attempt is None or r.attempt == attempt):
            self.running.pop((eval_id, shard_id), None)
        else:
            r = None
        if r is not None and r.pg is not None:
            remove_placement_group(r.pg)
            self.releasing.append((time.monotonic(), r.node_id, r.demand))
            asyncio.get_running_loop().call_later(RELEASE_S, self.wake.set)
        shard = await self.db.shard(eval_id, shard_id)
        if r is not None and shard is not None:
            self.traces.shard_ended(eval_id, shard)
        if shard is not None and shard.status == "queued" and eval_id not in self.cancelling:
            ev = await self.db.get_evaluation(eval_id)
            if ev is not None:  # a retry the supervisor asked for
                self.queue.push(queued_shard(ev, shard))
        self.wake.set()  # its capacity is free now: admit at once, not after the evaluation is finalised
        await self._maybe_finish(eval_id)
        self.wake.set()

    async def _maybe_finish(self, eval_id: str) -> None:
        if eval_id in self.finishing:
            return
        self.finishing.add(eval_id)
        try:
            await self._finish(eval_id)
        finally:
            self.finishing.discard(eval_id)

    async def _finish(self, eval_id: str) -> None:
        shards = await self.db.shards(eval_id)
        if not all_ended(shards):
            return
        ev = await self.db.get_evaluation(eval_id)
        if ev is None or ev.status in TERMINAL:
            return
        # a stop from the API kills first and tells the scheduler after: its marker says what it asked
        final = final_status(shards, self.cancelling.get(eval_id) or marks_of(self.settings).status(eval_id))
        spec = parse_spec(ev.spec)
        errors = shard_errors(shards)
        extra = summary_fields(ev, shards, final, errors)
        finalizing = self.traces.finalizing(eval_id)
        try:
            by = None
            if spec.dataset is not None and spec.dataset.group_by:
                key = spec.dataset.group_by
                by = {str(x.id): str(x.metadata.get(key, "(none)"))
                      for x in await asyncio.to_thread(load_samples, spec.dataset, self.settings)}
            result = await self.actors.call(self.aggregator_name, "finalize", eval_id, spec.scorer_names(), extra, by,
                                            trace=tracing.carrier(), timeout=outage_timeout(self.settings))
        except Exception as exc:  # results could not be written: the evaluation failed
            log.exception("finalizing %s failed", eval_id)
            result = {"summary": None, "results_uri": None, "error": f"results could not be written: {exc}"}
            final = "failed"
        if final == "succeeded":  # only a running evaluation may succeed
            await self.db.transition_evaluation(eval_id, "scheduled", expect="queued")
            await self.db.transition_evaluation(eval_id, "running", expect="scheduled")
        try:
            await self.db.transition_evaluation(
                eval_id, final, summary=result.get("summary"), results_uri=result.get("results_uri"),
                error=result.get("error") or ("; ".join(errors)[:2000] if errors and final != "succeeded" else None),
            )
        except StateError as exc:
            log.warning("evaluation %s: %s", eval_id, exc)
        self.cancelling.pop(eval_id, None)
        self.reasons.pop(eval_id, None)
        self.traces.finished(ev, final, result.get("error") or ("; ".join(errors)[:2000] if errors else None))
        log.info("evaluation %s ended %s", ev.name, final, extra={"eval_id": eval_id})
        finalizing.end(error=result.get("error"))
        self._publish([event(StatusEvent(eval_id=eval_id, status=final, summary=result.get("summary")))])

    # ------------------------------------------------------------ reading

    async def status(self) -> dict[str, Any]:
        return {
            "queued_shards": len(self.queue),
            "oldest_wait_s": round(self.queue.oldest_wait_s(), 3),
            "running_shards": len(self.running),
            "admitted_total": self.admitted_total,
            **capacity_summary(self._node_view()),
            "waiting": dict(self.reasons),
        }

    async def allocations(self) -> list[dict[str, Any]]:
        """What each running shard holds, for tests and the cluster view."""
        return [r.allocation() for r in self.running.values()]
