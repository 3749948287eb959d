"""The Inspect worker runs as the child of a Ray actor that holds its shard's resources:
a GPU shard's worker sees exactly the GPUs of the shard's placement group, and a shard
without GPUs sees none."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import ray

from eval_actors.control_plane import ControlPlane
from eval_actors.inspect_host import host_name
from eval_actors.scheduler import pg_name

pytestmark = pytest.mark.ray
TASKS = Path(__file__).resolve().parent / "inspect_tasks"


def spec(name: str, sandbox: dict[str, Any] | None = None, **args: Any) -> dict[str, Any]:
    return {"name": name, "model": {"adapter": "inspect", "model": "mockllm/model"}, "shard_size": 1,
            "inspect": {"task": "gpus.py@where", "files": {"gpus.py": (TASKS / "gpus.py").read_text()}, "args": args},
            **({"sandbox": sandbox} if sandbox else {})}


def _rows(ev: Any) -> dict[str, str]:
    df = pd.read_parquet(ev.results_uri.removeprefix("file://"))
    return dict(zip(df["shard_id"], df["output"]))


def _hosts(plane: ControlPlane, eval_id: str, count: int) -> dict[str, tuple[Any, int]]:
    """The live host actors of the evaluation's shards: shard id → (handle, store attempt)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = {}
        for s in plane.store().shards(eval_id):
            try:
                found[s.shard_id] = (ray.get_actor(host_name(eval_id, s.shard_id, s.attempt),
                                                   namespace=plane.settings.ray_namespace), s.attempt)
            except ValueError:
                continue
        if len(found) == count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"the {count} host actors of {eval_id} were not all alive at once")


def test_a_gpu_shards_worker_runs_in_the_actor_holding_its_placement_groups_gpus(plane: ControlPlane) -> None:
    box = {"runtime": "auto", "cpus": 1, "memory": "256Mi", "gpu": {"count": 2, "type": "H100"}}
    eval_id = plane.submit(spec("inspect-gpus", box, samples=2, seconds=6))
    hosts = _hosts(plane, eval_id, 2)
    gpus: dict[str, list[str]] = {}
    pids: dict[str, int] = {}
    for shard_id, (actor, attempt) in hosts.items():
        info = ray.get(actor.reservation.remote(), timeout=30)
        group = ray.util.get_placement_group(pg_name(eval_id, shard_id, attempt))
        table = ray.util.placement_group_table(group)
        assert info["node_id"] == table["bundles_to_node_id"][0]  # on the node the scheduler chose
        key = f"GPU_group_{group.id.hex()}"
        assert ray.cluster_resources()[key] == 2 and ray.available_resources().get(key, 0) == 0  # the host holds both
        assert len(set(info["gpu_ids"])) == 2 and info["cuda_visible_devices"] == ",".join(info["gpu_ids"])
        gpus[shard_id], pids[shard_id] = info["gpu_ids"], info["pid"]
    first, second = gpus.values()
    assert not set(first) & set(second)  # two shards at once, never the same GPU
    ev = plane.wait(eval_id, timeout=240)
    assert ev.status == "succeeded", ev.error
    outputs = _rows(ev)
    for shard_id, output in outputs.items():
        cuda, ppid, parent = (part.split("=", 1)[1] for part in output.split())
        assert cuda == ",".join(gpus[shard_id]) and int(ppid) == pids[shard_id]
        assert parent.startswith("ray::InspectWorkerHost")
    assert sorted(outputs) == sorted(hosts)


def test_a_shard_without_gpus_runs_its_worker_in_a_host_that_sees_none(plane: ControlPlane) -> None:
    eval_id = plane.submit(spec("inspect-no-gpus", samples=1))
    ev = plane.wait(eval_id, timeout=240)
    assert ev.status == "succeeded", ev.error
    (output,) = _rows(ev).values()
    assert output.startswith("cuda= ") and "parent=ray::InspectWorkerHost" in output
    shard = plane.store().shards(eval_id)[0]
    with pytest.raises(ValueError):  # the host is gone with its shard
        ray.get_actor(host_name(eval_id, shard.shard_id, shard.attempt), namespace=plane.settings.ray_namespace)
