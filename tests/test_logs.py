"""Structured logs: JSON lines that parse and carry their ids, text for a person by default,
from every kind of Proctor process; and no secret in any line, whatever carries it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from apiserver import auth, spec, wait_final
from httpjson import QuietHandler
from proctor.observability import REDACT, log_context
from proctor.observability.logs import JsonFormatter, TextFormatter
from proctor.observability.redact import MASK, Redactor
from proctor.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"time", "level", "logger", "message", "process", "pid", "eval_id", "shard_id", "trace_id", "span_id"}
API_KEY = "pk_Zx9TestTestTestTestTestTestTestT"
JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhZGEiLCJyb2xlIjoiYWRtaW4ifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


def _record(message: str, *args: Any, exc: BaseException | None = None, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("proctor.test", logging.WARNING, __file__, 1, message, args,
                               (type(exc), exc, exc.__traceback__) if exc else None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


# ------------------------------------------------------------------------------ formats


def test_a_json_line_has_every_field_and_the_ids_of_its_context() -> None:
    with log_context("ev-1", "00003"):
        line = json.loads(JsonFormatter("scheduler").format(_record("shard %s admitted", "00003")))
    assert set(line) == FIELDS
    assert (line["level"], line["logger"], line["message"], line["process"]) == \
        ("warning", "proctor.test", "shard 00003 admitted", "scheduler")
    assert (line["eval_id"], line["shard_id"], line["trace_id"], line["span_id"]) == ("ev-1", "00003", None, None)
    assert line["time"].endswith("+00:00")
    outside = json.loads(JsonFormatter("x").format(_record("m", eval_id="ev-2")))
    assert (outside["eval_id"], outside["shard_id"]) == ("ev-2", None)  # extra=, and no context leaks out


def test_an_asyncio_task_keeps_its_own_context() -> None:
    async def one(eval_id: str) -> dict[str, Any]:
        with log_context(eval_id, "00000"):
            await asyncio.sleep(0.01)
            return json.loads(JsonFormatter("x").format(_record("m")))

    async def both() -> list[dict[str, Any]]:
        return await asyncio.gather(one("ev-a"), one("ev-b"))

    assert [line["eval_id"] for line in asyncio.run(both())] == ["ev-a", "ev-b"]


def test_text_lines_are_for_a_person() -> None:
    with log_context("ev-1", "00003"):
        text = TextFormatter().format(_record("hello"))
    assert text.endswith(" WARNING proctor.test [ev-1/00003]: hello") and not text.startswith("{")


def test_lines_carry_the_current_span_when_tracing_is_on() -> None:
    code = """
        import io, json, logging
        from proctor.observability import configure_logging, tracing
        from proctor.settings import Settings
        settings = Settings(log_format="json", otel_endpoint="http://127.0.0.1:9")
        stream = io.StringIO()
        configure_logging(settings, "unit", stream=stream)
        tracing.setup(settings, "unit")
        with tracing.span("work") as span:
            logging.getLogger("proctor.unit").info("inside")
        logging.getLogger("proctor.unit").info("outside")
        print(json.dumps([span.parent.traceparent, stream.getvalue()]))
    """
    traceparent, lines = json.loads(_python(code).stdout)
    inside, outside = [json.loads(x) for x in lines.splitlines()]
    assert f"00-{inside['trace_id']}-{inside['span_id']}-01" == traceparent
    assert outside["trace_id"] is None and outside["message"] == "outside"


def _python(code: str, env: dict[str, str] | None = None, args: list[str] | None = None) -> Any:
    import textwrap

    result = subprocess.run([sys.executable, *(args or ["-c", textwrap.dedent(code)])], capture_output=True,
                            text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_settings_choose_the_format_and_text_is_the_default() -> None:
    code = "import logging\nfrom proctor.observability import configure_logging\nfrom proctor.settings import " \
           "load_settings\nconfigure_logging(load_settings(), 'unit')\nlogging.getLogger('proctor.u').info('hi')"
    plain = _python("", env={"PROCTOR_LOG_FORMAT": "text"}, args=["-c", code]).stderr.strip()
    assert plain.endswith("INFO proctor.u: hi")
    line = json.loads(_python("", env={"PROCTOR_LOG_FORMAT": "json"}, args=["-c", code]).stderr)
    assert line["message"] == "hi" and line["process"] == "unit"
    quiet = _python("", env={"PROCTOR_LOG_FORMAT": "json", "PROCTOR_LOG_LEVEL": "warning"}, args=["-c", code])
    assert quiet.stderr == ""


def test_the_dashboard_process_logs_json_lines() -> None:
    code = """
        import logging, sys
        import ui.__main__ as dashboard
        dashboard.build = lambda *args: None  # no Gradio app: only the process's set-up is under test
        dashboard.launch = lambda *args: logging.getLogger("proctor.ui").warning("serving")
        sys.argv = ["ui", "--port", "1"]
        dashboard.main()
    """
    [line] = [json.loads(x) for x in _python(code, env={"PROCTOR_LOG_FORMAT": "json"}).stderr.splitlines()]
    assert (line["process"], line["logger"], line["message"]) == ("dashboard", "proctor.ui", "serving")


@pytest.mark.sandbox
def test_the_cli_logs_json_lines_with_the_shards_ids(tmp_path: Path, sandbox_root: Path) -> None:
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(json.dumps(spec("cli-json", samples=2, runtime="bubblewrap")))
    env = {"PROCTOR_LOG_FORMAT": "json", "PROCTOR_LOG_LEVEL": "info", "PROCTOR_HOME": str(sandbox_root / "cli-home"),
           "PROCTOR_RESULTS_URI": (tmp_path / "results").as_uri()}
    result = _python("", env=env, args=["-m", "proctor.cli", "run", str(spec_file), "--json"])
    [summary] = json.loads(result.stdout)
    lines = [json.loads(x) for x in result.stderr.splitlines() if x.strip()]
    assert lines and all(set(line) == FIELDS and line["process"] == "cli" for line in lines)
    shard = [x for x in lines if x["logger"] == "proctor.executor"]
    assert shard and shard[0]["eval_id"] == summary["eval_id"] and shard[0]["shard_id"] == "00000"


# ------------------------------------------------------------------------------ secrets


def test_every_kind_of_secret_is_scrubbed_from_message_and_traceback() -> None:
    redact = Redactor(["hunter2-provider-key"])
    secrets = {
        API_KEY: f"token {API_KEY} rejected",
        JWT: f"bad jwt {JWT}",
        "sk-proj-abcdefghijklmnop1234": "provider said: Incorrect API key sk-proj-abcdefghijklmnop1234",
        "AKIAIOSFODNN7EXAMPLE": "aws key AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMIK7MDENGbPxRfiCY": "secret_access_key=wJalrXUtnFEMIK7MDENGbPxRfiCY",
        "s3cr3t-pw": "postgresql+psycopg://proctor:s3cr3t-pw@db/proctor",
        "opaque-bearer-value-123": "Authorization: Bearer opaque-bearer-value-123",
        "hunter2-provider-key": "the provider echoed hunter2-provider-key",
        "q-token-value": "GET /ws/evaluations?token=q-token-value",
    }
    for secret, text in secrets.items():
        assert secret not in redact(text) and MASK in redact(text), text
    for ordinary in ("token limit reached: 1000 tokens (safety.max_tokens)", "model_tokens: 1234",
                     "shard 00000 succeeded in 1.2 s", "Bearer of bad news"):
        assert redact(ordinary) == ordinary
    try:
        raise RuntimeError(f"401 for {API_KEY}")
    except RuntimeError as exc:
        line = json.loads(JsonFormatter("x").format(_record("failed with %s", API_KEY, exc=exc)))
    assert API_KEY not in json.dumps(line) and "RuntimeError" in line["exception"]
    assert API_KEY not in TextFormatter().format(_record("failed with %s", API_KEY))


class EchoingProvider(QuietHandler):
    """A provider that refuses every call and echoes the key it was sent (as some do)."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        self.reply({"error": {"message": f"Incorrect API key provided: {self.headers['Authorization'][7:]}"}}, 401)


