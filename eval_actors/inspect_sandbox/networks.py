"""The private network of a sample's services, on whichever runtime runs them.

Locally (gVisor, bubblewrap) it is a set of network namespaces (`cluster.runtimes.netns`):
each sandbox joins its service's namespace and finds its siblings in its /etc/hosts. On
Kubernetes it is a label, a NetworkPolicy and a headless Service
(`cluster.runtimes.podnetwork`): each pod carries the label and is its service's hostname.
Either way `fields(service)` is what the service's `LaunchRequest` gets, and `close()`
removes the network after its sandboxes.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from cluster.runtimes.netns import PrivateNetwork


class SampleNetwork(Protocol):
    services: tuple[str, ...]

    def fields(self, service: str) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class LocalNetwork:
    def __init__(self, net: PrivateNetwork):
        self.net = net
        self.services = net.services

    def fields(self, service: str) -> dict[str, Any]:
        return {"netns": self.net.path(service), "hosts": self.net.hosts()}

    async def close(self) -> None:
        await asyncio.to_thread(self.net.remove)


class PodNetworkOf:
    def __init__(self, net: Any):
        self.net = net
        self.services = net.services

    def fields(self, service: str) -> dict[str, Any]:
        return {"network": self.net.id, "hostname": service}

    async def close(self) -> None:
        await self.net.close()


async def open_network(runtime: Any, key: str, services: list[str],
                       labels: tuple[tuple[str, str], ...]) -> SampleNetwork:
    """The network of sample `key`'s `services`. Raises `NetworkError` (local) or
    `SandboxError` (kubernetes), having removed what it made."""
    if hasattr(runtime, "open_network"):  # kubernetes: the runtime makes it in the cluster
        return PodNetworkOf(await runtime.open_network(f"pxn-{key}", services, labels))
    return LocalNetwork(await asyncio.to_thread(PrivateNetwork.create, services))
