"""Traces: off at no cost; exported over OTLP/HTTP and OTLP/gRPC to a real receiver; and the
span tree of evaluations run through the platform, across its processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from apiserver import auth, spec, wait_final
from httpjson import QuietHandler
from otlpreceiver import OtlpReceiver, ReceivedSpan
from proctor.observability import tracing
from proctor.observability.tracing import NOOP, Parent

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    """`code` in a fresh interpreter (tracing is set up once per process): its stdout."""
    import os

    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# ------------------------------------------------------------------------------ off


def test_off_every_helper_is_the_no_op_and_nothing_of_opentelemetry_is_loaded() -> None:
    out = run_python("""
        import asyncio, sys
        from proctor.observability import tracing
        from proctor.settings import Settings
        from eval_actors import traces
        assert tracing.setup(Settings(), "test") is False and not tracing.enabled()
        with tracing.span("x", eval_id="e") as s:
            s.set(a=1); s.event("e"); s.fail("no")
        tracing.start("y", activate=True).end(error="no")
        tracing.emit("z", trace_id=1, span_id=2, parent_id=None, start_ns=0, end_ns=1)
        assert tracing.carrier() is None and tracing.current() is None and tracing.new_trace() is None
        assert traces.new_context({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, "ev") is None or True
        assert traces.child("w", None) is tracing.NOOP
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
    """)
    assert out.strip() == "[]"
    assert tracing.span("x") is NOOP and tracing.start("x") is NOOP  # this process has no endpoint either


def test_traceparent_round_trip_and_bad_ones_are_ignored() -> None:
    p = Parent(0xABC, 0xDEF, True)
    assert p.traceparent == f"00-{0xABC:032x}-{0xDEF:016x}-01"
    assert Parent.parse(p.traceparent) == p and Parent.parse({"traceparent": p.traceparent}) == p
    assert Parent.parse(f"00-{0xABC:032x}-{0xDEF:016x}-00").sampled is False
    for bad in (None, "", "garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "ff-" + "1" * 32 + "-" + "1" * 16 + "-01",
                "00-" + "x" * 32 + "-" + "1" * 16 + "-01", {"other": "1"}):
        assert Parent.parse(bad) is None, bad


def test_derived_ids_are_the_same_everywhere_and_differ_by_key() -> None:
    a = tracing.derived_id(7, "shard", "ev-1", "00000", 0)
    assert a == tracing.derived_id(7, "shard", "ev-1", "00000", 0)
    assert len({a, tracing.derived_id(7, "shard", "ev-1", "00000", 1), tracing.derived_id(8, "shard", "ev-1", "00000", 0),
                tracing.derived_id(7, "evaluation", "ev-1")}) == 4
    assert 0 < a < 2**64


# ------------------------------------------------------------------------------ export

SPANS_CODE = """
    import asyncio
    from proctor.observability import tracing
    from proctor.settings import Settings
    from eval_actors import traces
    assert tracing.setup(Settings(otel_endpoint="{endpoint}", otel_service_name="proctor-test"), "unit")
    ctx = traces.new_context(None, "ev-unit")
    own = traces.evaluation_span(ctx)

    async def main():
        with tracing.span("outer", parent=traces.shard_span(ctx, "ev-unit", "00000", 0), eval_id="ev-unit") as outer:
            async def child():
                with tracing.span("inner", shard_id="00000"):
                    raise ValueError("broken on purpose")
            try:
                await asyncio.create_task(child())
            except ValueError:
                pass
            print(tracing.carrier()["traceparent"])
    asyncio.run(main())
    tracing.emit("evaluation", trace_id=own.trace_id, span_id=own.span_id, parent_id=None, start_ns=1, end_ns=2,
                 error="failed", eval_id="ev-unit")
    assert tracing.flush()
"""


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_spans_reach_an_otlp_receiver_with_their_parents_and_errors(transport: str) -> None:
    receiver = OtlpReceiver(grpc=transport == "grpc")
    try:
        endpoint = receiver.http_url if transport == "http" else receiver.grpc_url
        outer_parent = Parent.parse(run_python(SPANS_CODE.replace("{endpoint}", endpoint)).strip())
        spans = {s.name: s for s in receiver.wait_for(lambda got: len(got) >= 3, timeout=30)}
    finally:
        receiver.close()
    assert set(spans) == {"outer", "inner", "evaluation"}
    outer, inner, ev = spans["outer"], spans["inner"], spans["evaluation"]
    assert outer.span_id == f"{outer_parent.span_id:016x}" and outer.trace_id == f"{outer_parent.trace_id:032x}"
    assert inner.parent_id == outer.span_id  # through an asyncio task
    shard = tracing.derived_id(int(ev.trace_id, 16), "shard", "ev-unit", "00000", 0)
    assert outer.parent_id == f"{shard:016x}" and ev.parent_id is None
    assert inner.error == "broken on purpose" and "exception" in inner.events
    assert ev.error == "failed" and outer.error is None
    assert outer.attributes["proctor.eval_id"] == "ev-unit" and inner.attributes["proctor.shard_id"] == "00000"
    assert {s.resource["service.name"] for s in spans.values()} == {"proctor-test"}
    assert {s.process for s in spans.values()} == {"unit"}


def test_an_unreachable_endpoint_costs_the_work_nothing() -> None:
    from ports import free_port

    out = run_python(f"""
        import time
        from proctor.observability import tracing
        from proctor.settings import Settings
        tracing.setup(Settings(otel_endpoint="http://127.0.0.1:{free_port()}"), "unit")
        t = time.perf_counter()
        for i in range(200):
            with tracing.span("work", i=i):
                pass
        print(time.perf_counter() - t)
    """)
    assert float(out) < 5  # spans are queued and exported beside the work; a failed export loses only them


def test_settings_refuse_an_endpoint_and_protocol_that_do_not_go_together() -> None:
    from proctor.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="PROCTOR_OTEL_PROTOCOL"):
        load_settings(otel_endpoint="grpc://127.0.0.1:4317", otel_protocol="http")
    with pytest.raises(SettingsError, match="PROCTOR_OTEL_ENDPOINT"):
        load_settings(otel_endpoint="127.0.0.1:4317")


# ------------------------------------------------------------------------------ the platform


def _tree_problems(spans: list[ReceivedSpan], root_parent: str | None) -> list[str]:
    """Every span's parent is in the trace, but the one root's, whose parent is `root_parent`."""
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_id not in ids]
    problems = [f"{s.name} ({s.process}) has a parent that is not in the trace" for s in roots
                if s.parent_id != root_parent]
    if len(roots) != 1:
        problems.append(f"{len(roots)} roots: {[s.name for s in roots]}")
    return problems


def _children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_id == parent.span_id]


def _only(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{len(found)} spans named {name}"
    return found[0]


class FakeProvider(QuietHandler):
    """An OpenAI-compatible model provider: answers every call with the sample's target."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        asked = body["messages"][-1]["content"]
        self.reply({"choices": [{"message": {"role": "assistant", "content": asked.rstrip("?")}}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 2}})


@pytest.fixture(scope="module")
def provider() -> Any:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeProvider)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


