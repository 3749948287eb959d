"""Rendering `kuberay/` and checking what it renders, for `test_kuberay.py`.

Each check returns a list of errors (empty: valid) so that a test can both assert a
clean render and show that a broken copy is caught:
- `render`: `kubectl kustomize` (or `kustomize build`), the tool `scripts/setup.sh --test`
  puts in `.venv/bin` first;
- `builtin_errors`: a Kubernetes object of a built-in kind, with kubernetes-validate
  (strict: unknown fields are errors) at the newest Kubernetes version it ships;
- `crd_errors`: an object against a CRD's `openAPIV3Schema`, turned into a JSON Schema
  that refuses unknown fields as the API server's strict field validation does (CEL
  rules, `x-kubernetes-validations`, are not checked);
- `kuberay_errors`: what KubeRay checks in code before it makes a RayCluster
  (`ray-operator/controllers/ray/utils/validation.go`), plus Proctor's own rule that the
  head does no evaluation work;
- `serve_config_errors`: a `serveConfigV2` as Ray Serve parses it, with no unknown keys.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "kuberay"
# KubeRay v1.7.0's CRDs, copied unchanged from the team's shared/schemas (test_kuberay
# checks the copy against it where shared/ is beside the checkout; CI's clone may not have it)
SCHEMAS = REPO / "tests" / "schemas" / "kuberay-v1.7.0"
SHARED_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0"
MIN_KUBERNETES = (1, 33)
MAX_RAYSERVICE_NAME = 47  # KubeRay: the RayCluster it makes is `<name>-<5 chars>`, at most 53
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
UPGRADE_TYPES = ("NewClusterWithIncrementalUpgrade", "NewCluster", "None")


class RenderError(RuntimeError):
    """kustomize is missing or refused the kustomization. Fails the test that renders."""


# ------------------------------------------------------------------------------ render

def kustomize_command() -> list[str]:
    """The kustomize to use: the kubectl that setup put beside this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return [str(beside), "kustomize"]
    if shutil.which("kustomize"):
        return [str(shutil.which("kustomize")), "build"]
    if shutil.which("kubectl"):
        return [str(shutil.which("kubectl")), "kustomize"]
    raise RenderError("neither kubectl nor kustomize is installed: run `bash scripts/setup.sh --test`, which "
                      "puts kubectl (with kustomize) in .venv/bin, or put kubectl >= 1.27 on PATH")


