"""`kuberay/` and `docker/`: the cluster deployment renders with kustomize, every object in
it is valid for Kubernetes, for KubeRay (its CRD schemas and its checks in code) and for
Ray Serve, and it says what the platform needs: the same Serve application as the local
platform, settings and Secrets, RBAC in the sandbox namespace only, gVisor, deny-all
sandboxes, non-root pods. The images are checked statically (no registry is reachable
here). The checks live in `manifests.py`; the last tests show that they catch mistakes.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import pytest
import yaml

import manifests as m
from manifests import KUBERAY, REPO, find, one

DOCKER = REPO / "docker"
PLATFORM_IMAGE = "ghcr.io/proctor-dev/proctor"
HARNESS_IMAGE = "ghcr.io/proctor-dev/proctor-harness"
# kinds kubernetes-validate has no schema for, and what checks them instead
CRD_KINDS = {("ray.io/v1", "RayService"): "KubeRay's CRD schemas and checks",
             ("monitoring.coreos.com/v1", "PodMonitor"): "manifests.PODMONITOR_SCHEMA",
             ("monitoring.coreos.com/v1", "PrometheusRule"): "manifests.PROMETHEUSRULE_SCHEMA"}
SANDBOX_RULES = {  # what supervisors may do in the sandbox namespace, exactly
    ("", "pods"): {"create", "get", "list", "watch", "delete"},
    ("", "pods/attach"): {"create", "get"},
    ("", "pods/log"): {"get"},
    ("networking.k8s.io", "networkpolicies"): {"create", "get", "list", "delete"},
    ("", "configmaps"): {"create", "get", "delete"},
    ("", "services"): {"create", "get", "list", "delete"},
    ("", "events"): {"get", "list", "watch"},
    ("metrics.k8s.io", "pods"): {"get"},
}
PLACEHOLDER = "REPLACE-ME"


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return m.render(KUBERAY)


@pytest.fixture(scope="module")
def monitoring() -> list[dict[str, Any]]:
    return m.render(KUBERAY / "monitoring")


def all_errors(objects: list[dict[str, Any]]) -> list[str]:
    """Every check of manifests.py over a render; an unexpected CRD kind is an error."""
    errors = []
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key == ("ray.io/v1", "RayService"):
            errors += m.rayservice_errors(obj) + m.kuberay_errors(obj)
            errors += m.serve_config_errors(obj["spec"].get("serveConfigV2", ""))
        elif key == ("monitoring.coreos.com/v1", "PodMonitor"):
            errors += m.podmonitor_errors(obj)
        elif key == ("monitoring.coreos.com/v1", "PrometheusRule"):
            errors += m.prometheusrule_errors(obj)
        else:
            errors += m.builtin_errors(obj)
    return errors


def rayservice(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "RayService", "proctor")


def ray_containers(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(group, t["spec"]["containers"][0]) for group, t in m.ray_templates(rayservice(objects))]


def decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


# ------------------------------------------------------------------------------ validity

def test_kustomize_renders_the_platform(rendered: list[dict[str, Any]], monitoring: list[dict[str, Any]]) -> None:
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in rendered)
    for expected in ("RayService/proctor", "Namespace/proctor", "Namespace/proctor-sandboxes",
                     "RuntimeClass/gvisor", "Role/proctor-sandbox-manager", "RoleBinding/proctor-sandbox-manager",
                     "Deployment/proctor-redis", "Service/proctor-redis", "Deployment/proctor-dashboard",
                     "Service/proctor-dashboard", "ConfigMap/proctor-settings", "Secret/proctor-postgres",
                     "Secret/proctor-s3", "Secret/proctor-jwt", "Secret/proctor-redis", "Secret/proctor-ray-auth"):
        assert expected in kinds, f"{expected} is not rendered; got {kinds}"
    assert sorted(o["kind"] for o in monitoring) == ["ConfigMap", "PodMonitor", "PodMonitor", "PrometheusRule", "Secret"]
    for obj in rendered + monitoring:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "proctor"


def test_every_object_validates(rendered: list[dict[str, Any]], monitoring: list[dict[str, Any]]) -> None:
    """Built-in kinds strictly at the newest Kubernetes kubernetes-validate ships (>= 1.33);
    the RayService against KubeRay v1.7's CRDs and code checks; PodMonitors against ours."""
    m.kubernetes_version()  # fails when older than manifests.MIN_KUBERNETES
    assert all_errors(rendered) == []
    assert all_errors(monitoring) == []