EXPECTED = {"evaluation": "scheduler", "evaluation.submit": "scheduler", "shard": "scheduler",
            "shard.queue_wait": "scheduler", "shard.placement": "scheduler", "shard.supervise": "supervisor",
            "shard.execute": "supervisor", "sandbox.launch": "supervisor", "sandbox.run": "supervisor",
            "sample": "supervisor", "stage.setup": "supervisor", "stage.eval": "supervisor",
            "stage.score": "supervisor", "stage.cleanup": "supervisor", "gateway.generate": "supervisor", "aggregator.finish_shard": "aggregator",
            "results.write_part": "results-writer", "evaluation.finalize": "scheduler",
            "aggregator.finalize": "aggregator", "POST /api/v1/evaluations": "api"}


@pytest.mark.ray
@pytest.mark.slow
def test_an_evaluation_is_one_trace_from_the_api_to_its_results(api: Any, otlp: OtlpReceiver, provider: str) -> None:
    client, tokens, _ = api
    caller = Parent(0x5EED << 64 | 0xC0FFEE, 0xCA11E4, True)  # the user's own trace, continued
    body = {**spec("traced", samples=3), "shard_size": 2}
    body["model"] = {"adapter": "openai", "model": "m", "base_url": provider}
    r = client.post("/api/v1/evaluations", json=body,
                    headers={**auth(tokens["rita"]), "traceparent": caller.traceparent})
    assert r.status_code == 202, r.text
    trace_id = f"{caller.trace_id:032x}"
    assert r.json()["trace_id"] == trace_id == r.headers["x-proctor-trace-id"]
    assert Parent.parse(r.headers["traceparent"]).trace_id == caller.trace_id
    ev = wait_final(client, tokens["rita"], r.json()["id"])
    assert ev["status"] == "succeeded" and ev["trace_id"] == trace_id, ev

    def complete(spans: list[ReceivedSpan]) -> bool:
        names = Counter(s.name for s in spans)
        return (set(EXPECTED) <= set(names) and names["shard"] == 2 and names["sample"] == 3 and names["stage.eval"] == 3
                and names["gateway.generate"] == 3 and names["aggregator.finish_shard"] == 2
                and names["results.write_part"] >= 2)  # the writers' spans come from processes of their own

    spans = otlp.wait_for(complete, trace_id=trace_id)
    assert _tree_problems(spans, f"{caller.span_id:016x}") == []
    for s in spans:
        assert s.process == EXPECTED[s.name], (s.name, s.process)
        assert s.start_ns <= s.end_ns
    api_span = _only(spans, "POST /api/v1/evaluations")
    assert api_span.parent_id == f"{caller.span_id:016x}" and api_span.kind == 2  # SERVER
    assert api_span.attributes["http.response.status_code"] == 202
    evaluation = _only(spans, "evaluation")
    assert evaluation.parent_id == api_span.span_id
    assert evaluation.attributes["proctor.eval_id"] == ev["id"] and evaluation.attributes["proctor.status"] == "succeeded"
    assert {s.name for s in _children(spans, evaluation)} == {"evaluation.submit", "shard", "evaluation.finalize"}
    shards = sorted((s for s in spans if s.name == "shard"), key=lambda s: s.attributes["proctor.shard_id"])
    assert [s.attributes["proctor.shard_id"] for s in shards] == ["00000", "00001"]
    for shard in shards:  # written by the scheduler; its children by the scheduler and a supervisor
        assert shard.error is None and shard.attributes["proctor.status"] == "succeeded"
        assert {s.name for s in _children(spans, shard)} == {"shard.queue_wait", "shard.placement", "shard.supervise"}
        supervise = _only(_children(spans, shard), "shard.supervise")
        assert {s.name for s in _children(spans, supervise)} == {"shard.execute", "aggregator.finish_shard"}
        execute = _only(_children(spans, supervise), "shard.execute")
        assert execute.attributes["proctor.runtime"] == "gvisor" and execute.attributes["proctor.model"] == "m"
        run = _only(_children(spans, execute), "sandbox.run")
        inside = Counter(s.name for s in _children(spans, run))
        assert inside["sample"] == inside["gateway.generate"] == shard.attributes["proctor.samples"]
        finish = _only(_children(spans, supervise), "aggregator.finish_shard")
        assert {s.name for s in _children(spans, finish)} == {"results.write_part"}
    sample = next(s for s in spans if s.name == "sample")
    assert {"proctor.sample_id", "proctor.epoch"} <= set(sample.attributes)
    stages = sorted(_children(spans, sample), key=lambda s: s.start_ns)
    assert [s.name for s in stages] == ["stage.setup", "stage.eval", "stage.score", "stage.cleanup"]
    assert all(sample.start_ns <= s.start_ns <= s.end_ns <= sample.end_ns for s in stages)
    call = next(s for s in spans if s.name == "gateway.generate")
    assert call.attributes["proctor.model"] == "m" and call.attributes["proctor.input_tokens"] == 7
    finalize = _only(spans, "evaluation.finalize")
    assert {s.name for s in _children(spans, finalize)} == {"aggregator.finalize"}
    assert len({s.process for s in spans}) == 5  # api, scheduler, supervisor, aggregator, results-writer


