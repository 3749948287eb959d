"""What `inspect sandbox cleanup proctor` removes: everything an interrupted run left.

Sandboxes of both local runtimes under the provider's folder (their processes, cgroups,
runsc state and bundles), every private network's namespaces (`pxn-*` under /run/netns),
and the sample workspaces; and where `PROCTOR_KUBECONFIG` names a cluster, every pod,
NetworkPolicy and Service the provider made there for the settings' platform instance
(those labelled `proctor.dev/inspect-sample`; the instance's shard pods are left alone).
"""

from __future__ import annotations

import shutil

from cluster.runtimes import BubblewrapRuntime, GvisorRuntime
from cluster.runtimes.netns import reap_networks
from eval_actors.inspect_sandbox.sample import root_of
from proctor.settings import Settings, load_settings


def remove_leftovers(settings: Settings | None = None) -> list[str]:
    """Remove them; returns what was removed (sandbox ids, namespaces, workspaces)."""
    root = root_of(settings or load_settings())
    removed: list[str] = []
    if (root / "runtimes").is_dir():
        for runtime in (GvisorRuntime(root / "runtimes"), BubblewrapRuntime(root / "runtimes")):
            removed += runtime.reap()
    removed += reap_networks()
    workspaces = root / "workspaces"
    for ws in sorted(workspaces.iterdir()) if workspaces.is_dir() else ():
        shutil.rmtree(ws, ignore_errors=True)
        if ws.name not in removed:
            removed.append(ws.name)
    return removed


SAMPLE_LABEL = "proctor.dev/inspect-sample"


async def remove_pod_leftovers(settings: Settings | None = None) -> list[str]:
    """The Kubernetes part (nothing without a kubeconfig); returns `kind/name` of what was
    deleted. Raises `SandboxError` when the API refuses."""
    settings = settings or load_settings()
    if settings.kubeconfig is None:
        return []
    from cluster.runtimes.kubernetes import KILL_GRACE_S, KubernetesRuntime

    runtime = KubernetesRuntime(settings)
    removed: list[str] = []
    try:
        for kind, noun in (("pods", "pod"), ("services", "service"), ("networkpolicies", "networkpolicy")):
            for obj in await runtime.api.list(kind, f"{runtime.pods.selector},{SAMPLE_LABEL}"):
                name = obj["metadata"]["name"]
                if await runtime.api.delete(kind, name, grace_s=KILL_GRACE_S if kind == "pods" else None):
                    removed.append(f"{noun}/{name}")
    finally:
        runtime.close()
    return removed