def test_only_the_named_kinds_are_crds(rendered: list[dict[str, Any]], monitoring: list[dict[str, Any]]) -> None:
    """kubernetes-validate knows every kind but exactly these, which have their own checks."""
    unknown = {(o["apiVersion"], o["kind"]) for o in rendered + monitoring
               if any("no schema" in e for e in m.builtin_errors(o))}
    assert unknown == set(CRD_KINDS)


def test_rayservice_passes_kuberays_own_checks(rendered: list[dict[str, Any]]) -> None:
    rs = rayservice(rendered)
    assert len(rs["metadata"]["name"]) <= m.MAX_RAYSERVICE_NAME
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert "cpu" in groups and any(name.startswith("gpu-") for name in groups)
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert g["maxReplicas"] > g["minReplicas"], f"{g['groupName']} cannot scale"
    assert m.kuberay_errors(rs) == []


def test_gpu_groups_offer_their_gpu_type(rendered: list[dict[str, Any]]) -> None:
    """A GPU group tells Ray its GPU count and type the way Proctor's scheduler matches them
    (`accelerator_type:<TYPE>: 1` per node, whatever its GPU count). With the shipped
    kubernetes runtime its Ray pods hold no GPU: the sandbox pods take them, so none is
    held twice."""
    settings = one(rendered, "ConfigMap", "proctor-settings")["data"]
    assert settings["PROCTOR_RUNTIME"] == "kubernetes"
    cluster = rayservice(rendered)["spec"]["rayClusterConfig"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if g["groupName"].startswith("gpu-")]
    assert gpu_groups
    for g in gpu_groups:
        spec = g["template"]["spec"]
        raw = g["rayStartParams"]["resources"]
        assert raw.startswith('"') and raw.endswith('"'), "KubeRay passes it to a shell: quote it"
        offered = yaml.safe_load(raw[1:-1].replace('\\"', '"'))
        gpu_type = g["template"]["metadata"]["labels"]["proctor.dev/gpu-type"]
        assert offered == {f"accelerator_type:{gpu_type}": 1}
        assert int(g["rayStartParams"]["num-gpus"]) >= 1
        assert g["groupName"] == f"gpu-{gpu_type.lower()}"
        for container in spec["containers"]:
            for kind in ("requests", "limits"):
                assert "nvidia.com/gpu" not in container["resources"].get(kind, {}), g["groupName"]


