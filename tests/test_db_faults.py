"""The state store's database going away under the API: a real PostgreSQL server behind a
real TCP fault proxy (tests/faultproxy.py) that refuses and resets its connections.

While the database is away the API answers 503 `state_unavailable` with `Retry-After`
(a client waits and tries again), never 500; once it is back the same requests succeed
(the engine's pool pre-pings and replaces dead connections) and no write was applied twice.
Only routes that need no Ray are called: this module starts no cluster and joins none.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from cluster.state import StateStore
from faultproxy import FaultProxy
from proctor.settings import Settings


@pytest.fixture
def proxied(postgres_url: str) -> Iterator[tuple[str, FaultProxy]]:
    url = make_url(postgres_url)
    with FaultProxy((url.host or "127.0.0.1", url.port or 5432)) as proxy:
        yield url.set(port=proxy.port).render_as_string(hide_password=False), proxy


@pytest.mark.parametrize("mode", ["refuse", "reset"])
def test_the_api_answers_503_with_retry_after_while_the_database_is_away_and_serves_once_it_returns(
        mode: str, proxied: tuple[str, FaultProxy], tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from serve_app.api import build_app

    url, proxy = proxied
    store = StateStore(url)
    user = f"ada-{uuid.uuid4().hex[:8]}"
    store.create_user(user, "admin")
    token = store.create_token(user, "db-faults")[0]
    settings = Settings(home=tmp_path, state_url=url, results_uri=(tmp_path / "results").as_uri(),
                        jwt_secret="db-faults-secret-0123456789abcdef", ray_namespace=f"absent-{uuid.uuid4().hex[:6]}")
    with TestClient(build_app(settings)) as client:
        headers = {"Authorization": f"Bearer {token}"}
        assert client.get("/api/v1/evaluations", headers=headers).status_code == 200
        proxy.set_mode(mode)  # type: ignore[arg-type]
        try:
            for _ in range(3):  # every pooled connection is dead, and new ones fail
                away = client.get("/api/v1/evaluations", headers=headers)
                assert away.status_code == 503, away.text
                assert away.headers["Retry-After"] == "5"
                assert away.json()["error"]["code"] == "state_unavailable"
        finally:
            proxy.set_mode("pass")
        assert client.get("/api/v1/evaluations", headers=headers).status_code == 200
    assert [t.name for t in store.list_tokens(user)] == ["db-faults"]
    store.close()
