"""Who owns the kubernetes runtime's pods, and how the platform finds the ones nobody
owns: the anchor ConfigMap's garbage collection, `reconcile()`, and the supervisor's hook
that runs it on start. Against the API-server double, or the cluster `PROCTOR_KUBECONFIG`
names; nothing may be left after each test.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cluster.runtimes.kubernetes import KubernetesRuntime
from cluster.runtimes.podspec import pod_name
from kubeapi import testing
from kubeapi.testing import FAST, first_event, request
from proctor.settings import Settings

double = pytest.fixture(scope="module")(testing.double)
settings = pytest.fixture(scope="module")(testing.settings)
runtime = pytest.fixture(testing.runtime)
workspace = pytest.fixture(testing.workspace)


def test_reconcile_deletes_orphans_and_keeps_live_pods(runtime: Any, settings: Settings, workspace: Path) -> None:
    other = KubernetesRuntime(settings.model_copy(update={"kube_instance": settings.kube_instance + "-other"}),
                              retry=FAST)

    async def go() -> tuple[list[str], Any, Any]:
        live = await runtime.launch(request(workspace, sid="rec-live"))
        orphan = await runtime.launch(request(workspace, sid="rec-orphan"))
        foreign = await other.launch(request(workspace, sid="rec-foreign"))
        try:
            restarted = KubernetesRuntime(settings, retry=FAST)  # a supervisor's next life
            try:
                deleted = await restarted.reconcile(lambda: {"rec-live"})
            finally:
                restarted.close()
            names = {p["metadata"]["name"] for p in await runtime.api.list("pods", "app.kubernetes.io/managed-by")}
            exit_ = await asyncio.wait_for(orphan.wait(), 20)
            return deleted, names, exit_
        finally:
            for sandbox in (live, orphan, foreign):
                await sandbox.kill()
                await sandbox.cleanup()

    try:
        deleted, names, exit_ = asyncio.run(go())
    finally:
        other.close()
    assert deleted == ["rec-orphan"]
    assert pod_name("rec-live") in names and pod_name("rec-foreign") in names and pod_name("rec-orphan") not in names
    assert exit_.reason == "killed" and "deleted outside Proctor" in exit_.detail


def test_deleting_the_anchor_collects_every_pod_of_the_instance(runtime: Any, workspace: Path) -> None:
    async def go() -> tuple[list[Any], Any]:
        sandbox = await runtime.launch(request(workspace))
        try:
            await first_event(sandbox)
            await runtime.api.delete("configmaps", runtime.pods.anchor_name)
            exit_ = await asyncio.wait_for(sandbox.wait(), 30)
            return await runtime.api.list("pods", runtime.pods.selector), exit_
        finally:
            await sandbox.cleanup()
            runtime.forget_anchor()

    left, exit_ = asyncio.run(go())
    assert left == [] and exit_.reason == "killed"




def test_a_restarted_supervisor_deletes_the_pods_no_running_shard_owns(runtime: Any, settings: Settings,
                                                                       workspace: Path, tmp_path: Path) -> None:
    """The supervisor's hook (`_reconcile_pods`) with a real state store: a shard another
    supervisor runs keeps its pod; the pods of this supervisor's previous life and of a
    finished shard go. (The shards themselves are the scheduler's recovery to retry.)"""
    from cluster.state import StateStore
    from cluster.state.models import NewShard
    from eval_actors.supervisor import Supervisor

    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    cpu = {"cpus": 1.0, "memory": 256 * 1024**2, "gpus": 0, "gpu_type": None}
    store.create_evaluation("ev-rec", owner="alice", name="rec", spec={"name": "rec"}, model="reference",
                            runtime="kubernetes", shards=[NewShard(f"s{i}", ["x"], 1, cpu) for i in range(3)])
    for shard, supervisor, status in (("s0", "sup-other", "running"), ("s1", "sup-me", "running"),
                                      ("s2", "sup-other", "succeeded")):
        assert store.transition_shard("ev-rec", shard, "scheduled", supervisor=supervisor)
        assert store.transition_shard("ev-rec", shard, "running", sandbox_id=f"ev-rec-{shard}-a1")
        if status != "running":
            assert store.transition_shard("ev-rec", shard, status)
    previous = KubernetesRuntime(settings, retry=FAST)  # the supervisors' pods, made before the restart
    restarted = KubernetesRuntime(settings, retry=FAST)
    me = SimpleNamespace(name="sup-me", settings=settings, store=store, reconciled_pods=[],
                         _runtime=lambda name: restarted)

    async def go() -> list[str]:
        pods = [await previous.launch(request(workspace, sid=f"ev-rec-s{i}-a1")) for i in range(3)]
        previous.active.clear()  # that life is over: it runs nothing any more
        try:
            assert await Supervisor.__ray_actor_class__._reconcile_round(me)
            return sorted(p["metadata"]["annotations"]["proctor.dev/sandbox-id"]
                          for p in await runtime.api.list("pods", runtime.pods.selector))
        finally:
            for sandbox in pods:
                await sandbox.kill()
                await sandbox.cleanup()

    try:
        kept = asyncio.run(go())
    finally:
        previous.close()
        restarted.close()
        store.close()
    assert me.reconciled_pods == ["ev-rec-s1-a1", "ev-rec-s2-a1"]
    assert kept == ["ev-rec-s0-a1"]
