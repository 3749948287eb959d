"""Warm sandboxes ahead of demand: from the scheduler's queue to each supervisor's pool.

The scheduler (`PoolPlanner`) looks at its queue every `PREWARM_EVERY_S`: for each
evaluation with queued shards it wants up to `pool_size` warm sandboxes, as many as free
capacity holds once running shards are counted (pooled sandboxes count against a node's
capacity like shards), and asks the evaluation's supervisor (one per evaluation, by a
stable hash, so that its pool is not moved about) to keep them warm. Each supervisor
answers with how many of each evaluation's class it has warm and what they hold; the
scheduler counts that against the node, hands a queued shard whose supervisor has a warm
sandbox of its class to that supervisor, and lets the shard take the warm sandbox's place
in the node's capacity (else a pool that filled the node would block the very shards it
was warmed for).

The supervisor turns an evaluation into its sandbox class (`template_for`: the launch
request its shards would make) and sets its pool's demand (`cluster/pool.py`).
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.pool import SandboxPool
from cluster.runtimes import RuntimeUnavailable, SandboxRuntime
from proctor.spec import parse_spec

from .capacity import Demand, Node
from .launch import ImageRefused, SandboxPlan, plan_sandbox
from .shard_queue import ShardQueue

log = logging.getLogger("proctor.prewarm")

PREWARM_EVERY_S = 1.0
PREWARM_CALL_S = 5.0  # a supervisor that does not answer by then keeps its last report


def template_for(spec: Any, runtime: SandboxRuntime, images: Any, monitored: bool = True) -> Any:
    """The sandbox plan a shard of `spec` gets from `runtime` (its request is the pool's
    template of the class). Raises `ImageRefused`."""
    from .shard_setup import traced_syscalls

    return plan_sandbox(spec, runtime, images, "template", Path("/"),
                        traced_syscalls(spec.safety) if monitored else (), ())


def pool_targets(queue: ShardQueue, nodes: list[Node], size: int, pooled_ok: Callable[[Demand], bool],
                 node_of: Callable[[str], str | None] = lambda _e: None) -> dict[str, int]:
    """How many warm sandboxes each queued evaluation should have: up to `size`, never more
    than its queued shards, placed on the free capacity of `nodes` (which already counts
    running shards) in the queue's admission order. `pooled_ok(demand)`: whether shards of
    that demand are pooled at all (GPU shards are not). `node_of(eval id)`: the node of the
    supervisor that would hold them (None: any)."""
    queued: dict[str, tuple[int, Demand]] = {}
    order: list[str] = []
    for q in queue.candidates({}):
        if q.eval_id not in queued:
            order.append(q.eval_id)
            queued[q.eval_id] = (0, q.demand)
        n, d = queued[q.eval_id]
        queued[q.eval_id] = (n + 1, d)
    free = {n.node_id: Node(n.node_id, n.cpus, n.memory, n.gpus, n.gpu_type, dict(n.used)) for n in nodes}
    targets: dict[str, int] = {}
    for eval_id in order:
        n, d = queued[eval_id]
        if size <= 0 or not pooled_ok(d):
            continue
        where = node_of(eval_id)
        for _ in range(min(n, size)):
            fits = [node for node in free.values() if (where is None or node.node_id == where) and node.fits(d)]
            if not fits:
                break
            fits[0].take(d)
            targets[eval_id] = targets.get(eval_id, 0) + 1
    return targets


@dataclass
class _Report:
    ready: dict[str, int] = field(default_factory=dict)  # eval id -> warm sandboxes of its class
    cpus: float = 0.0
    memory: int = 0
    node_id: str | None = None


class PoolPlanner:
    """The scheduler's side: targets to supervisors, their reports back, and claims."""

    def __init__(self, supervisor_names: list[str], size: int):
        self.names = supervisor_names
        self.size = size
        self.reports: dict[str, _Report] = {}
        self.claimed: dict[tuple[str, str], str] = {}  # (eval, shard) -> supervisor holding its warm sandbox

    def supervisor_of(self, eval_id: str) -> str:
        return self.names[zlib.crc32(eval_id.encode()) % len(self.names)]

    async def refresh(self, queue: ShardQueue, nodes: list[Node], actor: Callable[[str], Any]) -> None:
        """Tell every supervisor what to keep warm (an empty demand where none), and keep
        their reports."""
        if self.size <= 0:
            return

        def node_of(eval_id: str) -> str | None:
            report = self.reports.get(self.supervisor_of(eval_id))
            return report.node_id if report is not None else None

        targets = pool_targets(queue, nodes, self.size, lambda d: d.gpus == 0, node_of)
        per: dict[str, dict[str, int]] = {name: {} for name in self.names}
        for eval_id, n in targets.items():
            per[self.supervisor_of(eval_id)][eval_id] = n

        async def ask(name: str) -> None:
            try:
                got = await asyncio.wait_for(actor(name).prewarm.remote(per[name]), PREWARM_CALL_S)
            except Exception as exc:  # restarting, or busy: its last report stands
                log.debug("supervisor %s did not answer prewarm: %s", name, exc)
                return
            self.reports[name] = _Report(dict(got["ready"]), float(got["cpus"]), int(got["memory"]), got.get("node_id"))

        await asyncio.gather(*(ask(name) for name in self.names))

    def count_reserved(self, nodes: list[Node]) -> None:
        """Count the pools' sandboxes against their nodes (the first node where a
        supervisor's node is not known: one machine)."""
        by_id = {n.node_id: n for n in nodes}
        for report in self.reports.values():
            node = by_id.get(report.node_id or "") or (nodes[0] if nodes else None)
            if node is not None and (report.cpus or report.memory):
                node.take(Demand(report.cpus, report.memory))

    def claim(self, eval_id: str, shard_id: str, demand: Demand, *views: list[Node]) -> str | None:
        """A warm sandbox of the evaluation's class for this shard, if its supervisor has one:
        its capacity on the node (in each view of the nodes) becomes the shard's, and the
        supervisor's name is returned; else None."""
        name = self.supervisor_of(eval_id)
        report = self.reports.get(name)
        if report is None or report.ready.get(eval_id, 0) <= 0:
            return None
        report.ready[eval_id] -= 1
        report.cpus -= demand.cpus
        report.memory -= demand.memory
        for nodes in views:
            by_id = {n.node_id: n for n in nodes}
            node = by_id.get(report.node_id or "") or (nodes[0] if nodes else None)
            if node is not None:
                node.take(Demand(-demand.cpus, -demand.memory))
        self.claimed[(eval_id, shard_id)] = name
        return name


