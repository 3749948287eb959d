"""The API as a Ray Serve application (`@serve.ingress` around the FastAPI app).

`proctor up` deploys it; `serve_config.yaml` deploys the same application with
`serve deploy` (the import path is `serve_app.deployment:app`).
"""

from __future__ import annotations

from ray import serve

from proctor.settings import Settings, load_settings

from .api import build_app

APP_NAME = "proctor"


def deployment(settings: Settings) -> serve.Application:
    fastapi_app = build_app(settings)

    # Serve's per-request access log costs the replica CPU on every call; the API's own
    # latency histogram (`proctor_api_request_duration_seconds`) covers what it would tell
    @serve.deployment(name="ProctorAPI", num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=200, logging_config={"enable_access_log": False})
    @serve.ingress(fastapi_app)
    class ProctorAPI:
        pass

    return ProctorAPI.bind()


def app_builder(args: dict[str, str]) -> serve.Application:
    """For `serve deploy`/`serveConfigV2`: settings from the environment."""
    return deployment(load_settings())
