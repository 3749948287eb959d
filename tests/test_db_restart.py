"""Evaluations through restarts of their state store's PostgreSQL server.

A second control plane (namespace `proctor-dbrestart`, one supervisor) keeps its state in a
PostgreSQL server of this module's own (tests/postgres.py: the session's server is left
alone), reached through a real TCP fault proxy (tests/faultproxy.py). Its shards run in the
simulated runtime (a test double: no sandbox is needed to make rows). While evaluations
run, the server is restarted (`pg_ctl restart -m fast`), stopped for a while and started
again, or its connections are reset and refused at the proxy. The control plane rides it
out (`Settings.state_retry_s`): every evaluation ends `succeeded` with exactly samples x
epochs rows and done units, none doubled, and every shard ran once. While the server is
down, the API answers 503 with `Retry-After`, never 500.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from cluster.results import ResultsStore
from cluster.state import StateStore
from eval_actors import control_plane
from eval_actors.control_plane import ControlPlane
from faultproxy import FaultProxy
from postgres import PostgresServer
from proctor.settings import Settings
from raycluster import RUNTIMES, cluster_settings

pytestmark = pytest.mark.ray
SAMPLES, EPOCHS = 8, 2


def spec(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"adapter": "reference"},
        "dataset": {"samples": [{"id": f"s{i}", "input": "q", "target": "a", "metadata": {"sim_seconds": 0.3}}
                                for i in range(SAMPLES)]},
        "scorers": [{"type": "exact"}],
        "epochs": EPOCHS,
        "shard_size": 2,
        "sandbox": {"runtime": "kubernetes", "cpus": 1, "memory": "256Mi"},
    }


@pytest.fixture(scope="module")
def restartable(plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory,
                ) -> Iterator[tuple[ControlPlane, Settings, PostgresServer, FaultProxy]]:
    server = PostgresServer(database="dbrestart")
    url = make_url(server.__enter__())
    proxy = FaultProxy(("127.0.0.1", server.port)).start()
    home = tmp_path_factory.mktemp("dbrestart-home")
    settings = cluster_settings(home, (home / "results").as_uri(),
                                url.set(port=proxy.port).render_as_string(hide_password=False)).model_copy(
        update={"ray_namespace": f"proctor-dbrestart-{uuid.uuid4().hex[:6]}", "supervisors": 1,
                "state_retry_s": 120.0})
    try:
        yield control_plane.start(settings, runtime_factory=RUNTIMES), settings, server, proxy
    finally:
        control_plane.stop(settings)
        proxy.stop()
        server.stop()


def wait_running(cp: ControlPlane, ids: list[str]) -> None:
    """Until a shard of every evaluation is running: the fault comes mid-run."""
    with cp.store() as store:
        deadline = time.monotonic() + 120
        while not all(any(s.status == "running" for s in store.shards(i)) for i in ids):
            assert time.monotonic() < deadline, [[s.status for s in store.shards(i)] for i in ids]
            time.sleep(0.1)


def assert_exactly_once(cp: ControlPlane, settings: Settings, ids: list[str]) -> None:
    evaluations = [cp.wait(eval_id, timeout=300) for eval_id in ids]
    assert [ev.status for ev in evaluations] == ["succeeded"] * len(ids), [ev.error for ev in evaluations]
    with cp.store() as store:
        for ev in evaluations:
            table = ResultsStore(settings.results, settings).read(ev.id)
            keys = sorted(zip(table["sample_id"].to_pylist(), table["epoch"].to_pylist()))
            assert keys == sorted((f"s{i}", e) for i in range(SAMPLES) for e in range(1, EPOCHS + 1))
            assert ev.done_units == ev.total_units == SAMPLES * EPOCHS  # counted once per shard
            assert ev.summary["samples"] == SAMPLES * EPOCHS
            shards = store.shards(ev.id)
            assert [s.status for s in shards] == ["succeeded"] * len(shards)
            assert [s.attempt for s in shards] == [0] * len(shards), "a shard ran twice"


def test_evaluations_run_through_a_postgresql_restart(
        restartable: tuple[ControlPlane, Settings, PostgresServer, FaultProxy]) -> None:
    cp, settings, server, _ = restartable
    ids = [cp.submit(spec(f"restart-{i}")) for i in range(3)]
    wait_running(cp, ids)
    server.restart()
    assert_exactly_once(cp, settings, ids)


def test_evaluations_run_through_a_stopped_postgresql_and_the_api_answers_503_meanwhile(
        restartable: tuple[ControlPlane, Settings, PostgresServer, FaultProxy], tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from serve_app.api import build_app

    cp, settings, server, _ = restartable
    with StateStore(settings.state) as store:
        user = f"ada-{uuid.uuid4().hex[:8]}"
        store.create_user(user, "admin")
        token = store.create_token(user, "dbrestart")[0]
    api = settings.model_copy(update={"jwt_secret": "db-restart-secret-0123456789abcdef",
                                      "ray_namespace": f"absent-{uuid.uuid4().hex[:6]}"})
    headers = {"Authorization": f"Bearer {token}"}
    ids = [cp.submit(spec(f"stopped-{i}")) for i in range(3)]
    wait_running(cp, ids)
    with TestClient(build_app(api)) as client:
        assert client.get("/api/v1/evaluations", headers=headers).status_code == 200
        server.halt()
        try:
            away = client.get(f"/api/v1/evaluations/{ids[0]}", headers=headers)
            assert away.status_code == 503, away.text
            assert away.headers["Retry-After"] == "5" and away.json()["error"]["code"] == "state_unavailable"
            time.sleep(6)  # shards end while it is down: their outcomes wait for the database
        finally:
            server.resume()
        assert client.get(f"/api/v1/evaluations/{ids[0]}", headers=headers).status_code == 200
    assert_exactly_once(cp, settings, ids)


def test_evaluations_run_through_reset_and_refused_database_connections(
        restartable: tuple[ControlPlane, Settings, PostgresServer, FaultProxy]) -> None:
    cp, settings, _, proxy = restartable
    ids = [cp.submit(spec(f"proxy-{i}")) for i in range(3)]
    wait_running(cp, ids)
    for mode in ("reset", "refuse", "reset"):
        proxy.set_mode(mode)  # type: ignore[arg-type]
        time.sleep(2)
        proxy.set_mode("pass")
        time.sleep(0.5)
    assert proxy.reset > 0
    assert_exactly_once(cp, settings, ids)
