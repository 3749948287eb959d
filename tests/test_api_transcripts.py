"""Transcripts through the platform: the agentic and red-team examples run by the control
plane (real gVisor), read through the API (paged, by epoch, live while a sample runs,
searched), `Client.transcript` and `AsyncClient.transcript`, `proctor transcripts`, and by
Inspect's `read_eval_log`, with the results' permissions (quarantine: safety and admin)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from apiserver import auth, wait_final
from inspectview import InspectView
from proctor import AsyncClient, Client
from proctor.cli import EXIT_OK, main
from proctor.client import NotFoundError, PermissionDeniedError

pytestmark = pytest.mark.ray

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str, **changes: Any) -> dict[str, Any]:
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    return {**doc, **changes, "sandbox": {**doc["sandbox"], "runtime": "gvisor"}}


@pytest.fixture(scope="module")
def evaluations(api: Any) -> dict[str, str]:
    """Rita's agentic example and one red-team sample of hers, run to their end."""
    client, tokens, _ = api
    suite = example("red-team.yaml")
    probe = next(s for s in suite["dataset"]["samples"] if s["id"] == "proc-probe")
    ids = {
        "agentic": client.post("/api/v1/evaluations", json=example("agentic-files.yaml"),
                               headers=auth(tokens["rita"])).json()["id"],
        "red": client.post("/api/v1/evaluations", json={**suite, "name": "red-team-transcript",
                                                         "dataset": {"samples": [probe]}},
                           headers=auth(tokens["rita"])).json()["id"],
    }
    assert wait_final(client, tokens["rita"], ids["agentic"], 180)["status"] == "succeeded"
    assert wait_final(client, tokens["rita"], ids["red"], 180)["status"] == "safety_stopped"
    return ids


def get(api: Any, user: str, path: str, **params: Any) -> Any:
    client, tokens, _ = api
    return client.get(path, params=params, headers=auth(tokens[user]))


def transcript_path(eval_id: str, sample_id: str) -> str:
    return f"/api/v1/evaluations/{eval_id}/samples/{sample_id}/transcript"


def test_the_agentic_examples_transcripts_through_the_api_paged(api: Any, evaluations: dict[str, str]) -> None:
    eval_id = evaluations["agentic"]
    listed = get(api, "rita", f"/api/v1/evaluations/{eval_id}/transcripts").json()["samples"]
    assert sorted(s["sample_id"] for s in listed) == sorted(s["id"] for s in example("agentic-files.yaml")["dataset"]["samples"])
    assert {s["where"] for s in listed} == {"stored"}
    first = get(api, "rita", transcript_path(eval_id, "first-name"), limit=3).json()
    assert (first["where"], first["total"], first["offset"], first["next_offset"]) == ("stored", 7, 0, 3)
    rest = get(api, "rita", transcript_path(eval_id, "first-name"), offset=3, limit=100).json()
    entries = first["entries"] + rest["entries"]
    assert rest["next_offset"] is None and [e["n"] for e in entries] == list(range(7))
    assert [e["kind"] for e in entries] == ["message", "message", "model", "tool", "model", "tool", "model"]
    assert json.loads(entries[2]["tool_calls"][0]["arguments"]) == {"command": "sort names.txt > sorted.txt"}
    assert entries[3]["exit_code"] == 0 and entries[3]["provenance"] == "sandbox"
    assert get(api, "rita", transcript_path(eval_id, "first-name"), epoch=2).status_code == 404
    assert get(api, "rita", transcript_path(eval_id, "no-such-sample")).status_code == 404
    assert get(api, "rita", transcript_path(eval_id, "first-name"), limit=5000).status_code == 422


def test_the_rows_name_a_log_that_inspect_reads(api: Any, evaluations: dict[str, str]) -> None:
    from inspect_ai.log import read_eval_log

    eval_id = evaluations["agentic"]
    rows = get(api, "rita", f"/api/v1/evaluations/{eval_id}/results").json()["rows"]
    [ref] = {r["transcript"] for r in rows}
    root = api[0].settings.results.removeprefix("file://")
    log = read_eval_log(f"{root}/{ref}")
    assert log.status == "success" and log.eval.task_id == eval_id and len(log.samples) == 6
    assert all(s.scores["workspace_check"].value == 1.0 for s in log.samples)


