"""The kubernetes runtime in a task's image: the pod spec (valid, hardened, the harness
bundle copied in by an init container, the image pinned by digest), and a shard really
run in a busybox image (no Python, no C library) on the API-server double, whose kubelet
runs the bundle image's init container and the task image's container in their own roots
(bubblewrap; tests/kubeapi/containers.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from cluster.images import ImageStore
from cluster.runtimes import LaunchRequest, SandboxError, SandboxLimits
from cluster.runtimes.bundle import BUNDLE_ROOT, build_bundle, main as build_bundle_main
from cluster.runtimes.kubernetes import KubernetesRuntime
from cluster.runtimes.layout import harness_layout
from cluster.runtimes.podspec import HARNESS_BYTES, INIT_CONTAINER, PodSettings, pod_manifest
from eval_actors.gateway import ModelGateway
from eval_actors.launch import ImageRefused, pinned_reference, plan_sandbox
from eval_actors.shard_executor import ShardExecutor, ShardWork
from imagearchives import busybox_image, oci_archive
from kubeapi import KubeApiDouble, testing
from kubeapi.testing import FAST, needs_double
from proctor.harness.runner import sample_dir_name
from proctor.settings import Settings
from proctor.spec import parse_spec

pytestmark = needs_double  # the double's registry holds the images; a real cluster pulls them
K8S = kubernetes_validate.utils.latest_version()
DIGEST = "sha256:" + "ab" * 32
ANCHOR = {"metadata": {"name": "proctor-anchor-t", "uid": "6f1c2a7e-0000-4000-8000-000000000001"}}

double = pytest.fixture(scope="module")(testing.double)
settings = pytest.fixture(scope="module")(testing.settings)
runtime = pytest.fixture(testing.runtime)


@pytest.fixture(scope="module")
def bundle_image(double: KubeApiDouble, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle image's root: the bundle at /proctor-harness and nothing else but mount points."""
    root = tmp_path_factory.mktemp("bundle-image")
    build_bundle(root / BUNDLE_ROOT.lstrip("/"))
    for point in ("proc", "dev", "opt/proctor"):
        (root / point).mkdir(parents=True)
    double.kubelet.images[settings.kube_bundle_image] = root
    return root


