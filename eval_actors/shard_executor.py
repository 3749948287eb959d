"""Runs one shard in a sandbox and returns its outcome. Plain asyncio; the supervisors
of the control plane wrap it.

The executor launches the sandbox, sends the shard over the channel, answers `generate`
through the model gateway, copies declared artifacts out (bounded, no symlinks), and
enforces cancellation; the runtime enforces the deadline and the output cap. It trusts
nothing from the sandbox: inputs and targets in the records come from the dataset, a
sample the shard did not contain is rejected, and every expected (sample, epoch) gets a
row — a sample the sandbox never reported gets one with an error, so none is lost.

`run()` never raises for a shard's failure: it returns a `ShardOutcome` (failures are
data). It raises only `asyncio.CancelledError`, after killing and removing the sandbox.

Its parts: `shard_work` (what it is given and gives back), `shard_setup` (the workspace
and the shard message), `shard_guard` (the safety guard of the sandbox) and `artifacts`
(what the sandbox declares, checked and kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cluster.results import SampleRecord
from cluster.runtimes import Sandbox, SandboxError, SandboxExit, SandboxRuntime
from cluster.transcripts import transcript_ref
from proctor.observability import tracing
from proctor.protocol import (
    PROTOCOL_VERSION,
    ArtifactEvent,
    Cancel,
    DoneEvent,
    GenerateEvent,
    LogEvent,
    OutEvent,
    Rejection,
    SampleEvent,
    TranscriptEvent,
    encode,
)
from proctor.spec import EvaluationSpec, Sample
from safety.canaries import CANARIES
from safety.guard import SafetyGuard
from safety.scan import OutputScan

from . import traces
from .artifacts import ArtifactCollector, inline_budget
from .gateway import GatewayCall, ModelGateway
from .killswitch import KillSwitch, stop_requested
from .launch import ImageRefused, plan_sandbox
from .shard_guard import RuleSets, limit_hit, sandbox_guard
from .shard_setup import make_workspace, sandbox_id_for, shard_message, traced_syscalls
from .shard_work import (
    LATE_SAMPLE,
    ShardOutcome,
    ShardSafety,
    ShardStatus,
    ShardWork,
    StopSignal,
    model_label,
    render_input,
    render_target,
)
from .transcript_recorder import TranscriptRecorder

__all__ = ["LATE_SAMPLE", "ShardExecutor", "ShardOutcome", "ShardSafety", "ShardWork", "StopSignal"]

log = logging.getLogger("proctor.executor")

CANCEL_GRACE_S = 2.0


@dataclass
class _Run:
    """What one shard's run has gathered so far."""

    work: ShardWork
    expected: dict[tuple[str, int], Sample]
    collector: ArtifactCollector
    records: dict[tuple[str, int], SampleRecord] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)
    done: DoneEvent | None = None
    first_event_s: float | None = None
    on_record: Callable[[SampleRecord], None] | None = None
    model_calls: int = 0
    model_tokens: int = 0
    guard: SafetyGuard | None = None
    scan: OutputScan | None = None
    transcripts: TranscriptRecorder | None = None
    stop: asyncio.Event | None = None  # the shard's cancel or emergency stop
    version: int = PROTOCOL_VERSION  # the harness's, from its first line: what it is written to in

    @property
    def rejections(self) -> list[Rejection]:
        """What the shard's sandbox said that was refused (shared with its artifacts)."""
        return self.collector.rejections

    @property
    def hard_stopped(self) -> bool:
        """The emergency stop was asked for: what the sandbox still says raced its kill."""
        return isinstance(self.stop, StopSignal) and self.stop.is_set() and self.stop.hard


