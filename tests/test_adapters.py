from __future__ import annotations

import io
import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from proctor.harness.adapters import (
    ModelError,
    OpenAIAdapter,
    PythonAdapter,
    ReferenceAdapter,
    fit_messages,
    parse_tool_calls,
)
from proctor.harness.channel import Cancelled, Channel
from proctor.harness.scorers import build_scorer
from proctor.scripted import echo, file_agent
from proctor.protocol import ShardSample
from proctor.spec import (
    ChoiceScorer,
    ExactScorer,
    IncludesScorer,
    NumericScorer,
    OpenAIModel,
    PythonModel,
    ReferenceModel,
)


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))


def reference(error_rate: float = 0.0, seed: int = 0) -> ReferenceAdapter:
    return ReferenceAdapter(ReferenceModel(adapter="reference", error_rate=error_rate, seed=seed))


def ask(adapter: Any, sample: ShardSample, epoch: int = 1, workdir: Path = Path(".")) -> str:
    adapter.begin_sample(sample, epoch, workdir)
    return adapter.generate([{"role": "user", "content": "question here"}], None).text


def numbered(count: int) -> list[ShardSample]:
    return [ShardSample(id=f"s{i}", input="q", target=f"t{i}") for i in range(count)]


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_reference_error_rate_over_1000_samples_is_close_to_the_configured_rate(rate):
    adapter = reference(rate, seed=7)
    wrong = sum(ask(adapter, s) != s.target for s in numbered(1000))
    assert abs(wrong / 1000 - rate) <= 0.03


def test_reference_answers_are_deterministic_across_runs_and_depend_on_seed_and_epoch():
    samples = numbered(200)
    first = [ask(reference(0.5, seed=1), s) for s in samples]
    again = [ask(reference(0.5, seed=1), s) for s in samples]
    other_seed = [ask(reference(0.5, seed=2), s) for s in samples]
    other_epoch = [ask(reference(0.5, seed=1), s, epoch=2) for s in samples]
    assert first == again
    assert first != other_seed
    assert first != other_epoch


def test_reference_answers_choice_samples_with_the_target_letter():
    choices = ["Lyon", "Paris", "Nice"]
    assert ask(reference(), ShardSample(id="c", input="capital?", target="Paris", choices=choices)) == "B"
    assert ask(reference(), ShardSample(id="c", input="capital?", target="C", choices=choices)) == "C"


@pytest.mark.parametrize(
    "target, choices",
    [("Paris", ["Lyon", "Paris"]), ("A", ["x", "y", "z"]), ("42", None), ("-0.5", None), ("0", None),
     ("hello world", None), ("level", None), ("n", None), ("", None)],
)
def test_reference_wrong_answers_fail_exact_includes_numeric_and_choice_scorers(target, choices):
    sample = ShardSample(id="w", input="q", target=target, choices=choices)
    wrong = ask(reference(1.0), sample)
    right = ask(reference(0.0), sample)
    specs = [ExactScorer(type="exact"), IncludesScorer(type="includes")]
    if choices:
        specs = [ChoiceScorer(type="choice")]
    elif target.lstrip("-").replace(".", "").isdigit():
        specs.append(NumericScorer(type="numeric"))
    for spec in specs:
        scorer = build_scorer(spec)
        assert scorer.score(right, sample, Path(".")).value == 1.0, (spec.type, right)
        if target:
            assert scorer.score(wrong, sample, Path(".")).value == 0.0, (spec.type, wrong)


def test_reference_counts_words_as_tokens():
    adapter = reference()
    adapter.begin_sample(ShardSample(id="u", input="q", target="two words"), 1, Path("."))
    reply = adapter.generate([{"role": "user", "content": "one two three"}], None)
    assert (reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.calls) == (3, 2, 1)


def write_policy(directory: Path, name: str, body: str) -> PythonAdapter:
    (directory / f"{name}.py").write_text(body)
    return PythonAdapter(PythonModel(adapter="python", callable=f"{name}:act", params={"greeting": "hi"}), directory)


def test_python_adapter_never_passes_the_target_and_passes_params(tmp_path):
    adapter = write_policy(tmp_path, "peek_policy", "def act(messages, sample, workdir, greeting):\n"
                           "    return repr(sorted(sample)) + '|' + greeting + '|' + workdir\n")
    sample = ShardSample(id="p", input="q", target="SECRET", metadata={"k": 1})
    text = ask(adapter, sample, workdir=tmp_path / "p-e1")
    assert text == f"{sorted(['id', 'input', 'choices', 'metadata'])!r}|hi|{tmp_path / 'p-e1'}"
    assert "SECRET" not in text


def test_python_adapter_parses_tool_calls_from_a_dict(tmp_path):
    adapter = write_policy(tmp_path, "tool_policy", "def act(messages, **kw):\n"
                           "    return {'content': 'thinking', 'tool_calls': [{'id': 'x1', 'command': 'ls'}]}\n")
    adapter.begin_sample(ShardSample(id="t", input="q"), 1, tmp_path)
    reply = adapter.generate([{"role": "user", "content": "q"}], None)
    assert reply.text == "thinking"
    assert [(c.id, c.command, c.problem) for c in reply.tool_calls] == [("x1", "ls", None)]


def test_python_adapter_rejects_an_unusable_return_value(tmp_path):
    adapter = write_policy(tmp_path, "bad_policy", "def act(messages, **kw):\n    return 42\n")
    with pytest.raises(ModelError, match="return a str or a dict"):
        ask(adapter, ShardSample(id="b", input="q"), workdir=tmp_path)


