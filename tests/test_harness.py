"""The harness as the sandbox runs it: `python -S -B -m proctor.harness`, a subprocess
fed a shard on stdin, its events read back from stdout and checked with the
supervisor's own `EventParser`."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from proctor.protocol import PROTOCOL_VERSION, EventParser

REPO = Path(__file__).resolve().parents[1]


class Harness:
    """One harness process; `events` arrive on a queue as the harness writes them."""

    def __init__(self, workspace: Path, stderr_path: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]]))
        self._stderr = stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-B", "-m", "proctor.harness", "--workspace", str(workspace)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env, cwd=workspace,
        )
        self.raw = bytearray()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, b""):
            self.raw += line
            self.events.put(json.loads(line))
        self.events.put(None)

    def send(self, message: dict[str, Any] | str) -> None:
        line = message if isinstance(message, str) else json.dumps(message)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def next(self, timeout: float = 20.0) -> dict[str, Any]:
        event = self.events.get(timeout=timeout)
        assert event is not None, "the harness closed stdout"
        self.seen.append(event)
        return event

    def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = self.next(max(deadline - time.monotonic(), 0.01))
            if predicate(event):
                return event

    def finish(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Every event up to `done`; the process must then exit."""
        self.until(lambda e: e["type"] == "done", timeout)
        self.proc.wait(timeout)
        return self.seen

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._stderr.close()


@pytest.fixture
def start_harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    started: list[Harness] = []
    workspace = tmp_path / "workspace"
    workspace.mkdir()

    def start(shard: dict[str, Any] | None = None) -> Harness:
        harness = Harness(workspace, tmp_path / f"stderr-{len(started)}.txt")
        started.append(harness)
        if shard is not None:
            harness.send(shard)
        return harness

    yield start
    for harness in started:
        harness.close()


