"""Logs, artifacts, Parquet results, WebSockets and Prometheus metrics of the real Serve app."""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import pyarrow.parquet as pq
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from apiserver import auth, spec, wait_final
from proctor.cli import main
from proctor.client import Client, is_partial

pytestmark = pytest.mark.ray


def _ws_url(client: Any, path: str) -> str:
    return str(client.base_url).replace("http://", "ws://").rstrip("/") + path


@pytest.fixture(scope="module")
def finished(api: Any) -> dict[str, Any]:
    client, tokens, _ = api
    body = spec("streams", samples=3, artifacts=["notes.txt"])
    for sample in body["dataset"]["samples"]:
        sample["files"] = {"notes.txt": "kept\n"}
    r = client.post("/api/v1/evaluations", json=body, headers=auth(tokens["rita"]))
    assert r.status_code == 202, r.text
    ev = wait_final(client, tokens["rita"], r.json()["id"])
    assert ev["status"] == "succeeded", ev
    return ev


def test_logs_kept_and_filtered(api: Any, finished: dict[str, Any]) -> None:
    client, tokens, _ = api
    url = f"/api/v1/evaluations/{finished['id']}/logs"
    r = client.get(url, headers=auth(tokens["rita"]))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert any("harness ready" in line["message"] for line in lines)
    assert {line["shard_id"] for line in lines} == {"00000"}
    assert len({(x["shard_id"], x["attempt"], x["message"], x["ts"]) for x in lines}) == len(lines)  # no doubles
    quiet = client.get(url, params={"level": "warning"}, headers=auth(tokens["rita"])).text
    assert "harness ready" not in quiet
    found = client.get(url, params={"text": "HARNESS READY"}, headers=auth(tokens["rita"])).text.splitlines()
    assert found and all("harness ready" in json.loads(x)["message"] for x in found)
    assert client.get(url, headers=auth(tokens["rob"])).status_code == 404


def test_logs_follow_streams_until_the_end(api: Any) -> None:
    client, tokens, _ = api
    eval_id = client.post("/api/v1/evaluations", json=spec("follow"), headers=auth(tokens["rita"])).json()["id"]
    seen = []
    with client.stream("GET", f"/api/v1/evaluations/{eval_id}/logs", params={"follow": "true"},
                       headers=auth(tokens["rita"]), timeout=120) as r:
        assert r.status_code == 200
        for raw in r.iter_lines():
            seen.append(json.loads(raw))
    # the stream ended by itself, and only once the evaluation had
    assert client.get(f"/api/v1/evaluations/{eval_id}", headers=auth(tokens["rita"])).json()["status"] == "succeeded"
    assert any("harness ready" in line["message"] for line in seen)


def test_artifacts_listed_and_downloaded(api: Any, finished: dict[str, Any]) -> None:
    client, tokens, _ = api
    base = f"/api/v1/evaluations/{finished['id']}/artifacts"
    listed = client.get(base, headers=auth(tokens["rita"])).json()
    paths = [a["path"] for a in listed["artifacts"]]
    assert len(paths) == 3 and all(p.startswith("00000/") and p.endswith("/notes.txt") for p in paths), listed
    assert all(a["size"] == 5 and a["url"] is None for a in listed["artifacts"])  # file:// results: no URL
    got = client.get(f"{base}/{paths[0]}", headers=auth(tokens["rita"]))
    assert got.content == b"kept\n"
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["content-disposition"] == "attachment; filename=\"notes.txt\"; filename*=UTF-8''notes.txt"
    for bad in ["00000/missing.txt", "00000/../../../etc/passwd", "..%2F..%2Fstate.db", "notes.txt",
                paths[0].replace("00000", "00001")]:
        assert client.get(f"{base}/{bad}", headers=auth(tokens["rita"])).status_code == 404, bad
    assert client.get(base, headers=auth(tokens["rob"])).status_code == 404


def test_any_artifact_name_makes_a_valid_download_header() -> None:
    """A sandbox names its artifacts: any text must give a header that HTTP can carry."""
    from serve_app.routes.results import attachment

    for name in ["结果.txt", 'a"b;c%.txt', "tab\there.txt", "x" * 300]:
        header = attachment(name)
        header.encode("latin-1")  # what Starlette sends; no CR, LF or quote inside the plain name
        assert "\r" not in header and "\n" not in header and header.count('"') == 2
    assert attachment("结果.txt") == "attachment; filename=\"__.txt\"; filename*=UTF-8''%E7%BB%93%E6%9E%9C.txt"