@pytest.fixture(scope="module")
def task_image(double: KubeApiDouble, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """busybox-task:1 in an image store, and in the double's registry under its pinned reference."""
    folder = tmp_path_factory.mktemp("task-image")
    store = ImageStore(folder / "store")
    image = store.import_archive(oci_archive(folder / "image.tar", busybox_image()), name="busybox-task:1")
    double.kubelet.images[pinned_reference("busybox-task:1", image)] = image.rootfs
    return store, image


def request(image: str | None, workspace: Path = Path("/nonexistent"), **kw: Any) -> LaunchRequest:
    layout = harness_layout()
    return LaunchRequest(f"ki-{os.urandom(4).hex()}", layout.argv(), workspace,
                         SandboxLimits(timeout_s=60.0, memory_bytes=256 * 1024**2), layout.env, layout.ro_binds,
                         image=image, **kw)


def test_a_pod_in_a_task_image_is_valid_and_as_hardened_as_any() -> None:
    pod = pod_manifest(request(f"registry.example/ctf@{DIGEST}", gpus=1, gpu_type="A100"), PodSettings(), ANCHOR)
    kubernetes_validate.validate(pod, K8S, strict=True)
    spec = pod["spec"]
    (init,), (main,) = spec["initContainers"], spec["containers"]
    assert main["image"] == f"registry.example/ctf@{DIGEST}"  # by digest, never a tag
    assert init["name"] == INIT_CONTAINER and init["image"] == PodSettings().bundle_image
    for c in (init, main):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65534 and sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False and spec["runtimeClassName"] == "gvisor"
    # the bundle: written by the init container, read-only to the task's, started through its own loader
    assert {"name": "harness", "mountPath": "/opt/proctor"} in init["volumeMounts"]
    assert {"name": "harness", "mountPath": "/opt/proctor", "readOnly": True} in main["volumeMounts"]
    assert main["command"][:3] == ["/opt/proctor/lib/ld.so", "--library-path", "/opt/proctor/lib"]
    assert main["command"][3:] == ["/opt/proctor/bin/python3", "-S", "-B", "-m", "proctor.podentry"]
    env = {e["name"]: e["value"] for e in main["env"]}
    assert env["PYTHONHOME"] == "/opt/proctor" and "PATH" not in env  # the image's own PATH, from the agent's env
    # the GPU is the task container's alone; the bundle's emptyDir counts as ephemeral storage
    assert "nvidia.com/gpu" not in init["resources"]["limits"] and main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    volume = next(v for v in spec["volumes"] if v["name"] == "harness")
    assert volume["emptyDir"] == {"sizeLimit": str(HARNESS_BYTES)}
    plain = pod_manifest(request(None), PodSettings(), ANCHOR)
    assert "initContainers" not in plain["spec"] and plain["spec"]["containers"][0]["image"] == PodSettings().image


class NoModel(ModelGateway):
    """The scripted agent calls no model: a call would be a bug."""

    async def _complete(self, call: Any) -> Any:
        raise AssertionError(f"unexpected model call: {call}")


def image_spec(image: str, commands: list[str]) -> Any:
    return parse_spec({
        "name": "pod-image", "agentic": True,
        "model": {"adapter": "python", "callable": "proctor.scripted.file_agent:solve"},
        "dataset": {"samples": [{"id": "a", "input": "x", "target": "done", "metadata": {"commands": commands}}]},
        "scorers": [{"type": "command", "name": "ok", "command": 'test "$(cat out.txt)" != ""'}],
        "sandbox": {"runtime": "kubernetes", "timeout_s": 60, "memory": "512Mi", "image": image,
                    "artifacts": ["out.txt"]},
    })


def test_a_shard_runs_in_a_task_image_on_the_double(runtime: KubernetesRuntime, double: KubeApiDouble,
                                                    bundle_image: Path, task_image: Any, tmp_path: Path) -> None:
    store, image = task_image
    probe = ("(echo $TASK_MODE; cat /srv/secret.txt 2>/dev/null || echo refused; ls /usr 2>/dev/null || echo no-usr; "
             "touch /opt/proctor/x 2>/dev/null || echo harness-read-only; ls /bin/python3 2>/dev/null || echo no-python"
             ") > out.txt")
    spec = image_spec(pinned_reference("busybox-task:1", image), [probe])  # as the API accepts it: pinned
    executor = ShardExecutor(runtime, NoModel(), tmp_path / "sandboxes", images=store)
    outcome = asyncio.run(executor.run(ShardWork("ev-kimg", "s0000", spec, tuple(spec.dataset.samples or ()))))
    assert outcome.status == "succeeded", (outcome.error, outcome.exit)
    assert [r.scores for r in outcome.records] == [{"ok": 1.0}]
    out = dict(outcome.artifacts)[f"{sample_dir_name('a', 1)}/out.txt"].decode().split()
    # the image's environment and userland (busybox: no /usr, no Python), its service's file
    # closed to the agent, and the injected harness read-only
    assert out == ["image", "refused", "no-usr", "harness-read-only", "no-python"]


@pytest.mark.parametrize("fault", ["no-bundle", "no-pull"])
def test_a_harness_that_cannot_be_copied_in_fails_the_launch_and_leaves_nothing(
        runtime: KubernetesRuntime, double: KubeApiDouble, task_image: Any, settings: Settings, fault: str,
        tmp_path: Path) -> None:
    ref = f"registry.example/{fault}:1"
    if fault == "no-bundle":  # the bundle image holds no bundle: its copy cannot even start
        for point in ("proc", "dev", "opt/proctor"):
            (tmp_path / "root" / point).mkdir(parents=True)
        double.kubelet.images[ref] = tmp_path / "root"
        why = "init container 'harness' failed: Error exit code 1"
    else:
        double.fail_image(ref)
        why = "init container 'harness': ErrImagePull"
    broken = KubernetesRuntime(settings.model_copy(update={"kube_bundle_image": ref}), retry=FAST)
    try:
        req = request(pinned_reference("busybox-task:1", task_image[1]), tmp_path)
        with pytest.raises(SandboxError, match=why):
            asyncio.run(broken.launch(req))
        assert asyncio.run(broken.api.list("pods", broken.pods.selector)) == []
    finally:
        broken.close()


def test_the_plan_pins_the_image_by_digest_or_refuses_it(settings: Settings, task_image: Any,
                                                         tmp_path: Path) -> None:
    store, image = task_image
    runtime = KubernetesRuntime(settings, retry=FAST)  # nothing is launched: only planned

    def plan(ref: str, images: Any = store) -> Any:
        return plan_sandbox(image_spec(ref, []), runtime, images, "s1", tmp_path, (), ())

    by_name = plan("busybox-task:1")
    assert by_name.request.image == f"busybox-task@{image.manifest_digest}" and by_name.request.rootfs is None
    assert by_name.agent.user == "player" and by_name.agent.env["TASK_MODE"] == "image"  # the store's config
    elsewhere = plan(f"registry.example/ctf@{DIGEST}", None)  # not in any store here: the cluster pulls it
    assert elsewhere.request.image == f"registry.example/ctf@{DIGEST}" and elsewhere.agent.env == {}
    with pytest.raises(ImageRefused, match="pulls images from a registry by digest.*NAME@sha256:DIGEST"):
        plan("registry.example/ctf:latest")  # a tag could name another image tomorrow
    runtime.close()


def test_the_bundle_builder_refuses_an_existing_folder_and_bad_arguments(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "kept.txt").write_text("mine")
    assert build_bundle_main([str(tmp_path)]) == 1  # never writes into a folder that is there
    assert "harness bundle:" in capsys.readouterr().err and (tmp_path / "kept.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]
    assert build_bundle_main([]) == 2 and "usage:" in capsys.readouterr().err
