"""The embedded default platform on one machine: a local Ray cluster and the control plane.

`proctor up` starts a Ray head (`ray start --head`) with its dashboard, attaches, and
starts the control plane; `proctor down` stops both. State goes to SQLite and results to
a folder under `Settings.home` unless settings say otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from proctor.settings import Settings

RAY_PORT = 6379
DASHBOARD_PORT = 8265


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


def _state_file(settings: Settings) -> Path:
    return settings.home / "platform.json"


def cluster_running() -> bool:
    """Whether our Ray head answers on its port (a stale address file elsewhere is ignored)."""
    ray_token_auth()
    import socket

    try:
        with socket.create_connection(("127.0.0.1", RAY_PORT), timeout=2):
            return True
    except OSError:
        return False


def start_ray(settings: Settings) -> dict[str, Any]:
    """Start a local Ray head unless one is already running. Returns its addresses."""
    info = {"address": f"127.0.0.1:{RAY_PORT}", "dashboard": f"http://127.0.0.1:{DASHBOARD_PORT}",
            "ray_token_file": str(Path.home() / ".ray" / "auth_token")}
    if not cluster_running():
        cmd = [ray_bin(), "start", "--head", f"--port={RAY_PORT}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={DASHBOARD_PORT}", "--disable-usage-stats", "--include-dashboard=true"]
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"could not start Ray: {result.stderr.strip()[-2000:]}")
    return info


def up(settings: Settings) -> dict[str, Any]:
    """Bring up the embedded platform (idempotent). Returns what `proctor up` prints."""
    settings.home.mkdir(parents=True, exist_ok=True)
    from .auth import platform_secret

    platform_secret(settings, create=True)  # before the API starts: it verifies the platform's JWTs
    info = start_ray(settings)

    import ray

    from eval_actors import control_plane

    ray.init(address=info["address"], namespace=settings.ray_namespace, logging_level="ERROR",
             log_to_driver=False)
    control_plane.start(settings)
    from ray import serve

    from .deployment import APP_NAME, deployment

    serve.start(http_options={"host": "127.0.0.1", "port": settings.api_port})
    serve.run(deployment(settings), name=APP_NAME, route_prefix="/", blocking=False)
    info["api"] = settings.api_url
    info["docs"] = f"{settings.api_url}/docs"
    info["token_file"] = str(ensure_admin_token(settings))
    _wait_ready(settings.api_url)
    info["dashboard_ui"] = start_dashboard(settings, info["dashboard"])
    info.update({"state": settings.state, "results": settings.results, "started_at": time.time()})
    _state_file(settings).write_text(json.dumps(info, indent=2))
    return info


def _wait_ready(api_url: str, timeout: float = 120.0) -> None:
    """Until the API answers ready (Serve's proxy starts listening a moment after `serve.run`)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{api_url}/api/v1/health", timeout=5).json().get("ready"):
                return
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API at {api_url} was not ready after {timeout:.0f} s")
        time.sleep(0.5)


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
    local admin token. Idempotent: a running one is kept."""
    url = f"http://127.0.0.1:{settings.ui_port}"
    pid_file = _ui_pid_file(settings)
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 0)
            return url
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
    log = open(settings.home / "dashboard.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "ui", "--local-token", "--port", str(settings.ui_port),
                             "--api", settings.api_url, "--ray-dashboard", ray_dashboard],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    pid_file.write_text(str(proc.pid))
    return url


def stop_dashboard(settings: Settings) -> bool:
    pid_file = _ui_pid_file(settings)
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        stopped = True
    except (OSError, ValueError):
        stopped = False
    pid_file.unlink(missing_ok=True)
    return stopped


def down(settings: Settings) -> list[str]:
    import ray

    from eval_actors import control_plane

    stopped: list[str] = ["dashboard"] if stop_dashboard(settings) else []
    if cluster_running():
        ray.init(address=f"127.0.0.1:{RAY_PORT}", namespace=settings.ray_namespace, logging_level="ERROR",
                 log_to_driver=False)
        from ray import serve

        try:
            serve.shutdown()
            stopped.append("serve")
        except Exception:  # Serve was not running
            pass
        stopped += control_plane.stop(settings)
        ray.shutdown()
        subprocess.run([ray_bin(), "stop", "--force"], capture_output=True, timeout=120)
        stopped.append("ray")
    _state_file(settings).unlink(missing_ok=True)
    return stopped


def attach(settings: Settings) -> Any:
    """Join the running platform from this process; the control plane's client."""
    import ray

    from eval_actors.control_plane import ControlPlane

    if not ray.is_initialized():
        ray_token_auth()
        address = settings.ray_address or f"127.0.0.1:{RAY_PORT}"
        ray.init(address=address, namespace=settings.ray_namespace, logging_level="ERROR", log_to_driver=False)
    return ControlPlane(settings)


def have_ray_cli() -> bool:
    return shutil.which(ray_bin()) is not None or Path(ray_bin()).exists()
