"""One shard of an Inspect evaluation: Inspect's own eval loop for the shard's sample ids.

The supervisor runs it instead of the shard executor when the spec names an Inspect
task. The loop runs in a worker process outside the sandbox (`cluster.inspect_worker`),
in a session of its own, the child of a Ray actor that holds the shard's resources and
GPU reservation (`inspect_host`), with no provider key: its model calls go to the supervisor's
gateway server (`gateway_api`) under a grant for this shard attempt, and its task's tools
exec in Proctor sandboxes (`INSPECT_SANDBOX`, Proctor's Inspect provider). The gateway's
guard checks every answer against the safety rules; a `stop` kills the worker and the
shard ends `safety_stopped`. A cancel ends the worker (at once for an emergency stop),
and the end of a shard, however it ends, leaves no worker process behind.

The worker's `.eval` log is read back as rows (`cluster.inspect_rows`) and kept as the
shard's transcript log, which the aggregator merges into the evaluation's log at its end.
"""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cluster.inspect_rows import records_of
from cluster.inspect_tasks import (WorkerError, WorkerProcess, job_of, make_provider_home, materialize,
                                   reap_sandboxes, worker_env)
from cluster.transcripts import TranscriptStore, transcript_ref
from cluster.transcripts import _publish as publish  # one way of putting a file on storage
from proctor.inspect_spec import InspectModel
from proctor.spec import EvaluationSpec
from safety.guard import SafetyGuard
from safety.violations import Violation

from .gateway_api import GatewayServer
from .inspect_host import HostedWorker, Placement
from .shard_work import ShardOutcome, ShardSafety, ShardWork, StopSignal, model_label

log = logging.getLogger("proctor.inspect")

CANCEL_GRACE_S = 2.0
KILL_WAIT_S = 10.0
MAX_SAMPLES = 8  # samples a worker runs at once
INCIDENT_POLL_S = 0.2
MAX_INCIDENT_BYTES = 1024**2

# The one place that says which Inspect sandbox runs an Inspect evaluation's tools.
INSPECT_SANDBOX = "proctor"


def sandbox_for(spec: EvaluationSpec, runtime: str, home: Path, eval_id: str | None = None,
                stops: Path | None = None) -> list[Any] | None:
    """The Inspect sandbox a task's samples run in: Proctor's, for a task that declares one
    (its tools need it), configured by a file written in the shard's provider `home`: one
    service with the spec's image and limits, its runtime and safety policy; none for a
    task that declares none. With `eval_id` and `stops` (the platform's stop markers) the
    sandboxes are claimed for the evaluation, so that its emergency stop finds them."""
    resolved = spec.inspect.resolved if spec.inspect else None
    if resolved is None or not resolved.sandboxed:
        return None
    box = spec.sandbox
    service = {"image": box.image, "cpus": box.cpus, "mem_limit": box.memory, "pids_limit": box.pids}
    config: dict[str, Any] = {"services": {"default": {k: v for k, v in service.items() if v is not None}}}
    if resolved.sandbox_config:  # the task's own services (checked at submission); the platform's x-proctor
        config = dict(yaml.safe_load(spec.inspect.files[resolved.sandbox_config]))  # type: ignore[union-attr]
    config |= {"x-proctor": {"runtime": runtime if runtime in ("gvisor", "bubblewrap") else "auto",
                            "policy": spec.safety.model_dump(mode="json"), "timeout_s": box.timeout_s,
                            "home": str(home),
                            **({"evaluation": eval_id, "stops": str(stops)} if eval_id and stops else {})}}
    path = home / "sandbox.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [INSPECT_SANDBOX, str(path)]


def model_args(model: InspectModel) -> dict[str, Any]:
    """Provider arguments that keep the worker's calls in the shapes the gateway serves."""
    extra: dict[str, Any] = {"openai": {"responses_api": False}, "anthropic": {"streaming": False}}.get(
        model.provider, {})
    return {**extra, **model.args}


