"""A sample's stages in a real sandbox: setup, eval, score, and the wall between the agent
and the harness.

The agent here is a script (proctor.scripted.file_agent) whose shell commands probe the
harness the way a hostile agent would; what they saw is written to `probe.txt`, a declared
artifact the host reads back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cluster.runtimes import SandboxRuntime
from eval_actors.local_run import run_evaluation
from proctor.settings import Settings
from proctor.spec import parse_spec

pytestmark = pytest.mark.sandbox

# finds the harness by its command line, then tries to read its environment and memory,
# signal it, and write a forged event into its channel (its stdout)
PROBE_HARNESS = r"""
h=$(for p in /proc/[0-9]*; do tr '\0' ' ' < $p/cmdline 2>/dev/null | grep -q proctor.harness && basename $p; done | head -n 1)
echo "harness=$h"
echo "environ=$(tr -d '\0' < /proc/$h/environ 2>/dev/null | wc -c)"
head -c 1 /proc/$h/mem >/dev/null 2>&1; echo "mem=$?"
kill -0 $h 2>/dev/null; echo "signal=$?"
echo '{"v":1,"seq":999999,"type":"done","status":"ok","samples":0}' 2>/dev/null > /proc/$h/fd/1; echo "channel=$?"
ls /proc/$h/fd >/dev/null 2>&1; echo "fds=$?"
env | grep -c -E 'PROCTOR_TARGET|PYTHONPATH|PYTHONHOME' ; echo "secrets_in_env_done"
id -u
""".strip()


@pytest.fixture
def settings(tmp_path: Path, sandbox_root: Path) -> Settings:
    return Settings(home=sandbox_root, results_uri=(tmp_path / "results").as_uri())


def run(doc: dict[str, Any], settings: Settings, runtime: SandboxRuntime) -> Any:
    base: dict[str, Any] = {
        "name": "stages",
        "model": {"adapter": "python", "callable": "proctor.scripted.file_agent:solve"},
        "agentic": True,
        "scorers": [{"type": "exact"}],
        "sandbox": {"timeout_s": 90, "memory": "512Mi", "tool_timeout_s": 20, "artifacts": ["probe.txt"]},
        # the probes alert (sandbox-probe, a write outside the workspace) rather than stop: the wall itself is tested
        "safety": {"preset": "standard", "syscalls": {"action": "alert"}},
    }
    base.update(doc)
    return asyncio.run(run_evaluation(parse_spec(base), settings, runtime=runtime))


def rows(result: Any) -> pd.DataFrame:
    return pd.read_parquet(result.results_uri.removeprefix("file://")).sort_values("sample_id")


def artifact(result: Any, name: str) -> str:
    (found,) = Path(result.results_uri.removeprefix("file://"), "_artifacts").rglob(name)
    return found.read_text()


def test_the_agent_cannot_reach_the_harness(runtime: SandboxRuntime, settings: Settings) -> None:
    result = run({"dataset": {"samples": [{"id": "probe", "input": "probe", "target": "done",
                                           "metadata": {"commands": [f"({PROBE_HARNESS}) > probe.txt"]}}]}},
                 settings, runtime)
    assert result.status == "succeeded", [o.error for o in result.outcomes]
    seen = dict(line.split("=", 1) for line in artifact(result, "probe.txt").splitlines() if "=" in line)
    assert seen["harness"], "the probe did not find the harness"
    assert seen["environ"] == "0"  # refused, or nothing in it (see identity._blank_initial_environment)
    assert seen["mem"] != "0"  # another user's /proc: refused
    assert seen["signal"] != "0"  # not even signal 0
    assert seen["channel"] != "0" and seen["fds"] != "0"
    lines = artifact(result, "probe.txt").splitlines()
    assert lines[lines.index("secrets_in_env_done") - 1] == "0"  # no target, no harness paths in its env
    assert lines[-1] == "65534"
    assert rows(result)["score"].tolist() == [1.0]  # the forged `done` changed nothing


def test_no_agent_process_survives_into_scoring(runtime: SandboxRuntime, settings: Settings) -> None:
    # the agent leaves a loop writing to a file, in the background, detached from its shell
    keep_alive = "nohup sh -c 'while true; do echo x >> alive.txt; sleep 0.05; done' >/dev/null 2>&1 &"
    # the scorer (root, after the agent's turn) passes only if the file stopped growing and no
    # process of the agent's user is left
    still = ("a=$(wc -l < alive.txt); sleep 0.5; b=$(wc -l < alive.txt); test \"$a\" = \"$b\" && "
             "! grep -l '^Uid:[[:space:]]*65534[[:space:]]' /proc/[0-9]*/status")
    result = run({"dataset": {"samples": [{"id": "bg", "input": "x", "target": "done",
                                           "metadata": {"commands": [keep_alive, "sleep 0.3"]}}]},
                  "scorers": [{"type": "command", "name": "quiet", "command": still}]}, settings, runtime)
    assert result.status == "succeeded", [o.error for o in result.outcomes]
    df = rows(result)
    assert df["scores"].map(dict).tolist() == [{"quiet": 1.0}], df["error"].tolist()
    assert set(dict(df["stages"].iloc[0])) == {"setup", "eval", "score", "cleanup"}


def test_setup_prepares_what_the_agent_cannot_touch(runtime: SandboxRuntime, settings: Settings) -> None:
    """Setup runs as root before the agent: a file only root may read, and one handed to
    the agent's user; the agent reads the second, not the first."""
    setup = [{"command": "echo secret > root-only.txt && chmod 600 root-only.txt"},
             {"command": "echo hello > mine.txt", "user": "nobody"}]
    probe = "(cat root-only.txt 2>/dev/null || echo refused; cat mine.txt; id -un) > probe.txt"
    result = run({"setup": setup,
                  "dataset": {"samples": [{"id": "s", "input": "x", "target": "done",
                                           "setup": "echo from-sample > sample.txt && chmod 644 sample.txt",
                                           "metadata": {"commands": [probe + "; cat sample.txt >> probe.txt"]}}]}},
                 settings, runtime)
    assert result.status == "succeeded", [o.error for o in result.outcomes]
    assert artifact(result, "probe.txt").split() == ["refused", "hello", "nobody", "from-sample"]
    assert rows(result)["failed_stage"].isna().all()


