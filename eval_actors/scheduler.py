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
queued and reconciles what was running with the supervisors (see `recover`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from cluster.datasets import load_samples
from cluster.state import RetriesExhaustedError, StateError, StateStore
from proctor.settings import Settings
from proctor.spec import parse_spec

from .capacity import Demand, Node, can_ever_fit, choose_node, wait_reason
from .local_run import new_eval_id
from .metrics import record_submission
from .shard_executor import model_label
from .shard_queue import QueuedShard, ShardQueue

log = logging.getLogger("proctor.scheduler")

PG_PREFIX = "proctor:"
TERMINAL = {"succeeded", "failed", "cancelled", "safety_stopped"}
TICK_S = 0.1
RECONCILE_S = 2.0
MAX_ADMITS_PER_TICK = 256
# placement groups being created at once: Ray places them one by one, more slowly the more a
# node holds (a few per second with thousands), so an unbounded burst would time out and churn
MAX_PLACING = 32
MAX_HANDING_OVER = 1024  # shards admitted but not yet taken by a supervisor
PLACEMENT_TIMEOUT_S = 30.0
# Ray's own view of a removed placement group's resources lags ~0.1 s: a group created into them
# sooner is placed only on Ray's next retry, a second later. Freed capacity is reused after this.
RELEASE_S = 0.15
HANDLE_TTL_S = 1.0  # a named actor's handle is looked up again after this (a replaced actor is found)


def _remove(pg: Any) -> None:
    if pg is not None:
        remove_placement_group(pg)


@dataclass
class Running:
    eval_id: str
    shard_id: str
    owner: str
    demand: Demand
    node_id: str
    pg: Any  # the GPU shard's placement group; None for a CPU/memory-only shard
    attempt: int
    supervisor: str | None = None
    since: float = 0.0


def pg_name(eval_id: str, shard_id: str, attempt: int) -> str:
    return f"{PG_PREFIX}{eval_id}:{shard_id}:{attempt}"


def resources_of(spec: Any) -> dict[str, Any]:
    sb = spec.sandbox
    return {"cpus": sb.cpus, "memory": sb.memory, "gpus": sb.gpu.count, "gpu_type": sb.gpu.type}


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=1000)
class Scheduler:
    def __init__(self, settings: Settings, supervisor_names: list[str], aggregator_name: str, bus_name: str):
        logging.basicConfig(level=logging.INFO)
        self.settings = settings
        self.store = StateStore(settings.state)
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
        self.orphans: dict[tuple[str, str], float] = {}
        self._handles: dict[str, tuple[Any, float]] = {}
        self.releasing: deque[tuple[float, str, Demand]] = deque()  # (removed at, node, demand)
        # an async actor's __init__ runs on its event loop: start (and recover) at once,
        # also after Ray restarts this actor
        self._starting = asyncio.get_event_loop().create_task(self.start())

    # ------------------------------------------------------------ handles

    def _actor(self, name: str) -> Any:
        # `ray.get_actor` is a blocking GCS round trip (~0.3-0.5 ms): keep handles briefly
        now = time.monotonic()
        hit = self._handles.get(name)
        if hit is not None and now - hit[1] < HANDLE_TTL_S:
            return hit[0]
        handle = ray.get_actor(name, namespace=self.settings.ray_namespace)
        self._handles[name] = (handle, now)
        return handle

    def _publish(self, events: list[dict[str, Any]]) -> None:
        try:
            self._actor(self.bus_name).publish.remote(events)
        except ValueError:
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
                await self._admit()
                if time.monotonic() - last_reconcile > RECONCILE_S:
                    last_reconcile = time.monotonic()
                    await self._reconcile_running()
            except Exception:  # the loop must outlive any one bad tick
                log.exception("scheduler tick failed")

    # ------------------------------------------------------------ submit / cancel

    async def submit(self, spec_doc: dict[str, Any], owner: str, eval_id: str | None = None) -> str:
        """Validate, split into shards, store as queued, enqueue. Raises `SpecError`."""
        spec = parse_spec(spec_doc)
        samples = load_samples(spec.dataset, self.settings)
        eval_id = eval_id or new_eval_id()
        from cluster.state import NewShard

        size = spec.shard_size
        shards = [
            NewShard(shard_id=f"{i // size:05d}", sample_ids=[str(s.id) for s in samples[i: i + size]],
                     units=len(samples[i: i + size]) * spec.epochs, resources=resources_of(spec))
            for i in range(0, len(samples), size)
        ]
        runtime = spec.sandbox.runtime if spec.sandbox.runtime != "auto" else self.settings.runtime
        self.store.create_evaluation(
            id=eval_id, owner=owner, name=spec.name, spec=spec.model_dump(mode="json"), priority=spec.priority,
            labels=spec.labels, model=model_label(spec), runtime=runtime, shards=shards,
        )
        demand = Demand.from_resources(resources_of(spec))
        for shard in shards:
            self.queue.push(QueuedShard(eval_id, shard.shard_id, owner, spec.priority, demand))
        record_submission()
        self._publish([{"type": "status", "eval_id": eval_id, "status": "queued", "owner": owner, "name": spec.name}])
        self.wake.set()
        return eval_id

    async def cancel(self, eval_id: str, hard: bool = False, status: str = "cancelled") -> bool:
        """Cancel an evaluation: queued shards go at once; running ones are cancelled
        (`hard`: killed at once, the emergency stop). Idempotent."""
        ev = self.store.get_evaluation(eval_id)
        if ev is None or ev.status in TERMINAL:
            return False
        self.cancelling[eval_id] = status
        for q in self.queue.remove_evaluation(eval_id):
            self.store.transition_shard(eval_id, q.shard_id, "cancelled", expect="queued",
                                        error="cancelled before it ran")
        calls = [self._actor(r.supervisor).cancel.remote(eval_id, r.shard_id, hard)
                 for r in list(self.running.values()) if r.eval_id == eval_id and r.supervisor]
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)
        await self._maybe_finish(eval_id)
        return True

    async def stop_all(self, hard: bool = True) -> list[str]:
        ids = {r.eval_id for r in self.running.values()} | {e for e, _ in list(self.queue._index)}
        for eval_id in ids:
            await self.cancel(eval_id, hard=hard)
        return sorted(ids)

    # ------------------------------------------------------------ admission

    def _node_view(self) -> list[Node]:
        if time.monotonic() - self._nodes_at > 2.0 or not self._nodes:
            self._nodes = [Node.from_ray(n["NodeID"], n["Resources"]) for n in ray.nodes() if n.get("Alive")]
            self._nodes_at = time.monotonic()
        nodes = [Node(n.node_id, n.cpus, n.memory, n.gpus, n.gpu_type) for n in self._nodes]
        by_id = {n.node_id: n for n in nodes}
        for r in self.running.values():
            if r.node_id in by_id:
                by_id[r.node_id].take(r.demand)
        return nodes

    def _released_view(self, nodes: list[Node]) -> dict[str, Node]:
        """`nodes` less the capacity of placement groups removed under RELEASE_S ago."""
        now = time.monotonic()
        while self.releasing and now - self.releasing[0][0] >= RELEASE_S:
            self.releasing.popleft()
        view = {n.node_id: Node(n.node_id, n.cpus, n.memory, n.gpus, n.gpu_type, dict(n.used)) for n in nodes}
        for _, node_id, demand in self.releasing:
            if node_id in view:
                view[node_id].take(demand)
        return view

    async def _admit(self) -> None:
        if not len(self.queue):
            return
        running_by_owner: dict[str, int] = {}
        placing = handing_over = 0
        for r in self.running.values():
            running_by_owner[r.owner] = running_by_owner.get(r.owner, 0) + 1
            handing_over += r.supervisor is None
            placing += r.supervisor is None and r.pg is not None
        room = min(MAX_ADMITS_PER_TICK, MAX_HANDING_OVER - handing_over)
        gpu_room = MAX_PLACING - placing
        if room <= 0:
            return  # the next tick looks again
        nodes = self._node_view()
        released = self._released_view(nodes)
        blocked_types: set[str | None] = set()
        admits: list[tuple[QueuedShard, Node]] = []
        reasons: dict[str, str] = {}
        reached: set[str] = set()
        whole_pass = True
        for q in self.queue.candidates(running_by_owner):
            if len(admits) >= room:
                whole_pass = False
                break
            d = q.demand
            if d.gpus and gpu_room <= 0:
                whole_pass = False  # placement groups in flight: GPU shards wait for a later tick
                continue
            reached.add(q.eval_id)
            if not can_ever_fit(nodes, d):  # said as such, and it blocks no one
                reasons[q.eval_id] = wait_reason(nodes, d) + " (no node can ever hold it)"
                continue
            if d.gpus and (d.gpu_type in blocked_types or None in blocked_types):
                reasons.setdefault(q.eval_id, f"waiting behind a larger {d.gpu_type or 'GPU'} shard")
                continue
            node = choose_node(nodes, d)
            if node is None:
                reasons.setdefault(q.eval_id, wait_reason(nodes, d))
                if d.gpus:
                    blocked_types.add(d.gpu_type)
                continue
            node.take(d)
            if not released[node.node_id].fits(d):
                continue  # its capacity was freed a moment ago: placed on the next tick (RELEASE_S)
            released[node.node_id].take(d)
            gpu_room -= bool(d.gpus)
            admits.append((q, node))
        for q, node in admits:
            self.queue.remove(q.eval_id, q.shard_id)
        for q, node in admits:  # placement and hand-over run beside the next ticks
            task = asyncio.get_running_loop().create_task(self._start_shard(q, node))
            self._starts.add(task)
            task.add_done_callback(self._starts.discard)
        admitted = {q.eval_id for q, _ in admits}
        # an evaluation this pass did not reach keeps its reason (no flapping in the store)
        for eval_id in (set(self.reasons) if whole_pass else set(self.reasons) & reached) | set(reasons):
            reason = None if eval_id in admitted and eval_id not in reasons else reasons.get(eval_id)
            if self.reasons.get(eval_id) != reason:
                self.reasons[eval_id] = reason
                self.store.update_evaluation(eval_id, wait_reason=reason)
                if reason:
                    self._publish([{"type": "waiting", "eval_id": eval_id, "reason": reason}])
            if reason is None:
                self.reasons.pop(eval_id, None)

    async def _start_shard(self, q: QueuedShard, node: Node) -> None:
        shard = next((s for s in self.store.shards(q.eval_id) if s.shard_id == q.shard_id), None)
        if shard is None or shard.status != "queued":
            return
        pg = None
        if q.demand.gpus:
            pg = placement_group([q.demand.bundle()], strategy="STRICT_PACK", lifetime="detached",
                                 name=pg_name(q.eval_id, q.shard_id, shard.attempt),
                                 bundle_label_selector=[{"ray.io/node-id": node.node_id}])
        key = (q.eval_id, q.shard_id)
        entry = self.running[key] = Running(q.eval_id, q.shard_id, q.owner, q.demand, node.node_id, pg,
                                            shard.attempt, since=time.monotonic())
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
        if not self.store.transition_shard(q.eval_id, q.shard_id, "scheduled", expect="queued",
                                           placement=node.node_id):
            _remove(pg)
            self.running.pop(key, None)
            return
        self.admitted_total += 1
        if self.store.transition_evaluation(q.eval_id, "scheduled", expect="queued"):
            self._publish([{"type": "status", "eval_id": q.eval_id, "status": "scheduled"}])
        supervisor = self._pick_supervisor()
        self.running[key].supervisor = supervisor
        self.running[key].since = float("inf")  # not reconciled before the supervisor has it
        self._publish([{"type": "shard", "eval_id": q.eval_id, "shard_id": q.shard_id, "status": "scheduled",
                        "node": node.node_id, "demand": q.demand.describe(), "supervisor": supervisor}])
        try:
            await asyncio.wait_for(self._actor(supervisor).run_shard.remote(q.eval_id, q.shard_id, shard.attempt), 60)
        except Exception as exc:  # the supervisor is gone: reconciliation retries the shard
            log.warning("supervisor %s did not take %s/%s: %s", supervisor, q.eval_id, q.shard_id, exc)
        if self.running.get(key) is entry:
            entry.since = time.monotonic()

    def _pick_supervisor(self) -> str:
        load = {name: 0 for name in self.supervisor_names}
        for r in self.running.values():
            if r.supervisor in load:
                load[r.supervisor] += 1
        return min(load, key=lambda n: (load[n], n))

    # ------------------------------------------------------------ completion

    async def shard_finished(self, eval_id: str, shard_id: str) -> None:
        """Told by a supervisor once a shard's outcome is in the store. Idempotent."""
        r = self.running.pop((eval_id, shard_id), None)
        if r is not None and r.pg is not None:
            remove_placement_group(r.pg)
            self.releasing.append((time.monotonic(), r.node_id, r.demand))
            asyncio.get_running_loop().call_later(RELEASE_S, self.wake.set)
        shard = next((s for s in self.store.shards(eval_id) if s.shard_id == shard_id), None)
        if shard is not None and shard.status == "queued" and eval_id not in self.cancelling:
            ev = self.store.get_evaluation(eval_id)
            if ev is not None:  # a retry the supervisor asked for
                self.queue.push(QueuedShard(eval_id, shard_id, ev.owner, ev.priority,
                                            Demand.from_resources(shard.resources), shard.attempt))
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
        shards = self.store.shards(eval_id)
        if any(s.status not in TERMINAL for s in shards):
            return
        ev = self.store.get_evaluation(eval_id)
        if ev is None or ev.status in TERMINAL:
            return
        statuses = {s.status for s in shards}
        final = ("safety_stopped" if "safety_stopped" in statuses else self.cancelling.get(eval_id)
                 or ("failed" if "failed" in statuses or "cancelled" in statuses else "succeeded"))
        spec = parse_spec(ev.spec)
        errors = sorted({s.error for s in shards if s.error and s.status != "succeeded"})
        extra = {
            "name": ev.name, "status": final, "labels": ev.labels, "owner": ev.owner,
            "shards": {"total": len(shards), "failed": sum(s.status == "failed" for s in shards)},
            "shard_errors": errors[:20],
            "duration_s": round(time.time() - ev.created_at.timestamp(), 3),
        }
        try:
            by = None
            if spec.dataset.group_by:
                key = spec.dataset.group_by
                by = {str(x.id): str(x.metadata.get(key, "(none)"))
                      for x in await asyncio.to_thread(load_samples, spec.dataset, self.settings)}
            result = await self._actor(self.aggregator_name).finalize.remote(eval_id, spec.scorer_names(), extra, by)
        except Exception as exc:  # results could not be written: the evaluation failed
            log.exception("finalizing %s failed", eval_id)
            result = {"summary": None, "results_uri": None, "error": f"results could not be written: {exc}"}
            final = "failed"
        if final == "succeeded":  # only a running evaluation may succeed
            self.store.transition_evaluation(eval_id, "scheduled", expect="queued")
            self.store.transition_evaluation(eval_id, "running", expect="scheduled")
        try:
            self.store.transition_evaluation(
                eval_id, final, summary=result.get("summary"), results_uri=result.get("results_uri"),
                error=result.get("error") or ("; ".join(errors)[:2000] if errors and final != "succeeded" else None),
            )
        except StateError as exc:
            log.warning("evaluation %s: %s", eval_id, exc)
        self.cancelling.pop(eval_id, None)
        self.reasons.pop(eval_id, None)
        self._publish([{"type": "status", "eval_id": eval_id, "status": final,
                        "summary": result.get("summary")}])

    # ------------------------------------------------------------ recovery

    async def recover(self) -> None:
        """Rebuild from the store and Ray: re-queue queued shards, adopt running shards a
        supervisor still runs, retry or fail the rest, drop orphaned placement groups,
        and finish evaluations whose shards all ended."""
        pgs = {info["name"]: pid for pid, info in placement_group_table().items()
               if info.get("name", "").startswith(PG_PREFIX) and info.get("state") != "REMOVED"}
        live: dict[tuple[str, str], str] = {}
        for name in self.supervisor_names:
            try:
                for eval_id, shard_id in await self._actor(name).running_shards.remote():
                    live[(eval_id, shard_id)] = name
            except Exception:
                pass
        kept: set[str] = set()
        for ev in self.store.active_evaluations():
            for shard in self.store.shards(ev.id):
                key = (ev.id, shard.shard_id)
                if shard.status == "queued":
                    self.queue.push(QueuedShard(ev.id, shard.shard_id, ev.owner, ev.priority,
                                                Demand.from_resources(shard.resources), shard.attempt))
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
                        self._retry_or_fail(ev, shard, "its supervisor or sandbox was lost")
            await self._maybe_finish(ev.id)
        for name in set(pgs) - kept:
            try:
                remove_placement_group(ray.util.get_placement_group(name))
            except Exception:
                pass
        log.info("recovered: %d queued, %d running", len(self.queue), len(self.running))

    def _retry_or_fail(self, ev: Any, shard: Any, why: str) -> None:
        try:
            retried = self.store.transition_shard(ev.id, shard.shard_id, "queued", expect=("scheduled", "running"),
                                                  error=f"retried: {why}")
        except RetriesExhaustedError:
            retried = False
        if retried:
            fresh = next(s for s in self.store.shards(ev.id) if s.shard_id == shard.shard_id)
            self.queue.push(QueuedShard(ev.id, shard.shard_id, ev.owner, ev.priority,
                                        Demand.from_resources(shard.resources), fresh.attempt))
            self._publish([{"type": "shard", "eval_id": ev.id, "shard_id": shard.shard_id, "status": "queued",
                            "reason": why}])
        else:
            self.store.transition_shard(ev.id, shard.shard_id, "failed", expect=("scheduled", "running"),
                                        error=f"{why}; no attempts left")

    async def _reconcile_running(self) -> None:
        """A shard whose supervisor no longer runs it (the supervisor died) is retried."""
        live: set[tuple[str, str]] = set()
        for name in self.supervisor_names:
            try:
                live |= {tuple(k) for k in await asyncio.wait_for(
                    self._actor(name).running_shards.remote(), 10)}
            except Exception:
                return  # a supervisor is restarting; look again on the next round
        now = time.monotonic()
        for shard in self.store.shards_by_status(("scheduled", "running")):
            key = (shard.eval_id, shard.shard_id)
            if key in self.running or key in live or key in self.queue:
                continue
            # in the store as running, but no placement here and no supervisor has it
            self.orphans.setdefault(key, now)
            if now - self.orphans[key] > RECONCILE_S * 3:
                self.orphans.pop(key, None)
                ev = self.store.get_evaluation(shard.eval_id)
                if ev is not None:
                    self._retry_or_fail(ev, shard, "no supervisor runs it")
                    await self._maybe_finish(shard.eval_id)
        for key, r in list(self.running.items()):
            # a shard still being placed (no supervisor yet) is its `_start_shard`'s to retry;
            # it is reclaimed here only if that task died (well after the placement timeout)
            grace = RECONCILE_S * 3 if r.supervisor else PLACEMENT_TIMEOUT_S + RECONCILE_S * 3
            if key in live or now - r.since < grace:
                continue
            shard = next((s for s in self.store.shards(r.eval_id) if s.shard_id == r.shard_id), None)
            if shard is None or shard.status in TERMINAL or shard.status == "queued":
                await self.shard_finished(r.eval_id, r.shard_id)
                continue
            self.running.pop(key, None)
            _remove(r.pg)
            ev = self.store.get_evaluation(r.eval_id)
            if r.eval_id in self.cancelling:
                self.store.transition_shard(r.eval_id, r.shard_id, "cancelled", expect=("scheduled", "running"),
                                            error="cancelled")
            else:
                self._retry_or_fail(ev, shard, "its supervisor was lost")
            await self._maybe_finish(r.eval_id)

    # ------------------------------------------------------------ reading

    async def status(self) -> dict[str, Any]:
        nodes = self._node_view()
        gpus: dict[str, dict[str, float]] = {}
        for n in nodes:
            if n.gpu_type:
                g = gpus.setdefault(n.gpu_type, {"total": 0, "free": 0})
                g["total"] += n.gpus
                g["free"] += n.free("GPU")
        return {
            "queued_shards": len(self.queue),
            "running_shards": len(self.running),
            "admitted_total": self.admitted_total,
            "cpus": {"total": sum(n.cpus for n in nodes), "free": sum(n.free("CPU") for n in nodes)},
            "memory": {"total": sum(n.memory for n in nodes), "free": sum(n.free("memory") for n in nodes)},
            "gpus": gpus,
            "waiting": dict(self.reasons),
        }

    async def allocations(self) -> list[dict[str, Any]]:
        """What each running shard holds, for tests and the cluster view."""
        return [{"eval_id": r.eval_id, "shard_id": r.shard_id, "node_id": r.node_id, "gpus": r.demand.gpus,
                 "gpu_type": r.demand.gpu_type, "cpus": r.demand.cpus, "owner": r.owner}
                for r in self.running.values()]
