"""The kubernetes runtime end to end, against the API-server double (tests/kubeapi).

The cluster is found only through the kubeconfig setting: with `PROCTOR_KUBECONFIG` set,
these tests run against that cluster instead (those that need the double's fault
injection are skipped there). After every test, no pod of the test's platform instance
and no container process may be left.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cluster.runtimes import RuntimeUnavailable, SandboxError, select_runtime
from cluster.runtimes.kubernetes import METRICS_EVERY_S, KubernetesRuntime, go_duration
from eval_actors.gateway import ModelGateway
from eval_actors.shard_executor import ShardExecutor, ShardWork
from kubeapi import A100_NODE, KubeApiDouble, testing
from kubeapi.testing import FAST, REPORT, first_event, needs_double, request, run_to_end
from proctor.harness.runner import sample_dir_name
from proctor.protocol import INLINE_ARTIFACT_BYTES, GenerateResult
from proctor.settings import Settings
from proctor.spec import parse_spec

double = pytest.fixture(scope="module")(testing.double)
settings = pytest.fixture(scope="module")(testing.settings)
runtime = pytest.fixture(testing.runtime)
workspace = pytest.fixture(testing.workspace)


# ---------------------------------------------------------------- a shard, end to end


class AnswerFour(ModelGateway):
    """A model gateway that answers every call with "4" (no network)."""

    async def _complete(self, call: Any) -> GenerateResult:
        return GenerateResult(id=call.event.id, output="4")


def test_a_shard_runs_in_a_pod_and_its_samples_are_scored(runtime: Any, double: Any, tmp_path: Path) -> None:
    spec = parse_spec({
        "name": "kube", "model": {"adapter": "openai", "model": "m", "base_url": "http://gateway.invalid/v1"},
        "dataset": {"samples": [{"id": str(i), "input": f"{i} + {4 - i}?", "target": "4",
                                 "files": {"notes.txt": f"note {i}\n",
                                           **({"big.bin": "x" * (INLINE_ARTIFACT_BYTES + 1)} if i == 0 else {}),
                                           **({"huge.bin": "y" * (300 * 1024)} if i == 1 else {})}}
                                for i in range(3)]},
        "scorers": [{"type": "exact"},
                    {"type": "command", "name": "workspace", "command": 'test "$(cat ../data/answer.txt)" = 42'}],
        "sandbox": {"runtime": "kubernetes", "memory": "256Mi", "timeout_s": 60, "files": {"data/answer.txt": "42"},
                    "artifacts": ["notes.txt", "big.bin", "huge.bin"], "output_cap": "2Mi"},
    })
    work = ShardWork("ev-kube", "s0000", spec, tuple(spec.dataset.samples or ()))
    gateway = AnswerFour()
    executor = ShardExecutor(runtime, gateway, tmp_path / "sandboxes")
    seen: list[str] = []
    outcome = asyncio.run(executor.run(work, on_event=lambda e: seen.append(e.type)))
    assert outcome.status == "succeeded", (outcome.error, outcome.exit)
    assert (outcome.runtime, outcome.isolation) == ("kubernetes", "strong")
    assert [r.scores for r in outcome.records] == [{"exact": 1.0, "workspace": 1.0}] * 3  # files reached the pod
    assert outcome.model_calls == 3  # every generate went out through the attach stream and back
    assert seen[0] == "log" and seen.count("sample") == 3 and seen[-1] == "done"
    assert outcome.exit is not None and outcome.exit.reason == "exited" and outcome.exit.exit_code == 0
    # artifacts came back inline over the attach stream (big.bin in two pieces), checked against
    # their SHA-256, up to the inline budget (3/8 of the 2 MiB output cap: 768 KiB)
    kept = dict(outcome.artifacts)
    big = f"{sample_dir_name('0', 1)}/big.bin"
    assert sorted(kept) == sorted([big] + [f"{sample_dir_name(str(i), 1)}/notes.txt" for i in range(3)])
    assert kept.pop(big) == b"x" * (INLINE_ARTIFACT_BYTES + 1)
    assert [kept[k] for k in sorted(kept)] == [f"note {i}\n".encode() for i in range(3)]
    assert [r.reason for r in outcome.rejections if "bin" in r.reason] == [
        f"artifact '{sample_dir_name('1', 1)}/huge.bin' (307200 bytes) was not sent inline (over the shard's "
        "inline budget: 3/8 of its output cap)"]
    if double is not None:
        pod = next(o for _, kind, _, t, o in double.store.log if kind == "pods" and t == "ADDED"
                   and o["metadata"]["annotations"]["proctor.dev/eval-id"] == "ev-kube")
        assert pod["metadata"]["labels"]["proctor.dev/shard-id"] == "s0000"


def test_events_stream_in_order_and_send_reaches_the_pod(runtime: Any, workspace: Path) -> None:
    code = REPORT + textwrap.dedent("""
        import sys
        report(ready=True)
        for line in sys.stdin:
            if line.strip() == "bye":
                break
            report(echo=line.strip())
    """)

    async def go() -> tuple[list[dict[str, Any]], Any]:
        sandbox = await runtime.launch(request(workspace, code))
        seen = []
        try:
            async for event in sandbox.events():
                seen.append(json.loads(event.message))
                if len(seen) <= 3:
                    await sandbox.send(b"bye\n" if len(seen) == 3 else f"line {len(seen)}\n".encode())
            return seen, await sandbox.wait()
        finally:
            await sandbox.cleanup()

    seen, exit_ = asyncio.run(go())
    assert seen == [{"ready": True}, {"echo": "line 1"}, {"echo": "line 2"}]
    assert (exit_.reason, exit_.exit_code) == ("exited", 0)


# ---------------------------------------------------------------- stopping


def test_kill_deletes_the_pod_within_a_second(runtime: Any, workspace: Path) -> None:
    async def go() -> tuple[float, Any, Any]:
        sandbox = await runtime.launch(request(workspace))
        try:
            await first_event(sandbox)
            t0 = time.monotonic()
            await sandbox.kill("killed", "test")
            took = time.monotonic() - t0
            try:
                await runtime.api.get("pods", sandbox.pod, attempts=1)
                gone = False
            except SandboxError as exc:
                gone = "404" in str(exc)
            exit_ = await sandbox.wait()
            await sandbox.kill("deadline", "a second kill changes nothing")
            return took, gone, exit_
        finally:
            await sandbox.cleanup()
            await sandbox.cleanup()  # twice is safe

    took, gone, exit_ = asyncio.run(go())
    assert took < 1.0 and gone
    assert (exit_.reason, exit_.detail) == ("killed", "test")


STUBBORN = REPORT + "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nreport(up=True)\ntime.sleep(120)\n"


@needs_double
def test_kill_returns_only_once_the_container_is_dead(runtime: Any, double: Any, workspace: Path) -> None:
    """A graceful delete keeps the pod until its kubelet has stopped the container: a
    sandbox that ignores SIGTERM is dead (SIGKILL at the end of the grace) when kill returns."""
    async def go() -> tuple[float, list[int], Any]:
        sandbox = await runtime.launch(request(workspace, STUBBORN))
        try:
            await first_event(sandbox)
            pid = double.kubelet.container(double.namespace, sandbox.pod).proc.pid
            t0 = time.monotonic()
            await sandbox.kill("killed", "test")
            took = time.monotonic() - t0
            return took, [p for p in double.processes() if p == pid], double.pod(sandbox.pod)
        finally:
            await sandbox.cleanup()

    took, running, pod = asyncio.run(go())
    assert running == [] and pod is None
    assert 0.9 <= took < 5.0  # it waited out the grace period (1 s) for SIGKILL


@needs_double
def test_a_pod_whose_node_never_confirms_is_deleted_by_force(runtime: Any, double: Any, workspace: Path) -> None:
    async def go() -> tuple[float, Any, Any]:
        sandbox = await runtime.launch(request(workspace))
        try:
            await first_event(sandbox)
            double.kubelet.unresponsive = True  # the node is away: a graceful delete never completes
            t0 = time.monotonic()
            await sandbox.kill("killed", "test")
            return time.monotonic() - t0, double.pod(sandbox.pod), await sandbox.wait()
        finally:
            double.kubelet.unresponsive = False
            await sandbox.cleanup()

    runtime.kill_confirm_s = 1.5
    took, pod, exit_ = asyncio.run(go())
    assert pod is None and 1.4 <= took < 5.0  # waited for the kubelet, then forced
    assert (exit_.reason, exit_.detail) == ("killed", "test")


def test_the_wall_clock_deadline_ends_the_pod(runtime: Any, workspace: Path) -> None:
    async def go() -> Any:
        sandbox = await runtime.launch(request(workspace, timeout_s=1.5))
        try:
            return await asyncio.wait_for(sandbox.wait(), 20)
        finally:
            await sandbox.cleanup()

    assert asyncio.run(go()).reason == "deadline"


def test_a_memory_hog_ends_as_oom(runtime: Any, workspace: Path) -> None:
    code = REPORT + "hog = []\nreport(up=True)\nwhile True:\n    hog.append(bytearray(8 * 1024 * 1024))\n"

    exit_ = asyncio.run(run_to_end(runtime, request(workspace, code, memory_bytes=128 * 1024**2)))
    assert exit_.reason == "oom" and "OOMKilled" in exit_.detail and exit_.exit_code == 137


@needs_double
@pytest.mark.parametrize("fault, reason, detail", [
    ("evict", "killed", "evicted: The node was low on resource: memory."),
    ("expire", "deadline", "activeDeadlineSeconds reached"),
    ("oom_kill", "oom", "OOMKilled"),
])
def test_the_kubelet_ending_a_pod_is_reported_and_never_restarted(runtime: Any, double: Any, workspace: Path,
                                                                  fault: str, reason: str, detail: str) -> None:
    async def go() -> Any:
        sandbox = await runtime.launch(request(workspace))
        try:
            await first_event(sandbox)
            assert getattr(double, fault)(sandbox.pod)
            return await asyncio.wait_for(sandbox.wait(), 20)
        finally:
            await sandbox.cleanup()

    created = double.count("POST", "/pods")
    exit_ = asyncio.run(go())
    assert exit_.reason == reason and exit_.detail.startswith(detail), exit_
    assert double.count("POST", "/pods") == created + 1  # one pod, never a second one


# ---------------------------------------------------------------- launches that fail


def test_an_unschedulable_pod_fails_with_the_schedulers_reason_and_is_deleted(runtime: Any, workspace: Path) -> None:
    req = request(workspace, gpus=16, gpu_type="A100")
    started = time.monotonic()
    with pytest.raises(SandboxError) as info:
        asyncio.run(runtime.launch(req))
    message = str(info.value)
    assert "could not be scheduled within 1s" in message and "nodes are available" in message
    assert "Insufficient nvidia.com/gpu" in message
    assert time.monotonic() - started < 10
    assert not asyncio.run(runtime.api.list("pods", runtime.pods.selector))


@needs_double
def test_a_pod_whose_sandbox_cannot_be_made_fails_with_the_kubelets_reason(runtime: Any, double: Any,
                                                                          workspace: Path) -> None:
    double.kubelet.sandbox_error = 'failed to get sandbox runtime: no runtime for "runsc" is configured'
    t0 = time.monotonic()
    try:
        with pytest.raises(SandboxError, match=r'could not start: FailedCreatePodSandBox.*no runtime for "runsc"'):
            asyncio.run(runtime.launch(request(workspace)))  # its timeout is 60 s; the pending timeout 1 s
    finally:
        double.kubelet.sandbox_error = None
    assert time.monotonic() - t0 < 10


@needs_double
def test_a_gpu_pod_lands_on_a_node_of_its_type(runtime: Any, double: Any, workspace: Path) -> None:
    async def go() -> str:
        sandbox = await runtime.launch(request(workspace, gpus=2, gpu_type="A100", cpus=4))
        try:
            return double.pod(sandbox.pod)["spec"]["nodeName"]
        finally:
            await sandbox.kill()
            await sandbox.cleanup()

    assert asyncio.run(go()) == A100_NODE.name


def test_an_image_that_cannot_be_pulled_fails_the_launch(settings: Settings, workspace: Path) -> None:
    rt = KubernetesRuntime(settings.model_copy(update={"kube_image": "registry.invalid/proctor/missing:0"}),
                           retry=FAST)
    try:
        with pytest.raises(SandboxError, match="ErrImagePull|ImagePullBackOff"):
            asyncio.run(rt.launch(request(workspace)))
        assert not asyncio.run(rt.api.list("pods", rt.pods.selector))
    finally:
        rt.close()


@needs_double
def test_api_errors_are_retried_with_backoff(runtime: Any, double: Any, workspace: Path) -> None:
    double.fail_next(2, 503, "POST", "/pods")
    double.fail_next(1, 429, "GET", "/configmaps/")
    double.fail_next(1, 500, "DELETE", "/pods/")
    before = double.count("POST", "/pods")

    assert asyncio.run(run_to_end(runtime, request(workspace, REPORT + "report(up=True)\n"))).reason in (
        "exited", "killed")
    assert double.count("POST", "/pods") == before + 3


def test_one_watch_follows_every_starting_pod(runtime: Any, workspace: Path) -> None:
    async def go() -> list[str]:
        sandboxes = await asyncio.gather(*(runtime.launch(request(workspace)) for _ in range(4)))
        try:
            for sandbox in sandboxes:
                assert (await first_event(sandbox)).message == '{"up": true}'
            return [t.name for t in threading.enumerate()]
        finally:
            for sandbox in sandboxes:
                await sandbox.kill()
                await sandbox.cleanup()

    threads = asyncio.run(go())
    assert threads.count("proctor-pod-informer") == 1  # one list + watch for all four, not one each
    assert not [name for name in threads if name.startswith("proctor-watch")]


@needs_double
def test_the_pod_watch_recovers_when_listing_fails(runtime: Any, double: Any, workspace: Path) -> None:
    double.fail_next(2, 503, "GET", f"/namespaces/{runtime.api.namespace}/pods")  # the informer's first lists
    assert asyncio.run(run_to_end(runtime, request(workspace, REPORT + "report(up=True)\n"))).reason in (
        "exited", "killed")


@needs_double
def test_the_pod_watch_comes_back_after_a_refusal(runtime: Any, double: Any, workspace: Path) -> None:
    """Refused to list (403: RBAC still spreading at deploy time), the informer reads the
    followed pods one by one, and tries listing and watching again every `rewatch_s`."""
    pods = f"/api/v1/namespaces/{runtime.api.namespace}/pods"
    def lists() -> int:
        return sum(1 for method, path, _ in list(double.requests) if method == "GET" and path == pods)

    before = lists()
    double.fail_next(2, 403, "GET", pods, whole_path=True)
    runtime.informer.rewatch_s = 0.5
    assert asyncio.run(run_to_end(runtime, request(workspace, REPORT + "report(up=True)\n"))).reason in (
        "exited", "killed")
    deadline = time.monotonic() + 5
    while lists() - before < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lists() - before >= 3  # refused twice, then listed (and watched) again


@needs_double
def test_persistent_api_errors_fail_the_launch_after_bounded_retries(runtime: Any, double: Any,
                                                                     workspace: Path) -> None:
    double.fail_next(100, 500, "POST", "/pods")
    before = double.count("POST", "/pods")
    with pytest.raises(SandboxError, match=r"create pods/.*: 500 .*after 4 attempts"):
        asyncio.run(runtime.launch(request(workspace)))
    assert double.count("POST", "/pods") == before + 4  # bounded


def test_a_missing_kubeconfig_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnavailable, match="PROCTOR_KUBECONFIG"):
        select_runtime("kubernetes", tmp_path, settings=Settings(kubeconfig=tmp_path / "nope"))
    with pytest.raises(RuntimeUnavailable, match="PROCTOR_KUBECONFIG"):
        KubernetesRuntime.check(None)  # no in-cluster service account here


def test_select_runtime_builds_it_and_auto_never_picks_it(settings: Settings, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    rt = select_runtime("kubernetes", tmp_path, settings=settings)
    assert isinstance(rt, KubernetesRuntime) and (rt.name, rt.isolation) == ("kubernetes", "strong")
    rt.close()
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RuntimeUnavailable, match="refuses"):
        select_runtime("auto", tmp_path, settings=settings)


def test_cleanup_is_safe_after_a_failed_launch_and_twice(runtime: Any, workspace: Path) -> None:
    async def go() -> None:
        sandbox = await runtime.launch(request(workspace, REPORT + "report(up=True)\n"))
        async for _ in sandbox.events():
            pass
        await sandbox.wait()
        await sandbox.cleanup()
        await sandbox.cleanup()
        assert await sandbox.wait() is await sandbox.wait()

    asyncio.run(go())
    (workspace / "big").write_bytes(b"x" * 4096)
    with pytest.raises(SandboxError, match="more than 1024 bytes"):  # over the disk limit: nothing is made
        asyncio.run(runtime.launch(request(workspace, disk_bytes=1024)))


@needs_double
def test_metrics_windows_are_read_as_go_durations() -> None:
    assert [go_duration(w) for w in ("15s", "20.031s", "1m0.5s", "1h2m3s", "250ms")] == [15, 20.031, 60.5, 3723, 0.25]
    for bad in ("", "15", "s", "15 s", "-1s", "1x"):
        with pytest.raises(ValueError):
            go_duration(bad)


def test_stats_come_from_the_metrics_api(runtime: Any, workspace: Path) -> None:
    burner = REPORT + "import time\nreport(up=True)\nend = time.process_time() + 1.5\n" \
                      "while time.process_time() < end:\n    pass\nreport(burnt=True)\ntime.sleep(120)\n"

    async def go() -> Any:
        sandbox = await runtime.launch(request(workspace, burner))
        try:
            await first_event(sandbox)
            stats = await sandbox.stats()
            assert await sandbox.stats() is stats  # asked at most every few seconds
            runtime.metrics_every_s = 0.0
            await first_event(sandbox)  # it has burnt 1.5 s of CPU
            deadline = time.monotonic() + 90  # a real metrics-server scrapes every 15 s
            while (later := await sandbox.stats()).cpu_seconds is None or later.cpu_seconds < 1.2:
                assert time.monotonic() < deadline, later
                await asyncio.sleep(0.5)
            return stats, later, sandbox.trace_log
        finally:
            await sandbox.kill()
            await sandbox.cleanup()

    try:
        stats, later, trace_log = asyncio.run(go())
    finally:
        runtime.metrics_every_s = METRICS_EVERY_S
    assert stats.memory_bytes and stats.memory_bytes > 1024**2
    assert 1.2 <= later.cpu_seconds < 3.0  # CPU seconds summed from the API's rates over their windows
    assert trace_log is None


def test_the_api_servers_refusals_become_sandbox_errors(runtime: Any, settings: Settings, double: Any,
                                                        workspace: Path) -> None:
    bad_name = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "Not_A_Name"},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    with pytest.raises(SandboxError, match=r"create pods/Not_A_Name: 422 .*Invalid value"):
        asyncio.run(runtime.api.create("pods", bad_name))
    unknown = {**bad_name, "metadata": {"name": "ok"}, "spec": {"containers": [{"name": "c", "bogus": 1}]}}
    with pytest.raises(SandboxError, match="(?s)create pods/ok: ValidationError.*bogus"):  # the client refuses it
        asyncio.run(runtime.api.create("pods", unknown))
    rt = KubernetesRuntime(settings.model_copy(update={"kube_runtime_class": "no-such-class"}), retry=FAST)
    try:
        with pytest.raises(SandboxError, match='403 .*RuntimeClass "no-such-class" not found'):
            asyncio.run(rt.launch(request(workspace)))
    finally:
        rt.close()


@needs_double
def test_client_certificates_from_the_kubeconfig_authenticate_the_api_and_the_attach(workspace: Path,
                                                                                      tmp_path: Path) -> None:
    with KubeApiDouble(client_certs=True) as mtls:
        rt = KubernetesRuntime(Settings(home=tmp_path, kubeconfig=mtls.kubeconfig), retry=FAST)

        async def go() -> list[str]:
            sandbox = await rt.launch(request(workspace, REPORT + "report(up=True)\n"))
            try:
                messages = [e.message async for e in sandbox.events()]
                await sandbox.wait()
                return messages
            finally:
                await sandbox.cleanup()

        try:
            assert asyncio.run(go()) == ['{"up": true}']
            assert mtls.objects() == [] and mtls.processes() == []
        finally:
            rt.close()
