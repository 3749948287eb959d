"""A Ray worker node lost in the middle of a run, on a small cluster of its own.

Run as a script (tests/test_lost_nodes.py runs it in a subprocess, so that the session's
cluster in the test process is left alone); it prints one JSON line of what happened.

The cluster (`ray.cluster_utils.Cluster`: a real GCS and a raylet per node): a head that
does no evaluation work, and two workers, each with 2 logical A100 GPUs and one unit of
`proctor-supervisor`, so each holds one supervisor (`Settings.supervisor_resources`). GPU
shards run in the simulated runtime (a test double) inside their supervisor. While
evaluations run, the worker whose supervisor runs shards is removed without notice; then
a worker like it joins, and another evaluation runs.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SAMPLES, EPOCHS = 6, 2
WORKER = {"num_cpus": 4, "num_gpus": 2, "resources": {"accelerator_type:A100": 1, "proctor-supervisor": 1}}


def spec(name: str) -> dict[str, Any]:
    return {
        "name": name, "model": {"adapter": "reference"},
        "dataset": {"samples": [{"id": f"s{i}", "input": "q", "target": "a", "metadata": {"sim_seconds": 0.6}}
                                for i in range(SAMPLES)]},
        "scorers": [{"type": "exact"}], "epochs": EPOCHS, "shard_size": 1,
        "sandbox": {"runtime": "kubernetes", "cpus": 1, "memory": "256Mi", "gpu": {"count": 1, "type": "A100"}},
    }


def node_of(cp: Any, name: str) -> str:
    from ray._private import state

    return str(state.actors(actor_id=cp.actor(name)._actor_id.hex())["Address"]["NodeID"])


def outcome(cp: Any, settings: Any, eval_id: str) -> dict[str, Any]:
    from cluster.results import ResultsStore

    ev = cp.wait(eval_id, timeout=300)
    table = ResultsStore(settings.results, settings).read(eval_id)
    keys = sorted(zip(table["sample_id"].to_pylist(), table["epoch"].to_pylist()))
    with cp.store() as store:
        shards = [{"id": s.shard_id, "status": s.status, "attempt": s.attempt, "placement": s.placement,
                   "supervisor": s.supervisor} for s in store.shards(eval_id)]
    return {"status": ev.status, "error": ev.error, "done_units": ev.done_units, "rows": len(keys),
            "distinct_rows": len(set(keys)), "expected_rows": SAMPLES * EPOCHS, "shards": shards}


def main() -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group_table

    sys.path.insert(0, str(Path(__file__).parent))
    from cluster.localray import address_file_in
    from eval_actors import control_plane
    from eval_actors.control_plane import SCHEDULER
    from eval_actors.lost_work import actor_state
    from eval_actors.scheduler import RECONCILE_S
    from ports import free_port
    from raycluster import RUNTIMES
    from proctor.settings import Settings

    temp_dir = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
    home = Path(tempfile.mkdtemp(prefix="lostnodes-"))
    with address_file_in(temp_dir):
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "temp_dir": temp_dir, "dashboard_agent_listen_port": free_port()})
    report: dict[str, Any] = {}
    try:
        workers = [cluster.add_node(**WORKER, temp_dir=temp_dir, dashboard_agent_listen_port=free_port())
                   for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="proctor-lostnodes", logging_level="ERROR", log_to_driver=False)
        settings = Settings(home=home, results_uri=(home / "results").as_uri(), state_url=f"sqlite:///{home}/state.db",
                            ray_namespace="proctor-lostnodes", supervisors=2,
                            supervisor_resources={"proctor-supervisor": 1})
        cp = control_plane.start(settings, runtime_factory=RUNTIMES)
        by_node = {w.node_id: w for w in workers}
        ids = [cp.submit(spec(f"lost-{i}")) for i in range(2)]
        with cp.store() as store:  # until a shard runs in each supervisor: the node goes mid-run
            deadline = time.monotonic() + 180
            while len({s.supervisor for i in ids for s in store.shards(i) if s.status == "running"}) < 2:
                assert time.monotonic() < deadline, "no shard ran in both supervisors"
                time.sleep(0.05)
        victim_supervisor = control_plane.supervisor_names(settings)[0]
        victim = node_of(cp, victim_supervisor)
        report["scheduler_node"] = node_of(cp, SCHEDULER)  # on the lost node or not: either is recovered
        cluster.remove_node(by_node[victim], allow_graceful=False)
        report["lost_node"] = victim
        report["lost"] = [outcome(cp, settings, i) for i in ids]
        report["gpus_after"] = ray.available_resources().get("GPU", 0.0)
        report["allocations_after"] = ray.get(cp.scheduler.allocations.remote(), timeout=60)
        report["placement_groups_left"] = sorted(
            info["name"] for info in placement_group_table().values()
            if info.get("name", "").startswith("proctor:") and info.get("state") != "REMOVED")
        back = cluster.add_node(**WORKER, temp_dir=temp_dir, dashboard_agent_listen_port=free_port())
        cluster.wait_for_nodes()
        report["new_node"] = back.node_id
        deadline = time.monotonic() + 120  # the supervisor that waited for a node starts on it
        while True:
            try:
                if (node_of(cp, victim_supervisor) == back.node_id
                        and actor_state(cp.actor(victim_supervisor)) == "ALIVE"):
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "the waiting supervisor did not start on the new node"
            time.sleep(0.2)
        time.sleep(3 * RECONCILE_S)  # the scheduler's next rounds see it up again
        again = [cp.submit(spec(f"back-{i}")) for i in range(2)]
        report["back"] = [outcome(cp, settings, i) for i in again]
        report["supervisor_nodes"] = {n: node_of(cp, n) for n in control_plane.supervisor_names(settings)}
        control_plane.stop(settings)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
