"""The API as a Ray Serve application (`@serve.ingress` around the FastAPI app).

`proctor up` deploys it; `serve_config.yaml` deploys the same application with
`serve deploy`, and the KubeRay RayService (`kuberay/rayservice.yaml`) with its
`serveConfigV2`; both name the builder `serve_app.deployment:app_builder`.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from proctor.settings import Settings, load_settings

from .api import build_app
from .priority import PriorityKeeper

APP_NAME = "proctor"


def deployment(settings: Settings) -> serve.Application:
    fastapi_app = build_app(settings)

    # Serve's per-request access log costs the replica CPU on every call; the API's own
    # latency histogram (`proctor_api_request_duration_seconds`) covers what it would tell.
    # Serve's own lines are JSON too when Proctor's are (PROCTOR_LOG_FORMAT=json)
    @serve.deployment(name="ProctorAPI", num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=200,
                      logging_config={"enable_access_log": False,
                                      "encoding": "JSON" if settings.log_format == "json" else "TEXT"})
    @serve.ingress(fastapi_app)
    class ProctorAPI:
        def __init__(self) -> None:
            # Only in the replica: an app built in another process (a test's, a
            # script's) leaves that process's priority alone.
            self._priority = PriorityKeeper(settings.api_nice)  # a stop reaches the API on a busy host
            self._priority.start()

    return ProctorAPI.bind()


BUILDER_ARGS = ("start_control_plane",)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For `serve deploy`/`serveConfigV2`: settings from the environment.

    `args` is the application's `args` in the Serve config. `start_control_plane: "true"`
    first creates the control plane's actors where they are missing (idempotent, as
    `proctor up` does), so that a fresh cluster (the KubeRay RayService) needs nothing
    else; without it the control plane must already be running. Raises `ValueError` for
    an unknown argument or a value that is not true or false, before anything starts."""
    unknown = sorted(set(args) - set(BUILDER_ARGS))
    if unknown:
        raise ValueError(f"app_builder: unknown args {', '.join(unknown)}; known: {', '.join(BUILDER_ARGS)}")
    start = _flag("start_control_plane", args.get("start_control_plane", False))
    settings = load_settings()
    if start:
        from eval_actors import control_plane

        control_plane.start(settings)
    return deployment(settings)


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0", ""):
        return False
    raise ValueError(f"app_builder: {name}: {value!r} is not true or false")
