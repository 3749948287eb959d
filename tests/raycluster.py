"""One real Ray cluster for the test session, with logical GPUs of two types.

Three Ray nodes on this machine (`ray.cluster_utils.Cluster` starts a real GCS and a
raylet per node): a head with CPUs only, a node declaring 4 x H100 and a node declaring
2 x A100. The GPUs are logical (declared to Ray), which is all the scheduler sees.

Shards that ask for GPUs (runtime `kubernetes` in their spec) run in the simulated
runtime, a test double, because no GPU sandbox can run here; everything else runs in
the real local runtimes (`SimulateRemoteRuntimes`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from cluster.localray import address_file_in
from cluster.runtimes.simulated import SimulateRemoteRuntimes
from proctor.settings import Settings
from ports import free_port

NODES = {
    "head": {"num_cpus": 4},
    # as Ray itself declares a GPU node: `accelerator_type:<TYPE>: 1` whatever its GPU count
    "h100": {"num_cpus": 8, "num_gpus": 4, "resources": {"accelerator_type:H100": 1}},
    "a100": {"num_cpus": 8, "num_gpus": 2, "resources": {"accelerator_type:A100": 1}},
}



def start_cluster(dashboard_port: int | None = None) -> Any:
    """The cluster, its files (sockets, logs, and the address file `ray_current_cluster`) in
    a temporary folder of its own (`cluster.temp_dir`; `stop_cluster` removes it), not the
    machine's shared /tmp/ray: a Ray CLI or job on this machine that looks for "the" local
    cluster (the newest address file there) must not find this one instead of its own."""
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths live under it
    head = dict(NODES["head"], dashboard_agent_listen_port=free_port(), temp_dir=temp_dir)
    if dashboard_port:
        head.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port)
    with address_file_in(temp_dir):
        cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.temp_dir = temp_dir
    # free ports for every agent: another Ray on this machine must not take the job agent's
    cluster.add_node(**NODES["h100"], dashboard_agent_listen_port=free_port(), temp_dir=temp_dir)
    cluster.add_node(**NODES["a100"], dashboard_agent_listen_port=free_port(), temp_dir=temp_dir)
    cluster.wait_for_nodes()
    return cluster


def stop_cluster(cluster: Any) -> None:
    cluster.shutdown()
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def cluster_settings(home: Path, results_uri: str, state_url: str) -> Settings:
    return Settings(home=home, results_uri=results_uri, state_url=state_url, ray_namespace="proctor-test",
                    supervisors=2)


RUNTIMES = SimulateRemoteRuntimes()
