"""An OTLP receiver for the tests: real OTLP/HTTP and OTLP/gRPC endpoints on 127.0.0.1 that
decode the official protobufs (opentelemetry-proto's `ExportTraceServiceRequest`) and
keep every span, as an OpenTelemetry collector would receive them."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else str(v)


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: int
    start_ns: int
    end_ns: int
    error: str | None  # the status message of an ERROR status ("" if it has none); None if not an error
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)
    events: tuple[str, ...] = ()

    @property
    def process(self) -> str | None:
        return self.resource.get("proctor.process")


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out = []
    for rs in request.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                error = s.status.message if s.status.code == 2 else None
                out.append(ReceivedSpan(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex() or None,
                    name=s.name, kind=s.kind, start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    error=error, attributes={a.key: _value(a.value) for a in s.attributes}, resource=resource,
                    events=tuple(e.name for e in s.events)))
    return out


class OtlpReceiver:
    """`http_url` (POST /v1/traces, protobuf) and, with `grpc`, `grpc_url` (TraceService/Export)."""

    def __init__(self, grpc: bool = False) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_response(404 if self.path != "/v1/traces" else 415)
                    self.end_headers()
                    return
                receiver._keep(decode(trace_service_pb2.ExportTraceServiceRequest.FromString(body)))
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.grpc_server: Any = None
        if grpc:
            self._serve_grpc()

    def _serve_grpc(self) -> None:
        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the service's name
                receiver._keep(decode(request))
                return trace_service_pb2.ExportTraceServiceResponse()

        import grpc

        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.grpc_server)
        port = self.grpc_server.add_insecure_port("127.0.0.1:0")
        self.grpc_server.start()
        self.grpc_url = f"grpc://127.0.0.1:{port}"

    def _keep(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self.requests += 1
            self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], trace_id: str | None = None,
                 timeout: float = 60) -> list[ReceivedSpan]:
        """The spans (of `trace_id`, or all) once `predicate` holds for them."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = [s for s in self.spans if trace_id is None or s.trace_id == trace_id]
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted(f"{s.name}@{s.process}" for s in spans)
                raise AssertionError(f"the spans received within {timeout} s do not satisfy the test: {names}")
            time.sleep(0.2)

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=None)
