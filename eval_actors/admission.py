"""The scheduler's admission pass, without Ray: which queued shards go to which node now,
and why the others wait.

One pass walks the queue in admission order (`ShardQueue.candidates`) over a view of the
nodes with what runs already taken (`occupied`). A shard no node can ever hold says so
and blocks no one; a GPU shard that does not fit now reserves its GPU type for the rest
of the pass, so that smaller shards cannot starve it by fragmentation. Capacity freed a
moment ago (`released_view`, under `RELEASE_S`) is given out only on a later tick: Ray's
own view of it lags.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .capacity import Demand, Node, can_ever_fit, choose_node, wait_reason
from .shard_queue import QueuedShard

PG_PREFIX = "proctor:"
# Ray's own view of a removed placement group's resources lags ~0.1 s: a group created into them
# sooner is placed only on Ray's next retry, a second later. Freed capacity is reused after this.
RELEASE_S = 0.15


@dataclass
class Running:
    """A shard the scheduler has admitted, until it ends."""

    eval_id: str
    shard_id: str
    owner: str
    demand: Demand
    node_id: str
    pg: Any  # the GPU shard's placement group; None for a CPU/memory-only shard
    attempt: int
    supervisor: str | None = None
    since: float = 0.0

    def allocation(self) -> dict[str, Any]:
        """What it holds, for tests and the cluster view."""
        return {"eval_id": self.eval_id, "shard_id": self.shard_id, "node_id": self.node_id, "gpus": self.demand.gpus,
                "gpu_type": self.demand.gpu_type, "cpus": self.demand.cpus, "owner": self.owner}


@dataclass
class AdmissionPass:
    """What one pass decided: the shards to start (with their node), why the evaluations it
    reached wait, which it reached, and whether it reached the whole queue."""

    admits: list[tuple[QueuedShard, Node]] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    reached: set[str] = field(default_factory=set)
    whole_pass: bool = True

    def wait_reasons(self, known: Mapping[str, str | None]) -> dict[str, str | None]:
        """Why each evaluation waits after this pass (None: it no longer waits), for those it
        reached and those `known` to wait; one it did not reach keeps its reason (no flapping)."""
        ids = (set(known) if self.whole_pass else set(known) & self.reached) | set(self.reasons)
        return {eval_id: self.reasons.get(eval_id) for eval_id in ids}


def split_shards(sample_ids: list[str], epochs: int, size: int, resources: dict[str, Any]) -> list[Any]:
    """The evaluation's shards: `size` samples each, every epoch of a sample in its shard."""
    from cluster.state import NewShard

    return [NewShard(shard_id=f"{i // size:05d}", sample_ids=sample_ids[i: i + size],
                     units=len(sample_ids[i: i + size]) * epochs, resources=resources)
            for i in range(0, len(sample_ids), size)]


def pg_name(eval_id: str, shard_id: str, attempt: int) -> str:
    return f"{PG_PREFIX}{eval_id}:{shard_id}:{attempt}"


def resources_of(spec: Any) -> dict[str, Any]:
    sb = spec.sandbox
    return {"cpus": sb.cpus, "memory": sb.memory, "gpus": sb.gpu.count, "gpu_type": sb.gpu.type}


def queued_shard(ev: Any, shard: Any) -> QueuedShard:
    """The queue's entry of stored `shard` of evaluation `ev` (at the shard's attempt)."""
    return QueuedShard(ev.id, shard.shard_id, ev.owner, ev.priority, Demand.from_resources(shard.resources),
                       shard.attempt)


def in_flight(running: Iterable[Running]) -> tuple[dict[str, int], int, int]:
    """Running shards per owner; shards admitted but not yet taken by a supervisor; and of
    those, the GPU shards whose placement group is being made."""
    by_owner: dict[str, int] = {}
    handing_over = placing = 0
    for r in running:
        by_owner[r.owner] = by_owner.get(r.owner, 0) + 1
        handing_over += r.supervisor is None
        placing += r.supervisor is None and r.demand.gpus > 0
    return by_owner, handing_over, placing


def occupied(nodes: Iterable[Node], running: Iterable[Running]) -> list[Node]:
    """Fresh copies of `nodes` with the demand of every running shard taken."""
    view = [Node(n.node_id, n.cpus, n.memory, n.gpus, n.gpu_type) for n in nodes]
    by_id = {n.node_id: n for n in view}
    for r in running:
        if r.node_id in by_id:
            by_id[r.node_id].take(r.demand)
    return view


def released_view(nodes: list[Node], releasing: deque[tuple[float, str, Demand]],
                  now: float | None = None) -> dict[str, Node]:
    """`nodes` less the capacity of placement groups removed under RELEASE_S ago
    (`releasing`: when, on which node, what; the entries older than that are dropped)."""
    now = time.monotonic() if now is None else now
    while releasing and now - releasing[0][0] >= RELEASE_S:
        releasing.popleft()
    view = {n.node_id: Node(n.node_id, n.cpus, n.memory, n.gpus, n.gpu_type, dict(n.used)) for n in nodes}
    for _, node_id, demand in releasing:
        if node_id in view:
            view[node_id].take(demand)
    return view


def plan_admissions(candidates: Iterable[QueuedShard], nodes: list[Node], released: dict[str, Node],
                    room: int, gpu_room: int,
                    before_cpu_place: Callable[[QueuedShard, list[Node], dict[str, Node]], None] | None = None
                    ) -> AdmissionPass:
    """One pass over `candidates` (in admission order): at most `room` admits, of which at
    most `gpu_room` GPU shards (placement groups in flight). Takes each admit's demand
    from `nodes` and `released`. `before_cpu_place` sees each CPU shard about to be placed
    (the warm pool gives its sandbox's capacity back to the shard there)."""
    out = AdmissionPass()
    blocked_types: set[str | None] = set()
    for q in candidates:
        if len(out.admits) >= room:
            out.whole_pass = False
            break
        d = q.demand
        if d.gpus and gpu_room <= 0:
            out.whole_pass = False  # placement groups in flight: GPU shards wait for a later tick
            continue
        out.reached.add(q.eval_id)
        if not can_ever_fit(nodes, d):  # said as such, and it blocks no one
            out.reasons[q.eval_id] = wait_reason(nodes, d) + " (no node can ever hold it)"
            continue
        if d.gpus and (d.gpu_type in blocked_types or None in blocked_types):
            out.reasons.setdefault(q.eval_id, f"waiting behind a larger {d.gpu_type or 'GPU'} shard")
            continue
        if not d.gpus and before_cpu_place is not None:
            before_cpu_place(q, nodes, released)
        node = choose_node(nodes, d)
        if node is None:
            out.reasons.setdefault(q.eval_id, wait_reason(nodes, d))
            if d.gpus:
                blocked_types.add(d.gpu_type)
            continue
        node.take(d)
        if not released[node.node_id].fits(d):
            continue  # its capacity was freed a moment ago: placed on the next tick (RELEASE_S)
        released[node.node_id].take(d)
        gpu_room -= bool(d.gpus)
        out.admits.append((q, node))
    return out
