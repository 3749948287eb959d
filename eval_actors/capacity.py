"""Admission arithmetic: what a shard needs, what each node has free, where it goes.

Pure functions, no Ray: the scheduler feeds them Ray's view of the cluster (node totals
and the bundles of Proctor's live placement groups), so they are easy to test and never
keep a count of their own.

Placement is all-or-nothing on one node (a multi-GPU shard gets all its GPUs on the
same node, or waits), GPU types must match exactly, and GPU shards go best-fit: to the
node where the fewest GPUs of that type would be left, so that large shards are not
starved by fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ACCEL_PREFIX = "accelerator_type:"
ACCEL_SLIVER = 0.001
_EPS = 1e-9


@dataclass(frozen=True)
class Demand:
    cpus: float
    memory: int
    gpus: int = 0
    gpu_type: str | None = None

    @classmethod
    def from_resources(cls, r: dict) -> "Demand":
        return cls(float(r.get("cpus", 1.0)), int(r.get("memory", 0)), int(r.get("gpus", 0)), r.get("gpu_type"))

    def describe(self) -> str:
        if self.gpus:
            return f"{self.gpus} x {self.gpu_type or 'GPU'}"
        return f"{self.cpus:g} CPU, {self.memory / 1024**3:.1f} GiB"

    def bundle(self) -> dict[str, float]:
        """The Ray placement-group bundle that reserves this demand."""
        b: dict[str, float] = {"CPU": self.cpus}
        if self.memory:
            b["memory"] = float(self.memory)
        if self.gpus:
            b["GPU"] = float(self.gpus)
            if self.gpu_type:
                # Ray gives a GPU node `accelerator_type:<TYPE>: 1` whatever its GPU count (and
                # overrides a declared one): ask a sliver of it, as Ray's own `accelerator_type=` does
                b[ACCEL_PREFIX + self.gpu_type] = ACCEL_SLIVER
        return b


@dataclass
class Node:
    node_id: str
    cpus: float
    memory: float
    gpus: float
    gpu_type: str | None
    used: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_ray(cls, node_id: str, resources: dict[str, float]) -> "Node":
        types = [k[len(ACCEL_PREFIX):] for k in resources if k.startswith(ACCEL_PREFIX)]
        return cls(node_id, resources.get("CPU", 0.0), resources.get("memory", 0.0), resources.get("GPU", 0.0),
                   types[0] if types else None)

    def free(self, key: str) -> float:
        total = {"CPU": self.cpus, "memory": self.memory, "GPU": self.gpus}[key]
        return total - self.used.get(key, 0.0)

    def fits(self, d: Demand) -> bool:
        if d.gpus and (self.gpu_type is None or (d.gpu_type and d.gpu_type != self.gpu_type)):
            return False
        return (self.free("CPU") + _EPS >= d.cpus and self.free("memory") + _EPS >= d.memory
                and self.free("GPU") + _EPS >= d.gpus)

    def take(self, d: Demand) -> None:
        for key, value in (("CPU", d.cpus), ("memory", float(d.memory)), ("GPU", float(d.gpus))):
            self.used[key] = self.used.get(key, 0.0) + value


def choose_node(nodes: list[Node], d: Demand) -> Node | None:
    """The node to place `d` on, or None when none can hold it whole right now."""
    fitting = [n for n in nodes if n.fits(d)]
    if not fitting:
        return None
    if d.gpus:
        return min(fitting, key=lambda n: (n.free("GPU") - d.gpus, n.free("CPU"), n.node_id))
    # CPU-only work keeps off GPU nodes while a CPU node can hold it
    return min(fitting, key=lambda n: (n.gpus > 0, -n.free("CPU"), n.node_id))


def wait_reason(nodes: list[Node], d: Demand) -> str:
    """Why `d` cannot be placed: what it waits for and what is free."""
    if d.gpus:
        typed = [n for n in nodes if n.gpu_type is not None and (d.gpu_type in (None, n.gpu_type))]
        if not typed:
            kind = d.gpu_type or "GPU"
            return f"waiting for {d.gpus} x {kind}; the cluster has no {kind} nodes"
        free_best = max(int(n.free("GPU") + _EPS) for n in typed)
        total_free = sum(int(n.free("GPU") + _EPS) for n in typed)
        most = max(int(n.gpus) for n in typed)
        if d.gpus > most:
            return f"waiting for {d.gpus} x {d.gpu_type or 'GPU'} on one node; the largest node has {most}"
        if total_free >= d.gpus > free_best:
            return f"waiting for {d.gpus} x {d.gpu_type or 'GPU'} on one node; {total_free} free but at most {free_best} on any node"
        if free_best >= d.gpus:
            return f"waiting for CPU or memory beside {d.gpus} x {d.gpu_type or 'GPU'}"
        return f"waiting for {d.gpus} x {d.gpu_type or 'GPU'}; {total_free} free"
    free_cpu = max((n.free("CPU") for n in nodes), default=0.0)
    free_mem = max((n.free("memory") for n in nodes), default=0.0)
    if free_cpu + _EPS < d.cpus:
        return f"waiting for {d.cpus:g} CPU; at most {max(free_cpu, 0):g} free on a node"
    return f"waiting for {d.memory / 1024**3:.2f} GiB memory; at most {max(free_mem, 0) / 1024**3:.2f} GiB free on a node"


def can_ever_fit(nodes: list[Node], d: Demand) -> bool:
    """Whether an empty cluster of these nodes could hold `d` at all."""
    empty = [Node(n.node_id, n.cpus, n.memory, n.gpus, n.gpu_type) for n in nodes]
    return any(n.fits(d) for n in empty)


def capacity_summary(nodes: list[Node]) -> dict[str, Any]:
    """Total and free CPUs, memory, and GPUs by type, of `nodes` (as the cluster view shows them)."""
    gpus: dict[str, dict[str, float]] = {}
    for n in nodes:
        if n.gpu_type:
            g = gpus.setdefault(n.gpu_type, {"total": 0, "free": 0})
            g["total"] += n.gpus
            g["free"] += n.free("GPU")
    return {
        "cpus": {"total": sum(n.cpus for n in nodes), "free": sum(n.free("CPU") for n in nodes)},
        "memory": {"total": sum(n.memory for n in nodes), "free": sum(n.free("memory") for n in nodes)},
        "gpus": gpus,
    }