@dataclass(frozen=True)
class _Template:
    runtime: str
    plan: SandboxPlan


class SupervisorPools:
    """A supervisor's side: its pools (gvisor only), their demand from the scheduler's
    targets, and its report back."""

    def __init__(self, settings: Any, store: Any, images: Any, runtime: Callable[[str], SandboxRuntime],
                 workdir: Path, owner: str):
        self.settings, self.store, self.images, self.runtime = settings, store, images, runtime
        self.workdir, self.owner = workdir, owner
        self.pools: dict[str, SandboxPool] = {}  # runtime name -> warm sandboxes
        self._templates: dict[str, _Template | None] = {}  # eval id -> its sandbox class here (None: not pooled)

    async def prewarm(self, wants: dict[str, int]) -> dict[str, Any]:
        """Keep warm sandboxes for the queued shards of these evaluations (eval id -> how
        many), and none for any other. Answers how many of each evaluation's class are
        warm, and the CPUs and memory the pools hold on this node."""
        import ray

        demand: dict[str, list[Any]] = {}
        for eval_id, count in wants.items():
            found = await asyncio.to_thread(self._template, eval_id)
            if found is not None:
                image = found.plan.image
                hold = (lambda digest=image.digest: self.images.lease(digest)) if image is not None else None
                demand.setdefault(found.runtime, []).append((found.plan.request, count, hold))
        for name in set(demand) | set(self.pools):
            pool = self.pool(name)
            if pool is not None:
                pool.set_demand(demand.get(name, []))
        ready = {}
        for eval_id in wants:
            found = self._templates.get(eval_id)
            pool = self.pools.get(found.runtime) if found is not None else None
            ready[eval_id] = pool.ready(found.plan.request) if pool is not None and found is not None else 0
        cpus, memory = 0.0, 0
        for pool in self.pools.values():
            c, m = pool.reserved()
            cpus, memory = cpus + c, memory + m
        for eval_id in [e for e in self._templates if e not in wants]:
            del self._templates[eval_id]
        return {"ready": ready, "cpus": cpus, "memory": memory, "node_id": ray.get_runtime_context().get_node_id()}

    def _template(self, eval_id: str) -> _Template | None:
        if eval_id in self._templates:
            return self._templates[eval_id]
        found = None
        try:
            ev = self.store.get_evaluation(eval_id)
            spec = parse_spec(ev.spec) if ev is not None else None
            if spec is not None and spec.inspect is None and self.settings.pool_size > 0:
                runtime = self.runtime(ev.runtime if ev.runtime != "auto" else self.settings.runtime)
                if runtime.name == "gvisor":
                    found = _Template(runtime.name, template_for(spec, runtime, self.images))
        except (RuntimeUnavailable, ImageRefused):
            found = None
        self._templates[eval_id] = found
        return found

    def pool(self, name: str) -> SandboxPool | None:
        """The pool of runtime `name` (made on first use); None where it is not pooled."""
        if self.settings.pool_size <= 0 or name != "gvisor":
            return None
        if name not in self.pools:
            self.pools[name] = SandboxPool(self.runtime(name), self.workdir / name, owner=self.owner,
                                           size=self.settings.pool_size, max_age_s=self.settings.pool_max_age_s)
        return self.pools[name]