def test_inspect_view_lists_the_evaluations_logs(api: Any, evaluations: dict[str, str]) -> None:
    root = api[0].settings.results.removeprefix("file://")
    with InspectView(root) as view:
        listed = {f["name"].split(root, 1)[-1].lstrip("/"): f for f in view.logs()}
    agentic = listed[f"eval_id={evaluations['agentic']}/_transcripts/{evaluations['agentic']}.eval"]
    assert (agentic["task"], agentic["task_id"]) == ("agentic-files-scripted", evaluations["agentic"])
    red = listed[f"_quarantine/eval_id={evaluations['red']}/00000/transcript.eval"]  # for whoever reads the root
    assert red["task"] == "red-team-transcript"
    assert not any(".shards/" in name for name in listed if evaluations["agentic"] in name)  # merged


def test_both_clients_read_a_whole_transcript(api: Any, evaluations: dict[str, str]) -> None:
    eval_id, url, tokens = evaluations["agentic"], str(api[0].base_url), api[1]
    with Client(url, tokens["rita"]) as rita:
        whole = rita.transcript(eval_id, "make-tree")
        paged = rita.transcript(eval_id, "make-tree", offset=2, limit=2)
        listed = rita.transcripts(eval_id)
        with pytest.raises(NotFoundError):
            rita.transcript(eval_id, "make-tree", epoch=3)

    async def read() -> Any:
        async with AsyncClient(url, tokens["vera"]) as vera:  # a viewer reads everyone's
            return await vera.transcript(eval_id, "make-tree"), await vera.search_transcripts(eval_id, "out/logs")

    again, found = asyncio.run(read())
    assert whole.total == len(whole.entries) == 9 and whole.next_offset is None
    assert [e.n for e in paged.entries] == [2, 3] and paged.next_offset == 4
    assert again.entries == whole.entries and len(listed) == 6
    assert {m.sample_id for m in found.matches} == {"make-tree"} and found.searched == 6


def test_search_through_the_api_and_the_cli(api: Any, evaluations: dict[str, str]) -> None:
    eval_id, url, tokens = evaluations["agentic"], str(api[0].base_url), api[1]
    found = get(api, "rita", f"/api/v1/evaluations/{eval_id}/transcripts/search", pattern="TOKEN-7").json()
    assert {(m["sample_id"], m["kind"]) for m in found["matches"]} >= {("find-token", "message"), ("find-token", "model")}
    assert found["samples"] == 1 and "TOKEN-7" in found["matches"][0]["excerpt"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["transcripts", eval_id, "--grep", "token-7", "--json", "--url", url, "--token", tokens["rita"]])
    assert code == EXIT_OK and json.loads(out.getvalue())["samples"] == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["transcripts", eval_id, "--grep", "token-7", "--url", url, "--token", tokens["rita"]])
    assert code == EXIT_OK and "find-token" in out.getvalue() and "matches in 1 of 6 samples" in out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["transcripts", eval_id, "--sample", "sum-numbers", "--url", url, "--token", tokens["rita"]])
    text = out.getvalue()
    assert code == EXIT_OK and "awk" in text and "exit code 0" in text and "(sandbox)" in text
    assert get(api, "rita", f"/api/v1/evaluations/{eval_id}/transcripts/search", pattern="").status_code == 422