def test_gcs_fault_tolerance_uses_the_rendered_redis(rendered: list[dict[str, Any]]) -> None:
    ft = rayservice(rendered)["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    host, _, port = ft["redisAddress"].partition(":")
    service = one(rendered, "Service", host)
    assert service["metadata"]["namespace"] == "proctor"
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in one(rendered, "Secret", ref["name"])["data"]
    redis = one(rendered, "Deployment", "proctor-redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["env"][0]["valueFrom"]["secretKeyRef"] == ref  # the server asks for the same password


# ------------------------------------------------------------------------------ the application

def test_serve_config_is_the_local_platforms_application(rendered: list[dict[str, Any]]) -> None:
    """serveConfigV2 parses as a Ray Serve config and runs the application that `proctor up`
    and `serve deploy serve_app/serve_config.yaml` run, and starts the control plane."""
    text = rayservice(rendered)["spec"]["serveConfigV2"]
    assert m.serve_config_errors(text) == []
    cluster = yaml.safe_load(text)
    local = yaml.safe_load((REPO / "serve_app" / "serve_config.yaml").read_text())
    assert [a["name"] for a in cluster["applications"]] == [a["name"] for a in local["applications"]] == ["proctor"]
    (app,), (local_app,) = cluster["applications"], local["applications"]
    assert app["import_path"] == local_app["import_path"] == "serve_app.deployment:app_builder"
    assert app["route_prefix"] == local_app["route_prefix"]
    assert [d["name"] for d in app["deployments"]] == [d["name"] for d in local_app["deployments"]]
    assert app["args"] == {"start_control_plane": "true"}
    for group, container in ray_containers(rendered):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == cluster["http_options"]["port"], group


def test_ray_pods_run_serve_through_the_local_platforms_haproxy_ingress(rendered: list[dict[str, Any]]) -> None:
    """Every Ray pod runs Serve's HAProxy ingress with the environment `proctor up` gives
    its Ray head (serve_app/ingress.py), Debian's haproxy from the platform image; nothing
    outside the Ray pods reaches HAProxy's stats page or exporter."""
    from serve_app.ingress import DEBIAN_HAPROXY, ingress_env

    want = {k: f"value:{v}" for k, v in ingress_env("haproxy", haproxy=DEBIAN_HAPROXY).items()}
    for group, container in ray_containers(rendered):
        env = m.container_env(container, rendered, "proctor")
        assert {k: env.get(k) for k in want} == want, group
    final = final_stage(instructions((DOCKER / "Dockerfile.platform").read_text()))
    assert any(op == "RUN" and re.search(r"apt-get install [^&]*\bhaproxy\b", a) for op, a in final)
    policy = one(rendered, "NetworkPolicy", "proctor-ray")["spec"]["ingress"]
    opened = {p["port"] for rule in policy if "ports" in rule for p in rule["ports"]}
    assert opened.isdisjoint({8404, 9101}), opened


def test_app_builder_starts_the_control_plane_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from eval_actors import control_plane
    from serve_app import deployment

    started: list[Any] = []
    monkeypatch.setattr(control_plane, "start", lambda settings: started.append(settings))
    monkeypatch.setattr(deployment, "deployment", lambda settings: "app")
    assert deployment.app_builder({}) == "app" and started == []
    assert deployment.app_builder({"start_control_plane": "false"}) == "app" and started == []
    assert deployment.app_builder({"start_control_plane": "true"}) == "app" and len(started) == 1
    assert deployment.app_builder({"start_control_plane": True}) == "app" and len(started) == 2
    with pytest.raises(ValueError, match="unknown args start_controlplane"):
        deployment.app_builder({"start_controlplane": "true"})
    with pytest.raises(ValueError, match="not true or false"):
        deployment.app_builder({"start_control_plane": "maybe"})
    assert len(started) == 2


def test_ray_pods_get_the_platform_settings(rendered: list[dict[str, Any]]) -> None:
    from proctor.settings import Settings

    for group, container in ray_containers(rendered):
        env = m.container_env(container, rendered, "proctor")
        assert env["PROCTOR_RUNTIME"] == "value:kubernetes", group
        assert env["PROCTOR_KUBE_NAMESPACE"] == "value:proctor-sandboxes"
        assert env["PROCTOR_KUBE_IMAGE"] == f"value:{HARNESS_IMAGE}:{version()}"
        assert env["PROCTOR_KUBE_INSTANCE"] == "value:proctor"
        assert env["PROCTOR_HOME"] == "value:/var/lib/proctor"
        assert env["PROCTOR_RESULTS_URI"].startswith("value:s3://")
        mounts = {v["mountPath"] for v in container["volumeMounts"]}
        assert {"/var/lib/proctor", "/tmp"} <= mounts, f"{group}: PROCTOR_HOME and /tmp must be writable"
    settings = one(rendered, "ConfigMap", "proctor-settings")["data"]
    known = {f"PROCTOR_{name.upper()}" for name in Settings.model_fields}
    known |= {"PROCTOR_KUBE_NAMESPACE", "PROCTOR_KUBE_IMAGE", "PROCTOR_KUBE_INSTANCE"}  # the Kubernetes runtime's
    known |= {"RAY_USAGE_STATS_ENABLED"}
    misspelt = [k for k in settings if k not in known]
    assert misspelt == [], f"not Proctor settings (Settings ignores unknown keys): {misspelt}"


def test_credentials_come_from_secrets(rendered: list[dict[str, Any]]) -> None:
    """PostgreSQL, S3 and the JWT secret reach the Ray pods from Secrets, never as values."""
    for group, container in ray_containers(rendered):
        env = m.container_env(container, rendered, "proctor")
        for key in ("PROCTOR_STATE_URL", "PROCTOR_S3_ACCESS_KEY_ID", "PROCTOR_S3_SECRET_ACCESS_KEY",
                    "PROCTOR_JWT_SECRET"):
            assert env.get(key, "").startswith("secret:"), f"{group}: {key} is {env.get(key)!r}, not from a Secret"
    state_url = decoded(one(rendered, "Secret", "proctor-postgres"))["PROCTOR_STATE_URL"]
    assert state_url.startswith("postgresql+psycopg://")
    settings = one(rendered, "ConfigMap", "proctor-settings")["data"]
    assert not [k for k in settings if re.search("PASSWORD|SECRET|TOKEN|ACCESS_KEY|STATE_URL", k)]


def test_example_secrets_keep_the_head_from_starting(rendered: list[dict[str, Any]]) -> None:
    """Every committed Secret holds only placeholders, and the head's check-secrets init
    container (which sees every Secret the Ray pods use) refuses them: fail closed."""
    secrets = {s["metadata"]["name"]: decoded(s) for s in find(rendered, "Secret")}
    for name, data in secrets.items():
        assert all(PLACEHOLDER in v for v in data.values()), f"Secret {name} holds a real-looking value"
    head = rayservice(rendered)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (check,) = [c for c in head["initContainers"] if c["name"] == "check-secrets"]
    checked = {v.split(":", 1)[1].split("/")[0] for v in m.container_env(check, rendered, "proctor").values()}
    used = {v.split(":", 1)[1].split("/")[0] for _, c in ray_containers(rendered)
            for v in m.container_env(c, rendered, "proctor").values() if v.startswith("secret:")}
    cluster = rayservice(rendered)["spec"]["rayClusterConfig"]
    used |= {cluster["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]["name"],
             cluster["authOptions"]["secretName"]}
    assert used <= checked, f"check-secrets does not look at {used - checked}"

    def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *check["command"][1:], *check["args"]], env=env,
                              capture_output=True, text=True, timeout=60)

    example = {k: v for data in secrets.values() for k, v in data.items()}
    refused = run(example)
    assert refused.returncode != 0 and "PROCTOR_JWT_SECRET" in refused.stderr, refused.stderr
    assert run({k: v.replace(PLACEHOLDER, "filled-in") for k, v in example.items()}).returncode == 0


def test_what_the_readme_says_to_fill_in_reads_replace_me_and_is_checked(rendered: list[dict[str, Any]]) -> None:
    """kuberay/README.md: what must be filled in reads REPLACE-ME (every Secret, the results
    bucket in settings.env), and the head's check-secrets init container refuses it."""
    readme = (KUBERAY / "README.md").read_text()
    assert "`PROCTOR_RESULTS_URI` in `settings.env`" in readme.replace("\n", " ")
    settings = one(rendered, "ConfigMap", "proctor-settings")["data"]
    assert PLACEHOLDER in settings["PROCTOR_RESULTS_URI"]
    for path in [KUBERAY / "settings.env", *sorted((KUBERAY / "secrets").glob("*.env"))]:
        assert PLACEHOLDER in path.read_text(), f"{path.name}: the README says to fill it in, but nothing says where"
    head = rayservice(rendered)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (check,) = [c for c in head["initContainers"] if c["name"] == "check-secrets"]
    seen = m.container_env(check, rendered, "proctor")
    assert seen["PROCTOR_RESULTS_URI"] == f"value:{settings['PROCTOR_RESULTS_URI']}"
    secrets = {k: v for s in find(rendered, "Secret") for k, v in decoded(s).items()}
    env = {**settings, **{k: v.replace(PLACEHOLDER, "filled-in") for k, v in secrets.items()}}
    refused = subprocess.run([sys.executable, *check["command"][1:], *check["args"]], env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and "PROCTOR_RESULTS_URI" in refused.stderr, refused.stderr


# ------------------------------------------------------------------------------ isolation

def test_sandbox_namespace_enforces_restricted_pod_security(rendered: list[dict[str, Any]]) -> None:
    labels = one(rendered, "Namespace", "proctor-sandboxes")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce-version"]
    assert one(rendered, "Namespace", "proctor")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] in (
        "baseline", "restricted")


def test_rbac_lets_ray_pods_manage_sandboxes_in_their_namespace_only(rendered: list[dict[str, Any]]) -> None:
    assert not find(rendered, "ClusterRole") and not find(rendered, "ClusterRoleBinding")
    (role,) = find(rendered, "Role")
    assert role["metadata"]["namespace"] == "proctor-sandboxes"
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == SANDBOX_RULES
    (binding,) = find(rendered, "RoleBinding")
    assert binding["metadata"]["namespace"] == "proctor-sandboxes"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    bound = {(s["kind"], s["namespace"], s["name"]) for s in binding["subjects"]}
    used = {("ServiceAccount", "proctor", t["spec"]["serviceAccountName"])
            for _, t in m.ray_templates(rayservice(rendered))}
    assert bound == used, "exactly the Ray pods' accounts are bound"
    for kind, ns, name in used:
        assert one(rendered, kind, name)["metadata"]["namespace"] == ns
    dashboard = one(rendered, "Deployment", "proctor-dashboard")["spec"]["template"]["spec"]
    assert dashboard["automountServiceAccountToken"] is False
    (sandbox_account,) = [a for a in find(rendered, "ServiceAccount", "default")
                          if a["metadata"]["namespace"] == "proctor-sandboxes"]
    assert sandbox_account["automountServiceAccountToken"] is False, "sandbox pods get no API token"


def test_gvisor_runtime_class(rendered: list[dict[str, Any]]) -> None:
    assert one(rendered, "RuntimeClass", "gvisor")["handler"] == "runsc"


def test_network_policies(rendered: list[dict[str, Any]]) -> None:
    policies = find(rendered, "NetworkPolicy")
    sandbox = [p for p in policies if p["metadata"]["namespace"] == "proctor-sandboxes"]
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in sandbox), \
        "the sandbox namespace needs a default deny-all policy"
    platform = [p for p in policies if p["metadata"]["namespace"] == "proctor"]
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
               and not p["spec"].get("ingress") for p in platform), "the platform namespace denies ingress by default"
    (redis,) = [p for p in platform if p["spec"]["podSelector"].get("matchLabels", {}).get(
        "app.kubernetes.io/name") == "proctor-redis"]
    assert redis["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "proctor-ray"}}}], "ports": [{"port": 6379}]}]
    assert "Egress" in redis["spec"]["policyTypes"] and not redis["spec"].get("egress")
    for _, template in m.ray_templates(rayservice(rendered)):
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "proctor-ray"


def test_pods_are_non_root_and_locked_down(rendered: list[dict[str, Any]]) -> None:
    specs = m.pod_specs(rendered)
    assert len(specs) == 5  # redis, dashboard, Ray head, cpu and gpu workers
    for where, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod.get("runAsUser", 1) != 0, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v], where
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["readOnlyRootFilesystem"] is True and not sc.get("privileged"), f"{where} {c['name']}"
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), f"{where} {c['name']} has no limits"
            image, _, tag = c["image"].rpartition(":")
            assert image and tag and tag != "latest" and "/" not in tag, f"{where}: {c['image']} is not pinned"
    autoscaler = rayservice(rendered)["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["runAsNonRoot"] is True and autoscaler["allowPrivilegeEscalation"] is False


def test_podmonitors_scrape_ray_and_the_api(rendered: list[dict[str, Any]], monitoring: list[dict[str, Any]]) -> None:
    head = rayservice(rendered)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    ports = {p["name"] for p in head["spec"]["containers"][0]["ports"]}
    for monitor in find(monitoring, "PodMonitor"):
        assert monitor["metadata"]["namespace"] == "proctor"
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= head["metadata"]["labels"].items()
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports
            if "authorization" in endpoint:
                ref = endpoint["authorization"]["credentials"]
                assert ref["key"] in one(monitoring, "Secret", ref["name"])["data"]
    paths = {e.get("path", "/metrics") for mon in find(monitoring, "PodMonitor") for e in mon["spec"]["podMetricsEndpoints"]}
    assert paths == {"/metrics", "/api/v1/metrics"}


# ------------------------------------------------------------------------------ images

def version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#")))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in (ln.strip() for ln in text.splitlines()) if ln]


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def test_manifests_use_the_images_docker_builds(rendered: list[dict[str, Any]]) -> None:
    images = {c["image"] for _, spec in m.pod_specs(rendered) for c in spec.get("initContainers", []) + spec["containers"]}
    ours = {i for i in images if i.startswith("ghcr.io/")}
    assert ours == {f"{PLATFORM_IMAGE}:{version()}"}
    assert images - ours == {"redis:7.4.6-alpine"}
    steps = instructions((DOCKER / "Dockerfile.platform").read_text())
    (pin,) = re.findall(r'"ray\[default,serve\]==([\d.]+)"', " ".join(a for op, a in steps if op == "RUN"))
    assert rayservice(rendered)["spec"]["rayClusterConfig"]["rayVersion"] == pin


def dockerfile_errors(dockerfile: str, dockerignore: str) -> list[str]:
    """What is wrong with an image's Dockerfile (and its build context's ignore file): a
    base not pinned, a root or non-numeric final USER, secrets in ENV/ARG, the whole repo
    or a credential-looking path copied, anything fetched, a context that is no allowlist."""
    steps = instructions(dockerfile)
    args = dict(a.partition("=")[::2] for op, a in steps if op == "ARG")
    stages = {a.split()[-1] for op, a in steps if op == "FROM" and " AS " in a.upper()}
    errors = []
    for op, a in steps:
        if op == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda g: args.get(g.group(1), ""), a.split()[0])
            if not (re.search(r":\d+\.\d+\.\d+[-\w.]*$|@sha256:[0-9a-f]{64}$", image) or image in stages):
                errors.append(f"FROM {image}: pin the base image (an exact version or a digest)")
        if op in ("ENV", "ARG") and re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE", a, re.I):
            errors.append(f"{op} {a}: no credentials in an image")
        if op in ("COPY", "ADD"):
            sources = [s for s in a.split()[:-1] if not s.startswith("--")]
            if {".", "./", "*"} & set(sources):
                errors.append(f"{op} {a}: copy what the image needs, not the repo")
            if any(re.search(r"secret|\.env|kuberay|\.git|\.venv|\.ssh|\.aws|\.pem|\.key|token|kubeconfig", s, re.I)
                   for s in sources):
                errors.append(f"{op} {a}: a credential-looking path")
            if any("://" in s for s in sources):
                errors.append(f"{op} {a}: nothing is fetched at build time")
    users = [a for op, a in final_stage(steps) if op == "USER"]
    uid = users[-1].split(":")[0] if users else "0"
    if not uid.isdigit() or int(uid) == 0:
        errors.append(f"USER {users[-1] if users else '(none)'}: a numeric, non-root user (runAsNonRoot checks it)")
    ignore = [ln.strip() for ln in dockerignore.splitlines() if ln.strip() and not ln.startswith("#")]
    if not ignore or ignore[0] != "*":
        errors.append(".dockerignore: the build context must be an allowlist (start with *)")
    if "**/__pycache__" not in ignore:
        errors.append(".dockerignore: leave out **/__pycache__")
    return errors


