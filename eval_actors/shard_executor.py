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
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import functools
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from cluster.results import SampleRecord
from cluster.runtimes import LaunchRequest, SandboxError, SandboxExit, SandboxLimits, SandboxRuntime
from cluster.runtimes.layout import SANDBOX_USER, harness_layout
from proctor.protocol import MAX_ARTIFACT_BYTES, Cancel, Rejection, ShardMessage, ShardSample, encode
from proctor.spec import EvaluationSpec, Sample
from safety.canaries import CANARIES
from safety.canaries import PATHS as CANARY_PATHS
from safety.guard import SafetyGuard
from safety.monitors import ResourceMonitor, disk_usage
from safety.rules import RuleSet
from safety.syscalls import SyscallMonitor
from safety.violations import Violation

from .gateway import GatewayCall, ModelGateway

log = logging.getLogger("proctor.executor")

MAX_ARTIFACTS_TOTAL = 64 * 1024**2
MAX_LEFT_BEHIND = 32  # files per pattern collected after a safety stop
CANCEL_GRACE_S = 2.0
LIMIT_REFUSALS = ("model-call limit", "token limit", "cost limit")  # the gateway's refusals (gateway.py)
GUARD_INTERVAL_S = 0.25  # monitors are polled this often (the policy's text rules act at once)
RESOURCE_EVERY_S = 0.5  # sandbox stats (gVisor: a `runsc events` call) at most this often
DISK_EVERY_S = 1.0  # the workspace's disk use at most this often


class StopSignal(asyncio.Event):
    """A cancel event that can also ask for an immediate kill (`hard`: the emergency stop)."""

    hard: bool = False
    reason: str = "cancelled"

    def __init__(self) -> None:
        super().__init__()
        self.killed = asyncio.Event()  # set once a hard stop's sandbox is dead

    def stop(self, hard: bool = False, reason: str = "cancelled") -> None:
        self.hard = self.hard or hard
        self.reason = reason
        self.set()


@dataclass(frozen=True)
class ShardWork:
    eval_id: str
    shard_id: str
    spec: EvaluationSpec
    samples: tuple[Sample, ...]
    epochs: tuple[int, ...] = (1,)

    @property
    def units(self) -> int:
        return len(self.samples) * len(self.epochs)


@dataclass(frozen=True)
class ShardOutcome:
    eval_id: str
    shard_id: str
    status: Literal["succeeded", "failed", "cancelled", "safety_stopped"]
    records: tuple[SampleRecord, ...]
    runtime: str
    isolation: str
    error: str | None = None
    exit: SandboxExit | None = None
    rejections: tuple[Rejection, ...] = ()
    artifacts: tuple[tuple[str, bytes], ...] = ()
    logs: tuple[str, ...] = ()
    duration_s: float = 0.0
    first_event_s: float | None = None
    model_calls: int = 0  # answered by the gateway (counted outside the sandbox)
    model_tokens: int = 0
    safety: dict[str, Any] = field(default_factory=dict)  # the guard's violations, stop and resource trace


def render_input(value: str | list[Any]) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(f"{m.role}: {m.content}" for m in value)


def render_target(value: str | list[str]) -> str:
    return value if isinstance(value, str) else " | ".join(value)


def model_label(spec: EvaluationSpec) -> str:
    m = spec.model
    return {"reference": "reference", "python": f"python:{getattr(m, 'callable', '')}",
            "openai": f"openai:{getattr(m, 'model', '')}"}[m.adapter]


@dataclass
class _Run:
    """What one shard's run has gathered so far."""

    work: ShardWork
    expected: dict[tuple[str, int], Sample]
    records: dict[tuple[str, int], SampleRecord] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)
    artifacts: list[tuple[str, bytes]] = field(default_factory=list)
    artifact_bytes: int = 0
    inline: "_Pieces | None" = None  # the inline artifact being put together from its pieces
    logs: list[str] = field(default_factory=list)
    done: Any = None
    first_event_s: float | None = None
    on_record: Callable[[SampleRecord], None] | None = None
    model_calls: int = 0
    model_tokens: int = 0
    guard: SafetyGuard | None = None


