"""The one way to reach the control plane (`eval_actors/handles.py`), on the session's Ray
cluster: handles kept for their time, a missing or too slow actor as `ControlPlaneUnavailable`,
and the API's one answer to it (503 with `Retry-After`)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from eval_actors.control_plane import BUS, SCHEDULER
from eval_actors.handles import ActorHandles, ControlPlaneUnavailable, answer_blocking

pytestmark = pytest.mark.ray


def test_a_missing_actor_is_unavailable_and_a_present_one_answers(plane: Any) -> None:
    actors = ActorHandles(plane.settings.ray_namespace)
    with pytest.raises(ControlPlaneUnavailable, match="proctor-nobody is not running"):
        actors.get("proctor-nobody")
    assert isinstance(asyncio.run(actors.call(BUS, "last_seq")), int)
    assert "queued_shards" in answer_blocking(actors.get(SCHEDULER).status.remote(), SCHEDULER)


def test_a_handle_is_kept_for_its_time_and_then_looked_up_again(plane: Any) -> None:
    now = [0.0]
    actors = ActorHandles(plane.settings.ray_namespace, ttl_s=1.0, clock=lambda: now[0])
    first = actors.get(BUS)
    now[0] = 0.9
    assert actors.get(BUS) is first
    now[0] = 1.5
    again = actors.get(BUS)
    assert again is not first and again._actor_id == first._actor_id  # looked up afresh: the same actor
    actors.forget(BUS)
    assert actors.get(BUS) is not again


def test_a_call_that_does_not_answer_in_time_is_unavailable(plane: Any) -> None:
    actors = ActorHandles(plane.settings.ray_namespace)
    # a read far past the last event waits (here 5 s) for one that never comes
    with pytest.raises(ControlPlaneUnavailable, match=r"proctor-events did not answer within 0\.5 s"):
        asyncio.run(actors.call(BUS, "read", 10**12, f"ev-{uuid.uuid4().hex}", 5.0, 10, None, timeout=0.5))
    with pytest.raises(ControlPlaneUnavailable, match="did not answer within 0.5 s"):
        answer_blocking(actors.get(BUS).read.remote(10**12, "ev-none", 5.0, 10, None), BUS, 0.5)


def test_an_error_of_the_method_itself_is_not_converted(plane: Any) -> None:
    actors = ActorHandles(plane.settings.ray_namespace)
    with pytest.raises(Exception) as caught:
        asyncio.run(actors.call(SCHEDULER, "submit", {"name": "bad", "epochs": 0}, "rita"))
    assert not isinstance(caught.value, ControlPlaneUnavailable) and "epochs" in str(caught.value)


def test_the_api_answers_a_missing_control_plane_with_503_and_retry_after(plane: Any, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from cluster.state import StateStore
    from proctor.settings import Settings
    from serve_app.api import build_app

    settings = Settings(home=tmp_path, state_url=f"sqlite:///{tmp_path}/state.db",
                        results_uri=(tmp_path / "results").as_uri(), jwt_secret="handles-secret-0123456789abcdef",
                        ray_namespace=f"absent-{uuid.uuid4().hex[:6]}")
    store = StateStore(settings.state)
    store.create_user("ada", "admin")
    headers = {"Authorization": f"Bearer {store.create_token('ada', 'handles')[0]}"}
    with TestClient(build_app(settings)) as client:
        for method, path in [("GET", "/api/v1/cluster"), ("POST", "/api/v1/stop-all")]:
            r = client.request(method, path, headers=headers)
            assert r.status_code == 503, r.text
            assert r.headers["Retry-After"] == "5"
            error = r.json()["error"]
            assert error["code"] == "control_plane_unavailable" and "proctor-scheduler is not running" in error["message"]
        health = client.get("/api/v1/health").json()  # health reports it, it does not fail
        assert health["ready"] is False and "is not running" in health["checks"]["control_plane"]
    store.close()