@pytest.mark.parametrize("name", ["platform", "harness"])
def test_dockerfiles_are_pinned_non_root_and_copy_no_secrets(name: str) -> None:
    dockerfile = (DOCKER / f"Dockerfile.{name}").read_text()
    assert dockerfile_errors(dockerfile, (DOCKER / f"Dockerfile.{name}.dockerignore").read_text()) == []


@pytest.mark.parametrize(("mistake", "old", "new"), [
    ("a floating base", "python:3.11.14-slim-bookworm", "python:3.11-slim"),
    ("root", "USER 1000:1000", "USER root"),
    ("the whole repo", "COPY ui/ ui/", "COPY . ."),
    ("a secret copied", "COPY ui/ ui/", "COPY kuberay/secrets/ /etc/proctor/"),
    ("a secret baked in", "PYTHONUNBUFFERED=1", "PROCTOR_JWT_SECRET=abc PYTHONUNBUFFERED=1"),
])
def test_a_broken_dockerfile_is_rejected(mistake: str, old: str, new: str) -> None:
    dockerfile = (DOCKER / "Dockerfile.platform").read_text()
    assert old in dockerfile
    assert dockerfile_errors(dockerfile.replace(old, new), "*\n**/__pycache__\n"), f"{mistake} went unnoticed"


