"""A locked SQLite database never blocks an actor's event loop (eval_actors/state_calls.py).

Another connection holds SQLite's write lock (`BEGIN EXCLUSIVE`, as a backup or a second
platform on the same file would) while an actor writes to the store: the write waits on
SQLite's busy timeout, on a worker thread, and the actor's other coroutines go on. First
with a coroutine that ticks on the loop (and, for contrast, the same write made on the
loop itself, which stops the ticks), then with the real scheduler actor of a control
plane, whose `status` must answer while its submission waits for the lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cluster.state import NewShard, StateStore
from cluster.state.store import BUSY_TIMEOUT_S
from eval_actors.state_calls import ThreadedStore

CPU = {"cpus": 1.0, "memory": 512 * 1024**2, "gpus": 0, "gpu_type": None}
SPEC = {"version": 1, "name": "demo", "model": {"adapter": "reference"}}


@contextmanager
def write_locked(path: Path) -> Iterator[sqlite3.Connection]:
    """SQLite's write lock on `path`, held by another connection until the block ends."""
    holder = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        yield holder
        if holder.in_transaction:
            holder.execute("ROLLBACK")
    finally:
        holder.close()


async def ticks_while(write: Any, unlock: Any) -> tuple[int, bool]:
    """Run `write` while a coroutine ticks on the loop; `unlock` is called after the 20th
    tick (never, if the loop is blocked: the lock then ends only by SQLite's busy timeout,
    which the write is given less than). The ticks seen while the write waited, and its
    result."""
    ticks = 0
    writing = True

    async def heartbeat() -> None:
        nonlocal ticks
        while writing:
            await asyncio.sleep(0.02)
            if not writing:
                break
            ticks += 1
            if ticks == 20:
                unlock()

    beat = asyncio.get_running_loop().create_task(heartbeat())
    await asyncio.sleep(0)
    try:
        result = await write()
    finally:
        writing = False
        await beat
    return ticks, result


def test_a_store_write_waiting_for_a_locked_sqlite_database_leaves_the_event_loop_running(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with StateStore(f"sqlite:///{path}") as store:
        store.create_evaluation("ev-1", owner="ada", name="demo", spec=SPEC, model="m", runtime="gvisor",
                                shards=[NewShard("s0", ["a"], 1, CPU)])
        db = ThreadedStore(store)
        with write_locked(path) as holder:
            ticks, moved = asyncio.run(ticks_while(
                lambda: db.transition_evaluation("ev-1", "scheduled", expect="queued"),
                lambda: holder.execute("ROLLBACK")))
        assert moved is True and ticks >= 20
        assert store.get_evaluation("ev-1").status == "scheduled"


def test_for_contrast_the_same_write_made_on_the_event_loop_stops_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with StateStore(f"sqlite:///{path}") as store:
        store.create_evaluation("ev-1", owner="ada", name="demo", spec=SPEC, model="m", runtime="gvisor",
                                shards=[NewShard("s0", ["a"], 1, CPU)])
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")

        async def on_the_loop() -> bool:
            return store.transition_evaluation("ev-1", "scheduled", expect="queued")

        timer = threading.Timer(1.0, lambda: holder.execute("ROLLBACK"))  # from a thread: the loop is stuck
        timer.start()
        try:
            ticks, moved = asyncio.run(ticks_while(on_the_loop, lambda: None))
        finally:
            timer.join()
            holder.close()
        assert moved is True and ticks == 0


@pytest.mark.ray
def test_the_scheduler_answers_while_its_sqlite_database_is_locked(plane: Any, tmp_path_factory: Any) -> None:
    import ray

    from eval_actors import control_plane
    from raycluster import RUNTIMES, cluster_settings

    home = tmp_path_factory.mktemp("locked-home")
    settings = cluster_settings(home, (home / "results").as_uri(), f"sqlite:///{home}/state.db").model_copy(
        update={"ray_namespace": f"proctor-locked-{uuid.uuid4().hex[:6]}", "supervisors": 1})
    cp = control_plane.start(settings, runtime_factory=RUNTIMES)
    try:
        doc = {"name": "locked", "model": {"adapter": "reference"},
               "dataset": {"samples": [{"id": f"s{i}", "input": "q", "target": "a"} for i in range(4)]},
               "scorers": [{"type": "exact"}], "shard_size": 2,
               "sandbox": {"runtime": "kubernetes", "cpus": 1, "memory": "256Mi"}}
        with write_locked(home / "state.db"):
            submitted = cp.scheduler.submit.remote(doc, "ada")  # waits for the lock, on a worker thread
            ready, _ = ray.wait([submitted], timeout=1.0)
            assert not ready, "the submission was stored while the database was locked"
            # if the submission held the scheduler's event loop, nothing would answer before
            # SQLite's busy timeout gave up on it
            status = ray.get(cp.scheduler.status.remote(), timeout=BUSY_TIMEOUT_S - 5)
            assert status["queued_shards"] == 0
        eval_id = ray.get(submitted, timeout=120)
        ev = cp.wait(eval_id, timeout=240)
        assert ev.status == "succeeded" and ev.done_units == 4
    finally:
        control_plane.stop(settings)