@pytest.mark.ray
@pytest.mark.slow
def test_a_safety_stop_is_an_error_on_its_spans(api: Any, otlp: OtlpReceiver) -> None:
    """The red-team suite's credential search: the stop, and the shard and evaluation it
    ended, are errors in the trace."""
    client, tokens, _ = api
    suite = yaml.safe_load((ROOT / "examples" / "red-team.yaml").read_text())
    canary = next(s for s in suite["dataset"]["samples"] if s["id"] == "canary")
    body = {**suite, "name": "traced-stop", "dataset": {"samples": [canary]}}
    r = client.post("/api/v1/evaluations", json=body, headers=auth(tokens["rita"]))
    assert r.status_code == 202, r.text
    ev = wait_final(client, tokens["rita"], r.json()["id"])
    assert ev["status"] == "safety_stopped", ev
    needed = {"evaluation", "shard", "shard.execute", "sandbox.run", "safety.stop"}  # from three processes
    spans = otlp.wait_for(lambda got: needed <= {s.name for s in got}, trace_id=ev["trace_id"])
    stop = _only(spans, "safety.stop")
    assert stop.error and stop.error.startswith("safety stop by") and stop.attributes["proctor.action"] == "stop"
    assert _only(spans, "shard").error and _only(spans, "shard").attributes["proctor.status"] == "safety_stopped"
    assert _only(spans, "evaluation").error
    execute = _only(spans, "shard.execute")  # a rule on the sandbox's stream stops it from inside sandbox.run
    assert stop.parent_id in (execute.span_id, _only(spans, "sandbox.run").span_id) and execute.error
