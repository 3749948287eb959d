"""`proctor up` and `proctor down` as a user runs them, and the README's commands that need
the platform (`ray job submit`, `serve deploy`), run as written.

The platform is a real `proctor up` (the installed program) in a fresh shell's
environment: no RAY_AUTH_MODE, no .venv on the PATH, its own home and free ports. The
session's Ray cluster (`plane`) runs beside it, as another user's would, and must survive
`proctor down`. The README's commands are taken from the README and changed in two places
only: the Ray dashboard's port (this platform's, not 8265) and `.venv/bin/` (the
virtualenv running the tests, which is the repository's `.venv` under scripts/test.sh).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster import localray
from ports import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
FRESH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def readme_command(words: str) -> str:
    """The README's shell command (a ```bash block's line, with its continuations) that
    contains `words`."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    commands = [c.strip() for block in blocks for c in block.replace("\\\n", " ").splitlines()]
    (found,) = [c for c in commands if words in c]
    return re.sub(r"\s+", " ", found)


def as_here(command: str, dashboard_port: int) -> str:
    assert "http://127.0.0.1:8265" in command and ".venv/bin/" in command, command
    return command.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{dashboard_port}").replace(
        ".venv/bin/", f"{VENV_BIN}/")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def fresh_shell() -> tuple[Path, dict[str, int], dict[str, str]]:
    """A new Proctor home, free ports for everything `up` starts, and a fresh shell's environment."""
    home = Path(tempfile.mkdtemp(prefix="pp-"))  # short: Ray's socket paths live under it
    home.chmod(0o711)  # the sandbox user reaches its workspace
    ports = {"PROCTOR_RAY_PORT": free_port(), "PROCTOR_RAY_DASHBOARD_PORT": free_port(),
             "PROCTOR_API_PORT": free_port(), "PROCTOR_UI_PORT": free_port(),
             "PROCTOR_HAPROXY_STATS_PORT": free_port(), "PROCTOR_HAPROXY_METRICS_PORT": free_port()}
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": FRESH_PATH, "LANG": "C.UTF-8",
           "PROCTOR_HOME": str(home), "PROCTOR_CONFIG_DIR": str(home / "config"),
           **{k: str(v) for k, v in ports.items()}}
    if "PYTHONPATH" in os.environ:  # a checkout other than the installed one (a worktree)
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return home, ports, env


