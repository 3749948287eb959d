"""An emergency stop holds on a host whose CPUs are saturated by other work.

Six CPU-burning processes run beside the platform (3x the 2 cores of the test machine)
while evaluations with running sandboxes are stopped. Observed from outside: every
sandbox of the evaluation dies (no process, no live cgroup), the evaluation ends
`cancelled`, no row of a sample that finished after the stop counts as a result, and no
sandbox of it starts after the stop. Bounds are generous (correctness, not speed: the
latency is measured by benchmarks/stop_latency.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apiserver import auth, spec, wait_final
from cluster.runtimes import LaunchRequest, SandboxLimits, SandboxRuntime
from cluster.runtimes.layout import harness_layout
from cluster.stopping import StopMarks, alive, cgroups_of
from eval_actors.killswitch import KillSwitch
from test_runtimes import assert_nothing_left

BURNERS = 6
DEAD_WITHIN_S = 30.0
SLEEPER = ("import time\nprint('{\"v\": 1, \"seq\": 0, \"type\": \"log\", \"message\": \"up\"}', flush=True)\n"
           "time.sleep(600)")
# a policy that takes a while per sample and answers with the time it finished
CLOCK_POLICY = "import time\ndef answer(messages, **kw):\n    time.sleep(0.3)\n    return repr(time.time())\n"


@contextlib.contextmanager
def saturated() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Six busy processes beside the platform, killed in the end."""
    burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(BURNERS)]
    try:
        yield burners
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()


def _processes_naming(text: str) -> list[str]:
    """Command lines of live processes that name `text`, except the cleanup's `runsc delete`."""
    ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if text in line and " delete --force " not in line
            and not line.startswith("ps ")]


@pytest.mark.sandbox
def test_the_killswitch_kills_every_sandbox_of_the_evaluation_and_no_other(
        runtime: SandboxRuntime, sandbox_root: Path) -> None:
    eval_id, other = f"ev-{secrets.token_hex(4)}", f"ev-{secrets.token_hex(4)}"
    layout = harness_layout(unprivileged=runtime.isolation == "weak")
    switch = KillSwitch(StopMarks(sandbox_root / f"stopping-{eval_id}"))

    async def scenario() -> None:
        sandboxes = []
        for sid in (f"{eval_id}-s0-a0", f"{eval_id}-s1-a0", f"{other}-s0-a0"):
            ws = sandbox_root / f"ws-{sid}"
            ws.mkdir()
            os.chown(ws, 65534, 65534)
            box = await runtime.launch(LaunchRequest(sid, (layout.python, "-S", "-c", SLEEPER), ws,
                                                     SandboxLimits(timeout_s=600), env=layout.env,
                                                     ro_binds=layout.ro_binds))
            sandboxes.append(box)
            async for _event in box.events():
                break  # it runs
        try:
            assert alive(eval_id) > 0 and alive(other) > 0
            with saturated():
                found = await asyncio.wait_for(asyncio.wrap_future(switch.request(eval_id)), DEAD_WITHIN_S)
            assert found.alive == 0 and found.killed > 0
            assert set(found.sandboxes) <= {f"{eval_id}-s0-a0", f"{eval_id}-s1-a0"}
            for box in sandboxes[:2]:
                await asyncio.wait_for(box.wait(), DEAD_WITHIN_S)
            assert alive(eval_id) == 0 and not _processes_naming(f"{eval_id}-")
            assert all(not g.pids() for g in cgroups_of({eval_id}).get(eval_id, []))
            assert switch.marks.requested(eval_id) and switch.marks.status(eval_id) == "cancelled"
            assert sandboxes[2].proc is not None and sandboxes[2].proc.returncode is None, "another evaluation's died"
            assert alive(other) > 0
        finally:
            for box in sandboxes:
                await box.cleanup()
        for box in sandboxes:
            assert_nothing_left(runtime, box.id)

    asyncio.run(scenario())


def _running(store: Any, eval_id: str, count: int, timeout: float = 300) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        running = [s.sandbox_id for s in store.shards(eval_id) if s.status == "running" and s.sandbox_id]
        if len(running) >= count and all(_processes_naming(sid) for sid in running):
            return running
        assert time.monotonic() < deadline, store.shards(eval_id)
        time.sleep(0.2)


