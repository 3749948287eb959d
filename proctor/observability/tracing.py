"""OpenTelemetry traces of the platform, exported over OTLP; off unless configured.

`setup(settings, process)` turns tracing on in this process when `otel_endpoint` is set:
an SDK tracer provider, sampled per trace (`otel_sample_ratio`), batching spans to the
endpoint over gRPC or HTTP. Without an endpoint nothing of the SDK is imported and every
helper here returns at once: `span()` and `start()` give the shared no-op `NOOP`,
`carrier()` gives None.

Spans are made three ways:
- `span(name, ...)`: a `with` block, current for what runs inside it (tasks created
  inside inherit it); an exception leaving it is recorded as the span's error.
- `start(name, ...)` … `.end(error=...)`: the same without a block, for code that cannot
  be re-indented; `activate=True` makes it current until it ends (same task only).
- `emit(...)`: a finished span with ids chosen by the caller, for spans that outlive any
  one process (an evaluation, a shard): their ids are derived from the trace, so any
  process can parent work under them and whoever sees them end writes them.

Context crosses processes as a W3C `traceparent` (`carrier()`, the `parent=` of each
helper). Attributes given as keywords are named `proctor.<key>`.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from contextlib import AbstractContextManager
from contextvars import Token
from typing import TYPE_CHECKING, ParamSpec, TypeAlias, TypeVar, cast
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span as OtelSpan
    from opentelemetry.trace import SpanKind

    from proctor.settings import Settings

log = logging.getLogger("proctor.tracing")
Carrier = Mapping[str, str]
ParentLike: TypeAlias = "Parent | Carrier | str | None"  # what `parent=` takes: a Parent, a traceparent or a carrier
_P = ParamSpec("_P")
_R = TypeVar("_R")
EXPORT_EVERY_MS = 5000  # the SDK's default: a span waits at most this long in memory (a killed process loses them)
EXPORT_TIMEOUT_S = 10


@dataclass(frozen=True)
class Parent:
    """A span's identity as another process knows it."""

    trace_id: int
    span_id: int
    sampled: bool = True

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}"

    @classmethod
    def parse(cls, value: object) -> "Parent | None":
        """A `Parent` from a traceparent, a carrier holding one, or a Parent; None if none or invalid."""
        if value is None or isinstance(value, Parent):
            return value
        if isinstance(value, Mapping):
            value = value.get("traceparent")
        if not isinstance(value, str):
            return None
        parts = value.strip().split("-")
        if len(parts) < 4 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16:
            return None
        try:
            trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
        except ValueError:
            return None
        if not trace_id or not span_id:
            return None
        return cls(trace_id, span_id, bool(flags & 1))


