"""Shared fixtures: real sandbox runtimes (gVisor's runsc and bubblewrap)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from cluster.runtimes import BubblewrapRuntime, GvisorRuntime, SandboxRuntime
from ports import free_port


@pytest.fixture(scope="session")
def sandbox_root() -> Path:
    """A folder the sandbox user can traverse (mkdtemp gives 0700)."""
    root = Path(tempfile.mkdtemp(prefix="proctor-test-"))
    root.chmod(0o711)
    return root


@pytest.fixture(scope="session", params=["gvisor", "bubblewrap"])
def runtime(request: pytest.FixtureRequest, sandbox_root: Path) -> SandboxRuntime:
    """Each local runtime in turn: tests that take it run against both."""
    workdir = sandbox_root / request.param
    if request.param == "gvisor":
        GvisorRuntime.check()
        return GvisorRuntime(workdir)
    BubblewrapRuntime.check()
    return BubblewrapRuntime(workdir)


@pytest.fixture
def workspace(sandbox_root: Path) -> Path:
    ws = Path(tempfile.mkdtemp(prefix="ws-", dir=sandbox_root))
    os.chown(ws, 65534, 65534)
    return ws


@pytest.fixture(scope="session")
def s3_server():  # noqa: ANN201 - Iterator[MotoS3Server]
    """moto's S3 server as a real HTTP server on 127.0.0.1 (a subprocess), with a bucket."""
    from s3server import MotoS3Server

    with MotoS3Server() as server:
        yield server


@pytest.fixture(scope="session")
def s3_settings(s3_server):  # noqa: ANN001, ANN201 - MotoS3Server -> Settings
    """Settings whose results_uri is s3://<bucket>/results on the session's moto server."""
    return s3_server.settings("results")


@pytest.fixture(scope="session")
def postgres_url():  # noqa: ANN201 - Iterator[str]
    """A real PostgreSQL server for the session (tests/postgres.py) and the URL of an empty
    database in it. Fails, never skips, where PostgreSQL is not installed."""
    from postgres import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer()
        url = server.__enter__()  # stops and cleans up itself if the start fails
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        server.stop()



@pytest.fixture(scope="session")
def webhook():  # noqa: ANN201 - Iterator[WebhookReceiver]
    """A webhook receiver on 127.0.0.1 (tests/webhook.py); the session's control plane alerts it."""
    from webhook import WebhookReceiver

    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def otlp():  # noqa: ANN201 - Iterator[OtlpReceiver]
    """An OTLP receiver on 127.0.0.1 (tests/otlpreceiver.py); the session's platform traces to it."""
    from otlpreceiver import OtlpReceiver

    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def plane(sandbox_root: Path, tmp_path_factory: pytest.TempPathFactory, webhook, otlp):  # noqa: ANN001, ANN201
    """The session's one Ray cluster (tests/raycluster.py) with the control plane on it;
    its supervisors send safety alerts to the `webhook` receiver. Observed as in production:
    its processes log JSON lines and trace to the `otlp` receiver."""
    import ray

    from eval_actors import control_plane
    from raycluster import RUNTIMES, cluster_settings, start_cluster, stop_cluster

    home = sandbox_root / "control-plane"
    home.mkdir(parents=True, exist_ok=True)
    results = tmp_path_factory.mktemp("cp-results")
    cluster = start_cluster(dashboard_port=free_port())
    ray.init(address=cluster.address, namespace="proctor-test", logging_level="ERROR", log_to_driver=False)
    settings = cluster_settings(home, results.as_uri(), f"sqlite:///{home}/state.db").model_copy(
        update={"alert_webhooks": [webhook.url], "otel_endpoint": otlp.http_url, "log_format": "json"})
    try:
        yield control_plane.start(settings, runtime_factory=RUNTIMES)
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        control_plane.stop(settings)
        ray.shutdown()
        stop_cluster(cluster)


@pytest.fixture(scope="session")
def api(plane):  # noqa: ANN001, ANN201 - ControlPlane -> Iterator[(httpx.Client, tokens, StateStore)]
    """The real Serve app on the session's Ray cluster, and an API key per role
    (vera viewer, rita and rob researchers, sam safety, ada admin). It trusts the
    platform's HS256 JWTs and a real OIDC issuer (`client.issuer`, tests/oidc.py); its
    rate limit is 30/s per token with bursts of 100; bodies are capped at 1 MiB."""
    import httpx
    from ray import serve

    from apiserver import USERS
    from cluster.state import StateStore
    from serve_app.deployment import APP_NAME, deployment

    from oidc import Issuer

    issuer = Issuer()
    settings = plane.settings.model_copy(update={
        "jwt_secret": "test-platform-secret-0123456789abcdef", "oidc_issuer": issuer.url,
        "oidc_audience": issuer.audience, "rate_limit_per_s": 30.0, "rate_limit_burst": 100,
        "max_request_bytes": 1024**2})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(settings), name=APP_NAME, route_prefix="/")
    store = StateStore(plane.settings.state)
    tokens = {}
    for name, role in USERS:
        if store.get_user(name) is None:
            store.create_user(name, role)
        tokens[name] = store.create_token(name, "test")[0]
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    client.settings, client.issuer = settings, issuer  # for the auth tests
    yield client, tokens, store
    client.close()
    serve.delete(APP_NAME)
    issuer.close()
