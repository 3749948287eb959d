"""A TEST DOUBLE of the Kubernetes API server, for the `kubernetes` sandbox runtime's tests.

Not a Kubernetes: a real HTTPS server on 127.0.0.1 (a random port, its own CA) that the
real `kubernetes` client and the runtime's WebSocket attach talk to through the kubeconfig
file it writes (a bearer token checked, or with `client_certs` a client certificate that
the TLS handshake requires). It answers like the API server where the runtime
looks: the paths of pods, ConfigMaps, NetworkPolicies, Services, Events and pod metrics; create 201, get
200/404 with a `Status`, delete 200 with the object, 409 AlreadyExists, 422 Invalid (the
body validated with `kubernetes_validate`, strict, Kubernetes 1.37), 403 for an unknown
RuntimeClass; lists with label and field selectors; watches streaming ADDED / MODIFIED /
DELETED lines with resourceVersions; garbage collection through ownerReferences.

Its scheduler and kubelet (`kubelet.py`) place pods on configured nodes (by default two
8-CPU nodes without GPUs; optionally a node with 4 x A100), keep unplaceable pods Pending
and Unschedulable, and run each container as a LOCAL, unisolated process (trusted test
tasks only), its stdin/stdout/stderr reachable through the attach subresource
(v4.channel.k8s.io). Init containers run first, in order; a container whose image is in
the double's registry (`kubelet.images`: reference → root filesystem) runs for real in
that image's root, through bubblewrap, instead (`containers.py`). Faults on demand: OOM-kill, evict, expire (activeDeadlineSeconds),
a failing image pull, and "fail the next N requests with status S".

The tests reach it only through the kubeconfig (`PROCTOR_KUBECONFIG`): pointed at a real
cluster, the same tests run there.
"""

from __future__ import annotations

import base64
import secrets
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml

from .kubelet import Kubelet, Node
from .server import ApiHttpServer, Faults
from .store import Store
from .tls import make_certificates

CPU_NODES = [Node("cpu-1"), Node("cpu-2")]
A100_NODE = Node.gpu_node("gpu-a100-1", "NVIDIA-A100-SXM4-40GB", 4)

__all__ = ["KubeApiDouble", "Node", "CPU_NODES", "A100_NODE"]


class KubeApiDouble:
    def __init__(self, nodes: list[Node] | None = None, namespace: str = "proctor-sandboxes",
                 client_certs: bool = False):
        self.folder = Path(tempfile.mkdtemp(prefix="kubeapi-"))
        self.namespace = namespace
        self.token = None if client_certs else secrets.token_urlsafe(24)
        self.client_cn = "proctor-supervisor" if client_certs else None
        ca, tls, (cert, key) = make_certificates(self.folder, self.client_cn)
        user = ({"token": self.token} if self.token else
                {"client-certificate-data": base64.b64encode(cert).decode(),
                 "client-key-data": base64.b64encode(key).decode()})
        self.store = Store()
        (self.folder / "containers").mkdir()
        self.kubelet = Kubelet(self.store, list(nodes if nodes is not None else CPU_NODES), self.folder / "containers")
        self.faults = Faults()
        self.runtime_classes = {"gvisor"}
        self.requests: list[tuple[str, str, int]] = []
        self.server = ApiHttpServer(self, tls)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="kubeapi-double", daemon=True)
        self.thread.start()
        self.kubeconfig = self.folder / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {
                "server": self.url, "certificate-authority-data": base64.b64encode(ca).decode()}}],
            "users": [{"name": "proctor", "user": user}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "proctor",
                                                         "namespace": namespace}}],
        }))

    # ------------------------------------------------------------ what tests look at

    def objects(self, kind: str = "pods") -> list[dict[str, Any]]:
        return self.store.list(kind, self.namespace, None, None)[0]

    def pod(self, name: str) -> dict[str, Any] | None:
        return self.store.find("pods", self.namespace, name)

    def processes(self) -> list[int]:
        """Pids of the containers still running."""
        with self.kubelet.lock:
            return [c.proc.pid for c in self.kubelet.containers.values() if c.proc.poll() is None]

    def count(self, method: str, path_contains: str) -> int:
        return sum(1 for m, p, _ in list(self.requests) if m == method and path_contains in p)

    # ------------------------------------------------------------ faults

    def oom_kill(self, pod: str) -> bool:
        return self.kubelet.terminate(self.namespace, pod, "OOMKilled")

    def evict(self, pod: str, message: str = "The node was low on resource: memory.") -> bool:
        return self.kubelet.terminate(self.namespace, pod, "Evicted", message)

    def expire(self, pod: str) -> bool:
        return self.kubelet.terminate(self.namespace, pod, "DeadlineExceeded")

    def fail_image(self, image: str) -> None:
        self.kubelet.failing_images.add(image)

    def fail_next(self, n: int, status: int, method: str | None = None, path_contains: str = "",
                  whole_path: bool = False) -> None:
        self.faults.fail_next(n, status, method, path_contains, whole_path)

    # ------------------------------------------------------------ the end

    def close(self) -> None:
        self.store.closed = True
        self.kubelet.close()
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "KubeApiDouble":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
