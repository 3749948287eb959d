"""The warm sandbox pool (cluster/pool.py), in real gVisor sandboxes, and its planning
from the scheduler's queue (eval_actors/prewarm.py)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from test_executor import spec_with

from cluster.pool import SandboxPool, class_of
from cluster.runtimes import GvisorRuntime, reap_owner
from cluster.runtimes.cgroups import CgroupSet
from eval_actors.capacity import Demand, Node
from eval_actors.prewarm import PoolPlanner, pool_targets, template_for
from eval_actors.shard_executor import ShardExecutor, ShardWork
from eval_actors.shard_queue import QueuedShard, ShardQueue

pytestmark = pytest.mark.sandbox




@pytest.fixture
def folder(sandbox_root: Path, request: pytest.FixtureRequest) -> Path:
    """A supervisor's folder with a gvisor runtime folder in it (as the supervisor has)."""
    GvisorRuntime.check()
    path = sandbox_root / f"pool-{request.node.name[:40]}-{os.urandom(2).hex()}"
    (path / "gvisor").mkdir(parents=True)
    path.chmod(0o711)
    (path / "gvisor").chmod(0o711)
    return path


async def _warm(pool: SandboxPool, request: Any, n: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while pool.ready(request) < n:
        assert time.monotonic() < deadline, f"pool has {pool.ready(request)} of {n} warm sandboxes"
        await asyncio.sleep(0.1)


def _pool(folder: Path, **kw: Any) -> tuple[GvisorRuntime, SandboxPool]:
    runtime = GvisorRuntime(folder / "gvisor")
    return runtime, SandboxPool(runtime, folder / "gvisor", owner="sup-test", **kw)


def _alive(sandbox_id: str) -> list[int]:
    """Host processes whose command line names the sandbox (runsc, its sentry and gofer)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if sandbox_id.encode() in cmdline:
                found.append(int(entry.name))
    return found


def _work(spec: Any, eval_id: str) -> ShardWork:
    return ShardWork(eval_id, "s0", spec, tuple(spec.dataset.samples or ()))


def test_a_pooled_sandbox_runs_exactly_one_shard(folder: Path) -> None:
    spec = spec_with()

    async def main() -> list[tuple[str, str, list[str]]]:
        runtime, pool = _pool(folder, size=2)
        template = template_for(spec, runtime, None).request
        pool.set_demand([(template, 2, None)])
        await _warm(pool, template, 2)
        ran = []
        try:
            for i in range(4):
                executor = ShardExecutor(runtime, None, folder / "gvisor", pool=pool)  # type: ignore[arg-type]
                outcome = await executor.run(_work(spec, f"ev-{i}"))
                ran.append((outcome.status, outcome.error, executor.pooled_ids))
                await _warm(pool, template, 2)  # refilled after each take
        finally:
            await pool.close()
        assert pool.taken == 4 and pool.launched >= 6
        return ran

    ran = asyncio.run(main())
    assert [status for status, _, _ in ran] == ["succeeded"] * 4, ran
    ids = [sid for _, _, pooled in ran for sid in pooled]
    assert len(ids) == 4 and len(set(ids)) == 4  # each shard its own pooled sandbox, none twice
    assert all(sid.startswith("pool-sup-test-") for sid in ids)
    assert not [p for sid in ids for p in _alive(sid)]
    assert not list((folder / "gvisor").glob("ws-*")) and not list((folder / "gvisor" / "bundles").iterdir())


def test_a_shard_of_another_class_never_gets_a_pooled_sandbox(folder: Path) -> None:
    pooled_spec = spec_with()
    other = {"smaller memory": spec_with(sandbox={"timeout_s": 60, "memory": "256Mi"}),
             "more pids": spec_with(sandbox={"timeout_s": 60, "memory": "512Mi", "pids": 200}),
             "another deadline": spec_with(sandbox={"timeout_s": 61, "memory": "512Mi"})}

    async def main() -> dict[str, tuple[str, list[str]]]:
        runtime, pool = _pool(folder, size=1)
        template = template_for(pooled_spec, runtime, None).request
        pool.set_demand([(template, 1, None)])
        await _warm(pool, template, 1)
        seen = {}
        try:
            for name, spec in other.items():
                assert class_of(template_for(spec, runtime, None).request) != class_of(template)
                executor = ShardExecutor(runtime, None, folder / "gvisor", pool=pool)  # type: ignore[arg-type]
                outcome = await executor.run(_work(spec, "ev-other"))
                seen[name] = (outcome.status, executor.pooled_ids)
            assert pool.ready(template) == 1 and pool.taken == 0  # still waiting for its own class
        finally:
            await pool.close()
        return seen

    seen = asyncio.run(main())
    assert seen == {name: ("succeeded", []) for name in other}  # each launched cold


def test_a_pooled_sandbox_holds_nothing_of_an_earlier_shard(folder: Path) -> None:
    # the first shard leaves files in /tmp and the workspace and exports a variable in its
    # setup; the second, in the next pooled sandbox of the same class, must see none of it
    first = spec_with(setup=[{"command": "echo x > /tmp/left-by-first; echo x > /workspace/left-by-first; "
                                         "export LEFT_BY_FIRST=1; echo 'export LEFT_BY_FIRST=1' >> /tmp/.profile"}],
                      scorers=[{"type": "command", "command": "test -e /tmp/left-by-first"}])
    check = ("test ! -e /tmp/left-by-first && test ! -e /tmp/.profile && test ! -e /workspace/left-by-first "
             "&& ! ls /workspace | grep -q -- -e1- && ! env | grep -q LEFT_BY_FIRST && ! env | grep -q ev-first")
    second = spec_with(scorers=[{"type": "command", "command": check}])
    assert class_of(template_for(first, GvisorRuntime(folder / "gvisor"), None).request) == \
        class_of(template_for(second, GvisorRuntime(folder / "gvisor"), None).request)

    async def main() -> list[Any]:
        runtime, pool = _pool(folder, size=2)
        template = template_for(first, runtime, None).request
        pool.set_demand([(template, 2, None)])
        await _warm(pool, template, 2)
        outcomes = []
        try:
            for spec, eval_id in ((first, "ev-first"), (second, "ev-second")):
                executor = ShardExecutor(runtime, None, folder / "gvisor", pool=pool)  # type: ignore[arg-type]
                outcomes.append((await executor.run(_work(spec, eval_id)), executor.pooled_ids))
        finally:
            await pool.close()
        return outcomes

    (one, one_ids), (two, two_ids) = asyncio.run(main())
    assert one.status == two.status == "succeeded", (one.error, two.error)
    assert len(one_ids) == len(two_ids) == 1 and one_ids != two_ids
    assert one.records[0].scores["command"] == 1.0  # the first did leave its files
    assert two.records[0].scores["command"] == 1.0, two.records[0]  # ... and the second saw none


def test_pooled_sandboxes_are_recycled_at_their_maximum_age(folder: Path) -> None:
    async def main() -> tuple[list[str], SandboxPool]:
        runtime, pool = _pool(folder, size=2, max_age_s=2.0)
        template = template_for(spec_with(), runtime, None).request
        pool.set_demand([(template, 2, None)])
        await _warm(pool, template, 2)
        first = [w.sandbox.id for w in pool.classes[class_of(template)].warm]
        try:
            deadline = time.monotonic() + 60
            while pool.destroyed < 2 or pool.ready(template) < 2 or \
                    {w.sandbox.id for w in pool.classes[class_of(template)].warm} & set(first):
                assert time.monotonic() < deadline, "the pool did not recycle its sandboxes"
                await asyncio.sleep(0.2)
            for sid in first:  # the old ones are gone without a trace
                assert not _alive(sid)
                assert CgroupSet.named(runtime.cgroup_name(sid), runtime.cgroup_root) is None
                assert not (folder / "gvisor" / f"ws-{sid}").exists()
                assert not (runtime.bundles / sid).exists()
        finally:
            await pool.close()
        return first, pool

    first, pool = asyncio.run(main())
    assert pool.launched >= 4 and pool.taken == 0


def test_demand_that_goes_destroys_the_warm_sandboxes(folder: Path) -> None:
    async def main() -> tuple[list[str], SandboxPool]:
        runtime, pool = _pool(folder, size=2)
        template = template_for(spec_with(), runtime, None).request
        pool.set_demand([(template, 2, None)])
        await _warm(pool, template, 2)
        ids = [w.sandbox.id for w in pool.classes[class_of(template)].warm]
        assert pool.reserved() == (2 * template.limits.cpus, 2 * template.limits.memory_bytes)
        pool.set_demand([])
        deadline = time.monotonic() + 30
        while pool.destroyed < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert pool.reserved() == (0, 0)
        await pool.close()
        return ids, pool

    ids, _ = asyncio.run(main())
    assert not [p for sid in ids for p in _alive(sid)]


def test_reap_owner_finds_pooled_sandboxes(folder: Path) -> None:
    # a supervisor that died with a warm pool: its next life (or `proctor down`) reaps them
    async def main() -> tuple[list[str], int, SandboxPool]:
        runtime, pool = _pool(folder, size=2)
        template = template_for(spec_with(), runtime, None).request
        pool.set_demand([(template, 2, None)])
        await _warm(pool, template, 2)
        ids = [w.sandbox.id for w in pool.classes[class_of(template)].warm]
        assert all(_alive(sid) for sid in ids)
        killed = await asyncio.to_thread(reap_owner, folder)
        return ids, killed, pool

    ids, killed, _ = asyncio.run(main())
    assert killed >= 2
    runtime = GvisorRuntime(folder / "gvisor")
    for sid in ids:
        assert not _alive(sid)
        assert CgroupSet.named(runtime.cgroup_name(sid), runtime.cgroup_root) is None
    assert not list((folder / "gvisor").glob("ws-*"))


def _queue(*shards: tuple[str, int, Demand]) -> ShardQueue:
    queue = ShardQueue()
    for eval_id, n, demand in shards:
        for i in range(n):
            queue.push(QueuedShard(eval_id, f"s{i}", "u", 0, demand))
    return queue


def test_pool_targets_follow_the_queue_and_fit_free_capacity() -> None:
    small, gpu = Demand(1.0, 1024**3), Demand(1.0, 1024**3, gpus=1, gpu_type="H100")
    node = Node("n1", cpus=4, memory=16 * 1024**3, gpus=0, gpu_type=None)
    node.take(Demand(1.0, 1024**3))  # a running shard
    queue = _queue(("ev-a", 5, small), ("ev-b", 1, small), ("ev-g", 3, gpu))
    assert pool_targets(queue, [node], 2, lambda d: d.gpus == 0) == {"ev-a": 2, "ev-b": 1}  # 3 CPUs free
    full = Node("n1", cpus=2, memory=16 * 1024**3, gpus=0, gpu_type=None)
    full.take(Demand(1.5, 1024**3))
    assert pool_targets(queue, [full], 2, lambda d: d.gpus == 0) == {}  # no room: nothing pooled
    assert pool_targets(queue, [node], 0, lambda d: True) == {}  # size 0: the pool is off
    assert pool_targets(ShardQueue(), [node], 2, lambda d: True) == {}  # no queue, no pool


def test_a_claimed_warm_sandbox_gives_its_capacity_to_its_shard() -> None:
    planner = PoolPlanner(["sup-0", "sup-1"], size=2)
    d = Demand(1.0, 1024**3)
    name = planner.supervisor_of("ev-a")
    from eval_actors.prewarm import _Report

    planner.reports[name] = _Report({"ev-a": 2}, 2.0, 2 * 1024**3, "n1")
    node = Node("n1", cpus=2, memory=4 * 1024**3, gpus=0, gpu_type=None)
    planner.count_reserved([node])
    assert not node.fits(d)  # the pool holds the node's CPUs
    assert planner.claim("ev-a", "s0", d, [node]) == name
    assert node.fits(d)  # ... until a shard of its class takes one
    node.take(d)
    assert planner.claim("ev-b", "s0", d, [node]) is None  # another class gets nothing
    assert planner.claim("ev-a", "s1", d, [node]) == name
    assert planner.claim("ev-a", "s2", d, [node]) is None  # two were warm, two were taken