def shard(samples: list[dict[str, Any]], model: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    message = {
        "v": 1, "type": "shard", "eval_id": "ev-1", "shard_id": "sh-1",
        "model": model or {"adapter": "reference"},
        "scorers": [{"type": "exact"}],
        "samples": samples,
    }
    message.update(fields)
    return message


def file_agent(**params: Any) -> dict[str, Any]:
    return {"adapter": "python", "callable": "proctor.scripted.file_agent:solve", "params": params}


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def assert_valid_stream(harness: Harness) -> None:
    parser = EventParser()
    parser.feed(bytes(harness.raw))
    assert parser.rejected == 0, list(parser.rejections)
    assert parser.done


def test_ready_event_comes_before_the_shard_is_sent(start_harness):
    harness = start_harness()
    first = harness.next(timeout=10)
    assert first == {"v": PROTOCOL_VERSION, "seq": 0, "type": "log", "level": "info", "message": "harness ready (protocol 2)"}


def test_every_sample_and_epoch_is_reported_and_done_comes_last(start_harness, tmp_path):
    samples = [{"id": f"q{i}", "input": f"question {i}", "target": f"answer {i}"} for i in range(3)]
    harness = start_harness(shard(samples, epochs=[1, 2], scorers=[{"type": "exact"}, {"type": "includes", "name": "inc"}]))
    events = harness.finish()
    assert harness.proc.returncode == 0
    assert events[0]["message"] == "harness ready (protocol 2)"
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[-1] == {"v": PROTOCOL_VERSION, "seq": len(events) - 1, "type": "done", "status": "ok", "error": None, "samples": 6}
    reported = [(e["sample_id"], e["epoch"]) for e in of_type(events, "sample")]
    assert sorted(reported) == sorted((f"q{i}", epoch) for i in range(3) for epoch in (1, 2))
    last_progress = of_type(events, "progress")[-1]
    assert (last_progress["completed"], last_progress["total"]) == (6, 6)
    assert {e["name"]: e["value"] for e in of_type(events, "metric")} == {"exact/mean": 1.0, "inc/mean": 1.0}
    assert (tmp_path / "workspace" / "q2-e2").is_dir()
    assert_valid_stream(harness)


def test_sample_event_carries_chat_input_as_text_and_joined_targets(start_harness):
    sample = {"id": "chat", "input": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
              "target": ["4", "four"]}
    events = start_harness(shard([sample])).finish()
    (event,) = of_type(events, "sample")
    assert event["input"] == "system: be brief\n\nuser: 2+2?"
    assert event["target"] == "4 | four"
    assert event["output"] == "4"
    assert event["scores"]["exact"]["value"] == 1.0
    assert event["usage"]["calls"] == 1 and event["turns"] == 1


def test_first_message_that_is_not_a_shard_ends_with_error_and_exit_2(start_harness):
    harness = start_harness({"v": 1, "type": "cancel"})
    done = harness.finish()[-1]
    assert done["status"] == "error" and "first message must be 'shard'" in done["error"]
    assert harness.proc.returncode == 2


def test_invalid_scorer_spec_names_the_field_and_exits_2(start_harness):
    harness = start_harness(shard([{"id": "a", "input": "x"}], scorers=[{"type": "numeric", "tolerance": -1}]))
    done = harness.finish()[-1]
    assert done["status"] == "error" and "scorers.0.tolerance" in done["error"]
    assert harness.proc.returncode == 2


def test_agentic_file_agent_solves_a_task_and_the_command_scorer_passes(start_harness, tmp_path):
    sample = {"id": "make-file", "input": "Write hello into out.txt", "files": {"notes/hint.txt": "hello"},
              "metadata": {"commands": ["cp notes/hint.txt out.txt", "cat out.txt"]}}
    scorer = {"type": "command", "name": "has_file", "command": "grep -qx hello out.txt"}
    events = start_harness(shard([sample], model=file_agent(), scorers=[scorer], agentic=True)).finish()
    (event,) = of_type(events, "sample")
    assert event["error"] is None
    assert event["output"] == "done"
    assert event["turns"] == 3
    assert event["scores"]["has_file"]["value"] == 1.0
    tool_logs = [e["message"] for e in of_type(events, "log") if e["message"].startswith("tool: ")]
    assert tool_logs == ["tool: cp notes/hint.txt out.txt", "tool: cat out.txt"]
    assert (tmp_path / "workspace" / "make-file-e1" / "out.txt").read_text() == "hello"


def test_turn_limit_ends_the_sample_with_an_error_and_still_scores(start_harness):
    sample = {"id": "long", "input": "go", "target": "done", "metadata": {"commands": ["true"] * 5}}
    events = start_harness(shard([sample], model=file_agent(), agentic=True, max_turns=2)).finish()
    (event,) = of_type(events, "sample")
    assert event["error"] == "turn limit reached (2)"
    assert event["turns"] == 2
    assert event["scores"]["exact"]["value"] == 0.0
    assert events[-1]["status"] == "ok"


def test_cancel_kills_a_running_tool_command_and_ends_promptly(start_harness, tmp_path):
    sample = {"id": "slow", "input": "wait", "metadata": {"commands": ["echo $$ > pid && exec sleep 30"]}}
    harness = start_harness(shard([sample, {"id": "never", "input": "x"}], model=file_agent(), agentic=True))
    harness.until(lambda e: e["type"] == "log" and e["message"].startswith("tool: "))
    pid_file = tmp_path / "workspace" / "slow-e1" / "pid"
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sent = time.monotonic()
    harness.send({"v": 1, "type": "cancel", "reason": "user stop"})
    events = harness.finish(timeout=5)
    assert time.monotonic() - sent < 1.5
    assert events[-1]["status"] == "cancelled" and events[-1]["error"] == "user stop"
    assert harness.proc.returncode == 0
    assert of_type(events, "sample") == []
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_cancel_ends_the_harness_even_while_a_policy_is_stuck(start_harness, tmp_path):
    (tmp_path / "workspace" / "stuck_policy.py").write_text(
        "import pathlib, time\n"
        "def act(messages, sample, workdir, **params):\n"
        "    pathlib.Path(workdir, 'started').write_text('yes')\n"
        "    time.sleep(60)\n"
    )
    harness = start_harness(shard([{"id": "s", "input": "x"}], model={"adapter": "python", "callable": "stuck_policy:act"}))
    marker = tmp_path / "workspace" / "s-e1" / "started"
    deadline = time.monotonic() + 10
    while not marker.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sent = time.monotonic()
    harness.send({"v": 1, "type": "cancel"})
    events = harness.finish(timeout=5)
    assert time.monotonic() - sent < 1.5
    assert events[-1]["status"] == "cancelled"
    assert harness.proc.returncode == 0


def test_openai_model_call_is_answered_through_stdin(start_harness):
    model = {"adapter": "openai", "model": "gpt-x", "base_url": "https://api.example.com/v1", "max_tokens": 64,
             "temperature": 0.5}
    harness = start_harness(shard([{"id": "m", "input": "2+2?", "target": "4"}], model=model))
    call = harness.until(lambda e: e["type"] == "generate")
    assert call["messages"] == [{"role": "user", "content": "2+2?", "tool_call_id": None, "tool_calls": None}]
    assert call["tools"] == [] and call["max_tokens"] == 64 and call["temperature"] == 0.5
    harness.send({"v": 1, "type": "generate_result", "id": call["id"], "output": "4",
                  "usage": {"input_tokens": 7, "output_tokens": 1, "calls": 1}})
    events = harness.finish()
    (event,) = of_type(events, "sample")
    assert event["output"] == "4" and event["scores"]["exact"]["value"] == 1.0
    assert event["usage"] == {"input_tokens": 7, "output_tokens": 1, "calls": 1}
    assert_valid_stream(harness)


def test_openai_tool_calls_run_in_the_sample_directory(start_harness):
    model = {"adapter": "openai", "model": "gpt-x", "base_url": "https://api.example.com/v1"}
    harness = start_harness(shard([{"id": "t", "input": "where?", "target": "ok"}], model=model, agentic=True))
    first = harness.until(lambda e: e["type"] == "generate")
    assert first["tools"][0]["function"]["name"] == "bash"
    tool_call = {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": json.dumps({"command": "echo hi; pwd"})}}
    harness.send({"v": 1, "type": "generate_result", "id": first["id"], "tool_calls": [tool_call]})
    second = harness.until(lambda e: e["type"] == "generate")
    tool_message = second["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == "c1"
    assert tool_message["content"].startswith("exit code 0\nhi\n") and tool_message["content"].rstrip().endswith("t-e1")
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "bash"
    harness.send({"v": 1, "type": "generate_result", "id": second["id"], "output": "ok"})
    (event,) = of_type(harness.finish(), "sample")
    assert event["turns"] == 2 and event["scores"]["exact"]["value"] == 1.0


def test_malformed_stdin_line_is_logged_and_ignored(start_harness):
    model = {"adapter": "openai", "model": "gpt-x", "base_url": "https://api.example.com/v1"}
    harness = start_harness(shard([{"id": "m", "input": "hi", "target": "yo"}], model=model))
    call = harness.until(lambda e: e["type"] == "generate")
    harness.send("this is {not json")
    warning = harness.until(lambda e: e["type"] == "log" and e["level"] == "warning")
    assert "ignored a line on stdin" in warning["message"]
    harness.send({"v": 1, "type": "generate_result", "id": call["id"], "output": "yo"})
    events = harness.finish()
    assert events[-1]["status"] == "ok"
    assert of_type(events, "sample")[0]["output"] == "yo"


def test_model_error_is_reported_and_the_next_sample_still_runs(start_harness):
    model = {"adapter": "openai", "model": "gpt-x", "base_url": "https://api.example.com/v1"}
    harness = start_harness(shard([{"id": "a", "input": "1", "target": "1"}, {"id": "b", "input": "2", "target": "2"}],
                                  model=model))
    first = harness.until(lambda e: e["type"] == "generate")
    harness.send({"v": 1, "type": "generate_result", "id": first["id"], "error": "rate limited"})
    second = harness.until(lambda e: e["type"] == "generate")
    harness.send({"v": 1, "type": "generate_result", "id": second["id"], "output": "2"})
    events = harness.finish()
    a, b = of_type(events, "sample")
    assert "rate limited" in a["error"] and a["scores"] == {}
    assert b["error"] is None and b["scores"]["exact"]["value"] == 1.0
    assert (events[-1]["status"], events[-1]["samples"]) == ("ok", 2)


def test_sample_file_outside_its_directory_is_refused(start_harness, tmp_path):
    bad = {"id": "bad", "input": "x", "target": "x", "files": {"../escape.txt": "no"}}
    good = {"id": "good", "input": "y", "target": "y"}
    events = start_harness(shard([bad, good])).finish()
    first, second = of_type(events, "sample")
    assert "without '..'" in first["error"]
    assert second["error"] is None
    assert not (tmp_path / "workspace" / "escape.txt").exists()


def test_oversized_output_is_cut_so_every_event_stays_valid(start_harness):
    sample = {"id": "big", "input": "x", "metadata": {"answer": "\u0001" * 300_000}}
    harness = start_harness(shard([sample], model={"adapter": "python", "callable": "proctor.scripted.echo:answer"}))
    (event,) = of_type(harness.finish(), "sample")
    assert 0 < len(event["output"]) <= 256 * 1024
    assert "characters cut" in event["output"]
    assert_valid_stream(harness)


def test_stdin_closed_before_a_shard_ends_with_error_and_exit_2(start_harness):
    harness = start_harness()
    harness.proc.stdin.close()
    done = harness.finish()[-1]
    assert done["status"] == "error" and "before the shard message" in done["error"]
    assert harness.proc.returncode == 2