def test_python_adapter_reports_a_missing_callable(tmp_path):
    adapter = PythonAdapter(PythonModel(adapter="python", callable="no_such_module_here:act"), tmp_path)
    with pytest.raises(ModelError, match="cannot load no_such_module_here:act"):
        ask(adapter, ShardSample(id="m", input="q"), workdir=tmp_path)


def test_parse_tool_calls_reads_openai_format_and_reports_bad_calls():
    calls = parse_tool_calls([
        {"id": "a", "type": "function", "function": {"name": "bash", "arguments": json.dumps({"command": "ls -l"})}},
        {"id": "b", "type": "function", "function": {"name": "python", "arguments": "{}"}},
        {"id": "c", "type": "function", "function": {"name": "bash", "arguments": "not json"}},
        {"id": "d", "command": "pwd"},
    ])
    assert [(c.id, c.command) for c in calls] == [("a", "ls -l"), ("b", None), ("c", None), ("d", "pwd")]
    assert "unknown tool 'python'" in calls[1].problem
    assert "string 'command'" in calls[2].problem


def test_fit_messages_keeps_the_opening_and_the_latest_turns():
    opening = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    turns = []
    for i in range(600):
        turns += [{"role": "assistant", "content": f"a{i}"}, {"role": "tool", "content": f"t{i}"}]
    fitted = fit_messages(opening + turns)
    assert len(fitted) <= 1000
    assert fitted[:2] == opening and fitted[2]["role"] == "assistant"
    assert fitted[-1] == {"role": "tool", "content": "t599"}


class _Gateway(io.BytesIO):
    """Stands in for the supervisor: answers each `generate` the channel writes."""

    def __init__(self, answer: dict[str, Any]):
        super().__init__()
        self.channel: Channel | None = None
        self.answer = answer
        self.calls: list[dict[str, Any]] = []

    def write(self, data: bytes) -> int:
        event = json.loads(data)
        if event["type"] == "generate":
            self.calls.append(event)
            reply = {"v": 1, "type": "generate_result", "id": event["id"], **self.answer}
            threading.Timer(0.01, self.channel._receive, args=(json.dumps(reply).encode(),)).start()
        return len(data)


def openai_with(answer: dict[str, Any]) -> tuple[OpenAIAdapter, _Gateway, Channel]:
    gateway = _Gateway(answer)
    channel = Channel(gateway, first_seq=1)
    gateway.channel = channel
    spec = OpenAIModel(adapter="openai", model="m", base_url="https://x.example/v1", max_tokens=32, temperature=0.2)
    return OpenAIAdapter(spec, channel), gateway, channel


def test_openai_adapter_sends_generate_and_returns_the_result():
    call = {"id": "k", "type": "function", "function": {"name": "bash", "arguments": "{\"command\": \"ls\"}"}}
    adapter, gateway, _ = openai_with({"output": "hello", "tool_calls": [call],
                                       "usage": {"input_tokens": 5, "output_tokens": 1, "calls": 1}})
    reply = adapter.generate([{"role": "user", "content": "hi"}], [{"type": "function", "function": {"name": "bash"}}])
    assert reply.text == "hello" and reply.tool_calls[0].command == "ls"
    assert reply.usage.input_tokens == 5
    (sent,) = gateway.calls
    assert (sent["max_tokens"], sent["temperature"], sent["tools"][0]["function"]["name"]) == (32, 0.2, "bash")


def test_openai_adapter_raises_the_gateway_error():
    adapter, _, _ = openai_with({"error": "quota exceeded"})
    with pytest.raises(ModelError, match="quota exceeded"):
        adapter.generate([{"role": "user", "content": "hi"}], None)


def test_openai_adapter_stops_waiting_on_cancel():
    adapter, gateway, channel = openai_with({})
    gateway.answer = None
    gateway.write = lambda data: len(data)
    threading.Timer(0.1, channel.cancel, args=("stop",)).start()
    with pytest.raises(Cancelled):
        adapter.generate([{"role": "user", "content": "hi"}], None)


def test_file_agent_issues_one_command_a_turn_then_answers_done():
    sample = {"id": "f", "input": "q", "choices": None, "metadata": {"commands": ["mkdir d", "touch d/x"]}}
    chat: list[dict[str, Any]] = [{"role": "user", "content": "q"}]
    first = file_agent.solve(chat, sample=sample, workdir=".")
    assert first["tool_calls"][0]["command"] == "mkdir d"
    chat += [{"role": "assistant", "content": ""}, {"role": "tool", "tool_call_id": "call_1", "content": "exit code 0\n"}]
    assert file_agent.solve(chat, sample=sample, workdir=".")["tool_calls"][0]["command"] == "touch d/x"
    chat += [{"role": "assistant", "content": ""}, {"role": "tool", "tool_call_id": "call_2", "content": "exit code 0\n"}]
    assert file_agent.solve(chat, sample=sample, workdir=".") == "done"


def test_echo_answers_metadata_answer_else_the_input():
    assert echo.answer([], sample={"input": "q", "metadata": {"answer": "42"}}, workdir=".") == "42"
    assert echo.answer([], sample={"input": "repeat me", "metadata": {}}, workdir=".") == "repeat me"
    chat = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "last"}]
    assert echo.answer([], sample={"input": chat, "metadata": {}}, workdir=".") == "last"