def test_results_as_parquet(api: Any, finished: dict[str, Any]) -> None:
    client, tokens, _ = api
    r = client.get(f"/api/v1/evaluations/{finished['id']}/results.parquet", headers=auth(tokens["vera"]))
    assert r.status_code == 200
    table = pq.read_table(io.BytesIO(r.content))
    assert table.num_rows == 3 and set(table.column("sample_id").to_pylist()) == {"0", "1", "2"}
    assert r.headers["x-proctor-partial"] == "false"
    queued = client.post("/api/v1/evaluations", json=spec("not yet", runtime="kubernetes", gpu={"count": 8, "type": "H100"}),
                         headers=auth(tokens["rita"])).json()["id"]
    r = client.get(f"/api/v1/evaluations/{queued}/results.parquet", headers=auth(tokens["rita"]))
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_results"
    client.delete(f"/api/v1/evaluations/{queued}", headers=auth(tokens["rita"]))


def test_rows_written_so_far_while_it_runs(api: Any, capsys: pytest.CaptureFixture[str]) -> None:
    client, tokens, _ = api
    policy = ("import time\ndef answer(messages, sample, **kw):\n"
              "    if sample['id'] == 'slow':\n        time.sleep(300)\n    return sample['metadata']['answer']\n")
    body = spec("partial rows", timeout_s=300, files={"policy.py": policy})
    body["model"] = {"adapter": "python", "callable": "policy:answer"}
    body["dataset"]["samples"] = [{"id": i, "input": "x", "target": i, "metadata": {"answer": i}}
                                  for i in ("a", "b", "slow")]
    body["shard_size"] = 1
    eval_id = client.post("/api/v1/evaluations", json=body, headers=auth(tokens["rita"])).json()["id"]
    base = f"/api/v1/evaluations/{eval_id}"
    try:
        deadline = time.monotonic() + 120
        while (page := client.get(f"{base}/results", headers=auth(tokens["rita"])).json())["total"] < 2:
            assert time.monotonic() < deadline, page
            time.sleep(0.5)
        assert page["partial"] is True and page["status"] == "running" and page["summary"] is None
        assert sorted(row["sample_id"] for row in page["rows"]) == ["a", "b"]
        assert all(row["score"] == 1.0 for row in page["rows"])
        r = client.get(f"{base}/results.parquet", headers=auth(tokens["rita"]))
        assert r.status_code == 200 and r.headers["x-proctor-partial"] == "true"
        assert sorted(pq.read_table(io.BytesIO(r.content)).column("sample_id").to_pylist()) == ["a", "b"]
        with Client(str(client.base_url), token=tokens["rita"]) as rita:  # the client and the CLI say so
            assert is_partial(rita.results(eval_id))
        assert main(["results", eval_id, "--json", "--url", str(client.base_url), "--token", tokens["rita"]]) == 0
        out, err = capsys.readouterr()
        assert sorted(row["sample_id"] for row in json.loads(out)) == ["a", "b"]
        assert f"note: {eval_id} is still running; these are the 2 rows its shards have written so far" in err
    finally:
        client.delete(base, headers=auth(tokens["rita"]))
    wait_final(client, tokens["rita"], eval_id)
    done = client.get(f"{base}/results", headers=auth(tokens["rita"])).json()
    assert done["partial"] is False and done["status"] == "cancelled"
    with Client(str(client.base_url), token=tokens["rita"]) as rita:
        assert not is_partial(rita.results(eval_id))


async def _collect(url: str, token: str, stop_after: int | None = None) -> tuple[list[dict[str, Any]], Any]:
    events = []
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        try:
            async for raw in ws:
                events.append(json.loads(raw))
                if stop_after is not None and len(events) >= stop_after:
                    return events, None
        except websockets.ConnectionClosed:
            pass
        return events, ws.close_code


def test_websocket_resumes_with_every_event_exactly_once(api: Any) -> None:
    client, tokens, _ = api
    eval_id = client.post("/api/v1/evaluations", json=spec("ws", samples=4), headers=auth(tokens["rita"])).json()["id"]
    url = _ws_url(client, f"/ws/evaluations/{eval_id}")

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any]:
        first, _ = await _collect(url, tokens["rita"], stop_after=2)  # then the client drops
        await asyncio.sleep(1.0)  # events go on meanwhile
        rest, code = await _collect(f"{url}?after={first[-1]['seq']}", tokens["rita"])
        return first, rest, code

    first, rest, code = asyncio.run(run())
    assert code == 1000  # closed once the evaluation ended
    replay, _ = asyncio.run(_collect(f"{url}?after=0", tokens["rita"]))
    got = [e["seq"] for e in first + rest]
    assert got == [e["seq"] for e in replay]  # every event, in order, none twice
    assert len(got) == len(set(got))
    assert replay[-1]["type"] == "status" and replay[-1]["status"] == "succeeded"
    assert {"status", "shard", "progress", "log"} <= {e["type"] for e in replay}
    assert all(e["eval_id"] == eval_id for e in replay)


