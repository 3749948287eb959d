"""A safety stop through the whole platform: the Serve API, the scheduler, a supervisor
running real gVisor: the evaluation ends `safety_stopped`, the incident is recorded with
its evidence, the shard's outputs are quarantined (safety and admin only), an alert
reaches a webhook, and the Markdown report reads well."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from apiserver import auth, wait_final

pytestmark = pytest.mark.ray

SUITE = yaml.safe_load((Path(__file__).resolve().parent.parent / "examples" / "red-team.yaml").read_text())


def test_a_red_team_sample_is_stopped_quarantined_and_alerted(api: Any, webhook: Any) -> None:
    client, tokens, _ = api
    sample = next(s for s in SUITE["dataset"]["samples"] if s["id"] == "proc-probe")
    sample = {**sample, "files": {"notes.txt": "left behind\n"}}
    spec = {**SUITE, "name": "red-team-api", "dataset": {"samples": [sample]},
            "sandbox": {**SUITE["sandbox"], "runtime": "gvisor", "artifacts": ["*.txt"]}}
    r = client.post("/api/v1/evaluations", json=spec, headers=auth(tokens["rita"]))
    assert r.status_code == 202, r.text
    eval_id = r.json()["id"]
    ev = wait_final(client, tokens["rita"], eval_id)
    assert ev["status"] == "safety_stopped", ev
    incidents = client.get(f"/api/v1/evaluations/{eval_id}/incidents", headers=auth(tokens["rita"])).json()
    stop = next(i for i in incidents["incidents"] if i["evidence"]["stopped_the_shard"])
    assert stop["rule"] == "rules/sandbox-probe" and stop["severity"] == "critical"
    assert any("/proc/1/environ" in line for line in stop["evidence"]["lines"])
    assert stop["evidence"]["kill_s"] < 1.0 and stop["evidence"]["timeline"]
    mine = client.get("/api/v1/incidents", params={"limit": 3}, headers=auth(tokens["rita"])).json()["incidents"]
    assert any(i["eval_id"] == eval_id for i in mine) and all(i["owner"] == "rita" for i in mine)
    theirs = client.get("/api/v1/incidents", headers=auth(tokens["rob"])).json()["incidents"]
    assert all(i["owner"] == "rob" for i in theirs)  # another researcher sees none of it
    report = client.get(f"/api/v1/evaluations/{eval_id}/incidents", params={"format": "markdown"},
                        headers=auth(tokens["rita"]))
    assert report.headers["content-type"].startswith("text/markdown")
    assert "## rules/sandbox-probe" in report.text and "/proc/1/environ" in report.text
    # quarantined: not in the results, readable by the safety role only
    results = client.get(f"/api/v1/evaluations/{eval_id}/results", headers=auth(tokens["rita"])).json()
    assert results["total"] == 0
    assert client.get(f"/api/v1/evaluations/{eval_id}/quarantine", headers=auth(tokens["rita"])).status_code == 403
    kept = client.get(f"/api/v1/evaluations/{eval_id}/quarantine", headers=auth(tokens["sam"])).json()["artifacts"]
    paths = {a["path"] for a in kept}
    assert any(p.endswith("report.json") for p in paths) and any(p.endswith(".parquet") for p in paths), paths
    assert any(p.endswith("/notes.txt") for p in paths), paths  # its artifact, moved aside
    assert client.get(f"/api/v1/evaluations/{eval_id}/artifacts", headers=auth(tokens["sam"])).json()["artifacts"] == []
    got = client.get(f"/api/v1/evaluations/{eval_id}/quarantine/{sorted(paths)[0]}", headers=auth(tokens["sam"]))
    assert got.status_code == 200 and got.content
    # the alert reached the webhook
    [alert] = webhook.wait_for(lambda a: (a.get("incident") or {}).get("eval_id") == eval_id  # other tests' too
                               and a["incident"]["action"] == "stop")
    assert alert["type"] == "safety_incident" and alert["incident"]["rule"] == "rules/sandbox-probe"


@pytest.mark.parametrize("sample", [s for s in SUITE["dataset"]["samples"] if s["id"] != "proc-probe"],
                         ids=lambda s: s["id"])
def test_every_red_team_sample_through_the_platform(sample: dict[str, Any], api: Any, webhook: Any) -> None:
    client, tokens, _ = api
    spec = {**SUITE, "name": f"red-team-{sample['id']}", "dataset": {"samples": [sample]},
            "sandbox": {**SUITE["sandbox"], "runtime": "gvisor"}}
    eval_id = client.post("/api/v1/evaluations", json=spec, headers=auth(tokens["rita"])).json()["id"]
    assert wait_final(client, tokens["rita"], eval_id)["status"] == "safety_stopped"
    found = client.get(f"/api/v1/evaluations/{eval_id}/incidents", headers=auth(tokens["sam"])).json()["incidents"]
    stop = next(i for i in found if i["evidence"]["stopped_the_shard"])
    assert stop["rule"] == sample["metadata"]["expect"] and stop["evidence"]["lines"]
    assert stop["evidence"]["kill_s"] < 1.0
    kept = client.get(f"/api/v1/evaluations/{eval_id}/quarantine", headers=auth(tokens["sam"])).json()["artifacts"]
    assert any(a["path"].endswith("report.json") for a in kept)
    webhook.wait_for(lambda a: (a.get("incident") or {}).get("eval_id") == eval_id)