@dataclass
class _Pieces:
    """An inline artifact arriving in pieces: what its first event declared, and the bytes so far."""

    path: str
    size: int
    sha256: str
    data: bytearray = field(default_factory=bytearray)
    received: int = 0
    dropped: bool = False  # refused at its first piece (too large): the rest is counted, not kept


class ShardExecutor:
    def __init__(self, runtime: SandboxRuntime, gateway: ModelGateway, sandbox_dir: Path,
                 rescore: Callable[[Any, str, Sample], dict[str, float]] | None = None, monitored: bool = True):
        # `monitored=False` runs without the safety policy's monitors and rules: ONLY the
        # baseline of benchmarks/safety_stop.py; the platform never turns them off
        self.monitored = monitored
        self.runtime = runtime
        self.gateway = gateway
        self.sandbox_dir = sandbox_dir
        self.rescore = rescore
        self.guard: SafetyGuard | None = None  # the latest run's guard (its resource use, live)
        self.layout = harness_layout(unprivileged=runtime.isolation == "weak")
        self._rulesets: dict[str, RuleSet] = {}
        self.sandbox_dir.mkdir(parents=True, exist_ok=True)
        self.sandbox_dir.chmod(0o711)

    async def run(self, work: ShardWork, on_event: Callable[[Any], None] | None = None,
                  cancel: asyncio.Event | None = None, on_record: Callable[[SampleRecord], None] | None = None,
                  sandbox_id: str | None = None) -> ShardOutcome:
        """Run `work` to its end. `on_event` sees every accepted event (untrusted content);
        `on_record` every sample row as it is accepted, for streaming to the aggregator."""
        started = time.monotonic()
        spec = work.spec
        sid = sandbox_id or sandbox_id_for(work)
        workspace = self.sandbox_dir / f"ws-{sid}"
        run = _Run(work, {(str(s.id), e): s for e in work.epochs for s in work.samples}, on_record=on_record)
        sandbox = None
        try:
            canaries = CANARIES if spec.safety.canaries and self.monitored else {}
            _make_workspace(workspace, {**canaries, **spec.sandbox.files})
            request = LaunchRequest(
                sandbox_id=sid,
                argv=self.layout.argv(),
                workspace=workspace,
                limits=SandboxLimits(
                    cpus=spec.sandbox.cpus, memory_bytes=spec.sandbox.memory, pids=spec.sandbox.pids,
                    timeout_s=spec.sandbox.timeout_s, output_cap_bytes=spec.sandbox.output_cap,
                    disk_bytes=spec.sandbox.disk,
                ),
                env=self.layout.env,
                ro_binds=self.layout.ro_binds,
                trace_syscalls=_traced(spec.safety) if self.monitored else (),
                gpus=spec.sandbox.gpu.count,
                gpu_type=spec.sandbox.gpu.type,
                egress=tuple(spec.sandbox.egress),
                labels=(("proctor.dev/eval-id", work.eval_id), ("proctor.dev/shard-id", work.shard_id)),
            )
            try:
                sandbox = await self.runtime.launch(request)
            except SandboxError as exc:
                return self._outcome(run, "failed", str(exc), None, started)
            run.guard = self.guard = self._guard(spec, request, sandbox)
            run.guard.start()
            inline = 0 if self.runtime.shares_workspace else inline_budget(request.limits.output_cap_bytes)
            await sandbox.send(encode(_shard_message(work, inline_artifact_bytes=inline)))
            watcher = asyncio.create_task(self._watch_cancel(sandbox, cancel)) if cancel else None
            pending: set[asyncio.Task[None]] = set()
            try:
                async for event in sandbox.events():
                    if run.first_event_s is None:
                        run.first_event_s = time.monotonic() - started
                    self._handle(run, event, sandbox, workspace, pending)
                    if on_event is not None:
                        on_event(event)
                exit_ = await sandbox.wait()
                self._limit_hit(run.guard, exit_)
                await run.guard.sweep()
                await run.guard.wait_stopped()
            finally:
                if watcher is not None:
                    watcher.cancel()
                for task in pending:
                    task.cancel()
                await run.guard.close()
            if run.inline is not None and not run.inline.dropped:
                self._reject_inline(run, "arrived incomplete")
            run.rejections.extend(sandbox.parser.rejections)
            if run.guard.stopped is not None:
                self._collect_left_behind(run, workspace)
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
            shutil.rmtree(workspace, ignore_errors=True)

    def _guard(self, spec: EvaluationSpec, request: LaunchRequest, sandbox: Any) -> SafetyGuard:
        limits = request.limits
        policy = spec.safety

        disk = {"at": float("-inf"), "bytes": 0}

        async def sample() -> dict[str, float | None]:
            stats = await sandbox.stats()
            if time.monotonic() - disk["at"] >= DISK_EVERY_S:  # walking the workspace costs most
                disk["at"] = time.monotonic()
                disk["bytes"] = await asyncio.to_thread(disk_usage, request.workspace, 2 * limits.disk_bytes)
            return {"memory": stats.memory_bytes, "pids": stats.pids, "cpu_s": stats.cpu_seconds,
                    "disk": disk["bytes"], "output": getattr(sandbox, "output_bytes", None)}

        async def stop(v: Violation) -> None:
            await sandbox.kill("killed", f"safety: {v.monitor}/{v.rule}: {v.message}")
            try:
                await asyncio.wait_for(sandbox.wait(), 10)
            except asyncio.TimeoutError:
                log.error("sandbox %s not dead 10 s after a safety stop", request.sandbox_id)

        if not self.monitored:
            return SafetyGuard(policy, [], stop, interval=GUARD_INTERVAL_S, rules=RuleSet([]))
        resource_limits = {"memory": limits.memory_bytes, "pids": limits.pids, "disk": limits.disk_bytes,
                           "output": limits.output_cap_bytes, "cpu_s": policy.resources.max_cpu_s}
        monitors: list[Any] = [ResourceMonitor(sample, resource_limits, policy.resources, every=RESOURCE_EVERY_S)]
        trace_log = getattr(sandbox, "trace_log", None)
        if trace_log is not None:
            monitors.append(SyscallMonitor(trace_log, list(request.trace_syscalls), policy.syscalls.action,
                                           CANARY_PATHS if policy.canaries else [], policy.canary_action))
        return SafetyGuard(policy, monitors, stop, interval=GUARD_INTERVAL_S, rules=self._rules(policy))

    @staticmethod
    def _limit_hit(guard: SafetyGuard, exit_: SandboxExit) -> None:
        """A sandbox the runtime ended at a hard limit (the kernel's OOM kill, the output
        cap) broke the policy even when no monitor sampled it in time."""
        metric = {"oom": "memory", "output_cap": "output"}.get(exit_.reason)
        if metric is not None and guard.stopped is None:
            guard.report(Violation("resources", metric, guard.policy.resources.action,
                                   f"the sandbox hit its {metric} limit and was killed by the runtime",
                                   (exit_.detail,)))

    def _rules(self, policy: Any) -> RuleSet:
        key = policy.model_dump_json()
        rules = self._rulesets.get(key)
        if rules is None:
            rules = self._rulesets[key] = RuleSet.of(policy)
            while len(self._rulesets) > 64:
                self._rulesets.pop(next(iter(self._rulesets)))
        return rules

    async def _watch_cancel(self, sandbox: Any, cancel: asyncio.Event) -> None:
        await cancel.wait()
        if getattr(cancel, "hard", False):
            await sandbox.kill("killed", getattr(cancel, "reason", "emergency stop"))
            try:
                await asyncio.wait_for(sandbox.wait(), 5)
            finally:
                if isinstance(cancel, StopSignal):
                    cancel.killed.set()
            return
        await sandbox.send(encode(Cancel(reason="cancelled by the platform")))
        await asyncio.sleep(CANCEL_GRACE_S)
        await sandbox.kill("killed", "cancelled: the harness did not stop within the grace period")

    def _handle(self, run: _Run, event: Any, sandbox: Any, workspace: Path, pending: set[asyncio.Task[None]]) -> None:
        work = run.work
        if event.type == "sample":
            key = (event.sample_id, event.epoch)
            sample = run.expected.get(key)
            if sample is None or key in run.records:
                why = "duplicate" if key in run.records else "not in this shard"
                run.rejections.append(Rejection(f"sample {event.sample_id!r} epoch {event.epoch}: {why}", "", 0))
                return
            if run.guard is not None:
                run.guard.observe("output", event.output)
            record = run.records[key] = self._record(work, sample, event)
            if run.on_record is not None and (run.guard is None or run.guard.stopped is None):
                run.on_record(record)  # streamed while it runs; a stopped shard's rows go to quarantine only
        elif event.type == "generate":
            call = GatewayCall(work.eval_id, work.shard_id, work.spec.model, work.spec.safety, event)
            task = asyncio.create_task(self._answer(sandbox, call, run))
            pending.add(task)
            task.add_done_callback(pending.discard)
        elif event.type == "artifact":
            self._collect_artifact(run, workspace, event)
        elif event.type == "log":
            if run.guard is not None:
                run.guard.observe("log", event.message)
                if event.message.startswith("tool: "):  # the harness says so before it runs one
                    run.guard.observe("command", event.message[6:])
            run.logs.append(f"{event.level}: {event.message[:2000]}")
            del run.logs[: max(0, len(run.logs) - 1000)]
        elif event.type == "done":
            run.done = event

    async def _answer(self, sandbox: Any, call: GatewayCall, run: _Run) -> None:
        result = await self.gateway.generate(call)
        guard = run.guard
        if result.error is None:
            run.model_calls += 1
            run.model_tokens += result.usage.input_tokens + result.usage.output_tokens
        elif guard is not None and result.error.startswith(LIMIT_REFUSALS):
            guard.report(Violation("usage", result.error.split(" limit", 1)[0].replace(" ", "-"),
                                   guard.policy.usage_action, result.error, (result.error,)))
        if guard is None:
            await sandbox.send(encode(result))
            return
        if not guard.policy.hold_generations:
            await sandbox.send(encode(result))
        found = guard.observe("generation", result.output)
        for tool_call in result.tool_calls:
            found += guard.observe("command", _command_text(tool_call))
        if guard.policy.hold_generations and not guard.blocks(found):
            await sandbox.send(encode(result))  # a blocked answer never reaches the sandbox

    def _record(self, work: ShardWork, sample: Sample, event: Any) -> SampleRecord:
        scores = {name: s.value for name, s in event.scores.items() if name in work.spec.scorer_names()}
        error = event.error
        if self.rescore is not None:
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
        )

    def _collect_left_behind(self, run: _Run, workspace: Path) -> None:
        """After a safety stop: the declared artifacts the sandbox left in its workspace but
        was killed before reporting (evidence for the quarantine), with the same bounds and
        no symlinks followed."""
        kept = {path for path, _ in run.artifacts}
        for pattern in run.work.spec.sandbox.artifacts:
            for path in sorted(workspace.glob(f"*/{pattern}"))[:MAX_LEFT_BEHIND]:
                rel = str(path.relative_to(workspace))
                if rel not in kept and not path.is_symlink():
                    self._collect_artifact(run, workspace, SimpleNamespace(path=rel))
                    kept.add(rel)

    def _collect_artifact(self, run: _Run, workspace: Path, event: Any) -> None:
        problem = artifact_name_problem(event.path, run.work.spec.sandbox.artifacts)
        if problem is not None:
            run.rejections.append(Rejection(f"artifact {str(event.path)[:200]!r}: {problem}", "", 0))
            return
        rel = Path(event.path)
        if not self.runtime.shares_workspace:
            self._collect_inline(run, rel, event)
            return
        try:
            fd = open_beneath(workspace, rel)
        except OSError as exc:
            run.rejections.append(Rejection(f"artifact {event.path!r}: {exc.strerror}", "", 0))
            return
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                run.rejections.append(Rejection(f"artifact {event.path!r} is not a regular file", "", 0))
                return
            data = f.read(_room(run) + 1)
        _keep_artifact(run, rel, event.path, data)

    def _collect_inline(self, run: _Run, rel: Path, event: Any) -> None:
        """A piece of an artifact whose content comes in its events (the host cannot read
        the workspace). Pieces come in order, one artifact at a time; the artifact is kept
        only if they add up to exactly the size and SHA-256 its first event declared."""
        if getattr(event, "data", None) is None:
            run.rejections.append(Rejection(f"artifact {event.path!r} ({getattr(event, 'size', '?')} bytes) was not "
                                            "sent inline (over the shard's inline budget: 3/8 of its output cap)",
                                            "", 0))
            return
        offset, piece = getattr(event, "offset", 0), run.inline
        if offset == 0:
            if piece is not None and not piece.dropped:
                self._reject_inline(run, "arrived incomplete")
            piece = run.inline = _Pieces(event.path, event.size, event.sha256)
            if event.size > _room(run):
                run.rejections.append(Rejection(f"artifact {event.path!r} is over the size limit", "", 0))
                piece.dropped = True
        elif piece is None or (piece.path, piece.size, piece.sha256) != (event.path, event.size, event.sha256) \
                or offset != piece.received:
            if piece is not None and not piece.dropped:
                self._reject_inline(run, "arrived out of order")
            run.inline = None
            run.rejections.append(Rejection(f"artifact {event.path!r}: a piece at offset {offset} that follows "
                                            "nothing sent", "", 0))
            return
        try:
            data = base64.b64decode(event.data, validate=True)
        except ValueError:
            data = None
        if data is None or piece.received + len(data) > piece.size:
            if not piece.dropped:
                self._reject_inline(run, "its content is not base64" if data is None else
                                    "its content does not match its size and SHA-256 (more bytes)")
            run.inline = None
            return
        piece.received += len(data)
        if not piece.dropped:
            piece.data += data
        if piece.received < piece.size:
            return
        run.inline = None
        if piece.dropped:
            return
        if hashlib.sha256(piece.data).hexdigest() != piece.sha256:
            run.rejections.append(Rejection(f"artifact {event.path!r}: its content does not match its size "
                                            "and SHA-256", "", 0))
            return
        _keep_artifact(run, rel, event.path, bytes(piece.data))

    @staticmethod
    def _reject_inline(run: _Run, why: str) -> None:
        assert run.inline is not None
        run.rejections.append(Rejection(f"artifact {run.inline.path!r}: {why}", "", 0))
        run.inline = None

    def _judge(self, run: _Run, exit_: SandboxExit, cancel: asyncio.Event | None) -> tuple[str, str | None]:
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

    def _outcome(self, run: _Run, status: str, error: str | None, exit_: SandboxExit | None,
                 started: float) -> ShardOutcome:
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
        if error:
            log.warning("shard eval=%s shard=%s %s: %s", work.eval_id, work.shard_id, status, error)
        return ShardOutcome(
            eval_id=work.eval_id, shard_id=work.shard_id, status=status,  # type: ignore[arg-type]
            records=tuple(records), runtime=self.runtime.name, isolation=self.runtime.isolation,
            error=error, exit=exit_, rejections=tuple(run.rejections), artifacts=tuple(run.artifacts),
            logs=tuple(run.logs), duration_s=time.monotonic() - started, first_event_s=run.first_event_s,
            model_calls=run.model_calls, model_tokens=run.model_tokens,
            safety=({**run.guard.summary(), "trace": run.guard.trace(), "resources": run.guard.resources()}
                    if run.guard is not None else {}),
        )