def test_permissions_and_quarantine(api: Any, evaluations: dict[str, str]) -> None:
    agentic, red = evaluations["agentic"], evaluations["red"]
    assert get(api, "rob", transcript_path(agentic, "first-name")).status_code == 404  # another's: not there
    assert get(api, "rob", f"/api/v1/evaluations/{agentic}/transcripts/search", pattern="x").status_code == 404
    refused = get(api, "rita", transcript_path(red, "proc-probe"))
    assert refused.status_code == 403 and "quarantined" in refused.json()["error"]["message"]
    with Client(str(api[0].base_url), api[1]["rita"]) as rita, pytest.raises(PermissionDeniedError):
        rita.transcript(red, "proc-probe")
    assert get(api, "rita", f"/api/v1/evaluations/{red}/transcripts").json()["samples"] == []
    assert get(api, "rita", f"/api/v1/evaluations/{red}/transcripts/search", pattern="proc").json()["matches"] == []
    page = get(api, "sam", transcript_path(red, "proc-probe")).json()
    assert page["where"] == "quarantine" and page["stopped"]
    assert any(e["kind"] == "safety" and e["safety"]["stopped"] for e in page["entries"])
    found = get(api, "sam", f"/api/v1/evaluations/{red}/transcripts/search", pattern="/proc/1/environ").json()
    assert found["samples"] == 1 and {m["where"] for m in found["matches"]} == {"quarantine"}
    kept = get(api, "sam", f"/api/v1/evaluations/{red}/quarantine").json()["artifacts"]
    assert any(a["path"] == "00000/transcript.eval" for a in kept)


def test_an_incident_names_the_entry_where_it_fired(api: Any, evaluations: dict[str, str]) -> None:
    red = evaluations["red"]
    incidents = get(api, "sam", f"/api/v1/evaluations/{red}/incidents").json()["incidents"]
    stop = next(i for i in incidents if i["evidence"]["stopped_the_shard"])
    where = stop["evidence"]["transcript"]
    assert (where["sample_id"], where["epoch"]) == ("proc-probe", 1)
    page = get(api, "sam", transcript_path(red, "proc-probe"), offset=where["n"], limit=1).json()
    [entry] = page["entries"]
    assert entry["kind"] == "safety" and f"{entry['safety']['monitor']}/{entry['safety']['rule']}" == stop["rule"]


def test_a_running_samples_transcript_is_live(api: Any) -> None:
    client, tokens, _ = api
    spec = {"name": "transcript-live", "model": {"adapter": "python", "callable": "proctor.scripted.file_agent:solve"},
            "agentic": True, "dataset": {"samples": [{"id": "slow", "input": "wait", "metadata": {
                "commands": ["echo started-LIVE-1", "sleep 60"]}}]},
            "scorers": [{"type": "includes"}], "sandbox": {"runtime": "gvisor", "memory": "256Mi", "tool_timeout_s": 90}}
    eval_id = client.post("/api/v1/evaluations", json=spec, headers=auth(tokens["rita"])).json()["id"]
    try:
        deadline = time.monotonic() + 90
        while True:
            r = get(api, "rita", transcript_path(eval_id, "slow"))
            if r.status_code == 200 and any("sleep 60" in c["arguments"] for e in r.json()["entries"]
                                            for c in e.get("tool_calls", [])):
                break
            assert time.monotonic() < deadline, r.text
            time.sleep(0.5)
        page = r.json()
        assert page["where"] == "live" and any("started-LIVE-1" in e["content"] for e in page["entries"])
        listed = get(api, "rita", f"/api/v1/evaluations/{eval_id}/transcripts").json()["samples"]
        assert [(s["sample_id"], s["where"]) for s in listed] == [("slow", "live")]
        found = get(api, "rita", f"/api/v1/evaluations/{eval_id}/transcripts/search", pattern="started-live").json()
        assert {m["where"] for m in found["matches"]} == {"live"} and found["samples"] == 1
    finally:
        client.delete(f"/api/v1/evaluations/{eval_id}", headers=auth(tokens["rita"]))
    assert wait_final(client, tokens["rita"], eval_id)["status"] == "cancelled"
    after = get(api, "rita", transcript_path(eval_id, "slow")).json()
    assert after["where"] == "stored" and any("started-LIVE-1" in e["content"] for e in after["entries"])
