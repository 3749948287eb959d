"""Multi-service samples through the Inspect provider: each service its own sandbox, on a
private network of the sample's own. A sibling is reachable by its name; the host,
another sample's services and any outside address are not; nothing is left behind by
sample_cleanup or by `inspect sandbox cleanup proctor`."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.runtimes.netns import NETNS_DIR, PREFIX
from proctor.compose import parse_config
from eval_actors.inspect_sandbox.provider import ProctorSandboxEnvironment as Provider

pytestmark = [pytest.mark.anyio, pytest.mark.sandbox]

CONNECT = ("import socket, sys\n"
           "try:\n"
           "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
           "    print('connected', s.recv(64).decode())\n"
           "except OSError as e:\n"
           "    print('refused', e); sys.exit(3)\n")
SERVE = "python3 -c \"import socket\ns=socket.socket(); s.bind(('0.0.0.0', {port})); s.listen()\nwhile True:\n c,_=s.accept(); c.sendall(b'{word}'); c.close()\""


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def config(runtime: str, home: Path, services: dict[str, Any]) -> Any:
    return parse_config({"services": services, "x-proctor": {"runtime": runtime, "home": str(home)}}, where="test")


def two_services(runtime: str, home: Path) -> Any:
    return config(runtime, home, {
        "target": {"command": SERVE.format(port=8080, word="target")},
        "agent": {"x-default": True},
    })


async def connect(env: Any, host: str, port: int) -> str:
    result = await env.exec(["python3", "-c", CONNECT, host, str(port)], timeout=30)
    return result.stdout.strip()


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A TCP server on every address of the host, answering 'host'."""
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(0.5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.sendall(b"host")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines() if " lo " not in line]


def leftovers(home: Path) -> list[str]:
    namespaces = [p.name for p in NETNS_DIR.iterdir() if p.name.startswith(PREFIX)] if NETNS_DIR.is_dir() else []
    workspaces = list((home / "inspect" / "workspaces").glob("*"))
    bundles = list((home / "inspect" / "runtimes").glob("*/pxi-*"))
    cgroups = [p.name for pattern in ("proctor/*--pxi-*", "*/proctor/*--pxi-*")
               for p in Path("/sys/fs/cgroup").glob(pattern)]
    return namespaces + [str(p) for p in workspaces + bundles] + cgroups


@pytest.mark.parametrize("runtime", ["gvisor", "bubblewrap"])
async def test_services_reach_each_other_by_name_and_nothing_else(runtime: str, sandbox_root: Path,
                                                                   host_listener: int) -> None:
    home = sandbox_root / f"inspect-net-{runtime}"
    cfg = two_services(runtime, home)
    other = config(runtime, home, {"a": {}, "b": {}, "c": {"command": SERVE.format(port=8082, word="other")}})
    envs = await Provider.sample_init("net", cfg, {})
    others = await Provider.sample_init("net", other, {})
    try:
        assert list(envs) == ["agent", "target"]  # the default service first
        agent = envs["agent"]
        assert "connected target" in await _eventually(agent, "target", 8080)
        # the other sample's third service has an address this sample's network lacks
        assert await connect(others["a"], "c", 8082) == "connected other"
        assert (await connect(agent, "10.213.0.4", 8082)).startswith("refused")
        for address in host_addresses():
            assert (await connect(agent, address, host_listener)).startswith("refused"), address
        assert (await connect(agent, "10.213.0.1", host_listener)).startswith("refused")
        assert (await connect(agent, "1.1.1.1", 80)).startswith("refused")
        hosts = await agent.read_file("/etc/hosts")
        assert "target" in hosts and "agent" in hosts
    finally:
        await Provider.sample_cleanup("net", cfg, envs, False)
        await Provider.sample_cleanup("net", other, others, False)
    assert leftovers(home) == []


async def _eventually(env: Any, host: str, port: int) -> str:
    """The target's server starts in the background: try for a few seconds."""
    said = ""
    for _ in range(20):
        said = await connect(env, host, port)
        if said.startswith("connected"):
            return said
        await env.exec(["sleep", "0.5"])
    return said


async def test_cli_cleanup_removes_an_interrupted_samples_sandboxes(sandbox_root: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    home = sandbox_root / "inspect-cli-cleanup"
    monkeypatch.setenv("PROCTOR_HOME", str(home))
    cfg = two_services("gvisor", home)
    envs = await Provider.sample_init("net", cfg, {})
    assert leftovers(home) != []  # an interrupted run: its sample was never cleaned up
    await Provider.cli_cleanup(None)
    assert leftovers(home) == []
    await Provider.sample_cleanup("net", cfg, envs, True)  # still safe afterwards
