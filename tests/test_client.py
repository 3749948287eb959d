"""`proctor.Client` and `proctor.AsyncClient` against the real Serve app on the session's
Ray cluster (the `api` fixture): every method, and the typed errors."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from apiserver import spec
from ports import free_port
from proctor import AsyncClient, Client, ProctorError
from proctor.client import (AuthenticationError, ConflictError, Evaluation, NotFoundError, PermissionDeniedError,
                            RateLimitError, UnavailableError, InvalidRequestError, error_of)

pytestmark = pytest.mark.ray

TAG = uuid.uuid4().hex[:6]  # names of this module's evaluations, for filtering lists


def agentic_spec(name: str) -> dict[str, Any]:
    """One sample solved by the scripted file agent: it logs its tool calls and leaves answer.txt."""
    return {"name": name, "labels": {"suite": f"client-{TAG}"},
            "model": {"adapter": "python", "callable": "proctor.scripted.file_agent:solve"}, "agentic": True,
            "dataset": {"samples": [{"id": "upper", "input": "Upper-case name.txt into answer.txt.",
                                     "target": "PROCTOR", "files": {"name.txt": "proctor\n"},
                                     "metadata": {"commands": ["tr a-z A-Z < name.txt > answer.txt"]}}]},
            "scorers": [{"type": "command", "name": "check",
                         "command": 'test "$(cat answer.txt)" = "$PROCTOR_TARGET"'}],
            "sandbox": {"runtime": "gvisor", "memory": "256Mi", "artifacts": ["answer.txt"]}}


def slow_spec(name: str) -> dict[str, Any]:
    slow = spec(name, samples=1, timeout_s=300,
                files={"policy.py": "import time\ndef answer(messages, **kw):\n    time.sleep(300)\n"})
    slow["model"] = {"adapter": "python", "callable": "policy:answer"}
    return slow


@pytest.fixture(scope="module")
def url(api: Any) -> str:
    return str(api[0].base_url)


@pytest.fixture(scope="module")
def as_user(api: Any, url: str):  # noqa: ANN201 - Iterator[Callable[[str], Client]]
    """A Client for a test user by name (vera, rita, rob, sam, ada)."""
    clients: dict[str, Client] = {}

    def client(name: str) -> Client:
        if name not in clients:
            clients[name] = Client(url, api[1][name])
        return clients[name]

    yield client
    for c in clients.values():
        c.close()


@pytest.fixture(scope="module")
def finished(as_user: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Evaluation, list[Evaluation], str]:
    """Rita's agentic evaluation, submitted from a YAML file and waited for; the states
    `on_progress` saw; and the id of a second, plain evaluation of hers."""
    path = tmp_path_factory.mktemp("specs") / "agentic.yaml"
    path.write_text(yaml.safe_dump(agentic_spec(f"client-{TAG}-agentic")))
    rita = as_user("rita")
    eval_id = rita.submit(path)
    other = rita.submit(dict(spec(f"client-{TAG}-plain", samples=1), labels={"suite": f"client-{TAG}"}))
    seen: list[Evaluation] = []
    final = rita.wait(eval_id, timeout=180, on_progress=seen.append)
    assert rita.wait(other, timeout=180).status == "succeeded"
    return final, seen, other


def test_health_needs_no_token(url: str) -> None:
    with Client(url, token="") as anonymous:
        assert anonymous.token is None
        health = anonymous.health()
    assert health["live"] is True and health["ready"] is True


def test_defaults_come_from_settings_the_environment_and_the_token_file(
        api: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCTOR_API_PORT", str(api[0].base_url.port))
    monkeypatch.setenv("PROCTOR_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("PROCTOR_TOKEN", raising=False)
    (tmp_path / "token").write_text(api[1]["ada"] + "\n")  # as `proctor up` writes it
    with Client() as from_file:
        assert from_file.url == f"http://127.0.0.1:{api[0].base_url.port}" and from_file.token == api[1]["ada"]
        assert {"ada", "vera"} <= {t.user for t in from_file.tokens()}  # an admin sees all: the file's token was sent
    monkeypatch.setenv("PROCTOR_TOKEN", api[1]["vera"])
    with Client() as from_env:
        assert from_env.token == api[1]["vera"]
        assert {t.user for t in from_env.tokens()} == {"vera"}  # a viewer sees only hers
    with Client(token=api[1]["sam"]) as given:
        assert given.token == api[1]["sam"]


def test_submit_from_a_file_and_wait(finished: Any) -> None:
    ev, seen, _ = finished
    assert ev.status == "succeeded" and ev.finished and ev.owner == "rita"
    assert ev.name == f"client-{TAG}-agentic" and ev.labels == {"suite": f"client-{TAG}"}
    assert ev.done_units == ev.total_units == 1 and ev.finished_at is not None
    assert ev.summary["metrics"]["check"]["mean"] == 1.0
    assert seen[-1].status == "succeeded" and len(seen) == len({(e.status, e.done_units) for e in seen})


def test_get_and_summary(finished: Any, as_user: Any) -> None:
    ev, _, _ = finished
    got = as_user("vera").get(ev.id)
    assert got.id == ev.id and got.status == "succeeded" and got.results_uri == ev.results_uri
    assert as_user("sam").summary(ev.id) == ev.summary


def test_results_as_arrow_and_pandas(finished: Any, as_user: Any) -> None:
    ev, _, _ = finished
    table = as_user("rita").results(ev.id)
    assert isinstance(table, pa.Table) and table.num_rows == 1
    assert table["sample_id"].to_pylist() == ["upper"] and table["score"].to_pylist() == [1.0]
    df = as_user("rita").results_df(ev.id)
    assert list(df["sample_id"]) == ["upper"] and "scores" in df.columns


def test_list_follows_every_page_and_filters(finished: Any, as_user: Any) -> None:
    ev, _, other = finished
    ada = as_user("ada")
    everything = list(ada.list(text=f"client-{TAG}", limit=1))
    assert sorted(e.id for e in everything) == sorted([ev.id, other])
    page, cursor = ada.list_page(text=f"client-{TAG}", limit=1)
    assert len(page) == 1 and cursor
    by_name = [e.name for e in ada.list(label=f"suite=client-{TAG}", sort="name")]
    assert by_name == [f"client-{TAG}-agentic", f"client-{TAG}-plain"]
    assert [e.id for e in ada.list(text=f"client-{TAG}", status=["failed", "cancelled"])] == []
    assert {e.owner for e in ada.list(text=f"client-{TAG}", owner="rita", status="succeeded")} == {"rita"}
    assert list(as_user("rob").list(text=f"client-{TAG}")) == []  # rita's are not rob's to see


def test_logs(finished: Any, as_user: Any) -> None:
    ev, _, _ = finished
    lines = list(as_user("rita").logs(ev.id))
    tools = [line for line in lines if line["message"].startswith("tool: ")]
    assert tools and tools[0]["message"] == "tool: tr a-z A-Z < name.txt > answer.txt"
    assert {"ts", "shard_id", "level", "message"} <= set(tools[0]) and tools[0]["level"] == "info"
    assert [line["message"] for line in as_user("rita").logs(ev.id, text="TR A-Z")] == [tools[0]["message"]]
    assert all(line["level"] in ("warning", "error") for line in as_user("rita").logs(ev.id, level="warning"))
    followed = list(as_user("rita").logs(ev.id, follow=True))  # ends: the evaluation has ended
    assert sorted(line["message"] for line in followed) == sorted(line["message"] for line in lines)


def test_events_of_one_evaluation_end_with_it(finished: Any, as_user: Any) -> None:
    ev, _, _ = finished
    events = list(as_user("rita").events(ev.id))
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)) and {e["eval_id"] for e in events} == {ev.id}
    statuses = [e["status"] for e in events if e["type"] == "status"]
    assert statuses[-1] == "succeeded" and "running" in statuses
    assert {"status", "log"} <= {e["type"] for e in events}
    middle = seqs[len(seqs) // 2]
    assert [e["seq"] for e in as_user("rita").events(ev.id, after=middle)] == [s for s in seqs if s > middle]


def test_events_of_everything(finished: Any, as_user: Any) -> None:
    ev, _, _ = finished
    stream = as_user("ada").events()
    first = [next(stream) for _ in range(3)]
    stream.close()  # leaves the stream: the WebSocket is closed
    assert [e["seq"] for e in first] == sorted(e["seq"] for e in first) and all("type" in e for e in first)


class CuttingProxy:
    """A TCP proxy to the API that drops its first connection `cut_at` bytes after the HTTP
    headers of the answer (None: never). Records each connection's request line, and how
    many bytes followed the headers."""

    def __init__(self, upstream: int, cut_at: int | None):
        self.upstream, self.cut_at = upstream, cut_at
        self.requests: list[str] = []
        self.body_bytes: list[int] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept)]
        self.threads[0].start()

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        self.server.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self.threads:
            t.join(5)
        assert not any(t.is_alive() for t in self.threads), "the proxy left a thread behind"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(client, self.cut_at is not None and not self.requests))
            self.threads.append(t)
            t.start()

    def _serve(self, client: socket.socket, cut: bool) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        self.sockets += [client, upstream]
        with contextlib.suppress(OSError):  # closed under it by __exit__
            self._pump(client, upstream, cut)
        client.close()
        upstream.close()

    def _pump(self, client: socket.socket, upstream: socket.socket, cut: bool) -> None:
        request = client.recv(65536)
        self.requests.append(request.split(b"\r\n", 1)[0].decode())
        upstream.sendall(request)
        seen, index = b"", len(self.body_bytes)
        self.body_bytes.append(0)
        while data := upstream.recv(65536):
            seen += data
            head = seen.find(b"\r\n\r\n")
            self.body_bytes[index] = len(seen) - head - 4 if head >= 0 else 0
            if cut and head >= 0 and len(seen) >= head + 4 + self.cut_at:
                client.sendall(data[:len(data) - (len(seen) - head - 4 - self.cut_at)])
                break
            client.sendall(data)
        client.shutdown(socket.SHUT_RDWR)


def test_events_resume_after_a_dropped_connection(finished: Any, api: Any) -> None:
    ev, _, _ = finished
    token = api[1]["rita"]
    with CuttingProxy(api[0].base_url.port, cut_at=None) as measure:  # frames are compressed: measure them
        with Client(f"http://127.0.0.1:{measure.port}", token) as direct:
            expected = list(direct.events(ev.id))
    with CuttingProxy(api[0].base_url.port, cut_at=measure.body_bytes[0] // 2) as proxy:
        with Client(f"http://127.0.0.1:{proxy.port}", token) as client:
            got = list(client.events(ev.id))
    assert [e["seq"] for e in got] == [e["seq"] for e in expected]  # nothing missed, nothing twice
    assert len(proxy.requests) == 2, proxy.requests
    resumed_after = int(proxy.requests[1].split("after=")[1].split()[0])
    assert 0 < resumed_after < expected[-1]["seq"]


def test_artifacts_list_and_download(finished: Any, as_user: Any, tmp_path: Path) -> None:
    ev, _, _ = finished
    rita = as_user("rita")
    (found,) = rita.artifacts(ev.id)
    assert found.path.endswith("/answer.txt") and found.size == len("PROCTOR\n") and found.url is None
    written = rita.download_artifact(ev.id, found.path, tmp_path)
    assert written == tmp_path / "answer.txt" and written.read_text() == "PROCTOR\n"
    assert rita.download_artifact(ev.id, found.path, tmp_path / "copy.txt").read_bytes() == b"PROCTOR\n"
    with pytest.raises(NotFoundError):
        rita.download_artifact(ev.id, found.path.replace("answer", "nothing"), tmp_path)


def test_incidents_cluster_and_metrics(finished: Any, as_user: Any) -> None:
    ev, _, _ = finished
    assert as_user("sam").incidents(ev.id) == []
    cluster = as_user("vera").cluster()
    assert cluster["cpus"]["total"] >= 1 and "queued_shards" in cluster
    metrics = as_user("ada").metrics()
    assert "# TYPE" in metrics and "proctor_" in metrics


def test_cancel_and_emergency_stop(as_user: Any) -> None:
    rita = as_user("rita")
    first = rita.submit(slow_spec(f"client-{TAG}-cancel"))
    second = rita.submit(slow_spec(f"client-{TAG}-stop"))
    cancelled = rita.cancel(first)
    assert cancelled.id == first and cancelled.stopped is True
    with pytest.raises(NotFoundError):
        as_user("rob").stop(second)  # not his to see
    stopped = as_user("sam").stop(second)
    assert stopped.id == second and stopped.stopped is True
    assert rita.wait(first, timeout=60).status == "cancelled"
    assert rita.wait(second, timeout=60).status == "cancelled"


def test_stop_all_is_for_admins(as_user: Any) -> None:
    eval_id = as_user("rita").submit(slow_spec(f"client-{TAG}-stop-all"))
    with pytest.raises(PermissionDeniedError) as denied:
        as_user("sam").stop_all()
    assert denied.value.status == 403 and denied.value.code == "forbidden"
    assert eval_id in as_user("ada").stop_all()
    assert as_user("rita").wait(eval_id, timeout=60).status == "cancelled"


def test_wait_times_out(as_user: Any) -> None:
    rita = as_user("rita")
    eval_id = rita.submit(slow_spec(f"client-{TAG}-timeout"))
    try:
        with pytest.raises(TimeoutError, match="still"):
            rita.wait(eval_id, timeout=1)
    finally:
        rita.cancel(eval_id)
        rita.wait(eval_id, timeout=60)


def test_tokens_create_list_revoke(as_user: Any, url: str) -> None:
    ada = as_user("ada")
    made = ada.create_token(f"tess-{TAG}", "viewer", "client test", expires_in_days=1)
    assert made.user == f"tess-{TAG}" and made.role == "viewer" and made.token and made.expires_at is not None
    with Client(url, made.token) as tess:
        assert isinstance(tess.list_page(limit=1)[0], list)
        with pytest.raises(PermissionDeniedError):
            tess.submit(spec())
        listed = {t.id: t for t in ada.tokens()}
        assert listed[made.id].user == f"tess-{TAG}" and listed[made.id].revoked is False
        assert ada.revoke_token(made.id) is True
        assert {t.id: t for t in ada.tokens()}[made.id].revoked is True
        with pytest.raises(AuthenticationError):
            tess.list_page()
    with pytest.raises(PermissionDeniedError):
        as_user("rita").create_token("someone", "admin", "escalation")
    with pytest.raises(ConflictError) as clash:
        ada.create_token("vera", "admin", "not a viewer")
    assert clash.value.status == 409


@pytest.mark.parametrize("token", ["pk_not-a-real-token", ""])
def test_refused_tokens_raise_authentication_error(url: str, token: str) -> None:
    with Client(url, token) as client:
        with pytest.raises(AuthenticationError) as refused:
            client.list_page()
    assert refused.value.status == 401 and refused.value.code == "unauthenticated"
    assert isinstance(refused.value, ProctorError)
    if not token:
        assert "PROCTOR_TOKEN" in str(refused.value)


def test_viewer_submit_is_permission_denied(as_user: Any) -> None:
    with pytest.raises(PermissionDeniedError) as denied:
        as_user("vera").submit(spec())
    assert "researcher role" in denied.value.message


def test_invalid_spec_raises_validation_error_naming_every_field(as_user: Any, tmp_path: Path) -> None:
    bad = spec(memroy="1Gi")
    bad["epochs"] = 0
    with pytest.raises(InvalidRequestError) as invalid:
        as_user("rita").submit(bad)
    assert invalid.value.status == 422 and invalid.value.code == "invalid_spec"
    assert {"sandbox.memroy", "epochs"} <= {f["field"] for f in invalid.value.fields}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(InvalidRequestError) as local:  # a file is checked before it is sent
        as_user("rita").submit(path)
    assert {"sandbox.memroy", "epochs"} <= {f["field"] for f in local.value.fields}
    assert "sandbox.memroy" in str(local.value)


def test_unknown_evaluation_is_not_found(as_user: Any) -> None:
    with pytest.raises(NotFoundError) as missing:
        as_user("ada").get("ev-does-not-exist")
    assert missing.value.status == 404 and missing.value.code == "not_found"
    with pytest.raises(NotFoundError):
        list(as_user("ada").logs("ev-does-not-exist"))
    with pytest.raises(NotFoundError):
        list(as_user("ada").events("ev-does-not-exist"))


def test_no_results_yet_is_not_found(as_user: Any) -> None:
    rita = as_user("rita")
    eval_id = rita.submit(slow_spec(f"client-{TAG}-no-results"))
    try:
        with pytest.raises(NotFoundError) as missing:
            rita.results(eval_id)
        assert missing.value.code == "no_results"
    finally:
        rita.cancel(eval_id)
        rita.wait(eval_id, timeout=60)


def test_unreachable_api_is_unavailable() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", "any") as client:
        with pytest.raises(UnavailableError) as down:
            client.get("ev-1")
        assert "proctor up" in str(down.value)
        with pytest.raises(UnavailableError):
            list(client.events("ev-1"))


def test_rate_limit_answer_carries_retry_after() -> None:
    exc = error_of(429, {"error": {"code": "rate_limited", "message": "slow down"}}, {"retry-after": "2"})
    assert isinstance(exc, RateLimitError) and exc.retry_after == 2.0 and exc.code == "rate_limited"


def test_async_client(finished: Any, api: Any, url: str, tmp_path: Path) -> None:
    ev, _, other = finished
    tokens = api[1]

    async def main() -> None:
        async with AsyncClient(url, tokens["rita"]) as rita, AsyncClient(url, tokens["vera"]) as vera:
            assert (await rita.health())["ready"] is True
            seen: list[str] = []

            async def progress(e: Evaluation) -> None:
                seen.append(e.status)

            eval_id = await rita.submit(dict(spec(f"client-{TAG}-async", samples=1), labels={"suite": f"client-{TAG}"}))
            final = await rita.wait(eval_id, timeout=180, on_progress=progress)
            assert final.status == "succeeded" and seen[-1] == "succeeded"
            assert (await rita.get(ev.id)).summary == ev.summary == await rita.summary(ev.id)
            assert sorted([e.id async for e in rita.list(label=f"suite=client-{TAG}", limit=1)]) == sorted(
                [ev.id, other, eval_id])
            assert (await rita.list_page(text=f"client-{TAG}-async"))[0][0].id == eval_id
            lines = [line async for line in rita.logs(ev.id, follow=True)]
            assert any(line["message"].startswith("tool: ") for line in lines)
            events = [e async for e in rita.events(ev.id)]
            assert [e["status"] for e in events if e["type"] == "status"][-1] == "succeeded"
            assert (await rita.results(ev.id)).num_rows == 1
            assert list((await rita.results_df(eval_id))["sample_id"]) == ["0"]
            (artifact,) = await rita.artifacts(ev.id)
            assert (await rita.download_artifact(ev.id, artifact.path, tmp_path)).read_text() == "PROCTOR\n"
            assert await rita.incidents(ev.id) == []
            assert "cpus" in await rita.cluster()
            assert "proctor_" in await rita.metrics()
            with pytest.raises(PermissionDeniedError):
                await vera.submit(spec())
            with pytest.raises(NotFoundError):
                await vera.get("ev-does-not-exist")
            slow = await rita.submit(slow_spec(f"client-{TAG}-async-stop"))
            assert (await rita.cancel(slow)).stopped is True
            assert (await rita.wait(slow, timeout=60)).status == "cancelled"

    asyncio.run(main())


def test_async_client_admin_calls(api: Any, url: str) -> None:
    async def main() -> None:
        async with AsyncClient(url, api[1]["ada"]) as ada:
            made = await ada.create_token(f"tara-{TAG}", "researcher", "async")
            assert made.id in {t.id for t in await ada.tokens()}
            assert await ada.revoke_token(made.id) is True
            first = await ada.submit(slow_spec(f"client-{TAG}-async-emergency"))
            assert (await ada.stop(first)).stopped is True
            second = await ada.submit(slow_spec(f"client-{TAG}-async-stop-all"))
            assert second in await ada.stop_all()
            assert [(await ada.wait(i, timeout=60)).status for i in (first, second)] == ["cancelled"] * 2

    asyncio.run(main())


def test_me_shards_and_recent_incidents(finished: Any, as_user: Any) -> None:
    ev = finished[0]
    rita = as_user("rita")
    assert rita.me() == {"name": "rita", "role": "researcher"}
    stored = as_user("vera").shards(ev.id)
    assert stored["spec"]["name"] == ev.name
    assert {s["status"] for s in stored["shards"]} == {"succeeded"}
    assert sum(s["units"] for s in stored["shards"]) == ev.total_units
    for incident in as_user("sam").recent_incidents(50):  # any there are, newest first, with their evaluation
        assert incident["eval_id"] and incident["rule"] and "evaluation" in incident
    assert all(i["owner"] == "rita" for i in rita.recent_incidents(50))  # a researcher sees only their own
