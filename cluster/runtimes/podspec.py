"""What a Kubernetes sandbox is made of, as plain manifests: its pod, its NetworkPolicy,
the namespace's deny-all policy and the platform's anchor ConfigMap.

Pure functions of a `LaunchRequest` and a `PodSettings`; `kubernetes.py` sends them.

- The pod: `runtimeClassName` gvisor, no service-account token, no service links, non-root
  (65534) with RuntimeDefault seccomp, a read-only root, no privilege escalation, every
  capability dropped; requests equal to limits for CPU, memory, ephemeral storage and
  `nvidia.com/gpu`; GPU nodes chosen by node affinity on the GPU-model label and their
  `nvidia.com/gpu` taint tolerated; `activeDeadlineSeconds` as a backstop (see
  `active_deadline_s`);
  `restartPolicy: Never`; a writable emptyDir at /workspace (sizeLimit: the disk limit)
  and a small memory-backed /tmp; stdin attached once, no TTY.
- Ownership: labels for listing (managed-by, instance, eval, shard, sandbox) and an
  ownerReference to the instance's anchor ConfigMap, so deleting the anchor garbage-
  collects every pod and policy of that platform instance.
- Network: each sandbox gets its own policy, created before its pod, that denies all
  ingress and allows egress only to the spec's `CIDR:port` entries (none: deny all);
  the namespace also gets a deny-all policy, owned by nobody, so that it outlives the anchor.
  NetworkPolicies need a CNI that enforces them (Calico, Cilium, ...).

- A task's image (`LaunchRequest.image`, pinned by digest): the container runs that image,
  and the harness comes from the bundle image (`bundle.py`): an init container, as
  hardened as the main one, copies the bundle into an emptyDir that the task's container
  mounts read-only at `/opt/proctor` and starts the harness from, through the bundle's own
  dynamic loader. The image needs nothing of Proctor's; the agent's programs are its own.

The pids limit is the kubelet's `podPidsLimit` (a node setting): a pod cannot set its own.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from proctor.jsontypes import JsonObject

from proctor.podentry import HARNESS_FLAGS

from .base import LaunchRequest
from .bundle import BUNDLE_ROOT, BundleCommand
from .layout import INJECTED, SANDBOX_USER, WORKSPACE, is_harness

if TYPE_CHECKING:
    from proctor.settings import Settings

MANAGED_BY = "app.kubernetes.io/managed-by"
INSTANCE = "proctor.dev/instance"
SANDBOX = "proctor.dev/sandbox-id"
EVAL = "proctor.dev/eval-id"
SHARD = "proctor.dev/shard-id"
CONTAINER = "sandbox"
DENY_ALL = "proctor-deny-all"
GPU = "nvidia.com/gpu"
GFD_PRODUCT = "nvidia.com/gpu.product"
TMP_BYTES = 64 * 1024**2  # the memory-backed /tmp (it counts against the memory limit)
LOG_BYTES = 64 * 1024**2  # container logs count as ephemeral storage besides the workspace
HOST_ONLY_ENV = ("PATH", "PYTHONPATH", "PYTHONHOME")  # the local layout's; the image has its own
INIT_CONTAINER = "harness"  # copies the harness bundle in, for a pod in a task's image
HARNESS_VOLUME = "harness"
HARNESS_BYTES = 256 * 1024**2  # the emptyDir the bundle is copied into (it is about 110 MiB)

# what NVIDIA GPU feature discovery writes in `nvidia.com/gpu.product` for each of our types
GPU_PRODUCTS: dict[str, tuple[str, ...]] = {
    "A10G": ("NVIDIA-A10G",),
    "A100": ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"),
    "A100-80G": ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"),
    "H100": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"),
    "H200": ("NVIDIA-H200", "NVIDIA-H200-NVL"),
    "L4": ("NVIDIA-L4",),
    "L40S": ("NVIDIA-L40S",),
    "T4": ("Tesla-T4",),
    "V100": ("Tesla-V100-SXM2-16GB", "Tesla-V100-SXM2-32GB", "Tesla-V100-PCIE-16GB", "Tesla-V100-PCIE-32GB"),
}


@dataclass(frozen=True)
class PodSettings:
    """The cluster-side choices of the runtime (from `proctor.settings.Settings`)."""

    namespace: str = "proctor-sandboxes"
    image: str = "ghcr.io/proctor-dev/proctor-harness:0.1.0"
    bundle_image: str = "ghcr.io/proctor-dev/proctor-harness-bundle:0.1.0"
    instance: str = "proctor"
    runtime_class: str = "gvisor"
    gpu_node_label: str = GFD_PRODUCT

    @classmethod
    def of(cls, settings: Settings) -> "PodSettings":
        return cls(settings.kube_namespace, settings.kube_image, settings.kube_bundle_image, settings.kube_instance,
                   settings.kube_runtime_class, settings.kube_gpu_node_label)

    @property
    def selector(self) -> str:
        """The label selector of everything this platform instance made."""
        return f"{MANAGED_BY}=proctor,{INSTANCE}={self.instance}"

    @property
    def anchor_name(self) -> str:
        return dns_label(f"proctor-anchor-{self.instance}")


def dns_label(text: str, limit: int = 63) -> str:
    """`text` as a DNS-1123 label (a pod's name); a hash keeps apart ids that differ only
    in what was replaced or cut."""
    safe = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")
    if safe == text and len(safe) <= limit:
        return safe
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{safe[: limit - 9].rstrip('-')}-{digest}".lstrip("-")


def label_value(text: str) -> str:
    """`text` as a label value (at most 63 of [A-Za-z0-9_.-], alphanumeric at both ends)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", text).strip("-_.")
    if safe == text and len(safe) <= 63:
        return safe
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{safe[:54].rstrip('-_.')}-{digest}".lstrip("-_.")


def active_deadline_s(timeout_s: float) -> int:
    """The pod's `activeDeadlineSeconds`: a backstop for a pod whose supervisor is gone, not
    the shard's deadline. It counts from the pod's start on its node, before the image is
    pulled, and the runtime gives a pod up to `timeout_s` to start and then `timeout_s` to
    run (its own deadline ends it, as `deadline`); so twice the timeout and a minute."""
    return 2 * max(1, math.ceil(timeout_s)) + 60


def pod_name(sandbox_id: str) -> str:
    return dns_label(f"px-{sandbox_id}")


def policy_name(sandbox_id: str) -> str:
    return pod_name(sandbox_id)  # a NetworkPolicy's names are apart from a pod's


def labels_of(request: LaunchRequest, settings: PodSettings) -> dict[str, str]:
    labels = {MANAGED_BY: "proctor", "app.kubernetes.io/name": "proctor-sandbox", INSTANCE: settings.instance}
    for key, value in request.labels:
        labels[key] = label_value(value)
    labels[SANDBOX] = label_value(request.sandbox_id)
    return labels


def owner_reference(anchor: JsonObject) -> JsonObject:
    meta = anchor["metadata"]
    return {"apiVersion": "v1", "kind": "ConfigMap", "name": meta["name"], "uid": meta["uid"]}


def anchor_manifest(settings: PodSettings) -> JsonObject:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": settings.anchor_name, "namespace": settings.namespace,
                     "labels": {MANAGED_BY: "proctor", INSTANCE: settings.instance}},
        "data": {"about": f"Owner of every sandbox pod of Proctor instance {settings.instance!r}: "
                          "deleting this ConfigMap deletes them all (garbage collection)."},
    }