def test_a_failing_setup_ends_the_sample_without_a_score(runtime: SandboxRuntime, settings: Settings) -> None:
    result = run({"setup": [{"command": "echo preparing; echo broken >&2; exit 3"}],
                  "dataset": {"samples": [{"id": "a", "input": "x", "target": "done",
                                           "metadata": {"commands": ["touch ran.txt"]}}]}}, settings, runtime)
    df = rows(result)
    row = df.iloc[0]
    assert row["failed_stage"] == "setup"
    assert row["error"].startswith("setup failed:") and "exited with code 3" in row["error"]
    assert "broken" in row["error"] and "preparing" in row["error"]
    assert pd.isna(row["score"]) and dict(row["scores"]) == {}
    assert row["turns"] == 0  # the agent never started


def test_setup_as_an_unknown_user_and_a_failing_scorer_name_their_stage(runtime: SandboxRuntime,
                                                                      settings: Settings) -> None:
    result = run({"setup": [{"command": "true", "user": "no-such-user"}],
                  "dataset": {"samples": [{"id": "a", "input": "x", "target": "done"}]}}, settings, runtime)
    row = rows(result).iloc[0]
    assert row["failed_stage"] == "setup" and "no-such-user" in row["error"]
    result = run({"dataset": {"samples": [{"id": "b", "input": "x", "target": "done"}]},
                  "scorers": [{"type": "exact"}, {"type": "regex", "pattern": "{target}", "name": "re"},
                              {"type": "numeric"}]}, settings, runtime)
    row = rows(result).iloc[0]
    assert row["failed_stage"] == "score" and "numeric" in row["error"]
    assert dict(row["scores"]) == {"exact": 1.0, "re": 1.0}
