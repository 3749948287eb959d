"""The embedded default platform on one machine: a local Ray cluster, the control plane,
the API on Ray Serve, and the dashboard.

`proctor up` starts, overlapping what can overlap:
1. the dashboard's process (importing Gradio is the slowest single step; it waits for
   nothing, and signs in with the admin token written just before it);
2. a local Ray head in a session of its own (`cluster.localray`), unless a Ray head
   already answers on `Settings.ray_port`; Ray's daemons and workers get Proctor's
   Python first on their PATH, so that a Ray job's `python` is the one with Proctor;
3. the control plane's actors, and meanwhile the Serve application;
and returns once the API answers ready and the dashboard answers. It is idempotent.

`proctor down` stops the dashboard and, when `up` started the Ray head, exactly that Ray
cluster (with the control plane and the API in it), never another one on the machine. A
Ray cluster that `up` found running is left running, without Proctor's actors and
application. Then it kills the sandboxes the supervisors left running (`reap_owner` on
each supervisor's folder). State and results stay. What was started is recorded in
`$PROCTOR_HOME/platform.json`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cluster import localray
from proctor.settings import Settings

from .ingress import IngressError, ingress_env

READY_TIMEOUT_S = 120.0
SUPERVISOR_FOLDERS = "proctor-supervisor-*"  # eval_actors.control_plane.SUPERVISOR's (importing it loads Ray)


class PlatformError(RuntimeError):
    """The platform could not be brought up. Caught by `proctor up`, which prints it and exits 5."""


def ray_token_auth() -> None:
    """Ray's control plane runs arbitrary code for whoever reaches it: require Ray's token
    (kept in ~/.ray/auth_token, made on first use) for this process and what it starts."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules:  # Ray caches the mode when it loads; make it look again
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()
    token = Path.home() / ".ray" / "auth_token"
    if not token.exists():
        subprocess.run([ray_bin(), "get-auth-token", "--generate"], capture_output=True, timeout=60)


def ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