def test_websocket_refusals(api: Any, finished: dict[str, Any]) -> None:
    client, tokens, _ = api
    url = _ws_url(client, f"/ws/evaluations/{finished['id']}")

    async def close_code(target: str, headers: dict[str, str]) -> tuple[int | None, str]:
        async with websockets.connect(target, additional_headers=headers) as ws:
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed:
                pass
            return ws.close_code, ws.close_reason

    assert asyncio.run(close_code(url, {}))[0] == 4401
    assert asyncio.run(close_code(url, auth("pk_bogus")))[0] == 4401
    assert asyncio.run(close_code(url, auth(tokens["rob"])))[0] == 4404  # another researcher's
    # a browser passes the token as a query parameter
    events, code = asyncio.run(_collect(f"{url}?token={tokens['rita']}", "ignored-by-header"))
    assert code == 4401  # a bad header wins over the query: no mixing credentials
    events = asyncio.run(_collect_query(f"{url}?token={tokens['rita']}"))
    assert events and events[-1]["status"] == "succeeded"


async def _collect_query(url: str) -> list[dict[str, Any]]:
    events = []
    async with websockets.connect(url) as ws:
        try:
            async for raw in ws:
                events.append(json.loads(raw))
        except websockets.ConnectionClosed:
            pass
    return events


def test_all_evaluations_stream_shows_a_researcher_only_their_own(api: Any, finished: dict[str, Any]) -> None:
    client, tokens, _ = api
    theirs = client.post("/api/v1/evaluations", json=spec("robs"), headers=auth(tokens["rob"])).json()["id"]
    wait_final(client, tokens["rob"], theirs)

    async def read_all(token: str) -> list[dict[str, Any]]:
        events = []
        async with websockets.connect(_ws_url(client, "/ws/evaluations?after=0"),
                                      additional_headers=auth(token)) as ws:
            while True:
                try:
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 3)))
                except asyncio.TimeoutError:
                    return events

    rita = {e.get("eval_id") for e in asyncio.run(read_all(tokens["rita"]))}
    assert finished["id"] in rita and theirs not in rita
    assert {finished["id"], theirs} <= {e.get("eval_id") for e in asyncio.run(read_all(tokens["sam"]))}


def _metrics(client: Any, token: str) -> dict[str, Any]:
    r = client.get("/api/v1/metrics", headers=auth(token))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(r.text):
        out[family.name] = family
    return out


def _value(family: Any, sample: str, **labels: str) -> float:
    return sum(s.value for s in family.samples if s.name == sample and all(s.labels.get(k) == v
                                                                          for k, v in labels.items()))


def test_prometheus_metrics(api: Any) -> None:
    client, tokens, _ = api
    _metrics(client, tokens["vera"])  # starts this replica following the bus
    before = _metrics(client, tokens["vera"])
    eval_id = client.post("/api/v1/evaluations", json=spec("metrics", samples=3), headers=auth(tokens["rita"])).json()["id"]
    wait_final(client, tokens["rita"], eval_id)
    deadline = time.monotonic() + 15  # the replica's follower reads the bus within a poll
    while True:
        after = _metrics(client, tokens["vera"])
        if _value(after["proctor_evaluation_duration_seconds"], "proctor_evaluation_duration_seconds_count") > \
                _value(before["proctor_evaluation_duration_seconds"], "proctor_evaluation_duration_seconds_count") \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    names = set(after)
    assert {"proctor_submissions", "proctor_evaluations", "proctor_queue_depth_shards", "proctor_gpus_allocated",
            "proctor_sandbox_start_seconds", "proctor_evaluation_duration_seconds", "proctor_samples_scored",
            "proctor_model_gateway_calls", "proctor_model_gateway_tokens", "proctor_safety_violations",
            "proctor_api_request_duration_seconds"} <= names
    assert all(n.startswith("proctor_") for n in names)
    answered = {(x.labels["method"], x.labels["route"], x.labels["status"])
                for x in after["proctor_api_request_duration_seconds"].samples if x.name.endswith("_count")}
    assert {("GET", "/api/v1/evaluations/{eval_id}", "200"), ("POST", "/api/v1/evaluations", "202")} <= answered
    assert after["proctor_submissions"].type == "counter"
    assert _value(after["proctor_submissions"], "proctor_submissions_total") >= \
        _value(before["proctor_submissions"], "proctor_submissions_total") + 1
    assert _value(after["proctor_samples_scored"], "proctor_samples_scored_total") >= \
        _value(before["proctor_samples_scored"], "proctor_samples_scored_total") + 3
    assert _value(after["proctor_sandbox_start_seconds"], "proctor_sandbox_start_seconds_count") >= 1
    assert _value(after["proctor_evaluation_duration_seconds"], "proctor_evaluation_duration_seconds_count") >= 1
    assert _value(after["proctor_evaluations"], "proctor_evaluations", status="succeeded") >= 1
    # the logical GPUs declared to the test cluster
    assert _value(after["proctor_gpus"], "proctor_gpus", gpu_type="H100") == 4
    buckets = {s.labels["le"] for s in after["proctor_evaluation_duration_seconds"].samples if "le" in s.labels}
    assert "3600.0" in buckets  # buckets up to hours
    assert client.get("/api/v1/metrics").status_code == 401