def test_harness_image_is_the_harness_and_nothing_else() -> None:
    steps = instructions((DOCKER / "Dockerfile.harness").read_text())
    assert final_stage(steps)[-1] == ("ENTRYPOINT", '["python", "-m", "proctor.podentry"]')
    assert [a for op, a in steps if op == "USER"] == ["65534:65534"]
    assert [a.split()[0] for op, a in steps if op == "COPY"] == ["proctor/"]
    assert set(harness_packages()) == {"pydantic", "pyyaml"}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    from packaging.requirements import Requirement

    ranges = {Requirement(r).name.lower(): Requirement(r).specifier for r in project}
    for package, pinned in harness_packages().items():
        assert pinned in ranges[package], f"{package}=={pinned} is outside pyproject's {ranges[package]}"


def harness_packages() -> dict[str, str]:
    """What Dockerfile.harness pip-installs, with its pinned versions."""
    runs = " ".join(a for op, a in instructions((DOCKER / "Dockerfile.harness").read_text()) if op == "RUN")
    return {name.lower(): pin for part in re.findall(r"pip install ([^&]+)", runs)
            for name, pin in re.findall(r"([A-Za-z][\w.-]*)==([\w.]+)", part)}


def test_harness_runs_with_only_its_images_packages(tmp_path: Path) -> None:
    """The in-sandbox code imports with nothing but the harness image's packages (and
    their dependencies) and the `proctor` package: Python run isolated from the venv."""
    from packaging.requirements import Requirement

    todo, dists = list(harness_packages()), set()
    while todo:
        dist = distribution(todo.pop())
        if dist.metadata["Name"].lower() in dists:
            continue
        dists.add(dist.metadata["Name"].lower())
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    for name in dists:
        dist = distribution(name)
        for top in {f.parts[0] for f in dist.files or [] if not f.parts[0].endswith((".dist-info", ".data"))
                    and f.parts[0] != ".."}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (tmp_path / top).exists():
                (tmp_path / top).symlink_to(source)
    (tmp_path / "proctor").symlink_to(REPO / "proctor")
    modules = ["proctor.protocol", "proctor.podentry"] if (REPO / "proctor" / "podentry.py").exists() else [
        "proctor.protocol"]
    modules += [f"proctor.harness.{p.stem}" for p in (REPO / "proctor" / "harness").glob("*.py")
                if p.stem not in ("__init__", "__main__")]
    modules += [f"proctor.scripted.{p.stem}" for p in (REPO / "proctor" / "scripted").glob("*.py")]
    script = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import " + ", ".join(sorted(modules))
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the harness needs more than its image has:\n{done.stderr[-2000:]}"