@pytest.mark.ray
def test_an_emergency_stop_under_load_leaves_nothing_running_and_counts_nothing_late(
        api: Any, plane: Any) -> None:
    client, tokens, store = api
    body = spec("stop-under-load", samples=90, timeout_s=600, files={"policy.py": CLOCK_POLICY})
    body["model"] = {"adapter": "python", "callable": "policy:answer"}
    body["shard_size"] = 30
    eval_id = client.post("/api/v1/evaluations", json=body, headers=auth(tokens["rita"])).json()["id"]
    sandboxes = _running(store, eval_id, 3)
    with saturated():
        _stop_and_watch(client, tokens, eval_id)
    marked = plane.settings.home / "stopping" / eval_id  # the platform's record of when it got the stop
    stopped_at = float(marked.read_text().split()[1])
    _check_final(client, tokens, store, eval_id, sandboxes, stopped_at)


def _stop_and_watch(client: Any, tokens: dict[str, str], eval_id: str) -> None:
    """Stop once samples are being answered; every sandbox dead, none started after."""
    deadline = time.monotonic() + 300
    while len(client.get(f"/api/v1/evaluations/{eval_id}/transcripts",  # each shard runs one sample at a time:
                         headers=auth(tokens["sam"])).json()["samples"]) < 6:  # 6 started, 3 or more finished
        assert time.monotonic() < deadline, "no samples were answered"
        time.sleep(0.2)
    r = client.post(f"/api/v1/evaluations/{eval_id}/stop", headers=auth(tokens["sam"]))
    assert r.status_code == 200 and r.json()["stopped"] is True

    deadline = time.monotonic() + DEAD_WITHIN_S
    while _processes_naming(f"{eval_id}-") or alive(eval_id):
        assert time.monotonic() < deadline, _processes_naming(f"{eval_id}-")
        time.sleep(0.1)
    quiet_until = time.monotonic() + 3.0
    while time.monotonic() < quiet_until:  # no sandbox of it starts afterwards
        assert not _processes_naming(f"{eval_id}-"), "a sandbox started after the stop"
        time.sleep(0.1)


def _check_final(client: Any, tokens: dict[str, str], store: Any, eval_id: str, sandboxes: list[str],
                 stopped_at: float) -> None:
    """Final `cancelled`; no sandbox but the ones that ran before the stop; no row of a
    sample finished after the stop counted as a result."""
    ev = wait_final(client, tokens["sam"], eval_id)
    assert ev["status"] == "cancelled"
    for shard in store.shards(eval_id):
        assert shard.sandbox_id is None or shard.sandbox_id in sandboxes, "a sandbox started after the stop"
    rows = client.get(f"/api/v1/evaluations/{eval_id}/results", params={"limit": 1000},
                      headers=auth(tokens["sam"])).json()["rows"]
    counted = [row for row in rows if not row.get("error")]
    late = [row for row in rows if (row.get("error") or "").startswith("finished after the emergency stop")]
    assert counted, "no sample finished before the stop: the test did not exercise the race"
    for row in counted:
        assert float(row["output"]) < stopped_at, f"sample {row['sample_id']} finished after the stop but counted"
    for row in late:
        assert not row.get("scores"), row


def test_a_claimed_pooled_sandbox_is_found_by_its_evaluation(tmp_path: Path) -> None:
    """A warm sandbox's name (`pool-<owner>-<hex>`) does not say its evaluation: the claim
    the executor writes when it takes one is how a stop from another process finds it."""
    from cluster.stopping import StopMarks, _owner_of

    marks = StopMarks(tmp_path / "stopping")
    assert marks.claims() == {}
    marks.claim("ev1", "pool-sup-0-abc123")
    assert marks.claims() == {"pool-sup-0-abc123": "ev1"}
    claims = marks.claims()
    assert _owner_of("sup-0--pool-sup-0-abc123", {"ev1", "ev2"}, claims) == "ev1"
    assert _owner_of("sup-0--pool-sup-0-abc123", {"ev2"}, claims) is None  # another evaluation's stop
    assert _owner_of("sup-0--ev2-s0-a1", {"ev2"}, claims) == "ev2"
    with pytest.raises(ValueError):
        marks.claim("ev1", "../escape")