def ray_env(settings: Settings) -> dict[str, str]:
    """The environment of the Ray head `up` starts, and so of its workers and jobs: token
    auth, no usage reporting, this Python's folder first on PATH (a job's `python`), and
    Serve's ingress mode (`settings.serve_ingress`; Serve reads it in each of its
    processes). Raises `PlatformError` when that mode cannot run here."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    try:
        ingress = ingress_env(settings.serve_ingress, settings.haproxy_stats_port, settings.haproxy_metrics_port,
                              folder=settings.home / "haproxy")
    except IngressError as exc:
        raise PlatformError(str(exc)) from None
    return dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", PATH=path, **ingress)


def _state_file(settings: Settings) -> Path:
    return settings.home / "platform.json"


def _read_state(settings: Settings) -> dict[str, Any]:
    try:
        data = json.loads(_state_file(settings).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(settings: Settings, data: dict[str, Any]) -> None:
    _state_file(settings).write_text(json.dumps(data, indent=2, default=str))


def up(settings: Settings) -> dict[str, Any]:
    """Bring up the embedded platform (idempotent). Returns what `proctor up` prints.
    Raises `PlatformError`."""
    settings.home.mkdir(parents=True, exist_ok=True)
    from .auth import platform_secret

    platform_secret(settings, create=True)  # before the API starts: it verifies the platform's JWTs
    token_file = ensure_admin_token(settings)
    ui = start_dashboard(settings, settings.ray_dashboard_url)
    try:
        return _up(settings, token_file, ui)
    except BaseException:
        stop_dashboard(settings)  # the rest is for `down`, which the message suggests
        raise


def _up(settings: Settings, token_file: Path, ui: str) -> dict[str, Any]:
    took: dict[str, float] = {}  # seconds per step, for `proctor up --json` and benchmarks/platform_up.py
    mark = time.monotonic()

    def step(name: str) -> None:
        nonlocal mark
        took[name] = round(time.monotonic() - mark, 3)
        mark = time.monotonic()

    ray_token_auth()
    state = _read_state(settings)
    address = settings.ray_address
    if address is None:
        address = f"127.0.0.1:{settings.ray_port}"
        if not localray.head_answers(settings.ray_port):
            try:
                head = localray.start(ray_bin(), settings.ray_port, settings.ray_dashboard_port,
                                      settings.home / "ray", ray_env(settings))
            except localray.LocalRayError as exc:
                hint = " (its folder is in PROCTOR_HOME: a shorter one fixes it)" if "sockets" in str(exc) else ""
                raise PlatformError(f"Ray did not start: {exc}{hint}") from exc
            except OSError as exc:  # no `ray` program beside this Python, or it cannot run
                raise PlatformError(f"Ray did not start: {ray_bin()}: {exc.strerror or exc} (is Proctor installed "
                                    "with its dependencies? `scripts/setup.sh`)") from exc
            state = {"ray": head.to_dict()}  # written now: `down` stops it even if the rest fails
            _write_state(settings, state)
    step("ray")
    try:
        _start_control_plane_and_api(settings, address)
    except Exception as exc:  # noqa: BLE001 - Ray's errors, whatever their class, end `up` with their cause
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlatformError(f"the control plane and the API did not start on the Ray cluster at {address}: "
                            f"{type(exc).__name__}: {why}") from exc
    step("control_plane_and_api")
    _wait_answers(f"{settings.api_url}/api/v1/health", "the API", lambda r: r.json().get("ready") is True)
    step("api_ready")
    _wait_answers(ui, "the dashboard", lambda r: r.status_code == 200)
    step("dashboard_ready")
    info = {"address": address, "dashboard": settings.ray_dashboard_url,
            "ray_token_file": str(Path.home() / ".ray" / "auth_token"), "api": settings.api_url,
            "docs": f"{settings.api_url}/docs", "token_file": str(token_file), "dashboard_ui": ui,
            "state": settings.state, "results": settings.results, "started_at": time.time(), "took_s": took}
    _write_state(settings, {**state, **info})
    return info


def _start_control_plane_and_api(settings: Settings, address: str) -> None:
    """The control plane's actors and the Serve application, their processes starting together."""
    import ray

    from eval_actors import control_plane

    ray.init(address=address, namespace=settings.ray_namespace, logging_level="ERROR", log_to_driver=False)
    launch = control_plane.launch(settings)
    from ray import serve

    from .deployment import APP_NAME, deployment

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its start-up notes are not the user's business
    proxies = _start_serve({"host": "127.0.0.1", "port": settings.api_port})
    serve.run(deployment(settings), name=APP_NAME, route_prefix="/", blocking=False)
    ray.get(proxies, timeout=READY_TIMEOUT_S)
    launch.ready()