def harmless(default: object = None) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Tracing never breaks the work it watches: a failure in it is logged, and the
    helper gives `default` (no span), or what `default()` gives when it is callable: one
    of the helper's own answers (None, `NOOP`)."""
    def wrap(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(fn)
        def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return fn(*args, **kwargs)
            except Exception:
                log.warning("tracing: %s failed; the work goes on without it", fn.__qualname__, exc_info=True)
                return cast(_R, default() if callable(default) else default)
        return guarded
    return wrap


class _NoSpan:
    """What every helper gives while tracing is off: does nothing, costs nothing."""

    recording = False
    parent: Parent | None = None

    def __enter__(self) -> "_NoSpan":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set(self, **attrs: object) -> None:
        pass

    def rename(self, name: str) -> None:
        pass

    def event(self, name: str, **attrs: object) -> None:
        pass

    def fail(self, error: BaseException | str) -> None:
        pass

    def end(self, error: BaseException | str | None = None, end_ns: int | None = None) -> None:
        pass


NOOP = _NoSpan()


def _attributes(attrs: Mapping[str, object]) -> dict[str, str | bool | int | float]:
    out: dict[str, str | bool | int | float] = {}
    for key, value in attrs.items():
        if value is None:
            continue
        if not isinstance(value, (str, bool, int, float)):
            value = str(value)
        out[key if "." in key else f"proctor.{key}"] = value
    return out


class Span:
    """A live span of the SDK (see `span` and `start`)."""

    recording = True

    def __init__(self, otel_span: OtelSpan, token: Token[Context] | None = None) -> None:
        self._span = otel_span
        self._token = token
        self._ended = False
        ctx = otel_span.get_span_context()
        self.parent = Parent(ctx.trace_id, ctx.span_id, ctx.trace_flags.sampled)

    @harmless()
    def set(self, **attrs: object) -> None:
        self._span.set_attributes(_attributes(attrs))

    @harmless()
    def rename(self, name: str) -> None:
        self._span.update_name(name)

    @harmless()
    def event(self, name: str, **attrs: object) -> None:
        self._span.add_event(name, _attributes(attrs))

    @harmless()
    def fail(self, error: BaseException | str) -> None:
        from opentelemetry.trace import Status, StatusCode

        if isinstance(error, BaseException):
            self._span.record_exception(error)
            text = str(error) or type(error).__name__
        else:
            text = error
        self._span.set_status(Status(StatusCode.ERROR, text[:1000]))

    @harmless()
    def end(self, error: BaseException | str | None = None, end_ns: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        if error is not None:
            self.fail(error)
        if self._token is not None:
            from opentelemetry import context

            context.detach(self._token)
        self._span.end(end_time=end_ns)


class Tracing:
    """This process's tracing: the SDK's provider, its batch processor and the tracer. The
    provider is Proctor's own, not OpenTelemetry's global one: libraries that trace through
    the global API (FastAPI's, Ray's) add no spans to Proctor's traces."""

    def __init__(self, settings: Settings, process: str) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self.ratio = settings.otel_sample_ratio
        self._bound = TraceIdRatioBased.get_bound_for_rate(self.ratio)
        self.resource = Resource.create({
            "service.name": settings.otel_service_name, "service.namespace": "proctor",
            "service.instance.id": f"{socket.gethostname()}:{os.getpid()}", "proctor.process": process,
        })
        self.processor = BatchSpanProcessor(exporter(settings), schedule_delay_millis=EXPORT_EVERY_MS,
                                            export_timeout_millis=EXPORT_TIMEOUT_S * 1000)
        self.provider = TracerProvider(resource=self.resource, sampler=ParentBased(TraceIdRatioBased(self.ratio)))
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("proctor")
        self.scope = InstrumentationScope("proctor")
        self.process = process

    def sampled(self, trace_id: int) -> bool:
        """The sampler's decision for a new trace (the SDK's own rule: low 64 bits of the id)."""
        return trace_id & 0xFFFFFFFFFFFFFFFF < self._bound


_lock = threading.Lock()
_tracing: Tracing | None = None  # set by `setup`: OpenTelemetry's provider is per process


def setup(settings: Settings, process: str) -> bool:
    """Turn tracing on in this process if `settings.otel_endpoint` is set (once; later
    calls keep the first). Returns whether it is on."""
    global _tracing
    if _tracing is not None or not settings.otel_endpoint:
        return _tracing is not None
    with _lock:
        if _tracing is None:
            _tracing = Tracing(settings, process)
    return True


def enabled() -> bool:
    return _tracing is not None


def flush(timeout_s: float = 5.0) -> bool:
    """Export the spans this process holds now (e.g. before it exits)."""
    return _tracing is None or _tracing.provider.force_flush(int(timeout_s * 1000))


def exporter(settings: Settings) -> SpanExporter:
    """The OTLP span exporter for `otel_endpoint`, over gRPC or HTTP (`otel_protocol`)."""
    if not settings.otel_endpoint:
        raise ValueError("no otel_endpoint: tracing is off")
    url = urlsplit(settings.otel_endpoint)
    protocol = settings.otel_protocol
    if protocol == "auto":
        protocol = "grpc" if url.scheme.startswith("grpc") else "http"
    headers = dict(settings.otel_headers)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=url.netloc, insecure=url.scheme in ("http", "grpc"), headers=headers,
                            timeout=EXPORT_TIMEOUT_S)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    path = url.path if url.path not in ("", "/") else "/v1/traces"
    return HttpExporter(endpoint=f"{url.scheme}://{url.netloc}{path}", headers=headers, timeout=EXPORT_TIMEOUT_S)


# ---------------------------------------------------------------- spans


def _context(parent: ParentLike) -> Context | None:
    """The OpenTelemetry context to start a span in: `parent`'s, or the current one."""
    p = Parent.parse(parent)
    if p is None:
        return None
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    ctx = SpanContext(p.trace_id, p.span_id, is_remote=True, trace_flags=TraceFlags(1 if p.sampled else 0))
    return trace.set_span_in_context(NonRecordingSpan(ctx))


def _kind(kind: str) -> SpanKind:
    from opentelemetry.trace import SpanKind

    return {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER, "client": SpanKind.CLIENT,
            "producer": SpanKind.PRODUCER, "consumer": SpanKind.CONSUMER}[kind]


@harmless(lambda: NOOP)
def start(name: str, /, *, parent: ParentLike = None, kind: str = "internal", start_ns: int | None = None,
          activate: bool = False, attributes: Mapping[str, object] | None = None, **attrs: object) -> Span | _NoSpan:
    """A span that runs until `.end()`; `parent` (a Parent, a traceparent or a carrier)
    or else the current span is its parent. With `activate`, it is the current span of
    this task until it ends."""
    t = _tracing
    if t is None:
        return NOOP
    otel_span = t.tracer.start_span(name, context=_context(parent), kind=_kind(kind), start_time=start_ns,
                                    attributes=_attributes({**(attributes or {}), **attrs}))
    token = None
    if activate:
        from opentelemetry import context, trace

        token = context.attach(trace.set_span_in_context(otel_span))
    return Span(otel_span, token)


@contextmanager
def _block(name: str, parent: ParentLike, kind: str, attrs: dict[str, object]) -> Iterator[Span | _NoSpan]:
    s = start(name, parent=parent, kind=kind, activate=True, attributes=attrs)
    try:
        yield s
    except BaseException as exc:
        s.end(error=exc)
        raise
    finally:
        s.end()


def span(name: str, /, *, parent: ParentLike = None, kind: str = "internal",
         attributes: Mapping[str, object] | None = None, **attrs: object) -> AbstractContextManager[Span | _NoSpan]:
    """A `with` block's span, current inside it; an exception leaving it is its error."""
    if _tracing is None:
        return NOOP
    return _block(name, parent, kind, {**(attributes or {}), **attrs})


@harmless()
def emit(name: str, /, *, trace_id: int, span_id: int, parent_id: int | None, start_ns: int, end_ns: int,
         sampled: bool = True, error: str | None = None, attributes: Mapping[str, object] | None = None,
         **attrs: object) -> None:
    """Write a finished span whose ids the caller chose (derived ones: `derived_id`)."""
    t = _tracing
    if t is None or not sampled:
        return
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

    flags = TraceFlags(TraceFlags.SAMPLED)
    status = Status(StatusCode.ERROR, error[:1000]) if error else Status(StatusCode.UNSET)
    t.processor.on_end(ReadableSpan(
        name, context=SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags),
        parent=SpanContext(trace_id, parent_id, is_remote=True, trace_flags=flags) if parent_id else None,
        resource=t.resource, attributes=_attributes({**(attributes or {}), **attrs}), status=status,
        start_time=start_ns, end_time=max(end_ns, start_ns), instrumentation_scope=t.scope))


# ---------------------------------------------------------------- context


@harmless()
def current() -> Parent | None:
    """The current span's identity, if a span is current and tracing is on."""
    if _tracing is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return Parent(ctx.trace_id, ctx.span_id, ctx.trace_flags.sampled) if ctx.is_valid else None


def carrier() -> dict[str, str] | None:
    """The current span as a W3C carrier, to hand to another process; None when off."""
    p = current()
    return {"traceparent": p.traceparent} if p is not None else None


def new_trace() -> Parent | None:
    """A new trace's id (its `span_id` is 0: no span yet) and its sampling decision."""
    t = _tracing
    if t is None:
        return None
    trace_id = random.getrandbits(128) or 1
    return Parent(trace_id, 0, t.sampled(trace_id))


def derived_id(trace_id: int, *key: object) -> int:
    """A span id derived from its trace and a key (e.g. "shard", eval id, shard id, attempt):
    every process computes the same one, so work can be parented under a span that ends
    elsewhere, later."""
    import hashlib

    digest = hashlib.blake2b("/".join(map(str, (f"{trace_id:032x}", *key))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1