def render(path: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize <path>` renders."""
    cmd = [*kustomize_command(), str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RenderError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


# ------------------------------------------------------------------------------ built-in kinds

@functools.cache
def kubernetes_version() -> str:
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    if tuple(int(p) for p in version.split(".")[:2]) < MIN_KUBERNETES:
        raise RenderError(f"kubernetes-validate {version} is older than Kubernetes "
                          f"{'.'.join(map(str, MIN_KUBERNETES))}: upgrade it (scripts/setup.sh --test)")
    return version


def builtin_errors(obj: dict[str, Any]) -> list[str]:
    """Errors of a built-in kind's object (strict); a kind it has no schema for is an error."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, kubernetes_version(), strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{obj.get('kind')}: no schema in Kubernetes {kubernetes_version()} (a CRD?)"]
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        return [f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}: {where}: {exc.message}"]
    return []


def pod_template_errors(template: dict[str, Any], namespace: str) -> list[str]:
    """A pod template inside a custom resource, checked as a Kubernetes PodTemplate."""
    return builtin_errors({"apiVersion": "v1", "kind": "PodTemplate",
                           "metadata": {"name": "check", "namespace": namespace}, "template": template})


# ------------------------------------------------------------------------------ custom resources

def strict_schema(node: Any) -> Any:
    """An OpenAPI v3 schema of a CRD as a JSON Schema that refuses unknown fields."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for key in ("apiVersion", "kind"):
            props.setdefault(key, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(file: str, version: str = "v1") -> dict[str, Any]:
    path = SCHEMAS / file
    if not path.exists():
        raise RenderError(f"KubeRay's CRD {path} is missing: copy it from shared/schemas/kuberay-v1.7.0")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    found = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return strict_schema(found[0]["schema"]["openAPIV3Schema"])


def schema_errors(instance: Any, schema: dict[str, Any], what: str) -> list[str]:
    from jsonschema import Draft7Validator

    errors = sorted(Draft7Validator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{what}: {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}" for e in errors]


def rayservice_errors(rs: dict[str, Any]) -> list[str]:
    """A RayService against KubeRay's rayservices CRD, its cluster against the rayclusters
    CRD (the RayCluster KubeRay would make), and its pod templates as Kubernetes sees them."""
    errors = schema_errors(rs, crd_schema("ray.io_rayservices.yaml"), "RayService")
    spec = rs.get("spec", {}).get("rayClusterConfig", {})
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
               "metadata": {"name": f"{rs['metadata']['name']}-abcde", "namespace": rs["metadata"].get("namespace")},
               "spec": spec}
    errors += schema_errors(cluster, crd_schema("ray.io_rayclusters.yaml"), "RayCluster")
    namespace = rs["metadata"].get("namespace", "default")
    for group, template in ray_templates(rs):
        errors += [f"{group}: {e}" for e in pod_template_errors(template, namespace)]
    return errors


def ray_templates(rs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = rs.get("spec", {}).get("rayClusterConfig", {})
    groups = [("head", spec.get("headGroupSpec", {}).get("template", {}))]
    groups += [(g.get("groupName", "?"), g.get("template", {})) for g in spec.get("workerGroupSpecs", [])]
    return groups


def kuberay_errors(rs: dict[str, Any]) -> list[str]:
    """The checks KubeRay makes in code (validation.go) and Proctor's head rule."""
    errors = []
    name = rs["metadata"]["name"]
    if len(name) > MAX_RAYSERVICE_NAME:
        errors.append(f"RayService name should be no more than {MAX_RAYSERVICE_NAME} characters; {name!r} has {len(name)}")
    if not DNS1035.match(name):
        errors.append(f"RayService name {name!r} should be a valid DNS-1035 label")
    spec = rs["spec"]
    upgrade = (spec.get("upgradeStrategy") or {}).get("type")
    if upgrade is not None and upgrade not in UPGRADE_TYPES:
        errors.append(f"spec.upgradeStrategy.type {upgrade!r} is not one of {', '.join(UPGRADE_TYPES)}")
    cluster = spec["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    if (head.get("headService") or {}).get("metadata", {}).get("name"):
        errors.append("spec.rayClusterConfig.headGroupSpec.headService.metadata.name should not be set")
    groups = [("Head", head)] + [(g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs", [])]
    for group, g in groups:
        errors += _group_errors(group, g)
    errors += _replica_errors(cluster.get("workerGroupSpecs", []), bool(cluster.get("enableInTreeAutoscaling")))
    errors += _gcs_ft_errors(cluster, rs["metadata"].get("annotations") or {})
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") == "token" and _version(cluster.get("rayVersion", "")) < (2, 52, 0):
        errors.append(f"authOptions.mode is 'token' but rayVersion {cluster.get('rayVersion')!r} is not 2.52.0 or later")
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        errors.append('the head must do no evaluation work: headGroupSpec.rayStartParams num-cpus: "0"')
    return errors


def _group_errors(group: str, g: dict[str, Any]) -> list[str]:
    errors = []
    params = g.get("rayStartParams") or {}
    if not g.get("template", {}).get("spec", {}).get("containers"):
        errors.append(f"{group} group should have at least one container")
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
        errors.append(f"resource fields should not be set in both rayStartParams and Resources for {group} group")
    if "labels" in params:
        errors.append(f"rayStartParams['labels'] is not supported for {group} group")
    for key, value in (g.get("labels") or {}).items():
        prefix, _, label = key.rpartition("/")
        if not label or len(label) > 63 or not LABEL_NAME.match(label) or len(prefix) > 253:
            errors.append(f"invalid label key for {group} group: {key!r}")
        if len(value) > 63 or not LABEL_NAME.match(value):
            errors.append(f"invalid label value for key {key!r} in {group} group: {value!r}")
    return errors


def _replica_errors(workers: list[dict[str, Any]], autoscaling: bool) -> list[str]:
    errors, seen = [], set()
    for g in workers:
        name = g.get("groupName", "?")
        if name in seen or name == "headgroup":
            errors.append(f"worker group name {name!r} is taken")
        seen.add(name)
        low, high = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        replicas = g.get("replicas", low)
        if not all(isinstance(n, int) for n in (low, high, replicas)):
            continue  # not numbers: the CRD schema says so
        if low > high:
            errors.append(f"worker group {name}: minReplicas ({low}) is greater than maxReplicas ({high})")
        if not low <= replicas <= high:
            errors.append(f"worker group {name}: replicas ({replicas}) is not within [{low}, {high}]")
        if autoscaling and g.get("suspend"):
            errors.append(f"worker group {name} cannot be suspended with Autoscaler enabled")
    return errors


def _gcs_ft_errors(cluster: dict[str, Any], annotations: dict[str, str]) -> list[str]:
    head = cluster["headGroupSpec"]
    env = {e["name"] for e in head["template"]["spec"]["containers"][0].get("env", [])}
    params = head.get("rayStartParams") or {}
    errors = []
    if params.get("redis-username") or "REDIS_USERNAME" in env:
        errors.append("cannot set redis username in rayStartParams or env; use GcsFaultToleranceOptions.RedisUsername")
    if cluster.get("gcsFaultToleranceOptions") is None:
        if "RAY_REDIS_ADDRESS" in env:
            errors.append("RAY_REDIS_ADDRESS is set but GcsFaultToleranceOptions is not")
        return errors
    if annotations.get("ray.io/ft-enabled"):
        errors.append("ray.io/ft-enabled annotation and GcsFaultToleranceOptions are both set")
    if params.get("redis-password"):
        errors.append("cannot set `redis-password` in rayStartParams with GcsFaultToleranceOptions")
    errors += [f"cannot set `{k}` env var in the head Pod with GcsFaultToleranceOptions"
               for k in ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS") if k in env]
    if annotations.get("ray.io/external-storage-namespace"):
        errors.append("cannot set ray.io/external-storage-namespace with GcsFaultToleranceOptions")
    return errors


def _version(text: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", text)
    return tuple(int(p) for p in parts[:3]) if parts else (0,)


# ------------------------------------------------------------------------------ PodMonitor

_SELECTOR = {"type": "object", "additionalProperties": False,
             "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "matchExpressions": {"type": "array"}}}
_KEY_REF = {"type": "object", "additionalProperties": False, "required": ["name", "key"],
            "properties": {"name": {"type": "string"}, "key": {"type": "string"}, "optional": {"type": "boolean"}}}
PODMONITOR_SCHEMA = {
    # The part of monitoring.coreos.com/v1 PodMonitor that kuberay/monitoring uses
    # (prometheus-operator's CRD is not installed here); anything else is refused.
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
                 "properties": {
                     "selector": _SELECTOR,
                     "namespaceSelector": {"type": "object"},
                     "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "required": ["port"],
                         "properties": {
                             "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                             "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                             "scheme": {"enum": ["http", "https"]},
                             "authorization": {"type": "object", "additionalProperties": False,
                                               "properties": {"type": {"type": "string"}, "credentials": _KEY_REF}},
                         }}},
                 }},
    },
}


def podmonitor_errors(obj: dict[str, Any]) -> list[str]:
    return schema_errors(obj, PODMONITOR_SCHEMA, f"PodMonitor {obj.get('metadata', {}).get('name')}")


_DURATION = {"type": "string", "pattern": r"^(0|(\d+(ms|s|m|h|d|w|y))+)$"}
_RULE_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
PROMETHEUSRULE_SCHEMA = {
    # monitoring.coreos.com/v1 PrometheusRule as prometheus-operator's CRD has it (the part
    # kuberay/monitoring uses; tests/test_monitoring.py runs promtool on the rules themselves)
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                "properties": {
                    "name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                    "rules": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False, "required": ["expr"],
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                            "record": {"type": "string"}, "expr": {"type": "string", "minLength": 1},
                            "for": _DURATION, "keep_firing_for": _DURATION,
                            "labels": _RULE_LABELS, "annotations": _RULE_LABELS,
                        }}},
                }}},
        }},
    },
}


def prometheusrule_errors(obj: dict[str, Any]) -> list[str]:
    return schema_errors(obj, PROMETHEUSRULE_SCHEMA, f"PrometheusRule {obj.get('metadata', {}).get('name')}")


# ------------------------------------------------------------------------------ serveConfigV2

def serve_config_errors(text: str) -> list[str]:
    """Ray Serve's own parse of a config (ServeDeploySchema), which ignores unknown keys,
    plus a check that there are none (a misspelt key would be silently dropped)."""
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    doc = yaml.safe_load(text)
    try:
        ServeDeploySchema.model_validate(doc)
    except ValidationError as exc:
        return [f"serveConfigV2: {e['loc']}: {e['msg']}" for e in exc.errors()]
    errors = _unknown_keys(doc, ServeDeploySchema, "serveConfigV2")
    for i, app in enumerate(doc.get("applications", [])):
        errors += _unknown_keys(app, ServeApplicationSchema, f"applications[{i}]")
        for j, dep in enumerate(app.get("deployments", [])):
            errors += _unknown_keys(dep, DeploymentSchema, f"applications[{i}].deployments[{j}]")
    return errors


def _unknown_keys(doc: dict[str, Any], model: Any, where: str) -> list[str]:
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    return [f"{where}: unknown key {k!r}" for k in doc if k not in known]


# ------------------------------------------------------------------------------ pods

def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec the render makes, named: Deployments' and the RayService's groups."""
    found = [(f"Deployment {d['metadata']['name']}", d["spec"]["template"]["spec"]) for d in find(objects, "Deployment")]
    for rs in find(objects, "RayService"):
        found += [(f"RayService {rs['metadata']['name']} {group}", t["spec"]) for group, t in ray_templates(rs)]
    return found


def container_env(container: dict[str, Any], objects: list[dict[str, Any]], namespace: str) -> dict[str, str]:
    """Where each environment variable of a container comes from: `value:<v>` (set, or
    from a ConfigMap of the render) or `secret:<name>/<key>`. Fails on a missing source."""
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            data = _source(objects, "ConfigMap", ref["configMapRef"]["name"], namespace).get("data", {})
            env.update({k: f"value:{v}" for k, v in data.items()})
        if "secretRef" in ref:
            name = ref["secretRef"]["name"]
            env.update({k: f"secret:{name}/{k}" for k in _source(objects, "Secret", name, namespace).get("data", {})})
    for e in container.get("env", []):
        src = e.get("valueFrom", {})
        if "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            assert ref["key"] in _source(objects, "Secret", ref["name"], namespace).get("data", {}), ref
            env[e["name"]] = f"secret:{ref['name']}/{ref['key']}"
        elif "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            env[e["name"]] = "value:" + _source(objects, "ConfigMap", ref["name"], namespace)["data"][ref["key"]]
        else:
            env[e["name"]] = f"value:{e.get('value', '')}"
    return env


def _source(objects: list[dict[str, Any]], kind: str, name: str, namespace: str) -> dict[str, Any]:
    found = [o for o in find(objects, kind, name) if o["metadata"].get("namespace") == namespace]
    assert found, f"{kind} {namespace}/{name} is referred to but the render does not make it"
    return found[0]


def deep(obj: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(obj)
