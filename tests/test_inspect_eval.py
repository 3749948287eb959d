"""`inspect eval` with `--sandbox proctor`: Inspect's own CLI finds the provider through
its entry point and runs the examples' tasks (bash and python tools, a scripted
`mockllm/model`) in gVisor sandboxes, one and two services a sample."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from inspect_ai.log import read_eval_log

from cluster.runtimes.netns import NETNS_DIR, PREFIX

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "inspect"


def inspect_eval(task: Path, logs: Path, home: Path, *args: str) -> list[str]:
    """Run the task; returns what its tools answered."""
    env = {**os.environ, "PROCTOR_HOME": str(home), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([str(Path(sys.executable).parent / "inspect"), "eval", str(task.relative_to(ROOT)), "--model", "mockllm/model",
                          "--log-dir", str(logs), "--display", "plain", *args],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (path,) = logs.glob("*.eval")
    log = read_eval_log(str(path))
    assert log.status == "success", log.error
    (sample,) = log.samples or []
    assert sample.error is None
    assert sample.scores and next(iter(sample.scores.values())).value == "C"
    return [m.text for m in sample.messages if m.role == "tool"]


def test_inspect_eval_runs_a_task_with_bash_and_python_tools(sandbox_root: Path, tmp_path: Path) -> None:
    home = sandbox_root / "inspect-eval"
    tools = inspect_eval(EXAMPLES / "tools_task.py", tmp_path / "logs", home, "--sandbox", "proctor")
    assert tools == ["42\n", "python read 42\n"]
    assert list((home / "inspect" / "workspaces").iterdir()) == []


def test_inspect_eval_runs_a_two_service_task(sandbox_root: Path, tmp_path: Path) -> None:
    home = sandbox_root / "inspect-eval-two"
    tools = inspect_eval(EXAMPLES / "two-services" / "task.py", tmp_path / "logs", home)
    assert tools == ["FLAG{proctor-private-network}\n"]  # fetched from the target by its name
    assert [p for p in NETNS_DIR.iterdir() if p.name.startswith(PREFIX)] == []