INJECTED_PYTHON = BundleCommand(INJECTED)  # the bundle, as a task's container sees it


def container_args(argv: tuple[str, ...], injected: bool = False) -> list[str]:
    """What follows `python -m proctor.podentry` in the pod: for the harness (the entrypoint
    runs it), its flags among `HARNESS_FLAGS` (`--service`: the service mode), else `--`
    and the command, its Python being the image's (or the injected bundle's, `injected`,
    in a task's image)."""
    if not argv:
        return []
    if is_harness(argv):
        return [a for a in argv if a in HARNESS_FLAGS]
    command = list(argv)
    if Path(command[0]).name.startswith("python"):
        command[0:1] = [*INJECTED_PYTHON.launcher, INJECTED_PYTHON.python] if injected else ["python"]
    return ["--", *command]


def pod_env(request: LaunchRequest) -> list[dict[str, str]]:
    env = {k: v for k, v in request.env if k not in HOST_ONLY_ENV}
    if request.image is not None:
        env.update(INJECTED_PYTHON.env)
    env.update({"HOME": WORKSPACE, "TMPDIR": "/tmp", "PROCTOR_WORKSPACE": WORKSPACE})
    return [{"name": k, "value": v} for k, v in env.items()]


def resources(request: LaunchRequest) -> dict[str, dict[str, str]]:
    lim = request.limits
    amounts = {
        "cpu": f"{max(1, round(lim.cpus * 1000))}m",
        "memory": str(lim.memory_bytes),
        "ephemeral-storage": str(lim.disk_bytes + LOG_BYTES + (HARNESS_BYTES if request.image else 0)),
    }
    if request.gpus:
        amounts[GPU] = str(request.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def gpu_placement(request: LaunchRequest, settings: PodSettings) -> JsonObject:
    """Node affinity on the GPU model and the GPU nodes' taint tolerated; nothing for CPU pods.
    An affinity rather than a nodeSelector: one GPU type is several product names."""
    if not request.gpus:
        return {}
    placement: JsonObject = {"tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]}
    if request.gpu_type:
        if settings.gpu_node_label == GFD_PRODUCT:
            values = list(GPU_PRODUCTS.get(request.gpu_type, (request.gpu_type,)))
        else:
            values = [request.gpu_type]
        term = {"matchExpressions": [{"key": settings.gpu_node_label, "operator": "In", "values": values}]}
        placement["affinity"] = {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}
    return placement


def pod_manifest(request: LaunchRequest, settings: PodSettings, anchor: JsonObject) -> JsonObject:
    lim = request.limits
    non_root = {"runAsNonRoot": True, "runAsUser": SANDBOX_USER, "runAsGroup": SANDBOX_USER}
    runtime_default = {"seccompProfile": {"type": "RuntimeDefault"}}
    annotations = {SANDBOX: request.sandbox_id, **{k: v for k, v in request.labels}}
    security = {
        **non_root,
        **runtime_default,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    injected = request.image is not None
    container = {
        "name": CONTAINER,
        "image": request.image if injected else settings.image,
        "imagePullPolicy": "IfNotPresent",
        "command": INJECTED_PYTHON.argv("-m", "proctor.podentry") if injected else ["python", "-m", "proctor.podentry"],
        "args": container_args(request.argv, injected),
        "workingDir": WORKSPACE,
        "env": pod_env(request),
        "stdin": True,
        "stdinOnce": True,
        "tty": False,
        "resources": resources(request),
        "securityContext": security,
        "volumeMounts": [{"name": "workspace", "mountPath": WORKSPACE}, {"name": "tmp", "mountPath": "/tmp"},
                         *([{"name": HARNESS_VOLUME, "mountPath": INJECTED, "readOnly": True}] if injected else [])],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    volumes: list[JsonObject] = [
        {"name": "workspace", "emptyDir": {"sizeLimit": str(lim.disk_bytes)}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": str(TMP_BYTES)}},
    ]
    injection: JsonObject = {}
    if injected:
        volumes.append({"name": HARNESS_VOLUME, "emptyDir": {"sizeLimit": str(HARNESS_BYTES)}})
        injection["initContainers"] = [harness_init_container(request, settings, security)]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(request.sandbox_id),
            "namespace": settings.namespace,
            "labels": labels_of(request, settings),
            "annotations": annotations,
            "ownerReferences": [owner_reference(anchor)],
        },
        "spec": {
            "runtimeClassName": settings.runtime_class,
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "hostNetwork": False,
            "hostPID": False,
            "hostIPC": False,
            "activeDeadlineSeconds": active_deadline_s(lim.timeout_s),
            "terminationGracePeriodSeconds": 5,
            "securityContext": {**non_root, **runtime_default, "fsGroup": SANDBOX_USER},
            **gpu_placement(request, settings),
            **injection,
            "containers": [container],
            "volumes": volumes,
        },
    }


def harness_init_container(request: LaunchRequest, settings: PodSettings, security: JsonObject) -> JsonObject:
    """The init container that copies the harness bundle from the bundle image into the
    pod's harness volume, with the bundle's own Python (the bundle image holds nothing else)."""
    amounts = {k: v for k, v in resources(request)["limits"].items() if k != GPU}
    bundle = BundleCommand(BUNDLE_ROOT)
    return {
        "name": INIT_CONTAINER,
        "image": settings.bundle_image,
        "imagePullPolicy": "IfNotPresent",
        "command": bundle.copy_to(INJECTED),
        "env": [{"name": k, "value": v} for k, v in bundle.env],
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "securityContext": security,
        "volumeMounts": [{"name": HARNESS_VOLUME, "mountPath": INJECTED}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def egress_rule(entry: str) -> JsonObject:
    """One allowed destination, `CIDR:port` (validated by the spec), as a policy rule."""
    cidr, _, port = entry.rpartition(":")
    return {"to": [{"ipBlock": {"cidr": cidr.strip("[]")}}], "ports": [{"protocol": "TCP", "port": int(port)}]}


def policy_manifest(request: LaunchRequest, settings: PodSettings, anchor: JsonObject) -> JsonObject:
    """The sandbox's own policy: no ingress, egress only to its allowlist (none: deny all)."""
    spec: JsonObject = {
        "podSelector": {"matchLabels": {INSTANCE: settings.instance, SANDBOX: label_value(request.sandbox_id)}},
        "policyTypes": ["Ingress", "Egress"],
    }
    if request.egress:
        spec["egress"] = [egress_rule(e) for e in request.egress]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": policy_name(request.sandbox_id),
            "namespace": settings.namespace,
            "labels": labels_of(request, settings),
            "annotations": {SANDBOX: request.sandbox_id},
            "ownerReferences": [owner_reference(anchor)],
        },
        "spec": spec,
    }


def deny_all_manifest(settings: PodSettings) -> JsonObject:
    """Every pod of the namespace: no ingress, no egress (policies add up, so a sandbox's
    own allowlist still applies to it)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": DENY_ALL, "namespace": settings.namespace,
                     "labels": {MANAGED_BY: "proctor", INSTANCE: settings.instance}},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }
