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
from typing import Any

import ray

from cluster.images import ImageStore
from cluster.inspect_tasks import reap_owner_workers
from cluster.datasets import load_samples
from cluster.runtimes import RuntimeUnavailable, SandboxRuntime, reap_owner, select_runtime
from cluster.state import RetriesExhaustedError, StateStore
from cluster.transcripts import TranscriptStore, search
from proctor.bus_events import ShardEvent, StatusEvent, event
from proctor.jsontypes import JsonObject
from proctor.observability import observe_process, tracing
from proctor.settings import Settings
from proctor.spec import Sample, parse_spec

from safety.alerts import AlertSink, Webhook

from .gateway import OpenAIGateway
from .gateway_api import GatewayServer
from .handles import ActorHandles, ControlPlaneUnavailable, outage_timeout
from .incidents import record_incidents
from .inspect_host import Placement
from .inspect_shard import InspectShardRunner
from .killswitch import KillSwitch, marks_of
from .local_run import rescore_outside
from .metrics import record_shard
from .prewarm import SupervisorPools
from .shard_executor import ShardExecutor
from .shard_stream import ShardStream
from .shard_work import ShardOutcome, ShardWork, StopSignal
from .state_calls import ThreadedStore
from .traces import supervised

log = logging.getLogger("proctor.supervisor")

FINISHED_TIMEOUT_S = 600.0  # the scheduler hears that a shard ended (it may finish the evaluation first)
STOP_TIMEOUT_S = 120.0  # the scheduler stops an evaluation (its sandboxes die within seconds)
RECONCILE_EVERY_S = 300.0  # sandbox pods that no running shard owns are looked for this often


# `killswitch`: an event loop of its own for the kill path, never queued behind the shards' work
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=10_000,
            concurrency_groups={"killswitch": 4})
