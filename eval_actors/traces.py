"""Each evaluation's trace across the control plane's processes.

One trace per evaluation; its spans and the process that writes each:

    POST /api/v1/evaluations          API replica (or none: a Ray job's submit starts the trace)
    └─ evaluation                     scheduler, when the evaluation ends
       ├─ evaluation.submit           scheduler: validate, split into shards, store
       ├─ shard                       scheduler, when the attempt ends (one per attempt)
       │  ├─ shard.queue_wait         scheduler: queued → admitted
       │  ├─ shard.placement          scheduler: placement group, store, hand-over
       │  └─ shard.supervise          supervisor
       │     ├─ shard.execute         shard executor
       │     │  ├─ sandbox.launch
       │     │  ├─ sandbox.run        the harness's work in the sandbox
       │     │  │  ├─ sample          one per sample and epoch, as the sandbox timed it
       │     │  │  │  └─ stage.setup, stage.eval, stage.score, stage.cleanup
       │     │  │  └─ gateway.generate  one per model call
       │     │  └─ safety.stop        a violation → the sandbox dead
       │     └─ aggregator.finish_shard | aggregator.quarantine_shard
       │        └─ results.write_part   a Ray task
       └─ evaluation.finalize         scheduler
          └─ aggregator.finalize
             └─ results.write_part

The evaluation's context is stored with it (`Evaluation.trace_context`: the traceparent of
its `evaluation` span, and the span it was submitted from). The ids of `evaluation` and
of each `shard` attempt are derived from the trace (`tracing.derived_id`), so a
supervisor or a restarted scheduler parents its work under them without being told,
and the span is written by whoever sees it end. Everything here is a no-op, bar the log
context, while tracing is off.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from proctor.observability import log_context
from proctor.observability import tracing
from proctor.observability.tracing import NOOP, Parent, harmless
from proctor.protocol import STAGES

T = TypeVar("T")
log = logging.getLogger("proctor.executor")
RETRIED = "queued"  # a shard attempt that ends back in the queue was retried


def new_context(caller: Any, eval_id: str) -> dict[str, str] | None:
    """The trace context of a new evaluation: in the caller's trace (a carrier), else a
    new one. None when tracing is off."""
    parent = Parent.parse(caller)
    if parent is None:
        parent = tracing.new_trace()
        if parent is None:
            return None
    own = Parent(parent.trace_id, tracing.derived_id(parent.trace_id, "evaluation", eval_id), parent.sampled)
    ctx = {"traceparent": own.traceparent}
    if parent.span_id:
        ctx["parent"] = f"{parent.span_id:016x}"
    return ctx


def evaluation_span(ctx: dict[str, str] | None) -> Parent | None:
    return Parent.parse(ctx)


def shard_span(ctx: dict[str, str] | None, eval_id: str, shard_id: str, attempt: int) -> Parent | None:
    ev = Parent.parse(ctx)
    if ev is None:
        return None
    return Parent(ev.trace_id, tracing.derived_id(ev.trace_id, "shard", eval_id, shard_id, attempt), ev.sampled)


def trace_id(ctx: dict[str, str] | None) -> str | None:
    """The evaluation's trace id, as an operator's tools show it (32 hex digits)."""
    ev = Parent.parse(ctx)
    return f"{ev.trace_id:032x}" if ev is not None else None


def child(name: str, trace: Any, **attrs: Any) -> Any:
    """A span under `trace` (a carrier another process sent), or no span without one:
    background work that belongs to no evaluation starts no trace of its own."""
    if trace is None or not tracing.enabled():
        return NOOP
    return tracing.span(name, parent=trace, **attrs)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class SchedulerTraces:
    """The scheduler's part: the evaluation and shard spans, written as they end, and the
    queue and placement spans. Contexts are cached per running evaluation and read from
    the store after a restart."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.contexts: dict[str, dict[str, str] | None] = {}
        self.open: dict[tuple[str, str], tuple[int, float]] = {}  # (eval, shard) -> attempt, queued at

    @harmless()
    def shard_parent(self, q: Any) -> Parent | None:
        """The `shard` span of `q`'s attempt, noted as opened now."""
        ctx = self.context(q.eval_id)
        self.open.setdefault((q.eval_id, q.shard_id), (q.attempt, getattr(q, "queued_at", time.time())))
        return shard_span(ctx, q.eval_id, q.shard_id, q.attempt)

    def context(self, eval_id: str) -> dict[str, str] | None:
        if eval_id not in self.contexts:
            ev = self.store.get_evaluation(eval_id)
            self.contexts[eval_id] = ev.trace_context if ev is not None else None
        return self.contexts[eval_id]

    @harmless()
    def submitted(self, caller: Any, eval_id: str) -> dict[str, str] | None:
        """The new evaluation's trace context, to store with it (None while tracing is off)."""
        if not tracing.enabled():
            return None
        ctx = self.contexts[eval_id] = new_context(caller, eval_id)
        return ctx

    @harmless(lambda: NOOP)
    def submit_span(self, ctx: dict[str, str] | None, started: float, **attrs: Any) -> Any:
        """The `evaluation.submit` span (begun at `started`), current until it ends."""
        if ctx is None:
            return NOOP
        return tracing.start("evaluation.submit", parent=evaluation_span(ctx), start_ns=_ns(started), activate=True,
                             **attrs)

    def admission(self, work: Coroutine[Any, Any, T], q: Any, node: Any) -> Awaitable[T]:
        """`work` (the scheduler's start of shard `q` on `node`) in the shard's log context,
        after its `shard.queue_wait` span, inside its `shard.placement` span."""
        async def admitted() -> T:
            with log_context(q.eval_id, q.shard_id):
                parent = self.shard_parent(q) if tracing.enabled() else None
                if parent is None:
                    return await work
                tracing.start("shard.queue_wait", parent=parent, start_ns=_ns(self.open[q.eval_id, q.shard_id][1]),
                              eval_id=q.eval_id, shard_id=q.shard_id, attempt=q.attempt).end()
                with tracing.span("shard.placement", parent=parent, eval_id=q.eval_id, shard_id=q.shard_id,
                                  attempt=q.attempt, node=node.node_id, gpus=q.demand.gpus,
                                  gpu_type=q.demand.gpu_type, cpus=q.demand.cpus):
                    return await work
        return admitted()

    @harmless()
    def cancelled_in_queue(self, q: Any) -> None:
        """Write the `shard` span of a shard cancelled before it was admitted."""
        ctx = self.context(q.eval_id) if tracing.enabled() else None
        parent = shard_span(ctx, q.eval_id, q.shard_id, q.attempt)
        if parent is not None:
            tracing.emit("shard", trace_id=parent.trace_id, span_id=parent.span_id,
                         parent_id=evaluation_span(ctx).span_id, start_ns=_ns(getattr(q, "queued_at", time.time())),
                         end_ns=time.time_ns(), sampled=parent.sampled, eval_id=q.eval_id, shard_id=q.shard_id,
                         attempt=q.attempt, status="cancelled")

    @harmless()
    def shard_ended(self, eval_id: str, shard: Any, status: str | None = None, error: str | None = None,
                    attempt: int | None = None) -> None:
        """Write the `shard` span of the attempt that just ended (`shard` as the store has
        it now; a retried one is back in `queued` with the next attempt)."""
        opened = self.open.pop((eval_id, shard.shard_id), None)
        if not tracing.enabled() or shard is None:
            return
        ctx = self.context(eval_id)
        status = status or shard.status
        if attempt is None:  # the store's record after the change: a retry's attempt is the next one
            attempt = opened[0] if opened else (shard.attempt - 1 if status == RETRIED else shard.attempt)
        parent = shard_span(ctx, eval_id, shard.shard_id, attempt)
        if parent is None:
            return
        start = opened[1] if opened else (shard.started_at or shard.created_at).timestamp()
        failed = status in ("failed", "safety_stopped") or status == RETRIED
        tracing.emit("shard", trace_id=parent.trace_id, span_id=parent.span_id,
                     parent_id=evaluation_span(ctx).span_id, start_ns=_ns(start), end_ns=time.time_ns(),
                     sampled=parent.sampled, error=(error or shard.error or status) if failed else None,
                     eval_id=eval_id, shard_id=shard.shard_id, attempt=attempt,
                     status="retried" if status == RETRIED else status, samples=len(shard.sample_ids),
                     supervisor=shard.supervisor)

    @harmless(lambda: NOOP)
    def finalizing(self, eval_id: str) -> Any:
        ctx = self.context(eval_id) if tracing.enabled() else None
        if ctx is None:
            return NOOP
        return tracing.start("evaluation.finalize", parent=evaluation_span(ctx), activate=True, eval_id=eval_id)

    @harmless()
    def finished(self, ev: Any, status: str, error: str | None) -> None:
        """Write the `evaluation` span (it began when the evaluation was submitted)."""
        ctx = self.contexts.pop(ev.id, None) or ev.trace_context
        if not tracing.enabled():
            return
        for key in [k for k in self.open if k[0] == ev.id]:
            self.open.pop(key, None)
        own = evaluation_span(ctx)
        if own is None:
            return
        tracing.emit("evaluation", trace_id=own.trace_id, span_id=own.span_id,
                     parent_id=int(ctx["parent"], 16) if ctx.get("parent") else None,
                     start_ns=_ns(ev.created_at.timestamp()),
                     end_ns=time.time_ns(), sampled=own.sampled,
                     error=(error or status) if status in ("failed", "safety_stopped") else None,
                     eval_id=ev.id, name=ev.name, owner=ev.owner, model=ev.model, runtime=ev.runtime,
                     status=status, shards=ev.total_shards, units=ev.total_units)