def test_shards_and_spec_of_an_evaluation(api: Any, finished: dict[str, Any]) -> None:
    client, tokens, _ = api
    got = client.get(f"/api/v1/evaluations/{finished['id']}/shards", headers=auth(tokens["vera"])).json()
    assert got["spec"]["name"] == "streams" and got["spec"]["sandbox"]["artifacts"] == ["notes.txt"]
    [shard] = got["shards"]
    assert (shard["shard_id"], shard["status"], shard["samples"], shard["units"]) == ("00000", "succeeded", 3, 3)
    assert shard["supervisor"].startswith("proctor-supervisor-") and shard["finished_at"]
    assert client.get(f"/api/v1/evaluations/{finished['id']}/shards", headers=auth(tokens["rob"])).status_code == 404


def test_a_first_attempt_reads_1_in_rows_shards_and_logs(api: Any, finished: dict[str, Any]) -> None:
    """One meaning of `attempt` (1-based) everywhere: the rows as the platform wrote them
    (with the columns and types cluster/results.py documents), the shards API, the logs."""
    from schemadoc import documented_columns, type_name

    client, tokens, _ = api
    written = pq.read_table(finished["results_uri"].removeprefix("file://"))
    assert [(f.name, type_name(f.type)) for f in written.schema] == [(n, t) for n, t, _ in documented_columns()]
    assert set(written["attempt"].to_pylist()) == {1} and written.num_rows == 3
    shards = client.get(f"/api/v1/evaluations/{finished['id']}/shards", headers=auth(tokens["rita"])).json()
    assert [(x["attempt"], x["max_attempts"]) for x in shards["shards"]] == [(1, 3)]
    logs = client.get(f"/api/v1/evaluations/{finished['id']}/logs", headers=auth(tokens["rita"])).text.splitlines()
    assert logs and {json.loads(x)["attempt"] for x in logs} == {1}


def test_resources_of_a_finished_and_a_running_evaluation(api: Any, finished: dict[str, Any]) -> None:
    client, tokens, _ = api
    got = client.get(f"/api/v1/evaluations/{finished['id']}/resources", headers=auth(tokens["rita"])).json()
    [shard] = got["shards"]
    assert (shard["shard_id"], shard["attempt"], shard["live"]) == ("00000", 1, False)
    assert shard["samples"] and all(x["t"] > 0 and len(x) > 1 for x in shard["samples"]), shard
    assert got["gpus_per_shard"] == 0 and got["gpu_type"] is None
    assert client.get(f"/api/v1/evaluations/{finished['id']}/resources",
                      headers=auth(tokens["rob"])).status_code == 404

    body = spec("resources-live", samples=1)
    body.update(model={"adapter": "python", "callable": "proctor.scripted.file_agent:solve"}, agentic=True,
                scorers=[{"type": "includes"}])
    body["dataset"]["samples"][0]["metadata"] = {"commands": ["sleep 6"], "answer": body["dataset"]["samples"][0]["target"]}
    eval_id = client.post("/api/v1/evaluations", json=body, headers=auth(tokens["rita"])).json()["id"]
    live: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        shards = client.get(f"/api/v1/evaluations/{eval_id}/resources", headers=auth(tokens["rita"])).json()["shards"]
        live = [s for s in shards if s["live"]]
        if live and len(live[0]["samples"]) >= 3:
            break
        time.sleep(0.5)
    assert live and len(live[0]["samples"]) >= 3, live  # grows while it runs
    assert "cpu" in live[0]["samples"][-1] and live[0]["samples"][-1]["t"] > live[0]["samples"][0]["t"]
    assert wait_final(client, tokens["rita"], eval_id)["status"] == "succeeded"
    [kept] = client.get(f"/api/v1/evaluations/{eval_id}/resources", headers=auth(tokens["rita"])).json()["shards"]
    assert not kept["live"] and len(kept["samples"]) >= len(live[0]["samples"])
    # measured by the runtime over seconds (a run of one second may end before gVisor reports memory)
    assert any(x.get("memory", 0) > 0 for x in kept["samples"]), kept