@pytest.mark.sandbox
def test_a_provider_key_reaches_neither_a_log_nor_the_sandbox(tmp_path: Path, sandbox_root: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway holds a provider key of no known shape; the provider echoes it in its
    error. Every log line of the run (DEBUG and up, JSON) and every row stay clean of it."""
    from cluster.runtimes import GvisorRuntime
    from eval_actors.local_run import run_evaluation
    from proctor.spec import parse_spec

    key = "hunter2-opaque-provider-credential"
    monkeypatch.setenv("PROCTOR_TEST_PROVIDER_KEY", key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoingProvider)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(JsonFormatter("test"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        doc = spec("provider-key", samples=2)
        doc["model"] = {"adapter": "openai", "model": "m", "api_key_env": "PROCTOR_TEST_PROVIDER_KEY",
                        "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1"}
        settings = Settings(home=sandbox_root, results_uri=(tmp_path / "results").as_uri())
        result = asyncio.run(run_evaluation(parse_spec(doc), settings, runtime=GvisorRuntime(sandbox_root / "keys")))
        logging.getLogger("proctor.test").error("a careless line: %s", key)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        server.shutdown()
        server.server_close()
    rows = [r for o in result.outcomes for r in o.records]
    assert rows and all("401" in (r.error or "") for r in rows)  # the error reached the sandbox, the key did not
    assert all(key not in (r.error or "") + r.output for r in rows)
    lines = captured.getvalue().splitlines()
    assert any("model call" in json.loads(x)["message"] for x in lines)
    assert any("a careless line: [REDACTED]" == json.loads(x)["message"] for x in lines)
    assert key not in captured.getvalue()
    assert key in REDACT._values  # noqa: SLF001 - registered by the gateway when it read it


# ------------------------------------------------------------------------------ the platform


def _ray_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())  # noqa: SLF001 - the session's own


def _log_lines(folder: Path) -> Iterator[tuple[Path, str]]:
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".err", ".out", ".txt", ".json", ""):
            for line in path.read_text(errors="replace").splitlines():
                yield path, line


def _proctor_lines(folder: Path) -> list[dict[str, Any]]:
    found = []
    for _, text in _log_lines(folder):
        if text.startswith("{") and '"process"' in text:
            line = json.loads(text)  # every JSON line must parse
            if line.get("logger", "").startswith("proctor"):
                found.append(line)
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_the_platforms_processes_log_json_lines_with_their_ids(api: Any) -> None:
    client, tokens, _ = api
    r = client.post("/api/v1/evaluations", json=spec("json-logs", samples=2), headers=auth(tokens["rita"]))
    ev = wait_final(client, tokens["rita"], r.json()["id"])
    assert ev["status"] == "succeeded"
    deadline = time.monotonic() + 30
    while True:
        lines = [x for x in _proctor_lines(_ray_logs()) if x["eval_id"] == ev["id"]]
        kinds = {x["process"] for x in lines}
        if {"scheduler", "supervisor"} <= kinds or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"scheduler", "supervisor"} <= kinds, kinds
    assert all(set(x) == FIELDS for x in lines)
    ended = [x for x in lines if x["logger"] == "proctor.executor"]
    assert ended and ended[0]["shard_id"] == "00000" and ended[0]["trace_id"] == ev["trace_id"]
    assert len(ended[0]["span_id"]) == 16
    submitted = [x for x in lines if x["logger"] == "proctor.scheduler" and "submitted" in x["message"]]
    assert submitted and submitted[0]["trace_id"] == ev["trace_id"]


@pytest.mark.ray
@pytest.mark.slow
def test_no_token_or_key_reaches_the_platforms_logs(api: Any) -> None:
    """API keys, JWTs (ours and an identity provider's), a new key's secret, tokens in
    WebSocket URLs, bad tokens and the platform's JWT secret go through the API; not one
    of them is in any log file of the session's cluster."""
    import websockets.sync.client as ws

    from serve_app.auth import mint_jwt

    client, tokens, _ = api
    jwt = mint_jwt(client.settings, "rita", "researcher", 600)
    sso = client.issuer.token("rita", "researcher")
    secrets = [*tokens.values(), jwt, sso, API_KEY, JWT, client.settings.jwt_secret]
    made = client.post("/api/v1/tokens", json={"user": "logcheck", "role": "viewer", "name": "log check"},
                       headers=auth(tokens["ada"])).json()["token"]
    secrets.append(made)
    for token in (jwt, sso, made, API_KEY, JWT):
        client.get("/api/v1/evaluations", headers=auth(token))
    eval_id = client.post("/api/v1/evaluations", json=spec("secrets"), headers=auth(jwt)).json()["id"]
    wait_final(client, jwt, eval_id)
    url = str(client.base_url).replace("http://", "ws://") + f"/ws/evaluations/{eval_id}?token={made}"
    with ws.connect(url) as socket:
        socket.recv(timeout=10)
    client.get(f"/api/v1/evaluations/{eval_id}/logs", params={"token": JWT}, headers=auth(sso))
    time.sleep(2)  # the replicas' and actors' buffered lines reach their files
    leaks = [(path.name, secret[:12]) for path, line in _log_lines(_ray_logs().parent) for secret in secrets
             if secret in line]
    assert leaks == []