def supervised(work: Coroutine[Any, Any, T], store: Any, eval_id: str, shard_id: str, attempt: int,
               supervisor: str) -> Awaitable[T]:
    """`work` (a supervisor running one shard attempt) in the shard's log context and,
    with tracing on, in its `shard.supervise` span under the attempt's `shard` span."""
    async def run() -> T:
        with log_context(eval_id, shard_id):
            ev = _evaluation(store, eval_id) if tracing.enabled() else None
            parent = shard_span(ev.trace_context, eval_id, shard_id, attempt) if ev is not None else None
            if parent is None:
                return await work
            with tracing.span("shard.supervise", parent=parent, eval_id=eval_id, shard_id=shard_id,
                              attempt=attempt, supervisor=supervisor, model=ev.model, runtime=ev.runtime):
                return await work
    return run()


@harmless()
def _evaluation(store: Any, eval_id: str) -> Any:
    return store.get_evaluation(eval_id)


def executed(run: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Decorates `ShardExecutor.run`: the `shard.execute` span, its outcome as attributes
    (a failed or stopped shard is an error), and the shard's log context."""
    @functools.wraps(run)
    async def wrapper(self: Any, work: Any, *args: Any, **kwargs: Any) -> Any:
        with log_context(work.eval_id, work.shard_id):
            model = work.spec.model
            with tracing.span("shard.execute", eval_id=work.eval_id, shard_id=work.shard_id, units=work.units,
                              model=getattr(model, "model", None) or model.adapter, runtime=self.runtime.name,
                              isolation=self.runtime.isolation) as span:
                outcome = await run(self, work, *args, **kwargs)
                span.set(status=outcome.status, samples_scored=len(outcome.records),
                         model_calls=outcome.model_calls, model_tokens=outcome.model_tokens,
                         startup_s=outcome.first_event_s)
                if outcome.status in ("failed", "safety_stopped"):
                    span.fail(outcome.error or outcome.status)
            log.info("shard %s %s in %.2f s: %d rows, %d model calls, runtime %s", work.shard_id, outcome.status,
                     outcome.duration_s, len(outcome.records), outcome.model_calls, outcome.runtime)
            return outcome
    return wrapper


@harmless()
def sample(event: Any, error: str | None) -> None:
    """A `sample` span as the sandbox timed it (under `sandbox.run`), and a `stage.<name>`
    span for each stage it went through (setup, eval, score, cleanup), laid end to end
    from the harness's durations; the stage its error happened in is an error."""
    if not tracing.enabled() or event.started_at <= 0:
        return
    end = event.completed_at if event.completed_at >= event.started_at else time.time()
    failed = getattr(event, "failed_stage", None)
    span = tracing.start("sample", start_ns=_ns(event.started_at), sample_id=event.sample_id, epoch=event.epoch,
                         turns=event.turns, input_tokens=event.usage.input_tokens,
                         output_tokens=event.usage.output_tokens, failed_stage=failed)
    at = event.started_at
    stages = getattr(event, "stages", None) or {}
    for stage in STAGES:
        if stage in stages:
            took = max(0.0, stages[stage])
            tracing.start(f"stage.{stage}", parent=span.parent, start_ns=_ns(at), stage=stage,
                          sample_id=event.sample_id).end(error=error if stage == failed else None,
                                                         end_ns=_ns(min(at + took, end)))
            at += took
    span.end(error=error, end_ns=_ns(end))


def traced(name: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Decorates an actor method `(self, eval_id, [shard_id, attempt, ...])` that another
    process calls with `trace=carrier()`: its work is a span `name` under that carrier."""
    def wrap(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        names = list(inspect.signature(method).parameters)[1:4]

        @functools.wraps(method)
        async def wrapper(self: Any, *args: Any, trace: Any = None, **kwargs: Any) -> T:
            if trace is None or not tracing.enabled():
                return await method(self, *args, **kwargs)
            attrs = {k: v for k, v in zip(names, args) if k in ("eval_id", "shard_id", "attempt")}
            with tracing.span(name, parent=trace, **attrs):
                return await method(self, *args, **kwargs)

        # Ray checks each call against the method's signature, unwrapping decorators first:
        # this one's is the method's and `trace`
        del wrapper.__wrapped__  # type: ignore[attr-defined]
        signature = inspect.signature(method)
        wrapper.__signature__ = signature.replace(parameters=[  # type: ignore[attr-defined]
            *signature.parameters.values(),
            inspect.Parameter("trace", inspect.Parameter.KEYWORD_ONLY, default=None)])
        return wrapper
    return wrap
