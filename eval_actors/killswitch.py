"""The kill path of an emergency or safety stop, reserved for it.

A stop must not queue behind busy actors or a loaded event loop. `KillSwitch` is a
dedicated thread at raised scheduling priority in the process that receives the stop (an
API replica, or a supervisor through its `killswitch` concurrency group, whose calls run
on an event loop of their own). `request()` first writes the evaluation's durable
"stopping" marker (`cluster.stopping.StopMarks`), then the thread kills every local
sandbox of the evaluation by name (`cluster.stopping.kill_evaluations`: `cgroup.kill`,
and SIGKILL of runsc's processes), at once and again every `TICK_S` for `WATCH_S`, so
that a sandbox still launching dies the moment it exists. The scheduler's cancel does the
bookkeeping afterwards, as before.

The shard executor reads the marker (`stop_requested`) right before it launches a sandbox,
right after, and as each sample arrives: no new sandbox starts for an evaluation being
stopped, and a sample that finished after the stop is marked so, never counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from cluster.runtimes.cgroups import ROOT as CGROUP_ROOT
from cluster.stopping import KillPass, StopMarks, kill_evaluations
from proctor.settings import Settings

log = logging.getLogger("proctor.killswitch")

TICK_S = 0.02  # between kill passes while an evaluation is being stopped
WATCH_S = 5.0  # how long after a request new sandboxes of the evaluation are looked for and killed
NICE = -15  # the killer thread's priority (a root process may raise it; others keep their own)
ANSWER_S = 5.0  # the API waits this long for the scheduler's bookkeeping before it answers
REASONS = {"safety_stopped": "safety stop of the evaluation", "cancelled": "emergency stop"}


def marks_of(settings: Settings) -> StopMarks:
    """This host's stop markers, under the platform's home."""
    return StopMarks(settings.home / "stopping")


class KillSwitch:
    """One dedicated, high-priority killer thread per process (started on first use)."""

    def __init__(self, marks: StopMarks, cgroup_root: Path = CGROUP_ROOT):
        self.marks = marks
        self.cgroup_root = cgroup_root
        self._requests: queue.SimpleQueue[tuple[str, Future[KillPass]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # the API app travels pickled to its replicas
        return {"marks": self.marks, "cgroup_root": self.cgroup_root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["marks"], state["cgroup_root"])  # type: ignore[misc]

    def request(self, eval_id: str, status: str = "cancelled") -> Future[KillPass]:
        """Mark `eval_id` stopping (durable when this returns) and have the killer kill its
        sandboxes here. The future resolves with the first pass after which none is alive
        (or the last pass, `WATCH_S` later, if some still were), counting what every pass
        since the evaluation's first request killed."""
        self.marks.mark(eval_id, status)
        done: Future[KillPass] = Future()
        self._requests.put((eval_id, done))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="proctor-killswitch", daemon=True)
                self._thread.start()
        return done

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        except OSError:
            pass  # not root: the thread still never waits behind an event loop
        watching: dict[str, _Watch] = {}
        while True:
            try:
                item = self._requests.get(timeout=TICK_S if watching else None)
                while True:
                    eval_id, done = item
                    watch = watching.setdefault(eval_id, _Watch())
                    watch.until = max(watch.until, time.monotonic() + WATCH_S)
                    watch.waiters.append(done)
                    item = self._requests.get_nowait()
            except queue.Empty:
                pass
            try:
                passes = kill_evaluations(set(watching), self.cgroup_root, self.marks.claims())
            except Exception as exc:  # never lose the thread; the waiters hear of it
                log.exception("the kill pass failed")
                for watch in watching.values():
                    for w in watch.waiters:
                        if not w.done():
                            w.set_exception(exc)
                watching.clear()
                continue
            now = time.monotonic()
            for eval_id, watch in list(watching.items()):
                found = watch.add(passes[eval_id])
                if passes[eval_id].killed:
                    log.warning("stop of %s: killed %d processes of %s", eval_id, passes[eval_id].killed,
                                ", ".join(found.sandboxes) or "its runtime")
                if found.alive == 0 or now >= watch.until:
                    for w in watch.waiters:
                        if not w.done():
                            w.set_result(found)
                    watch.waiters.clear()
                if now >= watch.until:
                    del watching[eval_id]


@dataclass
class _Watch:
    """An evaluation being stopped here: until when its sandboxes are looked for, who waits
    to hear, and what the passes since the first request found (the sandboxes and the
    processes killed over all of them: a pass after the one that killed finds nothing)."""

    until: float = 0.0
    waiters: list[Future[KillPass]] = field(default_factory=list)
    sandboxes: set[str] = field(default_factory=set)
    killed: int = 0

    def add(self, one: KillPass) -> KillPass:
        self.sandboxes.update(one.sandboxes)
        self.killed += one.killed
        return KillPass(tuple(sorted(self.sandboxes)), self.killed, one.alive)


def stop_requested(marks: StopMarks | None, eval_id: str, cancel: Any) -> bool:
    """Whether `eval_id` is being stopped (its marker exists); if so, the shard's stop
    signal hears of it at once (a hard stop: the sandbox is killed, the shard ends
    cancelled), even while the scheduler's own cancel is still on its way."""
    if marks is None or not marks.requested(eval_id):
        return False
    if cancel is not None and not getattr(cancel, "hard", False) and hasattr(cancel, "stop"):
        cancel.stop(hard=True, reason=REASONS.get(marks.status(eval_id) or "", "emergency stop"))
    return True


def kill_running(switch: KillSwitch, store: Any) -> list[str]:
    """Stop-all's kill path: mark every evaluation with a shard scheduled or running, and
    have the killer kill their sandboxes here (blocking: one query). Returns their ids."""
    ids = sorted({s.eval_id for s in store.shards_by_status(("scheduled", "running"))})
    for eval_id in ids:
        switch.request(eval_id)
    return ids


def supervisors_of(settings: Settings) -> list[Any]:
    """Handles of the running supervisors (one missing is skipped: its sandboxes were reaped
    or are killed here)."""
    from .control_plane import supervisor_names

    found = []
    for name in supervisor_names(settings):
        try:
            found.append(ray.get_actor(name, namespace=settings.ray_namespace))
        except ValueError:
            continue
    return found


async def stop_evaluation(switch: KillSwitch, eval_id: str, status: str, supervisors: Callable[[], list[Any]],
                          cancel: Callable[[], Any]) -> bool:
    """The emergency stop as the API runs it: kill here first (the killer thread), then ask
    each supervisor to kill on its host through its reserved concurrency group, and the
    scheduler to cancel (`cancel()`, an awaitable), and wait up to `ANSWER_S` for it.
    `supervisors` and `cancel` are called only once the kill is under way: looking actors
    up is a round trip to Ray's GCS, slow on a loaded host. Returns what the scheduler
    said, or True when it has not answered yet (it goes on)."""
    killed = asyncio.wrap_future(switch.request(eval_id, status))
    others = [asyncio.ensure_future(s.kill_evaluation.remote(eval_id, status))
              for s in await asyncio.to_thread(supervisors)]
    try:
        await asyncio.wait_for(killed, WATCH_S + 1)
    except Exception:  # the supervisors' passes and the scheduler's cancel still kill
        log.exception("stop of %s: the kill pass here failed", eval_id)
    scheduled = asyncio.ensure_future(cancel())
    await asyncio.wait({scheduled, *others}, timeout=ANSWER_S)
    if not scheduled.done():
        log.warning("stop of %s: the scheduler's cancel is still running after %gs; answering", eval_id, ANSWER_S)
        return True
    return bool(scheduled.result())
