"""The API's path at a raised priority (serve_app/priority.py): which processes, and the renice."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from serve_app.priority import PriorityKeeper, renice, serve_path


def fake_process(proc: Path, pid: int, ppid: int, argv: list[str], name: str = "python") -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(f"{pid} ({name}) S {ppid} {pid} {pid} 0 -1 4194560 0 0\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_the_serve_path_is_the_ingress_beside_this_replica_and_below_it(tmp_path: Path) -> None:
    raylet, other_raylet = 100, 900
    fake_process(tmp_path, raylet, 1, ["/usr/bin/raylet"])
    fake_process(tmp_path, 101, raylet, ["ray::ProctorAPI"])  # the replica itself
    fake_process(tmp_path, 102, raylet, ["ray::HAProxyManager", ""])
    fake_process(tmp_path, 103, 102, ["/usr/sbin/haproxy", "-W", "-f", "haproxy.cfg"])
    fake_process(tmp_path, 104, 103, ["/usr/sbin/haproxy", "-W"], name="hap) (roxy")  # parens in the name
    fake_process(tmp_path, 105, raylet, ["ray::ProxyActor"])
    fake_process(tmp_path, 106, raylet, ["ray::Supervisor.run_shard"])  # evaluation work keeps its priority
    fake_process(tmp_path, 107, 106, ["runsc", "run"])
    fake_process(tmp_path, 901, other_raylet, ["ray::ProxyActor"])  # another Ray cluster's proxy
    (tmp_path / "self").mkdir()  # not a process
    assert serve_path(raylet, tmp_path) == [102, 103, 104, 105]
    assert serve_path(other_raylet, tmp_path) == [901]
    assert serve_path(555, tmp_path) == []


def test_renice_raises_every_thread_once_and_never_lowers() -> None:
    child = subprocess.Popen([sys.executable, "-c",
                              "import threading, time\n"
                              "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
                              "time.sleep(30)\n"],
                             preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, 5))  # whatever this process's
    try:
        tasks = Path(f"/proc/{child.pid}/task")
        deadline = time.monotonic() + 30
        while len(list(tasks.iterdir())) < 2:  # its second thread has started
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert renice(child.pid, -5) == 2
        assert {os.getpriority(os.PRIO_PROCESS, int(t.name)) for t in tasks.iterdir()} == {-5}
        assert renice(child.pid, -5) == 0  # nothing left to raise
        assert renice(child.pid, 3) == 0  # a higher nice is never applied
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == -5
    finally:
        child.kill()
        child.wait()
    assert renice(child.pid, -5) == 0  # gone: nothing, no error


def test_a_keeper_at_the_default_priority_starts_nothing() -> None:
    keeper = PriorityKeeper(0)
    keeper.start()
    assert keeper._thread is None


def test_the_running_api_and_serves_proxy_beside_it_run_at_the_raised_priority(api: Any) -> None:
    import ray

    client, tokens, _ = api
    assert client.get("/api/v1/health").status_code == 200  # the replica has started
    [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::proctor#ProctorAPI")]
    handle = ray.get_actor(replica["name"], namespace=replica["namespace"])
    pid, raylet = ray.get(handle.__ray_call__.remote(lambda self: (os.getpid(), os.getppid())))
    nice = client.settings.api_nice
    assert nice < 0
    deadline = time.monotonic() + 30
    while True:
        path = serve_path(raylet)
        tasks = [int(t.name) for p in [pid, *path] for t in Path(f"/proc/{p}/task").iterdir()]
        seen = {os.getpriority(os.PRIO_PROCESS, t) for t in tasks}
        if path and max(seen) <= nice:  # none below it (higher, where the cluster started higher)
            break
        assert time.monotonic() < deadline, f"the API's path is at {seen}, with {len(path)} ingress processes"
        time.sleep(0.5)
    titles = {Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0] for p in path}
    assert titles & {b"ray::ProxyActor", b"ray::HAProxyManager"}


def test_an_app_run_outside_serve_leaves_its_process_at_its_priority(tmp_path: Path) -> None:
    """Only Serve's replica raises its path: a script or test that runs the app in its own
    process keeps that process's priority (and what it starts later inherits it)."""
    from fastapi.testclient import TestClient

    from proctor.settings import Settings
    from serve_app.api import build_app

    before = {t.name: os.getpriority(os.PRIO_PROCESS, int(t.name)) for t in Path("/proc/self/task").iterdir()}
    settings = Settings(home=tmp_path, state_url=f"sqlite:///{tmp_path / 'state.db'}",
                        results_uri=(tmp_path / "results").as_uri(), ray_namespace="absent-priority")
    assert settings.api_nice < 0
    with TestClient(build_app(settings)) as client:
        assert client.get("/api/v1/health").status_code in (200, 503)
        time.sleep(0.5)
        after = {t.name: os.getpriority(os.PRIO_PROCESS, int(t.name)) for t in Path("/proc/self/task").iterdir()}
    assert all(after[tid] == nice for tid, nice in before.items() if tid in after)
    assert set(after.values()) <= set(before.values())