def _traced(policy: Any) -> tuple[str, ...]:
    """The syscalls to trace: the policy's, and `openat` to see canaries and writes."""
    if not policy.syscalls.enabled:
        return ("openat",) if policy.canaries else ()
    return tuple(dict.fromkeys([*policy.syscalls.syscalls, "openat"]))


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


def sandbox_id_for(work: ShardWork) -> str:
    raw = f"{work.eval_id}-{work.shard_id}-{os.urandom(3).hex()}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)[:120]


def _room(run: _Run) -> int:
    """Bytes the shard's next artifact may have."""
    return min(MAX_ARTIFACT_BYTES, MAX_ARTIFACTS_TOTAL - run.artifact_bytes)


def artifact_name_problem(name: Any, patterns: Sequence[str]) -> str | None:
    """Why a sandbox's artifact name cannot be kept (None if it can): a relative path of
    plain parts (no "", ".", "..", control characters), matching `<sample dir>/<pattern>`
    for one of the spec's `sandbox.artifacts` patterns."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        return "not a path of 1 to 1,024 characters"
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return "leaves the workspace or has empty parts"
    if any(ord(c) < 32 or ord(c) == 127 for c in name) or any(len(p.encode()) > 255 for p in parts):
        return "has control characters or a part over 255 bytes"
    if not any(fnmatch.fnmatchcase(name, f"*/{form}") for pattern in patterns for form in _glob_forms(pattern)):
        return "matches none of the spec's sandbox.artifacts patterns"
    return None


@functools.lru_cache(maxsize=256)
def _glob_forms(pattern: str) -> frozenset[str]:
    """`pattern` as fnmatch patterns that together match what `Path.glob` matches with it
    (fnmatch's `*` crosses folders; glob's `**/` may also stand for no folder at all).
    Cached: every artifact event (each inline piece) is checked against the spec's patterns."""
    forms = {pattern}
    while True:
        more = {f.replace("/**/", "/", 1) for f in forms} | {f[3:] for f in forms if f.startswith("**/")}
        if more <= forms:
            return frozenset(forms)
        forms |= more