def test_up_whose_ray_cannot_start_exits_5_naming_the_cause() -> None:
    home, ports, env = fresh_shell()
    (home / "ray").write_text("Ray's folder is a file here, so `ray start` fails\n")
    try:
        done = subprocess.run([str(VENV_BIN / "proctor"), "up"], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 5, (done.stdout + done.stderr)[-3000:]
        first = done.stderr.splitlines()[0]
        assert first.startswith("error: Ray did not start: could not start Ray on port "
                                f"{ports['PROCTOR_RAY_PORT']}"), done.stderr
        assert "Traceback" not in done.stderr and "ray" in done.stderr.lower()
        assert not (home / "dashboard.pid").exists()  # the dashboard it had started is stopped again
        assert all(port_free(port) for port in ports.values())
    finally:
        subprocess.run([str(VENV_BIN / "proctor"), "down"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def platform(plane: Any):  # noqa: ANN201 - Iterator[dict[str, Any]]
    """`proctor up` from a fresh shell; what it printed (--json), its environment, and
    whether the API and the dashboard answered the moment it returned."""
    home, ports, env = fresh_shell()
    up = subprocess.run([str(VENV_BIN / "proctor"), "up", "--json"], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        info = json.loads(up.stdout)
        answered = {"api": httpx.get(f"{info['api']}/api/v1/health", timeout=5).json(),
                    "dashboard": httpx.get(info["dashboard_ui"], timeout=5).status_code}
        yield {**info, "env": env, "ports": ports, "home": home, "answered": answered, "stderr": up.stderr}
    finally:
        subprocess.run([str(VENV_BIN / "proctor"), "down"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(home, ignore_errors=True)


def test_up_returns_once_the_api_and_the_dashboard_answer(platform: dict[str, Any]) -> None:
    assert platform["answered"]["api"]["ready"] is True, platform["answered"]
    assert platform["answered"]["dashboard"] == 200
    assert set(platform["took_s"]) == {"ray", "control_plane_and_api", "api_ready", "dashboard_ready"}
    assert platform["stderr"] == ""  # a quiet start: nothing the user did not cause


def test_up_again_keeps_the_running_platform(platform: dict[str, Any]) -> None:
    """`up` is idempotent: a second one finds its Ray head, Serve and dashboard running,
    starts none of them again, and returns with the API and the dashboard answering."""
    record = json.loads((platform["home"] / "platform.json").read_text())
    dashboard = (platform["home"] / "dashboard.pid").read_text()
    again = subprocess.run([str(VENV_BIN / "proctor"), "up", "--json"], env=platform["env"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    info = json.loads(again.stdout)
    assert info["api"] == platform["api"] and info["dashboard_ui"] == platform["dashboard_ui"]
    assert json.loads((platform["home"] / "platform.json").read_text())["ray"] == record["ray"]
    assert (platform["home"] / "dashboard.pid").read_text() == dashboard
    assert httpx.get(f"{info['api']}/api/v1/health", timeout=5).json()["ready"] is True
    assert httpx.get(info["dashboard_ui"], timeout=5).status_code == 200


def listening(pids: list[int]) -> dict[int, int]:
    """{port: pid} of the TCP sockets these processes listen on (/proc/net/tcp, their fds)."""
    owner = {}
    for pid in pids:
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                link = os.readlink(fd.path)
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:  # gone meanwhile
            continue
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # LISTEN
                found[int(fields[1].rsplit(":", 1)[1], 16)] = owner[fields[9]]
    return found


def test_the_api_port_is_haproxy_in_front_of_the_replicas_own_server(platform: dict[str, Any]) -> None:
    """Serve's HAProxy ingress is in effect: the controller says so, HAProxy holds the API
    port, and the replica serves the API over HTTP itself (no Python proxy between)."""
    head = localray.LocalHead.from_dict(json.loads((platform["home"] / "platform.json").read_text())["ray"])
    assert head is not None
    ports = listening(localray.processes(head))
    api = platform["ports"]["PROCTOR_API_PORT"]
    assert Path(f"/proc/{ports[api]}/comm").read_text().strip() == "haproxy"
    asked = subprocess.run([str(VENV_BIN / "python"), "-c", (
        "import json, ray; from serve_app.ingress import mode_in_effect, replica_http_ports; "
        f"ray.init(address='127.0.0.1:{platform['ports']['PROCTOR_RAY_PORT']}', logging_level='ERROR'); "
        "print(json.dumps([mode_in_effect('proctor'), replica_http_ports('proctor')]))")],
        env={**platform["env"], "RAY_AUTH_MODE": "token"}, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert asked.returncode == 0, asked.stderr[-3000:]
    mode, replicas = json.loads(asked.stdout.strip().splitlines()[-1])
    assert mode == "haproxy" and replicas
    for port in replicas:  # the replica's own server, in the replica's process
        assert "ServeReplica:proctor:ProctorAPI" in Path(f"/proc/{ports[port]}/cmdline").read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=10).json()["ready"] is True


def test_the_readme_ray_job_command_works_as_written(platform: dict[str, Any]) -> None:
    command = as_here(readme_command("ray job submit"), platform["ports"]["PROCTOR_RAY_DASHBOARD_PORT"])
    done = subprocess.run(["bash", "-c", command], env=platform["env"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["error_rate"] for r in rows] == [0.0, 0.3], out[-4000:]
    assert all(r["status"] == "succeeded" for r in rows) and rows[0]["accuracy"] == 1.0
    assert all(r["results"].startswith(Path(platform["results"].removeprefix("file://")).as_uri()) for r in rows)


def test_the_readme_serve_deploy_command_works_as_written(platform: dict[str, Any]) -> None:
    dashboard = platform["ports"]["PROCTOR_RAY_DASHBOARD_PORT"]
    command = as_here(readme_command("serve deploy"), dashboard)
    done = subprocess.run(["bash", "-c", command], env=platform["env"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    token = (Path(platform["env"]["HOME"]) / ".ray" / "auth_token").read_text().strip()
    deadline = time.monotonic() + 180
    while True:  # Serve applies a deployed config in the background
        apps = httpx.get(f"http://127.0.0.1:{dashboard}/api/serve/applications/",
                         headers={"Authorization": f"Bearer {token}"}, timeout=10).json()["applications"]
        app = apps.get("proctor", {})
        if app.get("status") == "RUNNING" and (app.get("deployed_app_config") or {}).get("import_path"):
            break
        assert time.monotonic() < deadline, app
        time.sleep(1)
    assert app["deployed_app_config"]["import_path"] == "serve_app.deployment:app_builder"
    assert httpx.get(f"{platform['api']}/api/v1/health", timeout=10).json()["ready"] is True


def test_down_stops_its_own_ray_cluster_and_no_other(platform: dict[str, Any], plane: Any) -> None:
    head = localray.LocalHead.from_dict(json.loads((platform["home"] / "platform.json").read_text())["ray"])
    assert head is not None and localray.processes(head)
    done = subprocess.run([str(VENV_BIN / "proctor"), "down"], env=platform["env"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopped: dashboard, ray"
    assert localray.processes(head) == []
    assert all(port_free(port) for port in platform["ports"].values())
    assert plane.status() is not None  # the session's own Ray cluster and control plane still answer
