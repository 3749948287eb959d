"""Evaluations through an outage of their results store, on the session's Ray cluster.

A second control plane (namespace `proctor-faults-<state store>`, one supervisor; its state in SQLite, then in PostgreSQL) writes its results to
the session's moto S3 server through a real TCP fault proxy (tests/faultproxy.py); its
shards run in the simulated runtime (a test double: no sandbox is needed to make rows).
The store goes away (connections refused, open ones reset) while evaluations run; they
must end as they would have, with exactly samples x epochs rows, none doubled.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.parquet as pq
import pytest
import ray

from cluster.outbox import Outbox, sync
from cluster.results import ResultsStore
from cluster.storage import filesystem
from eval_actors import control_plane
from eval_actors.control_plane import AGGREGATOR, ControlPlane
from faultproxy import FaultProxy
from proctor.settings import Settings
from raycluster import RUNTIMES, cluster_settings

pytestmark = pytest.mark.ray
SAMPLES, EPOCHS = 8, 2
BUDGET_S = 20.0


def spec(name: str, samples: int = SAMPLES) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"adapter": "reference"},
        "dataset": {"samples": [{"id": f"s{i}", "input": "q", "target": "a", "metadata": {"sim_seconds": 0.2}}
                                for i in range(samples)]},
        "scorers": [{"type": "exact"}],
        "epochs": EPOCHS,
        "shard_size": 2,
        "sandbox": {"runtime": "kubernetes", "cpus": 1, "memory": "256Mi"},
    }


def fresh_database(postgres_url: str) -> str:
    """A new empty database on the session's PostgreSQL server, and its URL."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    name = f"faults_{uuid.uuid4().hex[:8]}"
    engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    finally:
        engine.dispose()
    return make_url(postgres_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def faults(request: pytest.FixtureRequest, plane: ControlPlane, s3_server,  # noqa: ANN001
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, Settings, FaultProxy]]:
    """The second control plane, with its state in SQLite, then in PostgreSQL."""
    target = urlparse(s3_server.endpoint)
    proxy = FaultProxy((target.hostname or "127.0.0.1", target.port or 80)).start()
    home = tmp_path_factory.mktemp("faults-home")
    state = (f"sqlite:///{home}/state.db" if request.param == "sqlite"
             else fresh_database(request.getfixturevalue("postgres_url")))
    settings = cluster_settings(home, f"s3://{s3_server.bucket}/faults-{uuid.uuid4().hex[:8]}",
                                state).model_copy(update={
        "ray_namespace": f"proctor-faults-{request.param}", "supervisors": 1, "s3_endpoint_url": proxy.endpoint,
        "s3_region": s3_server.settings().s3_region, "s3_access_key_id": s3_server.settings().s3_access_key_id,
        "s3_secret_access_key": s3_server.settings().s3_secret_access_key,
        "store_retry_s": 2.0, "store_outage_budget_s": BUDGET_S})
    try:
        yield control_plane.start(settings, runtime_factory=RUNTIMES), settings, proxy
    finally:
        control_plane.stop(settings)
        proxy.stop()


def store_status(cp: ControlPlane) -> dict[str, Any]:
    return ray.get(cp.actor(AGGREGATOR).store_status.remote(), timeout=60)


def assert_rows_exact(settings: Settings, eval_id: str, samples: int = SAMPLES, compacted: bool = True) -> None:
    table = ResultsStore(settings.results, settings).read(eval_id)
    keys = sorted(zip(table["sample_id"].to_pylist(), table["epoch"].to_pylist()))
    assert keys == sorted((f"s{i}", e) for i in range(samples) for e in range(1, EPOCHS + 1))
    if compacted:  # what any Parquet reader sees on the store, without Proctor's de-duplication
        fs, path = filesystem(ResultsStore(settings.results, settings).eval_uri(eval_id), settings)
        assert pq.read_table(path, filesystem=fs).num_rows == samples * EPOCHS


def test_evaluations_run_through_a_store_outage(faults: tuple[ControlPlane, Settings, FaultProxy]) -> None:
    """The store refuses connections from the submissions until rows wait in the outbox,
    then resets every connection for 10 s more; then it is back."""
    cp, settings, proxy = faults
    proxy.set_mode("refuse")
    try:
        ids = [cp.submit(spec(f"outage-{i}")) for i in range(3)]
        deadline = time.monotonic() + 240
        while not store_status(cp)["degraded"]:
            assert time.monotonic() < deadline, "no write waited in the outbox while the store was away"
            time.sleep(0.5)
        proxy.set_mode("reset")
        time.sleep(10)
        assert store_status(cp)["waiting"] > 0
    finally:
        proxy.set_mode("pass")
    evaluations = [cp.wait(eval_id, timeout=240) for eval_id in ids]
    assert [ev.status for ev in evaluations] == ["succeeded"] * 3, [ev.error for ev in evaluations]
    for ev in evaluations:
        assert_rows_exact(settings, ev.id)
        assert ev.summary["samples"] == SAMPLES * EPOCHS and ev.summary["metrics"]["exact"]["mean"] == 1.0
    status = store_status(cp)
    assert status["degraded"] is False and status["waiting"] == 0


def test_past_its_outage_budget_an_evaluation_fails_saying_so_and_its_rows_are_written_when_the_store_returns(
        faults: tuple[ControlPlane, Settings, FaultProxy], monkeypatch: pytest.MonkeyPatch) -> None:
    cp, settings, proxy = faults
    proxy.set_mode("refuse")
    try:
        eval_id = cp.submit(spec("budget", samples=4))
        ev = cp.wait(eval_id, timeout=240)
        assert ev.status == "failed"
        assert "store_outage_budget_s" in (ev.error or "") and "proctor results sync" in (ev.error or "")
        waiting = Outbox.from_settings(settings).entries(eval_id)
        assert waiting and store_status(cp)["degraded"] is True
        ray.kill(cp.actor(AGGREGATOR), no_restart=False)  # the outbox is on disk: a restart keeps it
        assert len(Outbox.from_settings(settings).entries(eval_id)) == len(waiting)
    finally:
        proxy.set_mode("pass")
    for name, value in {"PROCTOR_HOME": settings.home, "PROCTOR_RESULTS_URI": settings.results,
                        "PROCTOR_S3_ENDPOINT_URL": settings.s3_endpoint_url,
                        "PROCTOR_S3_ACCESS_KEY_ID": settings.s3_access_key_id,
                        "PROCTOR_S3_SECRET_ACCESS_KEY": settings.s3_secret_access_key}.items():
        monkeypatch.setenv(name, str(value))
    done = sync()  # `proctor results sync` (the restarted aggregator's loop may take some first)
    assert done["waiting"] == 0 and done["error"] is None and done["folder"] == str(Path(settings.home) / "outbox")
    assert Outbox.from_settings(settings).entries() == []
    assert_rows_exact(settings, eval_id, samples=4, compacted=False)