def open_beneath(root: Path, rel: Path) -> int:
    """A read-only descriptor of `root/rel`, opened one part at a time without following
    any symlink (a sandbox may plant one in a folder of its workspace: O_NOFOLLOW alone
    guards only the last part). Raises OSError."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in rel.parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        return os.open(rel.parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)


def _keep_artifact(run: _Run, rel: Path, named: str, data: bytes) -> None:
    if len(data) > _room(run):
        run.rejections.append(Rejection(f"artifact {named!r} is over the size limit", "", 0))
        return
    path = str(rel)
    for kept, _ in run.artifacts:  # one file per name: no duplicate, no file that is another's folder
        if kept == path or kept.startswith(path + "/") or path.startswith(kept + "/"):
            run.rejections.append(Rejection(f"artifact {named!r} clashes with the artifact {kept!r}", "", 0))
            return
    run.artifact_bytes += len(data)
    run.artifacts.append((path, data))


def _make_workspace(path: Path, files: dict[str, str]) -> None:
    path.mkdir(mode=0o700)
    for rel, content in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    for p in [path, *path.rglob("*")]:
        os.chown(p, SANDBOX_USER, SANDBOX_USER)


def inline_budget(output_cap: int) -> int:
    """Bytes of artifact content a pod may send in its events: 3/8 of its output cap (half
    the cap once base64 has grown them), so that artifacts never stop a shard at its cap."""
    return min(output_cap * 3 // 8, MAX_ARTIFACTS_TOTAL)


def _shard_message(work: ShardWork, inline_artifact_bytes: int = 0) -> ShardMessage:
    spec = work.spec
    return ShardMessage(
        eval_id=work.eval_id,
        shard_id=work.shard_id,
        model=spec.model.model_dump(mode="json"),
        scorers=[s.model_dump(mode="json") for s in spec.scorers],
        samples=[
            ShardSample(
                id=str(s.id),
                input=s.input if isinstance(s.input, str) else [m.model_dump() for m in s.input],
                target=s.target, choices=s.choices, metadata=s.metadata, files=s.files,
            )
            for s in work.samples
        ],
        epochs=list(work.epochs),
        agentic=spec.agentic,
        max_turns=spec.safety.max_turns,
        tool_timeout_s=spec.sandbox.tool_timeout_s,
        artifacts=list(spec.sandbox.artifacts),
        inline_artifact_bytes=inline_artifact_bytes,
    )
