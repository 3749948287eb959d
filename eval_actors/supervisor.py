"""Supervisors: a pool of async Ray actors, each running many shards at once.

A supervisor runs each shard it is given through the shard executor, in its own sandbox
runtime folder: it marks the shard running in the store, streams accepted sample rows
to the aggregator, publishes progress and logs on the event bus, answers model calls
through its model gateway, and cancels or kills on request. When the shard ends it hands
every row to the aggregator (idempotent), records the outcome in the store, and tells
the scheduler.

A restarted supervisor first kills whatever sandboxes its previous life left behind, so
none runs unsupervised; the scheduler then retries the shards it had. Where a cluster is
configured, it also deletes the sandbox pods of this platform that no running shard owns
(`_reconcile_pods`); a shard whose pod is gone is retried or failed by the scheduler's
recovery, like any shard whose sandbox was lost.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import ray

from cluster.datasets import load_samples
from cluster.runtimes import RuntimeUnavailable, SandboxRuntime, select_runtime
from cluster.runtimes.cgroups import PARENT, CgroupSet
from cluster.state import RetriesExhaustedError, StateStore
from proctor.settings import Settings
from proctor.spec import Sample, parse_spec

from safety.alerts import AlertSink, Webhook
from safety.incident import evidence_of

from .gateway import OpenAIGateway
from .local_run import rescore_outside
from .metrics import record_shard, record_violation
from .shard_executor import ShardExecutor, ShardOutcome, ShardWork, StopSignal

log = logging.getLogger("proctor.supervisor")

PROGRESS_EVERY_S = 0.25
STREAM_EVERY_S = 1.0
HANDLE_TTL_S = 1.0  # a named actor's handle is looked up again after this (a replaced actor is found)
MAX_LOG_LINES = 10_000  # kept per shard attempt (all are published live)
RECONCILE_EVERY_S = 300.0  # sandbox pods that no running shard owns are looked for this often


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=10_000)
class Supervisor:
    def __init__(self, name: str, settings: Settings, scheduler_name: str, aggregator_name: str, bus_name: str,
                 runtime_factory: Any = None):
        logging.basicConfig(level=logging.INFO)
        self.name = name
        self.settings = settings
        self.store = StateStore(settings.state)
        self.names = {"scheduler": scheduler_name, "aggregator": aggregator_name, "bus": bus_name}
        self.workdir = settings.sandbox_dir / name
        self.runtime_factory = runtime_factory
        self.runtimes: dict[str, SandboxRuntime] = {}
        self.gateway = OpenAIGateway(secret=settings.secret)
        self.tasks: dict[tuple[str, str], tuple[asyncio.Task[None], StopSignal]] = {}
        self.samples: dict[str, dict[str, Sample]] = {}
        self.executors: dict[tuple[str, str], tuple[int, ShardExecutor]] = {}  # running: attempt, executor
        self._handles: dict[str, tuple[Any, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.alerts = AlertSink([Webhook(url, settings.alert_shape, settings.pagerduty_routing_key)
                                 for url in settings.alert_webhooks], source=f"proctor/{name}")
        self.killed_leftovers = self._kill_leftovers()
        self.reconciled_pods: list[str] = []
        # an async actor's __init__ runs on its event loop
        reconciling = asyncio.get_event_loop().create_task(self._reconcile_pods())
        self._tasks.add(reconciling)
        reconciling.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ handles

    def _actor(self, role: str) -> Any:
        # `ray.get_actor` is a blocking GCS round trip (~0.3-0.5 ms): keep handles briefly
        now = time.monotonic()
        hit = self._handles.get(role)
        if hit is not None and now - hit[1] < HANDLE_TTL_S:
            return hit[0]
        handle = ray.get_actor(self.names[role], namespace=self.settings.ray_namespace)
        self._handles[role] = (handle, now)
        return handle

    def _publish(self, events: list[dict[str, Any]]) -> None:
        try:
            self._actor("bus").publish.remote(events)
        except ValueError:
            pass

    # ------------------------------------------------------------ leftovers

    def _kill_leftovers(self) -> int:
        """Kill and remove sandboxes a previous life of this supervisor left running."""
        try:
            return self._kill_leftovers_once()
        except Exception:  # never keep a supervisor from starting; the scheduler retries its shards
            log.exception("supervisor %s: could not clean up after its previous life", self.name)
            return -1

    def _kill_leftovers_once(self) -> int:
        killed = 0
        state = self.workdir / "gvisor" / "runsc-state"
        if state.is_dir() and shutil.which("runsc"):
            out = subprocess.run(["runsc", "--root", str(state), "list", "--quiet"], capture_output=True, text=True)
            for sid in out.stdout.split():
                for ctrl in ("pids", "unified"):
                    d = Path("/sys/fs/cgroup", ctrl, PARENT, sid)
                    if d.is_dir():
                        CgroupSet(2 if ctrl == "unified" else 1, {ctrl: d}).kill_all(timeout=2)
                subprocess.run(["runsc", "--root", str(state), "delete", "--force", sid], capture_output=True)
                killed += 1
        for ctrl in ("pids", "unified"):
            for d in Path("/sys/fs/cgroup", ctrl, PARENT).glob(f"bwrap-{self.name}--*"):
                CgroupSet(2 if ctrl == "unified" else 1, {ctrl: d}).remove()
                killed += 1
        for ws in self.workdir.glob("*/ws-*"):
            shutil.rmtree(ws, ignore_errors=True)
        if killed:
            log.warning("supervisor %s: killed %d sandboxes left by its previous life", self.name, killed)
        return killed

    async def _reconcile_pods(self) -> None:
        """Delete this platform's sandbox pods that no running shard owns: those of this
        supervisor's previous life, and of shards that ended or moved on; at start, then
        every `RECONCILE_EVERY_S` (a supervisor removed from the pool leaves its pods to
        the others)."""
        def configured() -> None:  # on a thread: the client takes a moment to import
            from cluster.runtimes.kubernetes import KubernetesRuntime

            KubernetesRuntime.check(self.settings.kubeconfig)

        try:
            await asyncio.to_thread(configured)
        except RuntimeUnavailable:
            return  # no cluster configured: no pods anywhere
        while await self._reconcile_round():
            await asyncio.sleep(RECONCILE_EVERY_S)

    async def _reconcile_round(self) -> bool:
        """One reconciliation; False when the runtime cannot reconcile (a test double)."""
        try:
            reconcile = getattr(self._runtime("kubernetes"), "reconcile", None)
            if reconcile is None:
                return False

            def live() -> set[str]:  # read after the pods are listed: a pod is made after its shard is marked
                return {s.sandbox_id for s in self.store.shards_by_status(("scheduled", "running"))
                        if s.sandbox_id and s.supervisor != self.name}  # ours: the runtime knows them

            self.reconciled_pods = (self.reconciled_pods + await reconcile(live))[-1000:]  # the latest, bounded
        except Exception:  # never keep a supervisor from working; the next round tries again
            log.exception("supervisor %s: could not reconcile sandbox pods", self.name)
        return True

    def _runtime(self, name: str) -> SandboxRuntime:
        if name not in self.runtimes:
            if self.runtime_factory is not None:
                self.runtimes[name] = self.runtime_factory(name, self.workdir / name)
            else:
                self.runtimes[name] = select_runtime(name, self.workdir / name, self.settings.runsc_platform,
                                                     settings=self.settings)
        return self.runtimes[name]

    # ------------------------------------------------------------ the work

    async def run_shard(self, eval_id: str, shard_id: str, attempt: int) -> bool:
        key = (eval_id, shard_id)
        if key in self.tasks:
            return False
        stop = StopSignal()
        task = asyncio.get_running_loop().create_task(self._run(eval_id, shard_id, attempt, stop))
        self.tasks[key] = (task, stop)
        task.add_done_callback(lambda _t: self.tasks.pop(key, None))
        return True

    async def running_shards(self) -> list[tuple[str, str]]:
        return list(self.tasks)

    async def cancel(self, eval_id: str, shard_id: str, hard: bool = False) -> bool:
        entry = self.tasks.get((eval_id, shard_id))
        if entry is None:
            return False
        stop = entry[1]
        stop.stop(hard=hard, reason="emergency stop" if hard else "cancelled")
        if hard:  # answer only once the sandbox is dead: the emergency stop's promise
            try:
                await asyncio.wait_for(stop.killed.wait(), 10)
            except asyncio.TimeoutError:
                log.error("emergency stop of %s/%s: the sandbox was not dead after 10 s", eval_id, shard_id)
        return True

    async def resources(self, eval_id: str) -> list[dict[str, Any]]:
        """The resource use over time of the evaluation's shards running here."""
        found = []
        for (ev, shard_id), (attempt, executor) in list(self.executors.items()):
            if ev == eval_id and executor.guard is not None:
                found.append({"shard_id": shard_id, "attempt": attempt, "live": True,
                              "samples": executor.guard.resources()})
        return found

    async def info(self) -> dict[str, Any]:
        return {"name": self.name, "shards": len(self.tasks), "killed_leftovers": self.killed_leftovers,
                "reconciled_pods": len(self.reconciled_pods),
                "gateway_calls": sum(l.calls for l in self.gateway.ledgers.values())}

    def _incidents(self, eval_id: str, shard_id: str, outcome: ShardOutcome) -> list[dict[str, Any]]:
        """Record each safety violation of the shard as an incident, publish it, and alert
        on `stop` and `alert` ones. Returns them as dicts."""
        safety = outcome.safety or {}
        out = []
        for v in safety.get("violations", []):
            evidence = evidence_of(v, safety, safety.get("started_at"))
            evidence["stopped_the_shard"] = v == safety.get("stopped_by")
            try:
                inc = self.store.add_incident(eval_id, rule=f"{v['monitor']}/{v['rule']}", severity=v["severity"],
                                              action=v["action"], evidence=evidence, shard_id=shard_id)
            except Exception:  # the incident is also in the quarantine report and the log
                log.exception("could not record an incident of %s/%s", eval_id, shard_id)
                continue
            item = {"id": inc.id, "eval_id": eval_id, "shard_id": shard_id, "rule": inc.rule,
                    "severity": inc.severity, "action": inc.action, "evidence": evidence,
                    "created_at": inc.created_at.isoformat()}
            out.append(item)
            record_violation(inc.rule, inc.action)
            self._publish([{"type": "incident", **item}])
            if v["action"] in ("stop", "alert"):
                self.alerts.send(item)
        return out

    def _background(self, awaitable: Any) -> None:
        async def run() -> None:
            try:
                await awaitable
            except Exception:
                log.exception("background call failed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _work(self, eval_id: str, shard_id: str) -> tuple[Any, ShardWork, Any]:
        ev = self.store.get_evaluation(eval_id)
        spec = parse_spec(ev.spec)
        shard = next(s for s in self.store.shards(eval_id) if s.shard_id == shard_id)
        if eval_id not in self.samples:
            self.samples[eval_id] = {str(s.id): s for s in load_samples(spec.dataset, self.settings)}
            while len(self.samples) > 64:
                self.samples.pop(next(iter(self.samples)))
        by_id = self.samples[eval_id]
        work = ShardWork(eval_id, shard_id, spec, tuple(by_id[i] for i in shard.sample_ids),
                         tuple(range(1, spec.epochs + 1)))
        return ev, work, shard

    async def _run(self, eval_id: str, shard_id: str, attempt: int, stop: StopSignal) -> None:
        try:
            await self._run_inner(eval_id, shard_id, attempt, stop)
        except Exception as exc:  # failures are data: record, never leave the shard hanging
            log.exception("shard %s/%s crashed in supervisor %s", eval_id, shard_id, self.name)
            self.store.transition_shard(eval_id, shard_id, "failed", expect=("scheduled", "running"),
                                        error=f"supervisor error: {exc}"[:2000])
        finally:
            try:
                await self._actor("scheduler").shard_finished.remote(eval_id, shard_id)
            except Exception:
                log.exception("could not tell the scheduler that %s/%s ended", eval_id, shard_id)

    async def _run_inner(self, eval_id: str, shard_id: str, attempt: int, stop: StopSignal) -> None:
        ev, work, shard = self._work(eval_id, shard_id)
        runtime_name = ev.runtime if ev.runtime != "auto" else self.settings.runtime
        try:
            runtime = self._runtime(runtime_name)
        except RuntimeUnavailable as exc:
            self.store.transition_shard(eval_id, shard_id, "failed", expect="scheduled", error=str(exc))
            return
        sandbox_id = f"{eval_id}-{shard_id}-a{attempt}"
        if not self.store.transition_shard(eval_id, shard_id, "running", expect="scheduled", supervisor=self.name,
                                           sandbox_id=sandbox_id):
            return  # cancelled or taken meanwhile
        if self.store.transition_evaluation(eval_id, "running", expect="scheduled"):
            self._publish([{"type": "status", "eval_id": eval_id, "status": "running"}])
        self._publish([{"type": "shard", "eval_id": eval_id, "shard_id": shard_id, "status": "running",
                        "supervisor": self.name, "runtime": runtime.name}])
        aggregator = self._actor("aggregator")
        scorers = work.spec.scorer_names()
        pending: list[Any] = []
        done = 0
        last_progress = last_stream = 0.0

        def on_record(record: Any) -> None:
            nonlocal done, last_stream
            pending.append(record)
            done += 1
            now = time.monotonic()
            if now - last_stream > STREAM_EVERY_S:
                last_stream = now
                aggregator.add_records.remote(eval_id, shard_id, attempt, list(pending), scorers)
                pending.clear()

        logs: list[dict[str, Any]] = []
        dropped_logs = 0

        def on_event(event: Any) -> None:
            nonlocal last_progress, dropped_logs
            now = time.monotonic()
            if event.type == "progress" and now - last_progress > PROGRESS_EVERY_S:
                last_progress = now
                self._publish([{"type": "progress", "eval_id": eval_id, "shard_id": shard_id,
                                "done": done, "total": work.units}])
            elif event.type == "log":
                line = {"n": len(logs) + dropped_logs, "ts": time.time(), "shard_id": shard_id, "attempt": attempt,
                        "level": event.level, "message": event.message[:2000]}
                if len(logs) < MAX_LOG_LINES:
                    logs.append(line)
                else:
                    dropped_logs += 1
                self._publish([{"type": "log", "eval_id": eval_id, **line}])

        executor = ShardExecutor(runtime, self.gateway, self.workdir / runtime.name, rescore=rescore_outside)
        self.executors[(eval_id, shard_id)] = (attempt, executor)
        try:
            outcome: ShardOutcome = await executor.run(work, on_event=on_event, cancel=stop, on_record=on_record,
                                                       sandbox_id=sandbox_id)
        finally:
            self.executors.pop((eval_id, shard_id), None)
        try:
            incidents = self._incidents(eval_id, shard_id, outcome)
            if outcome.status == "safety_stopped":
                # its rows and artifacts are moved aside, readable by the safety and admin roles only
                await aggregator.quarantine_shard.remote(eval_id, shard_id, attempt, list(outcome.records), scorers,
                                                         list(outcome.artifacts), {"incidents": incidents,
                                                                                  "safety": outcome.safety})
            else:
                # every row of the shard, once more: the aggregator keeps them idempotently
                await aggregator.finish_shard.remote(eval_id, shard_id, attempt, list(outcome.records), scorers)
                if outcome.artifacts:
                    await aggregator.store_artifacts.remote(eval_id, shard_id, list(outcome.artifacts))
            if dropped_logs:
                logs.append({"n": len(logs) + dropped_logs, "ts": time.time(), "shard_id": shard_id, "attempt": attempt,
                             "level": "warning", "message": f"proctor: {dropped_logs} more log lines were not kept"})
            if logs:
                await aggregator.store_logs.remote(eval_id, shard_id, attempt, logs)
            if outcome.safety.get("resources"):
                await aggregator.store_resources.remote(eval_id, shard_id, attempt, outcome.safety["resources"])
            status = outcome.status
            retry = status == "failed" and outcome.exit is None  # the sandbox never started: infrastructure
            try:
                retried = retry and self.store.transition_shard(eval_id, shard_id, "queued", expect="running",
                                                                error=outcome.error)
            except RetriesExhaustedError:
                retried = False
            if not retried and self.store.transition_shard(eval_id, shard_id, status, expect="running",
                                                           error=outcome.error):
                self.store.add_done_units(eval_id, len(outcome.records))
            record_shard(status, len(outcome.records), outcome.model_calls, outcome.model_tokens, outcome.first_event_s)
            self._publish([{"type": "shard", "eval_id": eval_id, "shard_id": shard_id, "status": status,
                            "error": outcome.error, "runtime": outcome.runtime, "isolation": outcome.isolation,
                            "rejections": len(outcome.rejections), "duration_s": round(outcome.duration_s, 3),
                            "startup_s": outcome.first_event_s, "samples": len(outcome.records),
                            "model_calls": outcome.model_calls, "model_tokens": outcome.model_tokens},
                           {"type": "progress", "eval_id": eval_id, "shard_id": shard_id, "done": len(outcome.records),
                            "total": work.units}])
        finally:  # one shard's violation stops the whole evaluation, whatever failed above
            if outcome.status == "safety_stopped":
                self._background(self._actor("scheduler").cancel.remote(eval_id, True, "safety_stopped"))
