"""Where an Inspect shard's worker runs: a Ray actor that holds the shard's resources.

The scheduler admits a shard onto a node and, for a GPU shard, reserves its GPUs in a
placement group (`scheduler.pg_name`). The shard's Inspect worker then runs as the child
of one `InspectWorkerHost` actor made for the shard attempt with the shard's own demand
(CPUs, memory, GPUs and the `accelerator_type:<TYPE>` sliver): inside that placement
group's bundle for a GPU shard, pinned to the admitted node otherwise. Ray gives the
actor the reservation's GPUs; the worker sees exactly those (`CUDA_VISIBLE_DEVICES`, set
from `ray.get_gpu_ids()`, empty for a shard without GPUs).

The worker is a child process of the actor in a session of its own that dies with it
(`cluster.inspect_tasks.WorkerProcess`): `HostedWorker.kill` signals its process group,
`close` kills the actor (the worker dies with it, and the resources are freed), and its process group is written to the shard's `worker.pid` for a
restarted supervisor's reaping. The actor holds the resources until it is killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from cluster.inspect_tasks import WorkerError, WorkerProcess

from .capacity import ACCEL_PREFIX, ACCEL_SLIVER, Demand
from .scheduler import pg_name

START_TIMEOUT_S = 60.0  # for Ray to place the host (its resources are admitted, so only a lag)
POLL_S = 5.0  # a progress poll waits at most this long for news


def host_name(eval_id: str, shard_id: str, retry: int) -> str:
    """The name of a shard attempt's host actor (in the platform's Ray namespace)."""
    return f"proctor-inspect:{eval_id}:{shard_id}:{retry}"


@dataclass(frozen=True)
class Placement:
    """Where the scheduler admitted a shard attempt: its node, its demand, and (GPU shards)
    the name of its placement group."""

    node_id: str | None
    demand: Demand
    group: str | None
    name: str  # the host actor's (one per shard attempt)

    @classmethod
    def of(cls, eval_id: str, shard_id: str, retry: int, node_id: str | None, resources: dict[str, Any]) -> "Placement":
        demand = Demand.from_resources(resources)
        return cls(node_id, demand, pg_name(eval_id, shard_id, retry) if demand.gpus else None,
                   host_name(eval_id, shard_id, retry))

    def options(self) -> dict[str, Any]:
        """The host actor's Ray options: the shard's demand, where the scheduler put it.
        Raises `WorkerError` when the GPU shard's placement group is gone."""
        d = self.demand
        opts: dict[str, Any] = {"name": self.name, "num_cpus": d.cpus, "num_gpus": d.gpus}
        if d.memory:
            opts["memory"] = d.memory
        if d.gpus and d.gpu_type:
            opts["resources"] = {ACCEL_PREFIX + d.gpu_type: ACCEL_SLIVER}
        if self.group is not None:
            try:
                group = ray.util.get_placement_group(self.group)
            except ValueError:
                raise WorkerError(f"the shard's GPU reservation (placement group {self.group}) is gone") from None
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        elif self.node_id:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.node_id, soft=False)
        return opts


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=16)
class InspectWorkerHost:
    """One shard attempt's Inspect worker, run as this actor's child (async actor)."""

    def __init__(self) -> None:
        self.worker: WorkerProcess | None = None
        self.answer: asyncio.Future[dict[str, Any]] | None = None
        self.finished: list[tuple[str, int]] = []
        self.news = asyncio.Event()

    def reservation(self) -> dict[str, Any]:
        """What Ray gave this actor: its node, its process, its GPU ids."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    async def start(self, job: dict[str, Any], env: dict[str, str], cwd: str, pid_file: str) -> int:
        """Start the worker with the reservation's GPUs; returns its process id."""
        env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in ray.get_gpu_ids())}
        self.worker = await WorkerProcess.start("run", job, env, Path(cwd), Path(pid_file))
        self.answer = asyncio.ensure_future(self.worker.result(self._progressed))
        self.answer.add_done_callback(lambda _f: self.news.set())
        return self.worker.proc.pid

    def _progressed(self, sample_id: str, epoch: int) -> None:
        self.finished.append((sample_id, epoch))
        self.news.set()

    async def progress(self, seen: int) -> tuple[list[tuple[str, int]], bool]:
        """The samples finished after the first `seen`, waiting up to `POLL_S` for one, and
        whether the worker has answered."""
        assert self.answer is not None
        if len(self.finished) <= seen and not self.answer.done():
            self.news.clear()
            try:
                await asyncio.wait_for(self.news.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass
        return self.finished[seen:], self.answer.done()

    async def result(self) -> dict[str, Any]:
        assert self.answer is not None
        return await self.answer

    def kill(self, sig: int) -> None:
        if self.worker is not None:
            self.worker.kill(sig)

    async def wait_dead(self, timeout: float) -> bool:
        return self.worker is None or await self.worker.wait_dead(timeout)


class HostedWorker:
    """The supervisor's side of a hosted worker: `WorkerProcess`'s interface (result, kill,
    wait_dead) over the actor, and `close()` that kills the actor and frees its resources."""

    def __init__(self, actor: Any):
        self.actor = actor
        self.dead = False

    @classmethod
    async def start(cls, placement: Placement, job: dict[str, Any], env: dict[str, str], cwd: Path,
                    pid_file: Path) -> "HostedWorker":
        """Place the host and start the worker in it. Raises `WorkerError` if Ray cannot place
        it within `START_TIMEOUT_S` or it cannot start the worker (the host is killed)."""
        actor = InspectWorkerHost.options(**placement.options()).remote()  # type: ignore[attr-defined]
        hosted = cls(actor)
        try:
            await asyncio.wait_for(asyncio.wrap_future(actor.reservation.remote().future()), START_TIMEOUT_S)
            await actor.start.remote(job, env, str(cwd), str(pid_file))
        except asyncio.TimeoutError:
            hosted.close()
            raise WorkerError(f"Ray did not place the Inspect worker with the shard's resources "
                              f"({placement.demand.describe()}) within {START_TIMEOUT_S:g} s") from None
        except (RayActorError, RayTaskError) as exc:
            hosted.close()
            raise WorkerError(f"the Inspect worker's host could not start it: {exc}") from None
        return hosted

    async def result(self, on_progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
        """As `WorkerProcess.result`: raises `WorkerError` with the worker's reason, or when
        the host died."""
        seen = 0
        try:
            while True:
                items, answered = await self.actor.progress.remote(seen)
                seen += len(items)
                for sample_id, epoch in items:
                    if on_progress is not None:
                        on_progress(sample_id, epoch)
                if answered:
                    return await self.actor.result.remote()
        except RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            raise WorkerError(str(cause.cause if hasattr(cause, "cause") else exc).splitlines()[-1]) from None
        except RayActorError:
            raise WorkerError("the Inspect worker's host died") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the worker's process group (its sandboxes' processes are in it); `close()`
        kills the host itself."""
        if not self.dead:
            self.actor.kill.remote(int(sig))

    async def wait_dead(self, timeout: float) -> bool:
        if self.dead:
            return await _actor_gone(self.actor, timeout)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.actor.wait_dead.remote(timeout).future()),
                                          timeout + 5)
        except (RayActorError, asyncio.TimeoutError, GetTimeoutError):
            return False

    def close(self) -> None:
        if not self.dead:
            self.dead = True
            ray.kill(self.actor, no_restart=True)


async def _actor_gone(actor: Any, timeout: float) -> bool:
    """Whether the killed `actor` is dead within `timeout` (its calls fail)."""
    try:
        await asyncio.wait_for(asyncio.wrap_future(actor.reservation.remote().future()), timeout)
    except RayActorError:
        return True
    except asyncio.TimeoutError:
        return False
    return False