class Supervisor:
    def __init__(self, name: str, settings: Settings, scheduler_name: str, aggregator_name: str, bus_name: str,
                 runtime_factory: Any = None):
        observe_process(settings, "supervisor")
        self.name = name
        self.settings = settings
        self.store = StateStore(settings.state, retry_s=settings.state_retry_s)
        self.db = ThreadedStore(self.store)  # what the event loop calls: a locked database never blocks it
        self.names = {"scheduler": scheduler_name, "aggregator": aggregator_name, "bus": bus_name}
        self.workdir = settings.sandbox_dir / name
        self.runtime_factory = runtime_factory
        self.runtimes: dict[str, SandboxRuntime] = {}
        self.gateway = OpenAIGateway(secret=settings.secret)
        self.gateway_server = GatewayServer(self.gateway)  # Inspect workers' model calls, started on first use
        self.images = ImageStore.from_settings(settings)
        self.transcripts = TranscriptStore(settings.results, settings)
        self.killswitch = KillSwitch(marks_of(settings))
        self.tasks: dict[tuple[str, str], tuple[asyncio.Task[None], StopSignal]] = {}
        self.samples: dict[str, dict[str, Sample]] = {}
        self.executors: dict[tuple[str, str], tuple[int, ShardExecutor]] = {}  # running: attempt, executor
        self.actors = ActorHandles(settings.ray_namespace)
        self._tasks: set[asyncio.Task[None]] = set()
        self.alerts = AlertSink([Webhook(url, settings.alert_shape, settings.pagerduty_routing_key)
                                 for url in settings.alert_webhooks], source=f"proctor/{name}")
        self.killed_leftovers = self._kill_leftovers()
        self.warm = SupervisorPools(settings, self.store, self.images, self._runtime, self.workdir, name)
        self.reconciled_pods: list[str] = []
        # an async actor's __init__ runs on its event loop
        reconciling = asyncio.get_event_loop().create_task(self._reconcile_pods())
        self._tasks.add(reconciling)
        reconciling.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ peers

    def _actor(self, role: str) -> Any:
        return self.actors.get(self.names[role])

    async def _call(self, role: str, method: str, *args: Any, timeout: float, **kwargs: Any) -> Any:
        return await self.actors.call(self.names[role], method, *args, timeout=timeout, **kwargs)

    def _publish(self, events: list[JsonObject]) -> None:
        try:
            self._actor("bus").publish.remote(events)
        except ControlPlaneUnavailable:
            pass  # the bus is restarting; events are a live view, the store has the state

    # ------------------------------------------------------------ leftovers

    def _kill_leftovers(self) -> int:
        """Kill and remove sandboxes a previous life of this supervisor left running."""
        try:
            return self._kill_leftovers_once()
        except Exception:  # never keep a supervisor from starting; the scheduler retries its shards
            log.exception("supervisor %s: could not clean up after its previous life", self.name)
            return -1

    def _kill_leftovers_once(self) -> int:
        killed = reap_owner_workers(self.workdir)  # Inspect workers first, before their sandboxes
        killed += reap_owner(self.workdir, self.settings.runsc_platform)
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

    # ------------------------------------------------------------ the warm pool

    async def prewarm(self, wants: dict[str, int]) -> dict[str, Any]:
        """Keep warm sandboxes for these queued evaluations (`eval_actors/prewarm.py`)."""
        return await self.warm.prewarm(wants)

    # ------------------------------------------------------------ the work

    async def run_shard(self, eval_id: str, shard_id: str, retry: int) -> bool:
        """Start running the shard (`retry`: the store's `attempt`, 0 the first time)."""
        key = (eval_id, shard_id)
        if key in self.tasks:
            return False
        stop = StopSignal()
        task = asyncio.get_running_loop().create_task(
            supervised(self._run(eval_id, shard_id, retry, stop), self.store, eval_id, shard_id, retry, self.name))
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

    @ray.method(concurrency_group="killswitch")
    async def kill_evaluation(self, eval_id: str, status: str = "cancelled") -> int:
        """Kill every sandbox of the evaluation on this host now, and mark it stopping (no
        new sandbox starts): the emergency stop's reserved path. Returns how many processes
        it killed at first."""
        found = await asyncio.wrap_future(self.killswitch.request(eval_id, status))
        return found.killed

    async def resources(self, eval_id: str) -> list[dict[str, Any]]:
        """The resource use over time of the evaluation's shards running here."""
        found = []
        for (ev, shard_id), (attempt, executor) in list(self.executors.items()):
            if ev == eval_id and executor.guard is not None:
                found.append({"shard_id": shard_id, "attempt": attempt, "live": True,
                              "samples": executor.guard.resources()})
        return found

    def _recorders(self, eval_id: str) -> list[Any]:
        return [executor.transcripts for (ev, _), (_, executor) in list(self.executors.items())
                if ev == eval_id and executor.transcripts is not None]

    async def transcript(self, eval_id: str, sample_id: str, epoch: int) -> dict[str, Any] | None:
        """A sample's transcript so far, if a shard running here has started it."""
        for recorder in self._recorders(eval_id):
            found = recorder.snapshot(sample_id, epoch)
            if found is not None:
                return found.model_dump(mode="json")
        return None

    async def transcripts_started(self, eval_id: str) -> list[dict[str, Any]]:
        """The samples of the evaluation's running shards here that have a transcript."""
        return [item for recorder in self._recorders(eval_id) for item in recorder.started()]

    async def search_transcripts(self, eval_id: str, pattern: str, limit: int) -> dict[str, Any]:
        """Where `pattern` appears in the transcripts of the evaluation's running shards here."""
        live = ((t, "live") for recorder in self._recorders(eval_id)
                for t in (recorder.snapshot(*key) for key in list(recorder.samples)) if t is not None)
        return search(eval_id, pattern, live, limit).model_dump(mode="json")

    async def _keep_transcripts(self, work: ShardWork, attempt: int, outcome: ShardOutcome) -> None:
        """Write the shard attempt's transcripts as an Inspect log (a safety-stopped shard's
        to quarantine). A store that fails loses them, not the shard: it is logged."""
        if not outcome.transcripts:
            return
        try:
            await asyncio.to_thread(self.transcripts.write_shard, eval_id=work.eval_id, spec=work.spec,
                                    shard_id=work.shard_id, attempt=attempt, status=outcome.status,
                                    error=outcome.error, transcripts=outcome.transcripts, records=outcome.records,
                                    quarantined=outcome.status == "safety_stopped")
        except Exception:
            log.exception("the transcripts of %s/%s (attempt %d) were not kept", work.eval_id, work.shard_id, attempt)

    async def info(self) -> dict[str, Any]:
        return {"name": self.name, "shards": len(self.tasks), "killed_leftovers": self.killed_leftovers,
                "reconciled_pods": len(self.reconciled_pods),
                "pool": {name: {"launched": p.launched, "taken": p.taken, "destroyed": p.destroyed}
                         for name, p in self.warm.pools.items()},
                "gateway_calls": sum(l.calls for l in self.gateway.ledgers.values())}

    def _background(self, awaitable: Any) -> None:
        async def run() -> None:
            try:
                await awaitable
            except Exception:
                log.exception("background call failed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _work(self, eval_id: str, shard_id: str) -> tuple[Any, ShardWork, Any]:
        ev = await self.db.get_evaluation(eval_id)
        spec = parse_spec(ev.spec)
        shard = await self.db.shard(eval_id, shard_id)
        if spec.inspect is not None and spec.inspect.resolved is not None:  # the task's own samples, by id
            return ev, ShardWork(eval_id, shard_id, spec, tuple(Sample(id=i, input="") for i in shard.sample_ids),
                                 tuple(range(1, spec.inspect.resolved.epochs + 1))), shard
        if eval_id not in self.samples:
            assert spec.dataset is not None
            self.samples[eval_id] = {str(s.id): s for s in load_samples(spec.dataset, self.settings)}
            while len(self.samples) > 64:
                self.samples.pop(next(iter(self.samples)))
        by_id = self.samples[eval_id]
        work = ShardWork(eval_id, shard_id, spec, tuple(by_id[i] for i in shard.sample_ids),
                         tuple(range(1, spec.epochs + 1)))
        return ev, work, shard

    async def _run(self, eval_id: str, shard_id: str, retry: int, stop: StopSignal) -> None:
        try:
            await self._run_inner(eval_id, shard_id, retry, stop)
        except Exception as exc:  # failures are data: record, never leave the shard hanging
            log.exception("shard %s/%s crashed in supervisor %s", eval_id, shard_id, self.name)
            await self.db.transition_shard(eval_id, shard_id, "failed", expect=("scheduled", "running"),
                                        error=f"supervisor error: {exc}"[:2000])
        finally:
            try:
                await self._call("scheduler", "shard_finished", eval_id, shard_id, retry, timeout=FINISHED_TIMEOUT_S)
            except Exception:
                log.exception("could not tell the scheduler that %s/%s ended", eval_id, shard_id)

    async def _run_inner(self, eval_id: str, shard_id: str, retry: int, stop: StopSignal) -> None:
        attempt = retry + 1  # the store counts retries from 0; rows, logs and resources count attempts from 1
        ev, work, shard = await self._work(eval_id, shard_id)
        runtime_name = ev.runtime if ev.runtime != "auto" else self.settings.runtime
        try:
            runtime = self._runtime(runtime_name)
        except RuntimeUnavailable as exc:
            await self.db.transition_shard(eval_id, shard_id, "failed", expect="scheduled", error=str(exc))
            return
        sandbox_id = f"{eval_id}-{shard_id}-a{retry}"
        if not await self.db.transition_shard(eval_id, shard_id, "running", expect="scheduled", supervisor=self.name,
                                           sandbox_id=sandbox_id):
            return  # cancelled or taken meanwhile
        if await self.db.transition_evaluation(eval_id, "running", expect="scheduled"):
            self._publish([event(StatusEvent(eval_id=eval_id, status="running"))])
        self._publish([event(ShardEvent(eval_id=eval_id, shard_id=shard_id, status="running", supervisor=self.name,
                                        runtime=runtime.name))])
        aggregator = self._actor("aggregator")
        scorers = work.spec.scorer_names()
        stream = ShardStream(eval_id, shard_id, attempt, work.units, publish=self._publish,
                             add_records=lambda rows: aggregator.add_records.remote(eval_id, shard_id, attempt, rows,
                                                                                    scorers))
        if work.spec.inspect is not None:
            runner = InspectShardRunner(self.gateway_server, self.workdir / runtime.name, self.transcripts,
                                        runtime.name, runtime.isolation, self.settings.images_dir,
                                        self.killswitch.marks.folder)
            placement = Placement.of(eval_id, shard_id, retry, shard.placement, shard.resources)
            outcome: ShardOutcome = await runner.run(work, stop, attempt, stream.progressed, placement)
        else:
            executor = ShardExecutor(runtime, self.gateway, self.workdir / runtime.name, rescore=rescore_outside,
                                     images=self.images, pool=self.warm.pools.get(runtime.name),
                                     on_pooled=lambda sid: self.store.update_shard(eval_id, shard_id, sandbox_id=sid),
                                     killswitch=self.killswitch)
            self.executors[(eval_id, shard_id)] = (attempt, executor)
            try:
                outcome = await executor.run(work, on_event=stream.on_event, cancel=stop, on_record=stream.on_record,
                                             sandbox_id=sandbox_id)
                await self._keep_transcripts(work, attempt, outcome)  # before the shard is gone from the live view
            finally:
                self.executors.pop((eval_id, shard_id), None)
        try:
            incidents = await record_incidents(self.db, self.alerts, self._publish, eval_id, shard_id, outcome)
            stored = outage_timeout(self.settings)  # the aggregator rides out an outage of the results store
            if outcome.status == "safety_stopped":
                # its rows and artifacts are moved aside, readable by the safety and admin roles only
                await self._call("aggregator", "quarantine_shard", eval_id, shard_id, attempt, list(outcome.records),
                                 scorers, [*outcome.artifacts, *outcome.quarantined_artifacts],
                                 {"incidents": incidents, "safety": outcome.safety.as_dict()},
                                 trace=tracing.carrier(), timeout=stored)
            else:
                # every row of the shard, once more: the aggregator keeps them idempotently
                await self._call("aggregator", "finish_shard", eval_id, shard_id, attempt, list(outcome.records),
                                 scorers, trace=tracing.carrier(), timeout=stored)
                if outcome.artifacts:
                    await self._call("aggregator", "store_artifacts", eval_id, shard_id, list(outcome.artifacts),
                                     timeout=stored)
                if outcome.quarantined_artifacts:
                    await self._call("aggregator", "quarantine_artifacts", eval_id, shard_id,
                                     list(outcome.quarantined_artifacts),
                                     {"incidents": [i for i in incidents if i["rule"].startswith("cleanup/")]},
                                     timeout=stored)
            logs = stream.kept_logs()
            if logs:
                await self._call("aggregator", "store_logs", eval_id, shard_id, attempt, logs, timeout=stored)
            if outcome.safety.resources:
                await self._call("aggregator", "store_resources", eval_id, shard_id, attempt,
                                 list(outcome.safety.resources), timeout=stored)
            status = outcome.status
            try:
                retried = outcome.retryable and await self.db.transition_shard(
                    eval_id, shard_id, "queued", expect="running", error=outcome.error)
            except RetriesExhaustedError:
                retried = False
            if not retried:  # its rows count once: in the transition's own transaction
                await self.db.transition_shard(eval_id, shard_id, status, expect="running", error=outcome.error,
                                               done_units=len(outcome.records))
            record_shard(status, len(outcome.records), outcome.model_calls, outcome.model_tokens, outcome.first_event_s)
            self._publish([event(ShardEvent(eval_id=eval_id, shard_id=shard_id, status=status, error=outcome.error,
                                            runtime=outcome.runtime, isolation=outcome.isolation,
                                            rejections=len(outcome.rejections),
                                            duration_s=round(outcome.duration_s, 3),
                                            startup_s=outcome.first_event_s, samples=len(outcome.records),
                                            launched=outcome.exit is not None, model_calls=outcome.model_calls,
                                            model_tokens=outcome.model_tokens)),
                           stream.progress(len(outcome.records))])
        finally:  # one shard's violation stops the whole evaluation, whatever failed above
            if outcome.status == "safety_stopped":
                self._background(self._call("scheduler", "cancel", eval_id, True, "safety_stopped",
                                            timeout=STOP_TIMEOUT_S))