class InspectShardRunner:
    """Runs Inspect shards for one supervisor."""

    def __init__(self, server: GatewayServer, workdir: Path, transcripts: TranscriptStore,
                 runtime: str, isolation: str, images_dir: Path, stops: Path | None = None):
        self.server = server
        self.stops = stops  # the platform's stop markers (cluster.stopping.StopMarks' folder)
        self.images_dir = images_dir
        self.workdir = workdir
        self.transcripts = transcripts
        self.runtime = runtime
        self.isolation = isolation

    async def run(self, work: ShardWork, cancel: StopSignal, attempt: int,
                  on_progress: Callable[[int], None] | None = None, placement: Placement | None = None) -> ShardOutcome:
        """Run the shard; `on_progress(done)` as its samples × epochs finish. With a
        `placement` (the scheduler's) the worker runs in a Ray actor holding the shard's
        resources (`inspect_host`); without, as this process's child."""
        spec = work.spec
        assert spec.inspect is not None and isinstance(spec.model, InspectModel)
        started = time.monotonic()
        folder = self.workdir / f"inspect-{work.eval_id}-{work.shard_id}-a{attempt}"
        shutil.rmtree(folder, ignore_errors=True)
        materialize(spec.inspect, folder / "task")
        (folder / "home").mkdir()
        home = make_provider_home(folder, self.images_dir)
        incidents, seen = home / "inspect" / "incidents", set[str]()
        worker: WorkerProcess | HostedWorker | None = None

        async def stop_worker(v: Violation) -> None:
            if worker is not None:
                worker.kill()
                await worker.wait_dead(KILL_WAIT_S)

        guard = SafetyGuard(spec.safety, [], stop_worker)
        await self.server.start()
        grant = self.server.admit(work.eval_id, work.shard_id, spec.model, spec.safety, guard)
        ids = [str(s.id) for s in work.samples]
        job = job_of(spec.inspect, folder / "task", sample_ids=ids, limit=None, epochs=len(work.epochs),
                     model=spec.model.model, model_args=model_args(spec.model), sandbox=sandbox_for(spec, self.runtime, home, work.eval_id, self.stops),
                     log_dir=str(folder / "logs"), max_samples=MAX_SAMPLES)
        env = worker_env(folder / "home", self.server.environment(grant))
        status, error = "succeeded", None
        try:
            try:
                worker = await self._start(job, env, folder, placement)
            except WorkerError as exc:
                status, error = "failed", f"the Inspect worker did not start: {exc}"
            if worker is not None:
                watching = asyncio.ensure_future(report_incidents(incidents, guard, seen, until_stopped=True))
                try:
                    status, error = await self._wait(worker, cancel, guard, spec.sandbox.timeout_s, on_progress)
                finally:
                    watching.cancel()
                    await asyncio.gather(watching, return_exceptions=True)
        finally:
            self.server.revoke(grant)
            if worker is not None:
                worker.kill()
                await worker.wait_dead(KILL_WAIT_S)
                if isinstance(worker, HostedWorker):
                    worker.close()
            await asyncio.to_thread(reap_sandboxes, home)  # what a killed worker's provider left
            await report_incidents(incidents, guard, seen, until_stopped=False)
            if cancel.hard:
                cancel.killed.set()
            await guard.close()
        if guard.stopped is not None:
            status, error = "safety_stopped", f"safety stop: {guard.stopped.message}"
        quarantined = status == "safety_stopped"
        expected = [(i, e) for i in ids for e in work.epochs]
        records = await asyncio.to_thread(self._keep, work, attempt, folder / "logs", expected, quarantined)
        if status == "succeeded" and not any(r.transcript for r in records):
            status, error = "failed", "the Inspect worker wrote no log"
        shutil.rmtree(folder, ignore_errors=True)
        safety = ShardSafety.of(guard.summary()) if guard.violations else ShardSafety()
        return ShardOutcome(
            eval_id=work.eval_id, shard_id=work.shard_id, status=status,  # type: ignore[arg-type]
            records=tuple(records), runtime=self.runtime, isolation=self.isolation, error=error,
            duration_s=time.monotonic() - started, model_calls=grant.usage.calls,
            model_tokens=grant.usage.input_tokens + grant.usage.output_tokens, safety=safety,
            retryable=status == "failed")  # no sandbox of its own to tell a launch from a run: queued again

    @staticmethod
    async def _start(job: dict[str, Any], env: dict[str, str], folder: Path,
                     placement: Placement | None) -> WorkerProcess | HostedWorker:
        if placement is None:
            return await WorkerProcess.start("run", job, env, folder / "task", folder / "worker.pid")
        return await HostedWorker.start(placement, job, env, folder / "task", folder / "worker.pid")

    async def _wait(self, worker: WorkerProcess | HostedWorker, cancel: StopSignal, guard: SafetyGuard, timeout_s: float,
                    on_progress: Callable[[int], None] | None) -> tuple[str, str | None]:
        finished: set[tuple[str, int]] = set()

        def progressed(sample_id: str, epoch: int) -> None:
            finished.add((sample_id, epoch))
            if on_progress is not None:
                on_progress(len(finished))

        answer = asyncio.ensure_future(worker.result(progressed))
        cancelled = asyncio.ensure_future(cancel.wait())
        try:
            done, _ = await asyncio.wait({answer, cancelled}, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if answer in done:
                try:
                    answer.result()
                except WorkerError as exc:
                    return ("safety_stopped", None) if guard.stopped else ("failed", f"the Inspect worker failed: {exc}")
                return "succeeded", None
            if cancelled in done:
                if not cancel.hard:
                    worker.kill(signal.SIGTERM)
                    if await worker.wait_dead(CANCEL_GRACE_S):
                        return "cancelled", cancel.reason
                worker.kill()
                return "cancelled", cancel.reason
            worker.kill()
            return "failed", f"the shard ran past its deadline of {timeout_s:g} s (sandbox.timeout_s)"
        finally:
            cancelled.cancel()
            if not answer.done():
                answer.cancel()
            await asyncio.gather(answer, cancelled, return_exceptions=True)

    def _keep(self, work: ShardWork, attempt: int, log_dir: Path, expected: list[tuple[str, int]],
              quarantined: bool) -> list[Any]:
        """The shard's rows from its log, and the log put where the evaluation's transcripts are."""
        from inspect_ai.log import read_eval_log

        found = sorted(glob.glob(str(log_dir / "*.eval")))
        label = model_label(work.spec)
        names = work.spec.scorer_names()
        if not found:
            return records_of(_NoLog(), shard_id=work.shard_id, expected=expected, scorers=names, model=label,
                              runtime=self.runtime, isolation=self.isolation, transcript=None)
        try:
            eval_log = read_eval_log(found[-1])
        except Exception as exc:  # a log cut by a kill, or not Inspect's: the samples are lost, said so
            log.warning("the Inspect log of %s/%s cannot be read: %s", work.eval_id, work.shard_id, exc)
            return records_of(_NoLog(), shard_id=work.shard_id, expected=expected, scorers=names, model=label,
                              runtime=self.runtime, isolation=self.isolation, transcript=None)
        ref = transcript_ref(work.eval_id, work.shard_id, quarantined)
        uri = self.transcripts.uri(ref) if quarantined else \
            self.transcripts.shard_log_uri(work.eval_id, work.shard_id, attempt)
        publish(uri, self.transcripts.settings, lambda path: shutil.copyfile(found[-1], path))
        return records_of(eval_log, shard_id=work.shard_id, expected=expected, scorers=names, model=label,
                          runtime=self.runtime, isolation=self.isolation, transcript=ref)


def load_incidents(folder: Path, seen: set[str]) -> list[Violation]:
    """The provider's incidents in `folder` not `seen` yet (a safety stop inside a sample),
    as violations of the shard: a `stop` there stops the whole shard, as in a native one.
    The files were written by the worker: each is read bounded and checked; a bad one is a
    `watchdog` violation that stops the shard (fail closed)."""
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.name in seen:
            continue
        seen.add(path.name)
        try:
            record = json.loads(path.read_bytes()[:MAX_INCIDENT_BYTES])
            v = record["violation"]
            action = v["action"] if v["action"] in ("stop", "alert", "record") else "stop"
            found.append(Violation(str(v["monitor"]), str(v["rule"]), action,
                                   f"in an Inspect sample (incident {record.get('id')}): {v['message']}",
                                   tuple(str(e) for e in v.get("evidence") or ())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            found.append(Violation("watchdog", "incident-unreadable", "stop",
                                   f"an incident of the Inspect provider cannot be read: {exc}", (path.name,)))
    return found


async def report_incidents(folder: Path, guard: SafetyGuard, seen: set[str], until_stopped: bool) -> None:
    """Report the incidents to the guard: once, or (`until_stopped`) as they are written."""
    while True:
        for v in await asyncio.to_thread(load_incidents, folder, seen):
            guard.report(v)
        if not until_stopped or guard.stopped is not None:
            return
        await asyncio.sleep(INCIDENT_POLL_S)


class _NoLog:
    samples: list[Any] = []
