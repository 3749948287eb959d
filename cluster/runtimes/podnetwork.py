"""Private networks of several pods (the services of one Inspect sample), on Kubernetes.

A network is two objects and a label. Its pods carry `proctor.dev/network: <id>`; one
NetworkPolicy selects them and admits ingress from, and egress to, pods with that label
only, plus DNS to kube-dns (port 53, UDP and TCP), so that names resolve; and a headless
Service named after the network (no cluster IP, selecting the same pods) gives each pod,
whose `hostname` is its service's name and `subdomain` the Service's, the DNS name
`<service>.<network>.<namespace>.svc.<cluster domain>`. The pods' `dnsConfig.searches`
holds `<network>.<namespace>.svc.<cluster domain>`, so a bare service name resolves to
its sibling.

Policies add up: each pod keeps its own policy (no ingress, egress only to its allowlist)
and the namespace's deny-all, so what the network's policy admits is all it can reach:
not the node, not another sample's pods (another label), not the internet. The network's
objects are owned by the instance's anchor, like its pods, and labelled like them, so
that `KubernetesRuntime.reconcile` finds them once no pod of theirs is left.

DNS is the one way out of the sample besides its siblings: the cluster's resolver
forwards names it does not know, so a pod could leak data in the names it asks for
(as under Docker's own compose networks). A NetworkPolicy cannot filter names; a CNI
that can (Cilium's DNS-aware policies) would be the next layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import LaunchRequest, SandboxError
from .kubeapi import Conflict, KubeApi
from .podspec import INSTANCE, MANAGED_BY, PodSettings, label_value, owner_reference

NETWORK = "proctor.dev/network"
CLUSTER_DOMAIN = "cluster.local"
KUBE_DNS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
HOSTNAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a pod's hostname: a DNS-1123 label
NETWORK_ID = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # a Service's name: a DNS-1035 label


def members(network: str, settings: PodSettings) -> dict[str, str]:
    """The labels every pod of the network carries (and the policy and Service select by)."""
    return {INSTANCE: settings.instance, NETWORK: label_value(network)}


def network_labels(network: str, settings: PodSettings, extra: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    labels = {MANAGED_BY: "proctor", "app.kubernetes.io/name": "proctor-sandbox-network", **members(network, settings)}
    labels.update({k: label_value(v) for k, v in extra})
    return labels


def search_domain(network: str, settings: PodSettings) -> str:
    return f"{network}.{settings.namespace}.svc.{CLUSTER_DOMAIN}"


def network_policy_manifest(network: str, settings: PodSettings, anchor: dict[str, Any],
                            extra: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """The pods of `network`: ingress from each other only; egress to each other and to
    kube-dns on port 53 only."""
    peers = {"podSelector": {"matchLabels": members(network, settings)}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": network, "namespace": settings.namespace, "labels": network_labels(network, settings, extra),
                     "ownerReferences": [owner_reference(anchor)]},
        "spec": {
            "podSelector": {"matchLabels": members(network, settings)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [peers]}],
            "egress": [{"to": [peers]}, {"to": [KUBE_DNS], "ports": DNS_PORTS}],
        },
    }


def headless_service_manifest(network: str, settings: PodSettings, anchor: dict[str, Any],
                              extra: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """The DNS names of the network's pods: `<hostname>.<network>`, ready or not."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": network, "namespace": settings.namespace, "labels": network_labels(network, settings, extra),
                     "ownerReferences": [owner_reference(anchor)]},
        "spec": {"clusterIP": "None", "selector": members(network, settings), "publishNotReadyAddresses": True},
    }


def join_network(pod: dict[str, Any], request: LaunchRequest, settings: PodSettings) -> dict[str, Any]:
    """`pod` (podspec's manifest of `request`) as a member of `request.network`, if it names one."""
    if request.network is None:
        return pod
    pod["metadata"]["labels"].update(members(request.network, settings))
    spec = pod["spec"]
    if request.hostname is not None:
        spec["hostname"] = request.hostname
    spec["subdomain"] = request.network
    spec["dnsConfig"] = {"searches": [search_domain(request.network, settings)]}
    return pod


@dataclass
class PodNetwork:
    """A made network: its policy and its Service. `close` deletes both."""

    api: KubeApi
    id: str
    services: tuple[str, ...]
    made: list[str] = field(default_factory=list)  # the kinds created, in order
    closed: Callable[[str], None] = lambda network: None  # told once both are deleted

    @classmethod
    async def open(cls, api: KubeApi, settings: PodSettings, anchor: dict[str, Any], network: str,
                   services: list[str], labels: tuple[tuple[str, str], ...] = (),
                   closed: Callable[[str], None] = lambda network: None) -> "PodNetwork":
        """Make the network's policy, then its Service. Raises `SandboxError` (a service name
        that cannot be a pod's hostname, or the API's refusal), having deleted what it made."""
        if not NETWORK_ID.match(network):
            raise SandboxError(f"kubernetes: network {network!r} cannot name a Service (a DNS-1035 label)")
        for name in services:
            if not HOSTNAME.match(name):
                raise SandboxError(f"kubernetes: service name {name!r} cannot be a pod's hostname; use at most 63 "
                                   "lower-case letters, digits and '-', starting and ending with a letter or digit")
        net = cls(api, network, tuple(services), closed=closed)
        try:
            for kind, manifest in (("networkpolicies", network_policy_manifest(network, settings, anchor, labels)),
                                   ("services", headless_service_manifest(network, settings, anchor, labels))):
                net.made.append(kind)
                try:
                    await api.create(kind, manifest)
                except Conflict as exc:  # ids are fresh: another's, never to be shared
                    net.made.pop()
                    raise SandboxError(f"kubernetes: network {network}: a {kind[:-1]} of that name exists") from exc
        except BaseException:
            await net.close()
            raise
        return net

    async def close(self) -> None:
        """Delete the Service and the policy (what is gone already is done). Raises
        `SandboxError` when the API refuses; a second call tries again."""
        for kind in reversed(list(self.made)):
            await self.api.delete(kind, self.id)
            self.made.remove(kind)
        self.closed(self.id)


async def reap_networks(api: KubeApi, selector: str, keep: set[str]) -> list[str]:
    """Delete the policies and Services of networks (of `selector`'s instance) not in `keep`;
    returns those networks. Raises `SandboxError`."""
    gone: set[str] = set()
    for kind in ("services", "networkpolicies"):
        for obj in await api.list(kind, f"{selector},{NETWORK}"):
            network = obj["metadata"]["labels"][NETWORK]
            if network not in keep:
                await api.delete(kind, obj["metadata"]["name"])
                gone.add(network)
    return sorted(gone)


def networks_of(pods: list[dict[str, Any]]) -> set[str]:
    """The networks `pods` belong to (their label values)."""
    return {n for p in pods if (n := ((p.get("metadata") or {}).get("labels") or {}).get(NETWORK))}


__all__ = ["PodNetwork", "NETWORK", "join_network", "network_policy_manifest", "headless_service_manifest",
           "reap_networks", "networks_of", "search_domain"]
