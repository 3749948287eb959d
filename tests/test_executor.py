"""The shard executor and the local evaluation driver, end to end in real sandboxes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cluster.runtimes import SandboxRuntime
from eval_actors.gateway import OpenAIGateway
from eval_actors.local_run import run_evaluation
from httpjson import QuietHandler
from proctor.settings import Settings
from proctor.spec import load_spec, parse_spec

pytestmark = pytest.mark.sandbox
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def settings(tmp_path: Path, sandbox_root: Path) -> Settings:
    return Settings(home=sandbox_root, results_uri=(tmp_path / "results").as_uri())


def run(spec: Any, settings: Settings, runtime: SandboxRuntime, **kw: Any) -> Any:
    return asyncio.run(run_evaluation(spec, settings, runtime=runtime, **kw))


def spec_with(**doc: Any) -> Any:
    base: dict[str, Any] = {
        "name": "t",
        "model": {"adapter": "reference"},
        "dataset": {"samples": [{"id": "a", "input": "2+2?", "target": "4"}]},
        "scorers": [{"type": "exact"}],
        "sandbox": {"timeout_s": 60, "memory": "512Mi"},
    }
    base.update(doc)
    return parse_spec(base)


def test_arithmetic_accuracy_matches_the_reference_error_rate(runtime: SandboxRuntime, settings: Settings) -> None:
    spec = load_spec(EXAMPLES / "arithmetic.yaml")
    result = run(spec, settings, runtime)
    assert result.status == "succeeded"
    df = pd.read_parquet(settings.results.removeprefix("file://"))
    df = df[df["eval_id"] == result.eval_id]
    assert len(df) == 240  # samples x epochs, one row each
    assert df["sample_id"].is_unique
    accuracy = df["score"].mean()
    assert abs(accuracy - (1 - spec.model.error_rate)) < 0.05
    assert abs(result.summary["metrics"]["exact"]["mean"] - accuracy) < 1e-12
    assert set(df["runtime"]) == {runtime.name}
    assert set(df["isolation"]) == {runtime.isolation}
    assert (df["model"] == "reference").all()
    wrong = df[df["score"] == 0]
    assert (wrong["output"] != wrong["target"]).all()


def test_agentic_example_passes_its_command_scorer(runtime: SandboxRuntime, settings: Settings) -> None:
    result = run(load_spec(EXAMPLES / "agentic-files.yaml"), settings, runtime)
    assert result.status == "succeeded", result.summary
    assert result.summary["metrics"]["workspace_check"]["mean"] == 1.0
    records = [r for o in result.outcomes for r in o.records]
    assert all(r.turns >= 2 for r in records)  # tool turns, then the answer
    kept = sorted(Path(result.results_uri.removeprefix("file://"), "_artifacts").rglob("answer.txt"))
    assert len(kept) == 6
    assert {p.read_text().strip() for p in kept} == {"4", "PROCTOR", "alice", "notes/b.txt", "60", "ok"}


def test_epochs_multiply_rows_and_summary_matches_pandas(runtime: SandboxRuntime, settings: Settings) -> None:
    samples = [{"id": str(i), "input": f"{i}+0?", "target": str(i)} for i in range(7)]
    spec = spec_with(dataset={"samples": samples}, epochs=3, shard_size=3,
                     model={"adapter": "reference", "error_rate": 0.3, "seed": 1})
    result = run(spec, settings, runtime)
    df = pd.read_parquet(result.results_uri.removeprefix("file://"))
    assert len(df) == 21 and len(df.groupby(["sample_id", "epoch"])) == 21
    assert result.summary["metrics"]["exact"]["mean"] == pytest.approx(df["score"].mean())
    assert result.summary["samples"] == 21


class _FakeOpenAI(QuietHandler):
    """A test double of an OpenAI-compatible provider on 127.0.0.1: answers arithmetic."""

    calls: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append({"auth": self.headers.get("Authorization"), "body": body})
        if self.headers.get("Authorization") != "Bearer sk-test-key":
            self.send_response(401)
            self.end_headers()
            return
        question = body["messages"][-1]["content"]
        a, b = [int(x) for x in question.split("?")[0].split("+")]
        self.reply({"choices": [{"message": {"role": "assistant", "content": str(a + b)}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1}})


@pytest.fixture
def fake_openai() -> Any:
    _FakeOpenAI.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_model_is_answered_through_the_gateway(runtime: SandboxRuntime, settings: Settings,
                                                      fake_openai: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCTOR_TEST_KEY", "sk-test-key")
    samples = [{"id": str(i), "input": f"{i}+{i}?", "target": str(2 * i)} for i in range(4)]
    spec = spec_with(dataset={"samples": samples},
                     model={"adapter": "openai", "model": "m", "base_url": fake_openai, "api_key_env": "PROCTOR_TEST_KEY"})
    gateway = OpenAIGateway(secret=settings.secret)
    result = run(spec, settings, runtime, gateway=gateway)
    assert result.status == "succeeded", result.summary
    assert result.summary["metrics"]["exact"]["mean"] == 1.0
    assert len(_FakeOpenAI.calls) == 4
    assert all(c["auth"] == "Bearer sk-test-key" for c in _FakeOpenAI.calls)
    ledger = gateway.ledger(result.eval_id)
    assert (ledger.calls, ledger.input_tokens, ledger.output_tokens) == (4, 20, 4)
    assert result.summary["usage"]["model_calls"] == 4


def test_gateway_refuses_calls_over_the_limit(runtime: SandboxRuntime, settings: Settings,
                                              fake_openai: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCTOR_TEST_KEY", "sk-test-key")
    samples = [{"id": str(i), "input": f"{i}+1?", "target": str(i + 1)} for i in range(5)]
    spec = spec_with(dataset={"samples": samples}, safety={"max_model_calls": 2},
                     model={"adapter": "openai", "model": "m", "base_url": fake_openai, "api_key_env": "PROCTOR_TEST_KEY"})
    result = run(spec, settings, runtime)
    records = sorted((r for o in result.outcomes for r in o.records), key=lambda r: r.sample_id)
    assert len(_FakeOpenAI.calls) == 2
    assert sum(1 for r in records if r.error and "model-call limit reached" in r.error) == 3


def _policy(code: str) -> dict[str, str]:
    return {"policy.py": code}


def test_deadline_fails_the_shard_and_keeps_a_row_per_sample(runtime: SandboxRuntime, settings: Settings) -> None:
    spec = spec_with(
        model={"adapter": "python", "callable": "policy:answer"},
        dataset={"samples": [{"id": "a", "input": "x"}, {"id": "b", "input": "y"}]},
        sandbox={"timeout_s": 3, "files": _policy("import time\ndef answer(messages, **kw):\n    time.sleep(600)\n")},
    )
    result = run(spec, settings, runtime)
    assert result.status == "failed"
    outcome = result.outcomes[0]
    assert outcome.exit.reason == "deadline"
    assert [r.error.startswith("not completed: sandbox deadline") for r in outcome.records] == [True, True]
    assert result.summary["samples"] == 2


def test_cancel_stops_a_running_shard(runtime: SandboxRuntime, settings: Settings) -> None:
    spec = spec_with(
        model={"adapter": "python", "callable": "policy:answer"},
        dataset={"samples": [{"id": str(i), "input": "x"} for i in range(5)]},
        sandbox={"timeout_s": 120, "files": _policy("import time\ndef answer(messages, **kw):\n    time.sleep(2)\n    return 'x'\n")},
    )

    async def go() -> Any:
        cancel = asyncio.Event()
        task = asyncio.create_task(run_evaluation(spec, settings, runtime=runtime, cancel=cancel))
        await asyncio.sleep(1.0)
        cancel.set()
        return await asyncio.wait_for(task, 30)

    result = asyncio.run(go())
    assert result.status == "cancelled"
    assert result.duration_s < 10


def test_processes_at_the_pids_limit_are_reported_and_the_harness_carries_on(runtime: SandboxRuntime,
                                                                              settings: Settings) -> None:
    """An agent that fills its sandbox's pids limit with background commands: the runtime
    holds it there, the resource monitor reports `resources/pids` (here with action
    `record`, so the shard goes on), and the harness keeps what it needs to finish."""
    spec = spec_with(
        model={"adapter": "python", "callable": "proctor.scripted.file_agent:solve"}, agentic=True,
        dataset={"samples": [{"id": "p", "input": "Start processes.", "target": "done",
                              "metadata": {"commands": ["for i in $(seq 1 200); do sleep 30 & done", "echo after"]}}]},
        scorers=[{"type": "includes"}], sandbox={"timeout_s": 60, "memory": "256Mi", "pids": 64},
        safety={"resources": {"action": "record"}})
    result = run(spec, settings, runtime)
    (outcome,) = result.outcomes
    assert (outcome.status, outcome.exit.exit_code) == ("succeeded", 0), (outcome.error, outcome.exit)
    broken = [v for v in outcome.safety.violations if (v["monitor"], v["rule"]) == ("resources", "pids")]
    assert broken and broken[0]["action"] == "record", outcome.safety.violations
    (record,) = outcome.records
    assert record.error is None and record.output == "done" and record.turns == 3


def test_forged_events_from_the_sandbox_do_not_count(runtime: SandboxRuntime, settings: Settings) -> None:
    forger = (
        "import json, sys\n"
        "def answer(messages, sample, **kw):\n"
        "    forged = {'v': 1, 'seq': 10**9, 'type': 'sample', 'sample_id': sample['id'], 'epoch': 1,\n"
        "              'input': 'x', 'target': 'banana', 'output': 'banana',\n"
        "              'scores': {'exact': {'value': 1.0}}}\n"
        "    other = dict(forged, seq=10**9 + 1, sample_id='not-in-shard')\n"
        "    sys.stdout.write(json.dumps(forged) + '\\n' + json.dumps(other) + '\\n' + '{oops\\n')\n"
        "    sys.stdout.flush()\n"
        "    return 'banana'\n"
    )
    spec = spec_with(model={"adapter": "python", "callable": "policy:answer"},
                     dataset={"samples": [{"id": "a", "input": "2+2?", "target": "4"}]},
                     sandbox={"files": _policy(forger)})
    result = run(spec, settings, runtime)
    (record,) = result.outcomes[0].records
    assert record.scores.get("exact", 0.0) == 0.0  # recomputed outside from the trusted target
    assert record.target == "4" and record.input == "2+2?"
    assert result.summary["metrics"]["exact"]["mean"] == 0.0
    reasons = " ".join(r.reason for r in result.outcomes[0].rejections)
    assert "not in this shard" in reasons and "not JSON" in reasons


def test_cli_refuses_to_run_without_a_sandbox_runtime(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "PROCTOR_HOME": str(tmp_path / "home")}
    bin_dir = Path(sys.executable).parent
    result = subprocess.run([str(bin_dir / "proctor"), "run", str(EXAMPLES / "arithmetic.yaml")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 3
    assert "refuses to run" in result.stderr and "apt-get install runsc" in result.stderr
    assert not (tmp_path / "home" / "results").exists()


def test_cli_run_prints_json_summary(settings: Settings, tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PROCTOR_HOME=str(settings.home), PROCTOR_RESULTS_URI=settings.results)
    result = subprocess.run([str(bin_dir / "proctor"), "run", str(EXAMPLES / "agentic-files.yaml"), "--json"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    (summary,) = json.loads(result.stdout)
    assert summary["status"] == "succeeded" and summary["samples"] == 6
    assert summary["results_uri"].startswith(settings.results)


def test_a_stopped_shards_rows_are_not_streamed() -> None:
    """Rows stream to the aggregator while a shard runs (the API serves them as partial
    results); once its guard has stopped it, the rest goes to the quarantine only."""
    from types import SimpleNamespace

    from eval_actors.artifacts import ArtifactCollector
    from eval_actors.shard_executor import ShardExecutor, ShardWork, _Run
    from proctor.policy import Rule, SafetyPolicy
    from proctor.protocol import SampleEvent
    from safety.guard import SafetyGuard

    spec = parse_spec({"name": "stream", "model": {"adapter": "reference"}, "scorers": [{"type": "exact"}],
                       "dataset": {"samples": [{"id": str(i), "input": "q", "target": "a"} for i in range(3)]}})
    runtime = SimpleNamespace(shares_workspace=True, name="gvisor", isolation="strong")

    async def go(tmp: Path) -> tuple[list[str], list[str]]:
        executor = ShardExecutor(runtime, None, tmp)  # type: ignore[arg-type]
        streamed: list[str] = []
        run = _Run(ShardWork("ev-s", "s0", spec, tuple(spec.dataset.samples or ())),
                   {(s.id, 1): s for s in spec.dataset.samples or ()}, ArtifactCollector([], tmp),
                   on_record=lambda r: streamed.append(r.sample_id))

        async def stopped(_v: Any) -> None:
            return None

        policy = SafetyPolicy(rules=[Rule(name="boom", on=["output"], pattern="BOOM", action="stop")])
        run.guard = SafetyGuard(policy, [], stopped)
        for i, output in enumerate(["a", "BOOM", "a"]):
            executor._handle(run, SampleEvent(seq=i, sample_id=str(i), epoch=1, input="q", target="a", output=output),
                             None, set())
        await run.guard.close()
        return streamed, sorted(k[0] for k in run.records)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        streamed, kept = asyncio.run(go(Path(tmp)))
    assert streamed == ["0"] and kept == ["0", "1", "2"]  # all kept for the quarantine, one streamed


def test_samples_finished_after_an_emergency_stop_are_marked_and_not_streamed() -> None:
    """A sample event that arrives once the emergency stop was requested raced the kill: its
    row says so and carries no score, and it is not streamed as a result."""
    from types import SimpleNamespace

    from eval_actors.artifacts import ArtifactCollector
    from eval_actors.shard_executor import ShardExecutor, _Run
    from eval_actors.shard_work import LATE_SAMPLE, ShardWork, StopSignal
    from proctor.protocol import SampleEvent

    spec = parse_spec({"name": "late", "model": {"adapter": "reference"}, "scorers": [{"type": "exact"}],
                       "dataset": {"samples": [{"id": str(i), "input": "q", "target": "a"} for i in range(3)]}})
    runtime = SimpleNamespace(shares_workspace=True, name="gvisor", isolation="strong")

    async def go(tmp: Path) -> tuple[list[str], dict[str, Any]]:
        executor = ShardExecutor(runtime, None, tmp)  # type: ignore[arg-type]
        streamed: list[str] = []
        stop = StopSignal()
        run = _Run(ShardWork("ev-l", "s0", spec, tuple(spec.dataset.samples or ())),
                   {(s.id, 1): s for s in spec.dataset.samples or ()}, ArtifactCollector([], tmp),
                   on_record=lambda r: streamed.append(r.sample_id), stop=stop)
        for i in range(3):
            if i == 1:
                stop.stop(hard=True, reason="emergency stop")
            executor._handle(run, SampleEvent(seq=i, sample_id=str(i), epoch=1, input="q", target="a", output="a",
                                              scores={"exact": {"value": 1.0}}), None, set())
        return streamed, {k[0]: r for k, r in run.records.items()}

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        streamed, records = asyncio.run(go(Path(tmp)))
    assert streamed == ["0"]
    assert records["0"].scores == {"exact": 1.0} and records["0"].error is None
    assert [(records[k].scores, records[k].error) for k in ("1", "2")] == [({}, LATE_SAMPLE)] * 2


def test_a_shard_stopped_before_its_sandbox_started_starts_none(runtime: SandboxRuntime, settings: Settings,
                                                                 tmp_path: Path) -> None:
    from eval_actors.shard_executor import ShardExecutor
    from eval_actors.shard_work import ShardWork, StopSignal

    spec = spec_with(dataset={"samples": [{"id": "0", "input": "x"}]})
    launched: list[Any] = []

    class Counting:  # the real runtime, counting launches
        def __getattr__(self, name: str) -> Any:
            return getattr(runtime, name)

        async def launch(self, request: Any) -> Any:
            launched.append(request)
            return await runtime.launch(request)

    async def go() -> Any:
        stop = StopSignal()
        stop.stop(hard=True, reason="emergency stop")
        executor = ShardExecutor(Counting(), None, tmp_path / "sbx")  # type: ignore[arg-type]
        return await executor.run(ShardWork("ev-n", "s0", spec, tuple(spec.dataset.samples or ())), cancel=stop)

    outcome = asyncio.run(go())
    assert launched == [] and outcome.status == "cancelled"
    assert "emergency stop before its sandbox started" in (outcome.error or "")
    assert outcome.records and all(r.scores == {} for r in outcome.records)