# ------------------------------------------------------------------------------ the checks catch mistakes

def _workers(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return rayservice(objs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def _head(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return rayservice(objs)["spec"]["rayClusterConfig"]["headGroupSpec"]


def _serve(objs: list[dict[str, Any]], old: str, new: str) -> None:
    rayservice(objs)["spec"]["serveConfigV2"] = rayservice(objs)["spec"]["serveConfigV2"].replace(old, new)


BROKEN: dict[str, tuple[Callable[[list[dict[str, Any]]], Any], str]] = {
    "minReplicas above maxReplicas": (lambda o: _workers(o)[0].update(minReplicas=20), "greater than maxReplicas"),
    "replicas above maxReplicas": (lambda o: _workers(o)[0].update(replicas=11), "is not within"),
    "a 48-character name": (lambda o: rayservice(o)["metadata"].update(name="p" * 48), "no more than 47"),
    "a name that is no DNS label": (lambda o: rayservice(o)["metadata"].update(name="Proctor_1"), "DNS-1035"),
    "an unknown field": (lambda o: _head(o).update(rayStartParms={}), "rayStartParms"),
    "an unknown container field": (lambda o: _head(o)["template"]["spec"]["containers"][0].update(
        imagePullPolicyy="Always"), "imagePullPolicyy"),
    "a wrong type": (lambda o: _workers(o)[0].update(maxReplicas="ten"), "'ten' is not of type 'integer'"),
    "work on the head": (lambda o: _head(o)["rayStartParams"].pop("num-cpus"), "no evaluation work"),
    "token auth on an old Ray": (lambda o: rayservice(o)["spec"]["rayClusterConfig"].update(rayVersion="2.40.0"),
                                 "2.52.0"),
    "redis-password beside GCS FT": (lambda o: _head(o)["rayStartParams"].update({"redis-password": "x"}),
                                     "redis-password"),
    "resources said twice": (lambda o: _workers(o)[1].update(resources={"GPU": "1"}), "both rayStartParams"),
    "a misspelt Serve key": (lambda o: _serve(o, "route_prefix:", "route_prefx:"), "route_prefx"),
    "a Serve value Ray refuses": (lambda o: _serve(o, "num_replicas: 1", "num_replicas: -1"), "num_replicas"),
    "an unknown Deployment field": (lambda o: one(o, "Deployment", "proctor-dashboard")["spec"].update(
        replica=2), "replica"),
    "an unknown NetworkPolicy field": (lambda o: find(o, "NetworkPolicy")[0]["spec"].update(
        policyType=["Ingress"]), "policyType"),
}


@pytest.mark.parametrize("mistake", list(BROKEN))
def test_a_broken_copy_is_rejected(rendered: list[dict[str, Any]], mistake: str) -> None:
    mutate, expected = BROKEN[mistake]
    broken = [m.deep(o) for o in rendered]
    mutate(broken)
    changed = [b for b, o in zip(broken, rendered) if b != o]  # the rest passed test_every_object_validates
    assert changed
    errors = all_errors(changed)
    assert errors, f"{mistake} went unnoticed"
    assert any(expected in e for e in errors), errors


def test_a_broken_podmonitor_is_rejected(monitoring: list[dict[str, Any]]) -> None:
    broken = [m.deep(o) for o in monitoring]
    find(broken, "PodMonitor")[0]["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert any("intervall" in e for e in all_errors(broken))


def test_a_broken_prometheusrule_is_rejected(monitoring: list[dict[str, Any]]) -> None:
    broken = [m.deep(o) for o in monitoring]
    find(broken, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0]["fore"] = "5m"
    assert any("fore" in e for e in all_errors(broken))


def test_grafana_finds_the_dashboards(monitoring: list[dict[str, Any]]) -> None:
    """Grafana's sidecar loads ConfigMaps labelled grafana_dashboard=1: every dashboard in
    kuberay/monitoring/dashboards is in one, as the JSON it is."""
    [maps] = find(monitoring, "ConfigMap")
    assert maps["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = {p.name: p.read_text() for p in (KUBERAY / "monitoring" / "dashboards").glob("*.json")}
    assert files and maps["data"] == files


def test_render_failure_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(m.RenderError, match="missing.yaml"):
        m.render(tmp_path)


def test_readme_names_what_the_render_makes(rendered: list[dict[str, Any]]) -> None:
    """kuberay/README.md's commands name Services, Secrets and the RayService that exist
    (KubeRay names the head and serve Services after the RayService)."""
    text = (KUBERAY / "README.md").read_text()
    rs = rayservice(rendered)["metadata"]["name"]
    services = {s["metadata"]["name"] for s in find(rendered, "Service")} | {f"{rs}-head-svc", f"{rs}-serve-svc"}
    named = set(re.findall(r"svc/([\w-]+)", text))
    assert named and named <= services, named - services
    assert {f"{rs}-head-svc", f"{rs}-serve-svc", "proctor-dashboard"} <= named
    secrets = {s["metadata"]["name"] for s in find(rendered, "Secret")}
    assert set(re.findall(r"get secret ([\w-]+)", text)) <= secrets
    assert f"rayservice/{rs}" in text and "kubectl apply -k kuberay/" in text


def test_the_crd_schemas_are_kuberays_own() -> None:
    """The copies in tests/schemas are the shared ones, unchanged (where shared/ is here)."""
    for name in ("ray.io_rayservices.yaml", "ray.io_rayclusters.yaml"):
        copy = (m.SCHEMAS / name).read_bytes()
        assert yaml.safe_load(copy)["spec"]["names"]["kind"] in ("RayService", "RayCluster")
        if m.SHARED_SCHEMAS.is_dir():
            assert copy == (m.SHARED_SCHEMAS / name).read_bytes(), name
