"""Private networks of several sandboxes (the services of one sample), locally.

A `PrivateNetwork` is a set of network namespaces: a "hub" holding a bridge and nothing
else, and one namespace per service with a single veth whose other end is a port of the
hub's bridge. Each service gets an address of `SUBNET`; no namespace has a route or a link
to the host, so a service reaches its siblings, by the names written into its /etc/hosts,
and nothing else: not the host, not another sample (its own hub and bridge), not the
internet. Every sample uses the same addresses: the hubs never meet.

A sandbox joins its service's namespace when it starts (`enter`, in the runtime's process
between fork and exec). gVisor (`runsc --network=sandbox`) then runs its own network stack
on the veth. The runsc we pin refuses to start when `/proc/sys/net/core/rmem_default`
exists, its test for "the host's namespace" that newer kernels (which have that file in
every namespace) always fail: `enter` hides it, in a mount namespace of runsc's own, with
an empty tmpfs over `/proc/sys/net/core` (nothing else of the host's mounts changes, unlike
`ip netns exec`, which remounts /sys and hides the cgroups from runsc).

Names: `pxn-<network id>-hub` and `pxn-<network id>-<n>` under /run/netns, so that
`reap_networks` finds what a dead owner left.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

NETNS_DIR = Path("/run/netns")
PREFIX = "pxn-"
SUBNET = ipaddress.IPv4Network("10.213.0.0/24")
MAX_SERVICES = 200
_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class NetworkError(RuntimeError):
    """A private network could not be made. Caught by the Inspect provider's sample_init,
    which removes what was made and fails the sample with the message."""


@dataclass
class PrivateNetwork:
    """The namespaces of one sample's services; `addresses` maps a service to its address."""

    id: str
    services: tuple[str, ...]
    addresses: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, services: list[str]) -> "PrivateNetwork":
        """Make the hub, its bridge and one namespace with a veth per service. Raises
        `NetworkError` (having removed whatever it made)."""
        if not services or len(services) > MAX_SERVICES:
            raise NetworkError(f"a private network has 1 to {MAX_SERVICES} services, not {len(services)}")
        for name in services:
            if not _NAME.match(name):
                raise NetworkError(f"service name {name!r} cannot be a host name; use lower-case letters, digits, "
                                   "'-', '_' and '.'")
        if shutil.which("ip") is None:
            raise NetworkError("private networks need the `ip` command: apt-get install iproute2")
        net = cls(secrets.token_hex(6), tuple(services))
        hosts = list(SUBNET.hosts())
        net.addresses = {name: str(hosts[i + 1]) for i, name in enumerate(services)}
        try:
            net._build()
        except (OSError, subprocess.SubprocessError, NetworkError) as exc:
            net.remove()
            raise NetworkError(f"could not make the private network of {', '.join(services)}: {exc}") from exc
        return net

    @property
    def hub(self) -> str:
        return f"{PREFIX}{self.id}-hub"

    def namespace(self, service: str) -> str:
        return f"{PREFIX}{self.id}-{self.services.index(service)}"

    def path(self, service: str) -> str:
        """The namespace a sandbox of `service` joins."""
        return str(NETNS_DIR / self.namespace(service))

    def hosts(self) -> tuple[tuple[str, str], ...]:
        """(name, address) of every service, for each sandbox's /etc/hosts."""
        return tuple(self.addresses.items())

    def _build(self) -> None:
        names = [self.namespace(s) for s in self.services]
        lines = [f"netns add {self.hub}", *(f"netns add {n}" for n in names)]
        lines += [f"link add eth0 netns {n} type veth peer name pv{i} netns {self.hub}" for i, n in enumerate(names)]
        _ip_batch([], lines)
        hub = ["link add br0 type bridge", "link set br0 up", "link set lo up"]
        hub += [line for i in range(len(names)) for line in (f"link set pv{i} master br0", f"link set pv{i} up")]
        _ip_batch(["-n", self.hub], hub)
        for service, n in zip(self.services, names):
            _ip_batch(["-n", n], [f"addr add {self.addresses[service]}/{SUBNET.prefixlen} dev eth0",
                                  "link set eth0 up", "link set lo up"])

    def remove(self) -> None:
        """Delete every namespace of the network (their veths and the bridge go with
        them). Safe to call twice, and after a failed `create`."""
        for name in (self.hub, *(self.namespace(s) for s in self.services)):
            delete_namespace(name)


def _ip_batch(options: list[str], lines: list[str]) -> None:
    out = subprocess.run(["ip", *options, "-batch", "-"], input="\n".join(lines) + "\n", capture_output=True,
                         text=True, timeout=30, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if out.returncode != 0:
        raise NetworkError(f"ip {' '.join(options)}: {out.stderr.strip()[:500]}")


def delete_namespace(name: str) -> None:
    if (NETNS_DIR / name).exists():
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def reap_networks() -> list[str]:
    """Delete every namespace of a private network still under /run/netns (what sandboxes
    of a dead owner, or an interrupted run, left); returns their names."""
    found = sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(PREFIX)) if NETNS_DIR.is_dir() else []
    for name in found:
        delete_namespace(name)
    return found


def enter(path: str, hide_root_check: bool = False) -> None:
    """Join the network namespace at `path` (in a child, before exec). `hide_root_check`:
    also enter a mount namespace of the child's own with `/proc/sys/net/core` covered (the
    path runsc tests; see the module's docstring). Raises `OSError`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({path})")
    finally:
        os.close(fd)
    if not hide_root_check:
        return
    if libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if libc.mount(b"proctor-netns", b"/proc/sys/net/core", b"tmpfs", 0, b"size=4k,mode=555") != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs on /proc/sys/net/core")
