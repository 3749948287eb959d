"""The Ray control plane on a real Ray cluster with logical GPUs of two types.

GPU shards run in the simulated runtime (a test double: no GPU sandbox can run here);
the others run in real gVisor sandboxes. One cluster and one control plane for the module.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import ray

from cluster.runtimes import LOCAL_RUNTIMES
from cluster.runtimes.cgroups import CgroupSet
from eval_actors import control_plane
from eval_actors.control_plane import AGGREGATOR, SCHEDULER, ControlPlane, supervisor_names
from proctor.spec import load_spec

from raycluster import NODES

pytestmark = pytest.mark.ray
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GPUS = {"H100": NODES["h100"]["num_gpus"], "A100": NODES["a100"]["num_gpus"]}


def gpu_spec(name: str, gpus: int, gpu_type: str, samples: int = 2, seconds: float = 0.3,
             priority: int = 0, shard_size: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"adapter": "reference"},
        "dataset": {"samples": [{"id": f"s{i}", "input": "q", "target": "a", "metadata": {"sim_seconds": seconds}}
                                for i in range(samples)]},
        "scorers": [{"type": "exact"}],
        "shard_size": shard_size,
        "priority": priority,
        "sandbox": {"runtime": "kubernetes", "cpus": 1, "memory": "256Mi", "gpu": {"count": gpus, "type": gpu_type}},
    }


class AllocationSampler:
    """Samples the scheduler's allocations and Ray's placement groups while work runs."""

    def __init__(self, plane: ControlPlane):
        self.plane = plane
        self.samples: list[list[dict[str, Any]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(ray.get(self.plane.scheduler.allocations.remote()))
            time.sleep(0.05)

    def __enter__(self) -> "AllocationSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def node_types() -> dict[str, str | None]:
    out = {}
    for n in ray.nodes():
        types = [k.split(":", 1)[1] for k in n["Resources"] if k.startswith("accelerator_type:")]
        out[n["NodeID"]] = types[0] if types else None
    return out


def test_no_gpu_is_ever_oversubscribed_and_types_match(plane: ControlPlane) -> None:
    specs = ([gpu_spec(f"h1-{i}", 1, "H100", samples=3) for i in range(5)]
             + [gpu_spec(f"h3-{i}", 3, "H100") for i in range(2)]
             + [gpu_spec(f"a2-{i}", 2, "A100") for i in range(3)]
             + [gpu_spec(f"a1-{i}", 1, "A100", samples=3) for i in range(3)])
    with AllocationSampler(plane) as sampler:
        ids = [plane.submit(s, owner=f"user{i % 3}") for i, s in enumerate(specs)]
        finals = [plane.wait(i, timeout=180) for i in ids]
    assert all(ev.status == "succeeded" for ev in finals), [(ev.name, ev.status, ev.error) for ev in finals]
    types = node_types()
    busiest = 0
    for snapshot in sampler.samples:
        per_node: dict[str, int] = defaultdict(int)
        for a in snapshot:
            per_node[a["node_id"]] += a["gpus"]
            assert types[a["node_id"]] == a["gpu_type"], f"{a['gpu_type']} shard placed on a {types[a['node_id']]} node"
        for node, used in per_node.items():
            assert used <= GPUS[types[node]], f"{used} GPUs allocated on a node with {GPUS[types[node]]}"
            busiest = max(busiest, used)
    assert busiest == 4  # the sampler did see the H100 node full


def test_multi_gpu_shard_waits_whole_and_says_why(plane: ControlPlane) -> None:
    too_big = plane.submit(gpu_spec("h8", 8, "H100"))
    blocker = plane.submit(gpu_spec("a2-long", 2, "A100", samples=1, seconds=3))
    waiting = plane.submit(gpu_spec("a2-wait", 2, "A100", samples=1))
    store = plane.store()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        big, wait = store.get_evaluation(too_big), store.get_evaluation(waiting)
        if big.wait_reason and wait.wait_reason:
            break
        time.sleep(0.1)
    assert "8 x H100 on one node; the largest node has 4" in big.wait_reason
    assert wait.wait_reason == "waiting for 2 x A100; 0 free"
    assert not [a for a in ray.get(plane.scheduler.allocations.remote()) if a["eval_id"] == waiting]
    assert plane.wait(blocker, timeout=60).status == "succeeded"
    assert plane.wait(waiting, timeout=60).status == "succeeded"
    assert store.get_evaluation(waiting).wait_reason is None
    assert plane.cancel(too_big)
    assert plane.wait(too_big, timeout=30).status == "cancelled"


def test_priority_then_fairness_between_users(plane: ControlPlane) -> None:
    blocker = plane.submit(gpu_spec("a-block", 2, "A100", samples=1, seconds=2))
    time.sleep(0.5)
    low = plane.submit(gpu_spec("a-low", 2, "A100", samples=1, priority=0), owner="alice")
    high = plane.submit(gpu_spec("a-high", 2, "A100", samples=1, priority=50), owner="bob")
    greedy = plane.submit(gpu_spec("a-greedy", 1, "A100", samples=12, seconds=0.2), owner="carol")
    modest = plane.submit(gpu_spec("a-modest", 1, "A100", samples=1, seconds=0.2), owner="dave")
    for i in (blocker, low, high, greedy, modest):
        assert plane.wait(i, timeout=120).status == "succeeded"
    store = plane.store()
    assert store.get_evaluation(high).scheduled_at < store.get_evaluation(low).scheduled_at
    greedy_starts = sorted(s.started_at for s in store.shards(greedy))
    modest_start = store.shards(modest)[0].started_at
    assert modest_start < greedy_starts[3], "one user's many shards starved another user's one"


def test_gvisor_evaluation_through_the_control_plane(plane: ControlPlane) -> None:
    spec = load_spec(EXAMPLES / "arithmetic.yaml")
    ev = plane.wait(plane.submit(spec), timeout=300)
    assert ev.status == "succeeded", ev.error
    df = pd.read_parquet(ev.results_uri.removeprefix("file://"))
    assert len(df) == 240 and not df.duplicated(["sample_id", "epoch"]).any()
    assert set(df["runtime"]) == {"gvisor"}
    assert abs(ev.summary["metrics"]["exact"]["mean"] - df["score"].mean()) < 1e-12
    groups = ev.summary["groups"]
    assert set(groups) == {"+", "-", "*"} and all(g["samples"] == 80 for g in groups.values())


def _slow_spec(name: str, samples: int = 6) -> dict[str, Any]:
    policy = "import time\ndef answer(messages, sample, **kw):\n    time.sleep(0.4)\n    return sample['metadata']['a']\n"
    return {
        "name": name,
        "model": {"adapter": "python", "callable": "policy:answer"},
        "dataset": {"samples": [{"id": f"q{i}", "input": "x", "target": str(i), "metadata": {"a": str(i)}}
                                for i in range(samples)]},
        "scorers": [{"type": "exact"}],
        "epochs": 2,
        "shard_size": 3,
        "sandbox": {"runtime": "gvisor", "cpus": 0.5, "memory": "256Mi", "timeout_s": 120,
                    "files": {"policy.py": policy}},
    }


def _runsc_leftovers(home: Path) -> list[str]:
    found = []
    for state in home.glob("sandboxes/*/gvisor/runsc-state"):
        out = subprocess.run(["runsc", "--root", str(state), "list", "--quiet"], capture_output=True, text=True, check=True)
        found += out.stdout.split()
    return found


def _cgroup_leftovers(home: Path) -> list[str]:
    """The cgroups of sandboxes of any supervisor's runtime folder (the sandboxes a killed
    supervisor left must have been reaped by its next life)."""
    return [str(group.dirs) for folder in home.glob("sandboxes/*/*") for cls in LOCAL_RUNTIMES.values()
            for group in CgroupSet.owned(cls.owner_of(folder))]


@pytest.mark.parametrize("victim", ["scheduler", "supervisor", "aggregator"])
def test_killing_an_actor_mid_run_loses_and_doubles_nothing(plane: ControlPlane, victim: str) -> None:
    ids = [plane.submit(_slow_spec(f"kill-{victim}-{i}")) for i in range(3)]
    store = plane.store()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(s.status == "running" for i in ids for s in store.shards(i)):
        time.sleep(0.1)
    time.sleep(1.0)
    name = {"scheduler": SCHEDULER, "aggregator": AGGREGATOR, "supervisor": supervisor_names(plane.settings)[0]}[victim]
    ray.kill(ray.get_actor(name, namespace=plane.settings.ray_namespace), no_restart=False)
    if victim == "scheduler":
        deadline = time.monotonic() + 60
        while True:  # a restarted scheduler recovers when started again (`proctor up` does this)
            try:
                ray.get(plane.scheduler.start.remote(), timeout=30)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finals = [plane.wait(i, timeout=240) for i in ids]
    assert all(ev.status in ("succeeded", "failed") for ev in finals)
    for ev in finals:
        assert ev.status == "succeeded", ev.error
        df = pd.read_parquet(ev.results_uri.removeprefix("file://"))
        assert len(df) == 12, f"{ev.id}: {len(df)} rows, want 6 samples x 2 epochs"
        assert not df.duplicated(["sample_id", "epoch"]).any()
        assert df["score"].mean() == 1.0
    assert _runsc_leftovers(plane.settings.home) == []
    assert _cgroup_leftovers(plane.settings.home) == []


def test_a_ray_job_submits_evaluations_and_gets_results(plane: ControlPlane) -> None:
    import json
    import os
    import sys

    from ray.job_submission import JobStatus, JobSubmissionClient

    from ray._private.worker import get_dashboard_url

    dashboard = get_dashboard_url()
    client = JobSubmissionClient(f"http://{dashboard}")
    s = plane.settings
    env = {"PROCTOR_HOME": str(s.home), "PROCTOR_STATE_URL": s.state, "PROCTOR_RESULTS_URI": s.results,
           "PROCTOR_RAY_NAMESPACE": s.ray_namespace, "PROCTOR_SUPERVISORS": str(s.supervisors)}
    script = EXAMPLES / "ray_job_sweep.py"
    entrypoint = f"{sys.executable} {script} --spec {EXAMPLES / 'arithmetic.yaml'} --error-rates 0 0.5"
    for wait in range(60):  # the dashboard's job agent may still be starting on a loaded machine
        try:
            job = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env})
            break
        except RuntimeError as exc:
            last = exc
            time.sleep(1)
    else:
        raise AssertionError(f"the job API kept refusing: {last}")
    deadline = time.monotonic() + 300
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, "the Ray job did not finish"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    rows = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert [r["error_rate"] for r in rows] == [0.0, 0.5]
    assert all(r["status"] == "succeeded" for r in rows)
    assert rows[0]["accuracy"] == 1.0
    assert abs(rows[1]["accuracy"] - 0.5) < 0.1
    assert os.path.isdir(rows[1]["results"].removeprefix("file://"))
