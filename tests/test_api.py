"""The HTTP API served by Ray Serve on the session's Ray cluster, with real tokens."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from apiserver import auth, spec, stages_spec, wait_final

pytestmark = pytest.mark.ray


def test_health_and_docs_need_no_token(api: Any) -> None:
    client, _, _ = api
    health = client.get("/api/v1/health").json()
    assert health["ready"] is True
    assert health["checks"] == {"store": "ok", "control_plane": "ok", "results_store": "ok"}
    assert health["results_store"]["degraded"] is False and health["results_store"]["waiting"] == 0
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/evaluations", "/api/v1/evaluations/{eval_id}", "/api/v1/evaluations/{eval_id}/stop",
            "/api/v1/stop-all", "/api/v1/cluster", "/api/v1/health"} <= set(paths)


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer pk_not-a-real-token"])
def test_missing_or_bad_tokens_are_refused(api: Any, header: str | None) -> None:
    client, _, _ = api
    r = client.get("/api/v1/evaluations", headers={"Authorization": header} if header else {})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthenticated"


def test_revoked_key_is_refused(api: Any) -> None:
    client, _, store = api
    secret, token = store.create_token("rita", "to revoke")
    assert client.get("/api/v1/evaluations", headers=auth(secret)).status_code == 200
    store.revoke_token(token.id)
    assert client.get("/api/v1/evaluations", headers=auth(secret)).status_code == 401


def test_viewer_cannot_submit(api: Any) -> None:
    client, tokens, _ = api
    r = client.post("/api/v1/evaluations", json=spec(), headers=auth(tokens["vera"]))
    assert r.status_code == 403 and "researcher role" in r.json()["error"]["message"]


def test_invalid_spec_is_422_naming_fields_and_stores_nothing(api: Any) -> None:
    client, tokens, store = api
    before = len(store.list_evaluations(limit=500)[0])
    bad = spec(memroy="1Gi")
    bad["epochs"] = 0
    r = client.post("/api/v1/evaluations", json=bad, headers=auth(tokens["rita"]))
    assert r.status_code == 422
    fields = {f["field"] for f in r.json()["error"]["fields"]}
    assert {"sandbox.memroy", "epochs"} <= fields
    assert len(store.list_evaluations(limit=500)[0]) == before


@pytest.mark.parametrize(("image", "runtime", "reason"), [
    ("ctf-task:1", "gvisor", "image 'ctf-task:1' is not in the image store"),
    ("sha256:" + "b" * 64, "bubblewrap", "no image has the digest"),
    ("ctf-task:1", "kubernetes", "the kubernetes runtime runs images from a registry by digest only"),
    ("Not An Image", "gvisor", "is not an image reference"),
])
def test_a_spec_whose_image_cannot_run_is_422_and_stores_nothing(api: Any, image: str, runtime: str,
                                                                 reason: str) -> None:
    client, tokens, store = api
    before = len(store.list_evaluations(limit=500)[0])
    body = spec("imaged", image=image)
    body["sandbox"]["runtime"] = runtime
    r = client.post("/api/v1/evaluations", json=body, headers=auth(tokens["rita"]))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_spec"
    assert error["fields"][0]["field"] == "sandbox.image" and reason in error["fields"][0]["reason"]
    assert len(store.list_evaluations(limit=500)[0]) == before


def test_submit_get_list_and_results(api: Any) -> None:
    client, tokens, _ = api
    r = client.post("/api/v1/evaluations", json=spec("api-results", samples=3), headers=auth(tokens["rita"]))
    assert r.status_code == 202
    eval_id = r.json()["id"]
    ev = wait_final(client, tokens["rita"], eval_id)
    assert ev["status"] == "succeeded" and ev["owner"] == "rita"
    res = client.get(f"/api/v1/evaluations/{eval_id}/results", headers=auth(tokens["rita"])).json()
    assert res["total"] == 3 and len(res["rows"]) == 3 and res["summary"]["metrics"]["exact"]["mean"] == 1.0
    listed = client.get("/api/v1/evaluations", params={"status": "succeeded", "text": "api-results"},
                        headers=auth(tokens["vera"])).json()
    assert eval_id in [e["id"] for e in listed["items"]]


def test_researchers_see_and_stop_only_their_own(api: Any) -> None:
    client, tokens, _ = api
    eval_id = client.post("/api/v1/evaluations", json=spec("rita-own"), headers=auth(tokens["rita"])).json()["id"]
    assert client.get(f"/api/v1/evaluations/{eval_id}", headers=auth(tokens["rob"])).status_code == 404
    assert client.post(f"/api/v1/evaluations/{eval_id}/stop", headers=auth(tokens["rob"])).status_code == 404
    assert client.post(f"/api/v1/evaluations/{eval_id}/stop", headers=auth(tokens["vera"])).status_code == 403
    robs = client.get("/api/v1/evaluations", params={"owner": "rita"}, headers=auth(tokens["rob"])).json()
    assert robs["items"] == []
    assert client.post("/api/v1/stop-all", headers=auth(tokens["sam"])).status_code == 403
    wait_final(client, tokens["rita"], eval_id)


def _runsc_sandboxes(home: Path) -> list[str]:
    found = []
    for state in home.glob("sandboxes/*/gvisor/runsc-state"):
        found += subprocess.run(["runsc", "--root", str(state), "list", "--quiet"], capture_output=True,
                                text=True, check=True).stdout.split()
    return found


def test_emergency_stop_kills_the_sandbox_within_a_second(api: Any, plane: Any) -> None:
    client, tokens, store = api
    slow = spec("to-stop", samples=1, timeout_s=300,
                files={"policy.py": "import time\ndef answer(messages, **kw):\n    time.sleep(300)\n"})
    slow["model"] = {"adapter": "python", "callable": "policy:answer"}
    eval_id = client.post("/api/v1/evaluations", json=slow, headers=auth(tokens["rita"])).json()["id"]
    deadline = time.monotonic() + 60
    while not [s for s in store.shards(eval_id) if s.status == "running"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)
    (sandbox_id,) = [s.sandbox_id for s in store.shards(eval_id)]
    assert sandbox_id in _runsc_sandboxes(plane.settings.home)
    assert sandbox_id in subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    r = client.post(f"/api/v1/evaluations/{eval_id}/stop", headers=auth(tokens["sam"]))
    answered = time.monotonic()
    assert r.status_code == 200 and r.json()["stopped"] is True
    gone_at, alive = None, []
    while time.monotonic() - answered < 5:
        ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
        # the sandbox's processes (runsc run, its sentry and gofer), not the cleanup's own
        # `runsc delete --force <id>`, which may still be running after the stop
        alive = [line for line in ps.splitlines() if sandbox_id in line and " delete --force " not in line]
        if not alive:
            gone_at = time.monotonic()
            break
        time.sleep(0.02)
    assert gone_at is not None and gone_at - answered < 1.0, f"the sandbox outlived the stop by a second: {alive}"
    assert wait_final(client, tokens["sam"], eval_id)["status"] == "cancelled"
    assert sandbox_id not in _runsc_sandboxes(plane.settings.home)


def test_serve_config_file_deploys_the_same_app(plane: Any) -> None:
    """`serve deploy serve_app/serve_config.yaml` is valid for Ray Serve and builds the app."""
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).parent.parent / "serve_app" / "serve_config.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app = config.applications[0]
    module, _, name = app.import_path.partition(":")
    built = getattr(importlib.import_module(module), name)(app.args)
    from ray.serve import Application

    assert isinstance(built, Application)
    assert app.deployments[0].name == "ProctorAPI"


def test_the_shard_and_sample_views_time_each_stage(api: Any) -> None:
    client, tokens, _ = api
    eval_id = client.post("/api/v1/evaluations", json=stages_spec("api-stages"),
                          headers=auth(tokens["rita"])).json()["id"]
    wait_final(client, tokens["rita"], eval_id)
    shards = client.get(f"/api/v1/evaluations/{eval_id}/shards", headers=auth(tokens["rita"])).json()["shards"]
    (ok,) = [x for x in shards if not x["failed_stages"]]
    (bad,) = [x for x in shards if x["failed_stages"]]
    assert list(ok["stages"]) == ["setup", "eval", "score", "cleanup"] and all(v >= 0 for v in ok["stages"].values())
    assert bad["failed_stages"] == {"setup": 1}
    assert "setup" in bad["stages"] and "eval" not in bad["stages"]  # it ended in setup: no agent, no score
    rows = client.get(f"/api/v1/evaluations/{eval_id}/results", headers=auth(tokens["rita"])).json()["rows"]
    by_id = {r["sample_id"]: r for r in rows}
    assert list(by_id["0"]["stages"]) == ["setup", "eval", "score", "cleanup"] and by_id["0"]["failed_stage"] is None
    assert by_id["1"]["failed_stage"] == "setup" and "eval" not in by_id["1"]["stages"]
    # the shard's figures are its rows' sums
    assert ok["stages"] == pytest.approx(by_id["0"]["stages"])