def _start_serve(http_options: dict[str, Any]) -> list[Any]:
    """Start Serve's controller unless it runs, and return its proxies' readiness refs
    without waiting for them: `serve.start` waits for the proxies (HTTP, and HAProxy's
    manager and fallback proxy) before anything can be deployed, ~6 s on two cores, and
    the replica does not need them to start. Ray's private helper that `serve.start`
    itself calls; on a Ray without it, `serve.start` (and nothing to wait for)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    try:
        from ray.serve._private.api import _coerce_controller_options, _create_controller_and_proxy_refs
    except ImportError:
        private = False
    else:
        private = True
    if not private or _get_global_client(raise_if_no_controller_running=False) is not None:
        serve.start(http_options=http_options)  # a running Serve: checks its HTTP options are these
        return []
    _, proxies = _create_controller_and_proxy_refs(http_options, None, None, None, _coerce_controller_options(None))
    return list(proxies)


def _wait_answers(url: str, what: str, ok: Any, timeout: float = READY_TIMEOUT_S) -> None:
    """Until GET `url` answers and `ok(response)` (Serve's proxy, and Gradio, start
    listening a moment after they are deployed or spawned). Raises `PlatformError`."""
    import httpx

    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            response = httpx.get(url, timeout=5)
            if ok(response):
                return
            last = f"HTTP {response.status_code}"
        except (httpx.HTTPError, ValueError) as exc:
            last = str(exc) or type(exc).__name__
        if time.monotonic() > deadline:
            raise PlatformError(f"{what} at {url} was not ready after {timeout:.0f} s ({last})")
        time.sleep(0.1)


def ensure_admin_token(settings: Settings) -> Path:
    """On first start, an admin user and key, stored 0600 where the CLI and client look."""
    from cluster.state import StateStore

    path = settings.token_file
    store = StateStore(settings.state)
    try:
        if path.exists() and store.verify_token(path.read_text().strip()) is not None:
            return path
        if store.get_user("admin") is None:
            store.create_user("admin", "admin")
        secret, _ = store.create_token("admin", "local admin (proctor up)")
    finally:
        store.close()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return path


def _ui_pid_file(settings: Settings) -> Path:
    return settings.home / "dashboard.pid"


def start_dashboard(settings: Settings, ray_dashboard: str) -> str:
    """The Gradio dashboard in its own process (Gradio wants one), signed in with the
    local admin token. Idempotent: a running one started the same way is kept. Returns
    its URL."""
    argv = [sys.executable, "-m", "ui", "--local-token", "--port", str(settings.ui_port),
            "--api", settings.api_url, "--ray-dashboard", ray_dashboard]
    pid = _dashboard_pid(settings)
    if pid is not None:
        if _cmdline(pid) == argv:
            return settings.ui_url
        stop_dashboard(settings)  # started for other settings
    log = open(settings.home / "dashboard.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    _ui_pid_file(settings).write_text(str(proc.pid))
    return settings.ui_url


def _dashboard_pid(settings: Settings) -> int | None:
    """The pid of the dashboard `start_dashboard` started, if that process still runs it."""
    try:
        pid = int(_ui_pid_file(settings).read_text())
    except (OSError, ValueError):
        return None
    cmd = _cmdline(pid)
    return pid if cmd[1:3] == ["-m", "ui"] else None  # not a pid reused by another program


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def stop_dashboard(settings: Settings) -> bool:
    pid = _dashboard_pid(settings)
    _ui_pid_file(settings).unlink(missing_ok=True)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return False
    return True


def down(settings: Settings) -> list[str]:
    """Stop what `up` started (see the module's doc). Returns what was stopped."""
    stopped: list[str] = ["dashboard"] if stop_dashboard(settings) else []
    state = _read_state(settings)
    head = localray.LocalHead.from_dict(state.get("ray") or {})
    if head is not None and localray.stop(head):
        stopped.append("ray")  # the control plane and the API ran in it
    elif settings.ray_address or localray.head_answers(settings.ray_port):
        stopped += _leave_cluster(settings, settings.ray_address or f"127.0.0.1:{settings.ray_port}")
    if reap_sandboxes(settings):
        stopped.append("sandboxes")
    _state_file(settings).unlink(missing_ok=True)
    return stopped


def reap_sandboxes(settings: Settings) -> int:
    """Kill the sandboxes the supervisors left (their Ray workers are gone, their runsc and
    bwrap processes are not: each runs in a session and cgroup of its own); how many."""
    from cluster.inspect_tasks import reap_owner_workers
    from cluster.runtimes import reap_owner

    killed = 0
    for folder in sorted(settings.sandbox_dir.glob(SUPERVISOR_FOLDERS)):
        try:
            killed += reap_owner_workers(folder) + reap_owner(folder, settings.runsc_platform)
        except Exception:  # noqa: BLE001 - one folder's trouble must not keep `down` from the rest
            logging.getLogger("proctor.platform").exception("could not reap the sandboxes in %s", folder)
    return killed


def _leave_cluster(settings: Settings, address: str) -> list[str]:
    """On a Ray cluster `up` did not start: remove Proctor's application and actors only."""
    import ray

    from eval_actors import control_plane

    ray_token_auth()
    ray.init(address=address, namespace=settings.ray_namespace, logging_level="ERROR", log_to_driver=False)
    from ray import serve

    from .deployment import APP_NAME

    gone: list[str] = []
    try:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.delete(APP_NAME)
        gone.append("serve")
    except Exception:  # noqa: BLE001 - Serve was not running there
        pass
    gone += control_plane.stop(settings)
    ray.shutdown()
    return gone


def attach(settings: Settings) -> Any:
    """Join the running platform from this process; the control plane's client."""
    import ray

    from eval_actors.control_plane import ControlPlane

    if not ray.is_initialized():
        ray_token_auth()
        address = settings.ray_address or f"127.0.0.1:{settings.ray_port}"
        ray.init(address=address, namespace=settings.ray_namespace, logging_level="ERROR", log_to_driver=False)
    return ControlPlane(settings)