class ShardExecutor:
    def __init__(self, runtime: SandboxRuntime, gateway: ModelGateway, sandbox_dir: Path,
                 rescore: Callable[[EvaluationSpec, str, Sample], dict[str, float]] | None = None,
                 monitored: bool = True, images: Any = None, pool: Any = None,
                 on_pooled: Callable[[str], None] | None = None, killswitch: KillSwitch | None = None) -> None:
        # `monitored=False` runs without the safety policy's monitors and rules: ONLY the
        # baseline of benchmarks/safety_stop.py; the platform never turns them off
        self.monitored = monitored
        self.runtime = runtime
        self.gateway = gateway
        self.sandbox_dir = sandbox_dir
        self.rescore = rescore
        self.guard: SafetyGuard | None = None  # the latest run's guard (its resource use, live)
        self.images = images  # cluster.images.ImageStore: where a spec's sandbox.image is found
        self.killswitch = killswitch  # stop markers, and the kill path of a violation (killswitch.py)
        self.stops = killswitch.marks if killswitch is not None else None
        self.transcripts: TranscriptRecorder | None = None  # the latest run's transcripts (live)
        self._rules = RuleSets()
        self.pool = pool  # cluster.pool.SandboxPool: warm sandboxes of this runtime, taken when of the shard's class
        self.pooled_ids: list[str] = []  # the pooled sandboxes this executor took, in order
        self.on_pooled = on_pooled  # told the id of a pooled sandbox when one is taken (it is not the one asked for)
        self.sandbox_dir.mkdir(parents=True, exist_ok=True)
        self.sandbox_dir.chmod(0o711)

    @traces.executed
    async def run(self, work: ShardWork, on_event: Callable[[OutEvent], None] | None = None,
                  cancel: asyncio.Event | None = None, on_record: Callable[[SampleRecord], None] | None = None,
                  sandbox_id: str | None = None) -> ShardOutcome:
        """Run `work` to its end. `on_event` sees every accepted event (untrusted content);
        `on_record` every sample row as it is accepted, for streaming to the aggregator.
        `cancel` stops it; a `StopSignal` may ask for the emergency stop's immediate kill."""
        started = time.monotonic()
        spec = work.spec
        sid = sandbox_id or sandbox_id_for(work)
        workspace = self.sandbox_dir / f"ws-{sid}"
        collector = ArtifactCollector(spec.sandbox.artifacts, workspace if self.runtime.shares_workspace else None)
        run = _Run(work, {(str(s.id), e): s for e in work.epochs for s in work.samples}, collector,
                   on_record=on_record, stop=cancel)
        run.transcripts = self.transcripts = TranscriptRecorder(work.eval_id, work.shard_id, list(run.expected),
                                                                spec.transcripts)
        sandbox: Sandbox | None = None
        leases = contextlib.ExitStack()  # the image the sandbox runs in, kept from garbage collection
        try:
            try:
                plan = plan_sandbox(spec, self.runtime, self.images, sid, workspace,
                                    traced_syscalls(spec.safety) if self.monitored else (),
                                    (("proctor.dev/eval-id", work.eval_id), ("proctor.dev/shard-id", work.shard_id)))
            except ImageRefused as exc:
                return self._outcome(run, "failed", str(exc), None, started, retryable=True)
            request = plan.request
            stop_requested(self.stops, work.eval_id, cancel)  # right before the launch: a stop's marker
            if cancel is not None and cancel.is_set():  # stopped while it waited: no sandbox is started
                reason = cancel.reason if isinstance(cancel, StopSignal) else "cancelled"
                return self._outcome(run, "cancelled", f"{reason} before its sandbox started", None, started)
            # a warm sandbox of exactly this class, if the pool has one: its workspace is empty until now
            pooled = self.pool.take(request) if self.pool is not None else None
            if pooled is not None:
                sandbox, request, workspace, sid = pooled, pooled.request, pooled.request.workspace, pooled.id
                self.pooled_ids.append(sid)
                if self.stops is not None:  # its name does not say its evaluation: a stop finds it by the claim
                    self.stops.claim(work.eval_id, sid)
                if self.on_pooled is not None:
                    self.on_pooled(sid)
                if collector.workspace is not None:
                    collector.workspace = workspace
            canaries = CANARIES if spec.safety.canaries and self.monitored else {}
            make_workspace(workspace, {**canaries, **spec.sandbox.files}, exist_ok=pooled is not None)
            if plan.image is not None:
                leases.enter_context(self.images.lease(plan.image.digest))
            launching = tracing.start("sandbox.launch", sandbox_id=sid, runtime=self.runtime.name, gpus=request.gpus,
                                      pooled=pooled is not None)
            try:
                if sandbox is None:
                    sandbox = await self.runtime.launch(request)
            except SandboxError as exc:
                launching.end(error=exc)
                return self._outcome(run, "failed", str(exc), None, started, retryable=True)
            launching.end()
            if stop_requested(self.stops, work.eval_id, cancel):  # stopped while it launched: killed now
                await sandbox.kill("killed", cancel.reason if isinstance(cancel, StopSignal) else "emergency stop")
            run.guard = self.guard = sandbox_guard(
                spec.safety, request, sandbox, self._rules.of(spec.safety) if self.monitored else None,
                on_stop=self._stop_others(work.eval_id))
            run.guard.start()
            collector.report = run.guard.report
            if self.monitored:
                run.scan = collector.scan = OutputScan(spec.safety, self._rules.of(spec.safety))
            running = tracing.start("sandbox.run", activate=True, sandbox_id=sid)  # model calls and samples: its children
            inline = 0 if self.runtime.shares_workspace else inline_budget(request.limits.output_cap_bytes)
            watcher = asyncio.create_task(self._watch_cancel(sandbox, cancel, run)) if cancel else None
            pending: set[asyncio.Task[None]] = set()
            try:
                async for event in sandbox.events():
                    if run.first_event_s is None:  # `harness ready`: the shard goes out in its version
                        run.first_event_s = time.monotonic() - started
                        run.version = event.v
                        await sandbox.send(encode(shard_message(work, plan.agent, inline_artifact_bytes=inline),
                                                  run.version))
                    self._handle(run, event, sandbox, pending)
                    if on_event is not None:
                        on_event(event)
                exit_ = await sandbox.wait()
                stop_requested(self.stops, work.eval_id, cancel)  # killed by the stop from another process
                if cancel is None or not cancel.is_set():  # (a sandbox killed by a stop hit no limit:
                    limit_hit(run.guard, exit_)  # its pids' refusals under load are not a violation)
                await run.guard.sweep()
                await run.guard.wait_stopped()
            finally:
                if watcher is not None:
                    watcher.cancel()
                for task in pending:
                    task.cancel()
                await run.guard.close()
                running.end()
            collector.finish()
            run.rejections.extend(sandbox.parser.rejections)
            if run.guard.stopped is not None:
                collector.collect_left_behind()
            status, error = self._judge(run, exit_, cancel)
            return self._outcome(run, status, error, exit_, started)
        except asyncio.CancelledError:
            if sandbox is not None:
                await sandbox.kill("killed", "supervisor cancelled")
            if run.guard is not None:
                await run.guard.close()
            raise
        finally:
            if sandbox is not None:
                await sandbox.cleanup()
            leases.close()
            shutil.rmtree(workspace, ignore_errors=True)

    def _stop_others(self, eval_id: str) -> Callable[[], None] | None:
        """After a safety stop: the evaluation's other sandboxes, from the reserved path."""
        if self.killswitch is None:
            return None
        killswitch = self.killswitch
        return lambda: killswitch.request(eval_id, "safety_stopped")

    async def _watch_cancel(self, sandbox: Sandbox, cancel: asyncio.Event, run: _Run) -> None:
        await cancel.wait()
        if isinstance(cancel, StopSignal) and cancel.hard:
            await sandbox.kill("killed", cancel.reason)
            try:
                await asyncio.wait_for(sandbox.wait(), 5)
            finally:
                cancel.killed.set()
            return
        await sandbox.send(encode(Cancel(reason="cancelled by the platform"), run.version))
        await asyncio.sleep(CANCEL_GRACE_S)
        await sandbox.kill("killed", "cancelled: the harness did not stop within the grace period")

    def _handle(self, run: _Run, event: OutEvent, sandbox: Sandbox | None, pending: set[asyncio.Task[None]]) -> None:
        """Act on one validated event of the harness (`proctor.protocol.OutEvent`)."""
        work = run.work
        if isinstance(event, SampleEvent):
            key = (event.sample_id, event.epoch)
            sample = run.expected.get(key)
            if sample is None or key in run.records:
                why = "duplicate" if key in run.records else "not in this shard"
                run.rejections.append(Rejection(f"sample {event.sample_id!r} epoch {event.epoch}: {why}", "", 0))
                return
            if run.guard is not None:
                run.guard.observe("output", event.output)
                for v in run.scan.check(f"the output of sample {event.sample_id[:200]!r}", event.output,
                                        rules=False) if run.scan else ():
                    run.guard.report(v)
            record = self._record(work, sample, event)
            stopping = stop_requested(self.stops, work.eval_id, run.stop)  # asked before the row arrived
            late = stopping or run.hard_stopped
            if late:  # it raced the kill: kept as evidence, never counted as a scored sample
                record = replace(record, scores={}, answers={}, error=LATE_SAMPLE)
            run.records[key] = record
            traces.sample(event, record.error)
            if run.transcripts is not None:
                run.transcripts.sample_done(key)
            if run.on_record is not None and not late and (run.guard is None or run.guard.stopped is None):
                run.on_record(record)  # streamed while it runs; a stopped shard's rows go to quarantine only
        elif isinstance(event, GenerateEvent):
            assert sandbox is not None, "a model call is answered to its sandbox"
            call = GatewayCall(work.eval_id, work.shard_id, work.spec.model, work.spec.safety, event)
            task = asyncio.create_task(self._answer(sandbox, call, run))
            pending.add(task)
            task.add_done_callback(pending.discard)
        elif isinstance(event, ArtifactEvent):
            run.collector.collect(event)
        elif isinstance(event, LogEvent):
            if run.guard is not None:
                run.guard.observe("log", event.message)
                if event.message.startswith("tool: "):  # the harness says so before it runs one
                    run.guard.observe("command", event.message[6:])
            run.logs.append(f"{event.level}: {event.message[:2000]}")
            del run.logs[: max(0, len(run.logs) - 1000)]
        elif isinstance(event, TranscriptEvent) and run.transcripts is not None:
            if (refused := run.transcripts.sandbox(event)) is not None:
                run.rejections.append(refused)
        elif isinstance(event, DoneEvent):
            run.done = event
        if run.transcripts is not None and run.guard is not None:
            run.transcripts.sync(run.guard)

    async def _answer(self, sandbox: Sandbox, call: GatewayCall, run: _Run) -> None:
        asked = time.monotonic()
        answer = await self.gateway.answer(call)
        result = answer.result
        entry = run.transcripts.gateway(call.event, result, time.monotonic() - asked) if run.transcripts else None
        guard = run.guard
        if result.error is None:
            run.model_calls += 1
            run.model_tokens += result.usage.input_tokens + result.usage.output_tokens
        elif guard is not None and answer.refusal is not None:
            guard.report(answer.refusal.violation(guard.policy.usage_action))
        if guard is None:
            await sandbox.send(encode(result, run.version))
            return
        if not guard.policy.hold_generations:
            await sandbox.send(encode(result, run.version))
        found = guard.observe("generation", result.output)
        for tool_call in result.tool_calls:
            found += guard.observe("command", _command_text(tool_call))
        held = guard.policy.hold_generations and guard.blocks(found)
        if run.transcripts is not None:
            run.transcripts.checked(entry, found, held, [_command_text(c) for c in result.tool_calls])
            run.transcripts.sync(guard)
        if guard.policy.hold_generations and not guard.blocks(found):
            await sandbox.send(encode(result, run.version))  # a blocked answer never reaches the sandbox

    def _record(self, work: ShardWork, sample: Sample, event: SampleEvent) -> SampleRecord:
        scores = {name: s.value for name, s in event.scores.items() if name in work.spec.scorer_names()}
        error = event.error
        if event.failed_stage == "setup":  # the sample never reached the model: an error, not a score of 0
            scores = {}
        elif self.rescore is not None:
            trusted = self.rescore(work.spec, event.output, sample)
            for name, value in trusted.items():
                if name in scores and abs(scores[name] - value) > 1e-9:
                    error = (error + "; " if error else "") + f"score {name!r} from the sandbox disagreed; recomputed outside"
                scores[name] = value
        return SampleRecord(
            shard_id=work.shard_id,
            sample_id=str(sample.id),
            epoch=event.epoch,
            input=render_input(sample.input),
            target=render_target(sample.target),
            output=event.output,
            scores=scores,
            answers={n: s.answer for n, s in event.scores.items() if s.answer is not None and n in scores},
            error=error,
            started_at=event.started_at,
            completed_at=event.completed_at,
            input_tokens=event.usage.input_tokens,
            output_tokens=event.usage.output_tokens,
            model_calls=event.usage.calls,
            turns=event.turns,
            model=model_label(work.spec),
            runtime=self.runtime.name,
            isolation=self.runtime.isolation,
            failed_stage=event.failed_stage,
            stages=dict(event.stages),
        )

    def _judge(self, run: _Run, exit_: SandboxExit, cancel: asyncio.Event | None) -> tuple[ShardStatus, str | None]:
        if run.guard is not None and run.guard.stopped is not None:
            v = run.guard.stopped
            return "safety_stopped", f"safety stop by {v.monitor}/{v.rule}: {v.message}"
        if cancel is not None and cancel.is_set():
            return "cancelled", "cancelled"
        if exit_.reason != "exited":
            return "failed", f"sandbox {exit_.reason}: {exit_.detail}"
        if run.done is None:
            tail = exit_.stderr_tail.strip().splitlines()[-3:]
            return "failed", f"harness exited with code {exit_.exit_code} before done" + (f": {' / '.join(tail)}" if tail else "")
        if run.done.status != "ok":
            return "failed", f"harness reported {run.done.status}: {run.done.error}"
        if exit_.exit_code != 0:
            return "failed", f"harness exited with code {exit_.exit_code}"
        if len(run.records) < len(run.expected):
            return "failed", f"{len(run.expected) - len(run.records)} samples were not reported"
        return "succeeded", None

    def _outcome(self, run: _Run, status: ShardStatus, error: str | None, exit_: SandboxExit | None,
                 started: float, retryable: bool = False) -> ShardOutcome:
        """The shard's outcome; `retryable` when it failed for the platform's sake before its
        sandbox ran (its image or its launch), so the supervisor may queue it again."""
        work = run.work
        records = []
        for (sid, epoch), sample in run.expected.items():
            rec = run.records.get((sid, epoch))
            if rec is None:
                rec = SampleRecord(
                    shard_id=work.shard_id, sample_id=sid, epoch=epoch, input=render_input(sample.input),
                    target=render_target(sample.target), output="", error=f"not completed: {error or 'unknown'}",
                    model=model_label(work.spec), runtime=self.runtime.name, isolation=self.runtime.isolation,
                )
            records.append(rec)
        summary = run.guard.summary() if run.guard is not None else {}
        transcripts: tuple[Any, ...] = ()
        if run.transcripts is not None:
            transcripts = run.transcripts.finish(run.guard)
            if (more := run.transcripts.overflow()) is not None:
                run.rejections.append(more)
            records = run.transcripts.label(records, transcript_ref(work.eval_id, work.shard_id,
                                                                    status == "safety_stopped"))
            run.transcripts.annotate(summary, run.guard)  # where each violation fired, for its incident
        safety = (ShardSafety.of(summary, run.guard.trace(), run.guard.resources()) if run.guard is not None
                  else ShardSafety())
        if error:
            log.warning("shard eval=%s shard=%s %s: %s", work.eval_id, work.shard_id, status, error)
        return ShardOutcome(
            eval_id=work.eval_id, shard_id=work.shard_id, status=status,
            records=tuple(records), runtime=self.runtime.name, isolation=self.runtime.isolation,
            error=error, exit=exit_, rejections=tuple(run.rejections), artifacts=tuple(run.collector.artifacts),
            quarantined_artifacts=tuple(run.collector.quarantined), retryable=retryable,
            logs=tuple(run.logs), duration_s=time.monotonic() - started, first_event_s=run.first_event_s,
            model_calls=run.model_calls, model_tokens=run.model_tokens, safety=safety, transcripts=transcripts,
        )


def _command_text(tool_call: Any) -> str:
    """The command a model's tool call asks for (OpenAI's shape: function.arguments is a
    JSON string with `command`), else the whole call as JSON: the rules read either."""
    try:
        args = tool_call.get("function", {}).get("arguments")
        if isinstance(args, str):
            args = json.loads(args)
        if isinstance(args, dict) and isinstance(args.get("command"), str):
            return args["command"]
    except (AttributeError, ValueError):
        pass
    return json.dumps(tool_call, default=str)[:65536]
