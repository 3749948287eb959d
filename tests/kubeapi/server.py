"""The double's HTTP(S) front: the API server's paths, verbs, status codes and Status
bodies, bearer-token authentication, watches as streamed JSON lines, the attach upgrade,
pod metrics, and injected failures."""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate

from .attach import PROTOCOL, AttachSession, accept_key
from .procstats import rss, scrape_cpu
from .store import KINDS, ApiError, now_iso

K8S_VERSION = "1.37.0"
ROUTES = [
    re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<kind>pods|configmaps|events|services)(?:/(?P<name>[^/]+)(?:/(?P<sub>attach))?)?$"),
    re.compile(r"^/apis/networking\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/(?P<kind>networkpolicies)(?:/(?P<name>[^/]+))?$"),
]
METRICS = re.compile(r"^/apis/metrics\.k8s\.io/v1beta1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
REASONS = {429: "TooManyRequests", 500: "InternalError", 502: "InternalError", 503: "ServiceUnavailable",
           504: "Timeout"}


class Faults:
    """Failures to inject: the next `n` requests (matching method and path) get `status`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rules: list[dict[str, Any]] = []

    def fail_next(self, n: int, status: int, method: str | None = None, path_contains: str = "",
                  whole_path: bool = False) -> None:
        with self.lock:
            self.rules.append({"n": n, "status": status, "method": method, "path": path_contains, "whole": whole_path})

    def take(self, method: str, path: str) -> int | None:
        with self.lock:
            for rule in self.rules:
                matches = rule["path"] == path if rule["whole"] else rule["path"] in path
                if rule["n"] > 0 and rule["method"] in (None, method) and matches:
                    rule["n"] -= 1
                    return rule["status"]
        return None


def validate(kind: str, body: Any, runtime_classes: set[str]) -> None:
    """Answer like the API server's validation and admission: 400, 422 Invalid, 403."""
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the request body is not a JSON object")
    name = (body.get("metadata") or {}).get("name")
    kind_name = KINDS[kind]
    if not name:
        raise ApiError(422, "Invalid", f"{kind_name} \"\" is invalid: metadata.name: Required value: name or "
                                      "generateName is required", {"kind": kind})
    if len(name) > 253 or not DNS_SUBDOMAIN.match(name):
        raise ApiError(422, "Invalid", f'{kind_name} "{name}" is invalid: metadata.name: Invalid value: "{name}": '
                                      "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                                      "characters, '-' or '.'", {"name": name, "kind": kind})
    try:
        kubernetes_validate.validate(body, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        first = str(exc).splitlines()[0]
        raise ApiError(422, "Invalid", f'{kind_name} "{name}" is invalid: {first}', {"name": name, "kind": kind})
    rc = (body.get("spec") or {}).get("runtimeClassName")
    if kind == "pods" and rc is not None and rc not in runtime_classes:
        raise ApiError(403, "Forbidden", f'pods "{name}" is forbidden: pod rejected: RuntimeClass "{rc}" not found')


class ApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "ApiHttpServer"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise ApiError(400, "BadRequest", "the request body is not JSON") from None

    def _handle(self, method: str) -> None:
        double = self.server.double
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        status = 200
        try:
            body = self._body()
            if not self._authenticated(double):
                raise ApiError(401, "Unauthorized", "Unauthorized")
            injected = double.faults.take(method, url.path)
            if injected is not None:
                raise ApiError(injected, REASONS.get(injected, "InternalError"), f"injected failure {injected}")
            status = self._route(method, url.path, query, body)
        except ApiError as exc:
            status = exc.code
            self._json(exc.code, exc.status(), {"Retry-After": "0"} if exc.code == 429 else {})
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True
        double.requests.append((method, url.path, status))

    def _authenticated(self, double: Any) -> bool:
        if double.token is not None:
            return self.headers.get("Authorization") == f"Bearer {double.token}"
        subject = dict(x[0] for x in (self.connection.getpeercert() or {}).get("subject", ()))
        return subject.get("commonName") == double.client_cn  # the handshake checked the CA

    def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> int:
        double = self.server.double
        store = double.store
        if path == "/version":
            self._json(200, {"major": "1", "minor": "37", "gitVersion": "v1.37.0-proctor-double"})
            return 200
        metrics = METRICS.match(path)
        if metrics:
            return self._metrics(metrics["ns"], metrics["name"])
        for route in ROUTES:
            m = route.match(path)
            if m:
                break
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        ns, kind, name = m["ns"], m["kind"], m["name"]
        if m.groupdict().get("sub") == "attach":
            return self._attach(ns, name)
        if name is None and method == "GET" and query.get("watch") in ("true", "1"):
            return self._watch(kind, ns, query)
        if name is None and method == "GET":
            items, rv = store.list(kind, ns, query.get("labelSelector"), query.get("fieldSelector"))
            self._json(200, {"kind": f"{KINDS[kind]}List", "apiVersion": "v1",
                             "metadata": {"resourceVersion": rv}, "items": items})
            return 200
        if name is None and method == "POST":
            validate(kind, body, double.runtime_classes)
            obj = dict(body)
            if kind == "pods":
                obj["status"] = {"phase": "Pending", "qosClass": "Guaranteed"}
            if kind == "services":  # the API server's defaults (a headless Service keeps "None")
                spec = obj.setdefault("spec", {})
                spec.setdefault("type", "ClusterIP")
                spec.setdefault("clusterIP", "10.96.0.10")
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
                obj["status"] = {"loadBalancer": {}}
            self._json(201, store.create(kind, ns, obj))
            return 201
        if name is not None and method == "GET":
            self._json(200, store.get(kind, ns, name))
            return 200
        if name is not None and method == "DELETE":
            grace = query.get("gracePeriodSeconds")
            if grace is None and isinstance(body, dict):  # or in the DeleteOptions body
                grace = body.get("gracePeriodSeconds")
            self._json(200, store.delete(kind, ns, name, int(grace) if grace is not None else None))
            return 200
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported by this double on {path}")

    def _watch(self, kind: str, ns: str, query: dict[str, str]) -> int:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = self.server.double.store.watch(kind, ns, query.get("resourceVersion"), query.get("labelSelector"),
                                                query.get("fieldSelector"), float(query.get("timeoutSeconds") or 1800))
        for type_, obj in events:
            line = json.dumps({"type": type_, "object": obj}).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.write(b"0\r\n\r\n")
        return 200

    def _metrics(self, ns: str, name: str) -> int:
        container = self.server.double.kubelet.container(ns, name)
        if container is None or container.ended:
            raise ApiError(404, "NotFound", f'podmetrics.metrics.k8s.io "{ns}/{name}" not found')
        rate, window = scrape_cpu(container)  # every request is a fresh scrape here
        usage = {"cpu": f"{int(rate * 1e9)}n", "memory": f"{rss(container.proc.pid) // 1024}Ki"}
        self._json(200, {"kind": "PodMetrics", "apiVersion": "metrics.k8s.io/v1beta1",
                         "metadata": {"name": name, "namespace": ns}, "timestamp": now_iso(), "window": f"{window:.3f}s",
                         "containers": [{"name": "sandbox", "usage": usage}]})
        return 200

    def _attach(self, ns: str, name: str) -> int:
        double = self.server.double
        pod = double.store.get("pods", ns, name)
        if self.headers.get("Upgrade", "").lower() != "websocket":
            raise ApiError(400, "BadRequest", "Upgrade request required")
        offered = [p.strip() for p in (self.headers.get("Sec-WebSocket-Protocol") or "").split(",")]
        if PROTOCOL not in offered:
            raise ApiError(400, "BadRequest", f"the double speaks only {PROTOCOL}")
        container = double.kubelet.container(ns, name)
        if container is None or container.ended:
            raise ApiError(400, "BadRequest", f'unable to upgrade connection: container not found ("{name}")')
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept_key(self.headers["Sec-WebSocket-Key"]))
        self.send_header("Sec-WebSocket-Protocol", PROTOCOL)
        self.end_headers()
        session = AttachSession(self.connection, container, bool(pod["spec"]["containers"][0].get("stdinOnce")))
        container.session = session
        session.serve()
        self.close_connection = True
        return 101


class ApiHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, double: Any, tls: ssl.SSLContext):
        super().__init__(("127.0.0.1", 0), ApiHandler)
        self.double = double
        self.tls = tls

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:  # the TLS handshake here, on the connection's own thread
            request = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            super().finish_request(request, client_address)
        finally:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            request.close()
