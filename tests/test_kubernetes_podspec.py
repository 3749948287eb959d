"""The manifests of the kubernetes runtime (cluster/runtimes/podspec.py): each validated
against the Kubernetes schema (kubernetes_validate, strict) and each hardening field
asserted one by one; the spec's `egress`; and the pod entrypoint's workspace unpacking."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from cluster.runtimes import LaunchRequest, SandboxLimits
from cluster.runtimes.layout import harness_layout
from cluster.runtimes.podspec import (GPU_PRODUCTS, PodSettings, anchor_manifest, deny_all_manifest, dns_label,
                                      label_value, pod_manifest, policy_manifest)
from proctor.podentry import WorkspaceError, header, pack_workspace, unpack
from proctor.spec import SpecError, parse_spec

K8S = kubernetes_validate.utils.latest_version()
SETTINGS = PodSettings(namespace="proctor-sandboxes", instance="test-platform")
ANCHOR = {"metadata": {"name": "proctor-anchor-test-platform", "uid": "6f1c2a7e-0000-4000-8000-000000000001"}}


def spec(**sandbox: Any) -> Any:
    return parse_spec({"name": "k", "model": {"adapter": "reference"}, "dataset": {"samples": [{"input": "a"}]},
                       "scorers": [{"type": "exact"}], "sandbox": {"runtime": "kubernetes", **sandbox}})


def request_for(doc: Any, sandbox_id: str = "ev-1-s0000-a1") -> LaunchRequest:
    """The LaunchRequest the shard executor builds from a spec (eval_actors/shard_executor.py)."""
    sb = doc.sandbox
    layout = harness_layout()
    return LaunchRequest(
        sandbox_id=sandbox_id, argv=layout.argv(), workspace=Path("/nonexistent"),
        limits=SandboxLimits(cpus=sb.cpus, memory_bytes=sb.memory, pids=sb.pids, timeout_s=sb.timeout_s,
                             output_cap_bytes=sb.output_cap, disk_bytes=sb.disk),
        env=layout.env, ro_binds=layout.ro_binds, gpus=sb.gpu.count, gpu_type=sb.gpu.type,
        egress=tuple(sb.egress), labels=(("proctor.dev/eval-id", "ev-1"), ("proctor.dev/shard-id", "s0000")),
    )


CASES = {
    "cpu": spec(cpus=2, memory="2Gi", disk="5Gi", timeout_s=90.5),
    "1xA100": spec(gpu={"count": 1, "type": "A100"}, memory="16Gi"),
    "8xH100": spec(gpu={"count": 8, "type": "H100"}, cpus=64, memory="512Gi", disk="100Gi"),
    "egress": spec(egress=["10.0.0.0/8:443", "203.0.113.7:8080"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_manifest_is_a_valid_kubernetes_object(case: str) -> None:
    req = request_for(CASES[case])
    for manifest in (pod_manifest(req, SETTINGS, ANCHOR), policy_manifest(req, SETTINGS, ANCHOR),
                     deny_all_manifest(SETTINGS), anchor_manifest(SETTINGS)):
        kubernetes_validate.validate(manifest, K8S, strict=True)


@pytest.mark.parametrize("case", list(CASES))
def test_the_pod_is_hardened(case: str) -> None:
    doc = CASES[case]
    pod = pod_manifest(request_for(doc), SETTINGS, ANCHOR)
    spec_, (c,) = pod["spec"], pod["spec"]["containers"]
    assert spec_["runtimeClassName"] == "gvisor"
    assert spec_["automountServiceAccountToken"] is False
    assert spec_["enableServiceLinks"] is False
    assert spec_["restartPolicy"] == "Never"
    assert spec_["hostNetwork"] is False and spec_["hostPID"] is False and spec_["hostIPC"] is False
    assert spec_["activeDeadlineSeconds"] == 2 * math.ceil(doc.sandbox.timeout_s) + 60  # a backstop
    psc = spec_["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == psc["runAsGroup"] == psc["fsGroup"] == 65534
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = c["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["privileged"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["runAsNonRoot"] is True and csc["runAsUser"] == 65534
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert (c["stdin"], c["stdinOnce"], c["tty"]) == (True, True, False)
    assert c["command"] == ["python", "-m", "proctor.podentry"] and c["args"] == []
    env = {e["name"]: e["value"] for e in c["env"]}
    assert "PYTHONPATH" not in env and "PATH" not in env  # the host's layout stays on the host
    assert env["PROCTOR_WORKSPACE"] == env["HOME"] == "/workspace"


@pytest.mark.parametrize("case", list(CASES))
def test_requests_equal_limits_including_storage_and_gpus(case: str) -> None:
    doc = CASES[case]
    res = pod_manifest(request_for(doc), SETTINGS, ANCHOR)["spec"]["containers"][0]["resources"]
    assert res["requests"] == res["limits"]
    assert res["limits"]["cpu"] == f"{round(doc.sandbox.cpus * 1000)}m"
    assert res["limits"]["memory"] == str(doc.sandbox.memory)
    assert int(res["limits"]["ephemeral-storage"]) >= doc.sandbox.disk
    if doc.sandbox.gpu.count:
        assert res["limits"]["nvidia.com/gpu"] == str(doc.sandbox.gpu.count)
    else:
        assert "nvidia.com/gpu" not in res["limits"]


def test_volumes_writable_workspace_and_small_memory_tmp() -> None:
    doc = CASES["cpu"]
    pod = pod_manifest(request_for(doc), SETTINGS, ANCHOR)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["workspace"]["emptyDir"] == {"sizeLimit": str(doc.sandbox.disk)}
    assert volumes["tmp"]["emptyDir"]["medium"] == "Memory"
    assert int(volumes["tmp"]["emptyDir"]["sizeLimit"]) <= 64 * 1024**2
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert set(mounts) == {"/workspace", "/tmp"} and not any(m.get("readOnly") for m in mounts.values())


def test_gpu_pods_go_to_nodes_of_their_type_and_tolerate_the_gpu_taint() -> None:
    cpu = pod_manifest(request_for(CASES["cpu"]), SETTINGS, ANCHOR)["spec"]
    assert "tolerations" not in cpu and "affinity" not in cpu and "nodeSelector" not in cpu
    for case, gpu in (("1xA100", "A100"), ("8xH100", "H100")):
        pod = pod_manifest(request_for(CASES[case]), SETTINGS, ANCHOR)["spec"]
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        (expr,) = term["matchExpressions"]
        assert expr["key"] == "nvidia.com/gpu.product" and expr["operator"] == "In"
        assert expr["values"] == list(GPU_PRODUCTS[gpu])
    own_label = PodSettings(gpu_node_label="example.com/gpu-type")
    pod = pod_manifest(request_for(CASES["1xA100"]), own_label, ANCHOR)["spec"]
    expr = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert expr["matchExpressions"] == [{"key": "example.com/gpu-type", "operator": "In", "values": ["A100"]}]


def test_labels_annotations_and_owner_tie_the_pod_to_its_shard_and_platform() -> None:
    sid = "ev_Upper-1-s0000-a1"
    meta = pod_manifest(request_for(CASES["cpu"], sid), SETTINGS, ANCHOR)["metadata"]
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "proctor"
    assert meta["labels"]["proctor.dev/instance"] == "test-platform"
    assert meta["labels"]["proctor.dev/eval-id"] == "ev-1"
    assert meta["labels"]["proctor.dev/shard-id"] == "s0000"
    assert meta["labels"]["proctor.dev/sandbox-id"] == label_value(sid)
    assert meta["annotations"]["proctor.dev/sandbox-id"] == sid  # exact, for reconciliation
    assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "ConfigMap", "name": ANCHOR["metadata"]["name"],
                                        "uid": ANCHOR["metadata"]["uid"]}]
    assert meta["name"] == dns_label(f"px-{sid}") and len(meta["name"]) <= 63 and meta["name"].islower()


def test_names_and_label_values_stay_valid_and_distinct() -> None:
    long = "e" * 100 + "-s1-a1"
    assert len(dns_label(f"px-{long}")) <= 63 and len(label_value(long)) <= 63
    assert dns_label("px-Ab") != dns_label("px-ab")  # a hash keeps apart what lower-casing merges
    assert label_value("ok-id_1.2") == "ok-id_1.2"


def test_network_policies_deny_all_and_allow_exactly_the_egress_allowlist() -> None:
    deny = deny_all_manifest(SETTINGS)["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    closed = policy_manifest(request_for(CASES["cpu"]), SETTINGS, ANCHOR)
    assert closed["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in closed["spec"] and "egress" not in closed["spec"]  # nothing allowed either way
    assert closed["spec"]["podSelector"]["matchLabels"]["proctor.dev/sandbox-id"] == label_value("ev-1-s0000-a1")
    assert closed["metadata"]["ownerReferences"][0]["uid"] == ANCHOR["metadata"]["uid"]
    open_ = policy_manifest(request_for(CASES["egress"]), SETTINGS, ANCHOR)["spec"]
    assert "ingress" not in open_
    assert open_["egress"] == [
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"protocol": "TCP", "port": 443}]},
        {"to": [{"ipBlock": {"cidr": "203.0.113.7/32"}}], "ports": [{"protocol": "TCP", "port": 8080}]},
    ]


def test_a_command_other_than_the_harness_runs_after_the_entrypoint() -> None:
    req = request_for(CASES["cpu"])
    probe = LaunchRequest("p", ("/usr/bin/python3.11", "-S", "-c", "print(1)"), Path("/x"), req.limits)
    c = pod_manifest(probe, SETTINGS, ANCHOR)["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "proctor.podentry"]
    assert c["args"] == ["--", "python", "-S", "-c", "print(1)"]


@pytest.mark.parametrize("argv", [harness_layout().argv(), harness_layout().argv("--sandboxed"),
                                  ("/usr/bin/python3.11", "-S", "-B", "-m", "proctor.harness")])
def test_the_harness_in_either_form_runs_as_the_entrypoint(argv: tuple[str, ...]) -> None:
    # the sandboxes' `-c ENTRY` form and `-m proctor.harness` both leave the harness to podentry
    probe = LaunchRequest("p", argv, Path("/x"), request_for(CASES["cpu"]).limits)
    c = pod_manifest(probe, SETTINGS, ANCHOR)["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "proctor.podentry"]
    assert "args" not in c or c["args"] == []


# ---------------------------------------------------------------- the spec's egress


def errors(sandbox: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        spec(**sandbox) if sandbox.get("runtime", "kubernetes") == "kubernetes" else parse_spec(
            {"name": "k", "model": {"adapter": "reference"}, "dataset": {"samples": [{"input": "a"}]},
             "scorers": [{"type": "exact"}], "sandbox": sandbox})
    return str(info.value)


def test_egress_entries_are_normalised() -> None:
    doc = spec(egress=["10.0.0.0/8:443", "203.0.113.7:8080", "[2001:db8::/32]:443"])
    assert doc.sandbox.egress == ["10.0.0.0/8:443", "203.0.113.7/32:8080", "2001:db8::/32:443"]
    assert spec().sandbox.egress == []


@pytest.mark.parametrize("entry, why", [
    ("10.0.0.0/8", "has no port"),
    ("10.0.0.0/8:http", "is not a number"),
    ("10.0.0.0/8:70000", "is not a number from 1 to 65535"),
    ("10.0.0.1/8:443", "host bits set"),
    ("example.com:443", "does not appear to be an IPv4 or IPv6 network"),
])
def test_a_bad_egress_entry_is_named(entry: str, why: str) -> None:
    message = errors({"egress": ["10.0.0.0/8:443", entry]})
    assert "sandbox.egress" in message and repr(entry) in message and why in message


@pytest.mark.parametrize("runtime", ["auto", "gvisor", "bubblewrap"])
def test_egress_needs_the_kubernetes_runtime(runtime: str) -> None:
    message = errors({"runtime": runtime, "egress": ["10.0.0.0/8:443"]})
    assert "sandbox.egress" in message and "local sandboxes" in message and "no network" in message


# ---------------------------------------------------------------- the pod's entrypoint


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, data: bytes = b"x", type_: bytes = tarfile.REGTYPE,
           link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, link
    if type_ == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def test_the_workspace_travels_and_unpacks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "run.sh").write_text("#!/bin/sh\n")
    (src / "sub" / "run.sh").chmod(0o755)
    (src / "link").symlink_to("/etc/passwd")
    packed = pack_workspace(src)
    head, data = packed.split(b"\n", 1)
    assert head + b"\n" == header(len(data))
    dst = tmp_path / "dst"
    assert unpack(data, dst) == 2
    assert (dst / "a.txt").read_text() == "alpha" and (dst / "sub" / "run.sh").stat().st_mode & 0o100
    assert not (dst / "link").exists()  # links never travel


@pytest.mark.parametrize("bad, why", [
    (member("/etc/cron.d/x"), "not a relative path"),
    (member("../escape"), "not a relative path"),
    (member("a/../../escape"), "not a relative path"),
    (member("ln", type_=tarfile.SYMTYPE, link="/etc/passwd"), "not a regular file"),
    (member("hard", type_=tarfile.LNKTYPE, link="a"), "not a regular file"),
    (member("dev", type_=tarfile.CHRTYPE), "not a regular file"),
])
def test_unsafe_workspace_members_are_refused(tmp_path: Path, bad: Any, why: str) -> None:
    with pytest.raises(WorkspaceError, match=why):
        unpack(tar_of(bad), tmp_path / "ws")
    assert not (tmp_path / "escape").exists()


def test_workspace_size_is_capped(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="more than 10 bytes"):
        unpack(tar_of(member("a", b"x" * 8), member("b", b"x" * 8)), tmp_path / "ws", limit=10)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "f").write_bytes(b"x" * 100)
    with pytest.raises(WorkspaceError, match="more than 50 bytes"):
        pack_workspace(tmp_path / "big", limit=50)
    (tmp_path / "many").mkdir()
    for i in range(2500):  # empty files: no bytes of content, but a tar header each
        (tmp_path / "many" / f"{i:04d}-{'n' * 80}").touch()
    with pytest.raises(WorkspaceError, match="tar is over"):
        pack_workspace(tmp_path / "many", limit=1000)
