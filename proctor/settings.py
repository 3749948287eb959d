"""The one settings object. Nothing else in Proctor reads the environment.

Every key can be set as `PROCTOR_<NAME>` (e.g. `PROCTOR_RESULTS_URI`); a bad value fails
with a message that names the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    # root's home is 0700; the sandbox user must reach its workspace, so root uses /var/lib
    return Path("/var/lib/proctor") if os.geteuid() == 0 else Path.home() / ".local/share/proctor"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROCTOR_", extra="ignore", frozen=True)

    home: Path = Field(default_factory=_default_home, description="data folder: sandboxes, results, state")
    results_uri: str | None = Field(None, description="file:///path or s3://bucket/prefix; <home>/results if unset")
    runtime: Literal["auto", "gvisor", "bubblewrap", "kubernetes"] = Field(
        "auto", description="sandbox runtime used when a spec says 'auto'"
    )
    runsc_platform: Literal["ptrace", "systrap", "kvm"] = "ptrace"
    max_concurrent_shards: int = Field(0, ge=0, description="shards run at once by a local run; 0: the CPU count")
    state_url: str | None = Field(None, description="SQLAlchemy URL of the state store; SQLite in <home> if unset")
    ray_address: str | None = Field(None, description="Ray cluster to join; a local one is started if unset")
    ray_namespace: str = "proctor"
    ray_port: int = Field(6379, ge=1, le=65535, description="port of the local Ray head's GCS (proctor up)")
    ray_dashboard_port: int = Field(8265, ge=1, le=65535, description="port of the local Ray dashboard and its "
                                    "job API on 127.0.0.1 (proctor up)")
    api_port: int = Field(8000, ge=1, le=65535, description="port of the HTTP API on 127.0.0.1 (proctor up)")
    ui_port: int = Field(8001, ge=1, le=65535, description="port of the dashboard on 127.0.0.1 (proctor up)")
    serve_ingress: Literal["proxy", "direct", "haproxy"] = Field(
        "haproxy", description="how HTTP reaches the API's Ray Serve replica (proctor up; serve_app/ingress.py): "
        "haproxy (HAProxy on the API port, then the replica's own server: the fastest), proxy (Serve's Python "
        "proxy actor), direct (the replica's own server, on a port Serve picks; the API port stays Serve's proxy). "
        "Read when `proctor up` starts the Ray head: a Ray cluster it did not start keeps its own")
    haproxy_stats_port: int = Field(8404, ge=1, le=65535, description="port of HAProxy's stats page "
                                    "(serve_ingress haproxy)")
    haproxy_metrics_port: int = Field(9101, ge=1, le=65535, description="port of HAProxy's Prometheus "
                                      "exporter (serve_ingress haproxy)")
    config_dir: Path = Field(default_factory=lambda: Path.home() / ".config" / "proctor",
                             description="where the CLI and client find the local token")
    supervisors: int = Field(2, ge=1, le=1024, description="supervisor actors, each running many shards")
    pool_size: int = Field(2, ge=0, le=64, description="warm gvisor sandboxes kept per sandbox class (runtime, "
                           "image, limits, network) while shards of that class are queued, started ahead of "
                           "demand and used once each (cluster/pool.py); 0 turns the pool off")
    api_nice: int = Field(-10, ge=-20, le=19, description="scheduling priority (nice) of the API's replica and "
                          "Serve's ingress beside it, so that a stop reaches the API on a busy host "
                          "(serve_app/priority.py; needs root or CAP_SYS_NICE); 0 leaves the default")
    pool_max_age_s: float = Field(300.0, gt=0, description="how long a warm sandbox waits before it is destroyed "
                                  "and replaced")
    supervisor_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources "
                                                   "each supervisor asks for: where it (and the local sandboxes "
                                                   "it starts) may run, e.g. {\"proctor-supervisor\": 1} "
                                                   "declared once on each worker node")
    s3_endpoint_url: str | None = Field(None, description="endpoint of an S3-compatible store")
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    # faults of the results store (cluster/retry.py, cluster/outbox.py)
    store_retry_s: float = Field(10.0, ge=0, description="how long one storage operation retries transient "
                                 "errors (refused, reset, timeouts, 5xx, throttling) before the aggregator "
                                 "spills what it was writing to the local outbox")
    store_outage_budget_s: float = Field(1800.0, gt=0, description="how long an evaluation waits for an "
                                         "unreachable results store before it fails (its spilled rows are "
                                         "still written when the store returns)")
    store_spill_max_bytes: int = Field(4 * 1024**3, ge=1, description="most bytes the outbox (<home>/outbox) "
                                       "may hold while the results store is away")
    state_retry_s: float = Field(120.0, ge=0, description="how long the control plane's state-store calls "
                                 "retry while the database is unreachable (a PostgreSQL restart) before they "
                                 "fail; the API does not wait: it answers 503 with Retry-After at once")
    # the API's auth and limits (serve_app)
    jwt_secret: str | None = Field(None, description="HS256 secret for the platform's own JWTs; "
                                   "<home>/jwt-secret (made by `proctor up`) if unset")
    jwt_issuer: str = Field("proctor", description="`iss` of the platform's own HS256 JWTs")
    oidc_issuer: str | None = Field(None, description="an OIDC issuer whose RS256/ES256 JWTs are accepted (SSO)")
    oidc_audience: str | None = Field(None, description="the `aud` an OIDC token must carry")
    oidc_jwks_url: str | None = Field(None, description="the issuer's JWKS; discovered from "
                                      "<issuer>/.well-known/openid-configuration if unset")
    oidc_user_claim: str = Field("preferred_username", description="claim naming the user (else `sub`)")
    oidc_role_claim: str = Field("proctor_role", description="claim carrying the Proctor role")
    rate_limit_per_s: float = Field(50.0, ge=0, description="requests per second per token (0: no limit)")
    rate_limit_burst: int = Field(200, ge=1, description="requests a token may make at once")
    max_request_bytes: int = Field(16 * 1024**2, ge=1024, description="largest request body accepted")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS (none by default)")
    # safety alerts (safety/alerts.py)
    alert_webhooks: list[str] = Field(default_factory=list, description="URLs that receive safety incidents")
    alert_shape: Literal["json", "pagerduty"] = Field("json", description="the alert body: Proctor's JSON or "
                                                      "PagerDuty Events v2")
    pagerduty_routing_key: str | None = Field(None, description="the integration key of PagerDuty alerts")
    # the kubernetes sandbox runtime (cluster/runtimes/kubernetes.py)
    kubeconfig: Path | None = Field(None, description="kubeconfig file of the cluster that runs sandbox pods; "
                                    "the in-cluster service account if unset")
    kube_namespace: str = Field("proctor-sandboxes", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
                                description="namespace of the sandbox pods (dedicated to them)")
    kube_image: str = Field("ghcr.io/proctor-dev/proctor-harness:0.1.0", min_length=1,
                            description="image of the sandbox pods (entrypoint `python -m proctor.podentry`)")
    kube_bundle_image: str = Field("ghcr.io/proctor-dev/proctor-harness-bundle:0.1.0", min_length=1,
                                   description="image holding the self-contained harness bundle at "
                                   "/proctor-harness (docker/Dockerfile.bundle): a pod in a task's image copies it "
                                   "in with an init container")
    kube_instance: str = Field("proctor", pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$",
                               description="label value telling apart the pods of platforms sharing a namespace")
    kube_pending_timeout_s: float = Field(120.0, gt=0, description="how long a pod may stay unschedulable "
                                          "before its launch fails and the pod is deleted")
    kube_gpu_node_label: str = Field("nvidia.com/gpu.product", min_length=1,
                                     description="node label naming the GPU model (NVIDIA GPU feature discovery's)")
    kube_runtime_class: str = Field("gvisor", min_length=1, description="RuntimeClass of the sandbox pods")
    # the image store (cluster/images); sizes in bytes or e.g. 8Gi
    image_max_bytes: int = Field(16 * 1024**3, ge=1, description="largest image: its layers' uncompressed bytes "
                                 "together; an import stops as soon as it passes this")
    image_layer_max_bytes: int = Field(8 * 1024**3, ge=1, description="largest uncompressed layer of an image")
    image_store_max_bytes: int = Field(0, ge=0, description="most bytes all stored images may take together "
                                       "(their layers, uncompressed); 0: only the free disk space limits them")
    image_min_free_bytes: int = Field(2 * 1024**3, ge=0, description="disk space an import or build leaves free "
                                      "on the store's file system")
    image_apt_mirror: str | None = Field(None, description="Debian mirror of recipe builds (e.g. "
                                         "http://deb.debian.org/debian); the host's apt sources if unset")
    image_build_timeout_s: float = Field(1800.0, gt=0, description="longest a recipe build may take")

    @field_validator("image_max_bytes", "image_layer_max_bytes", "image_store_max_bytes", "image_min_free_bytes",
                     "store_spill_max_bytes", mode="before")
    @classmethod
    def _size(cls, v: object, info: object) -> object:
        if isinstance(v, str):
            from .spec import parse_size

            return parse_size(v, getattr(info, "field_name", "size"))
        return v

    # observability (proctor/observability/)
    log_format: Literal["text", "json"] = Field("text", description="`json`: one JSON object per log line "
                                                 "(time, level, logger, message, eval_id, shard_id, trace_id, "
                                                 "span_id), for a log collector; `text`: for a person")
    log_level: Literal["debug", "info", "warning", "error"] | None = Field(
        None, description="the lowest level logged; unset: info in the platform's processes, warning in the CLI")
    otel_endpoint: str | None = Field(None, pattern=r"^(https?|grpcs?)://[^\s/]+", description="an OTLP "
                                      "receiver (an OpenTelemetry collector): traces go there; unset: no tracing")
    otel_protocol: Literal["auto", "grpc", "http"] = Field("auto", description="OTLP over gRPC or HTTP "
                                                           "(protobuf); auto: gRPC for grpc:// and grpcs:// "
                                                           "endpoints, HTTP for http:// and https://")
    otel_headers: dict[str, str] = Field(default_factory=dict, description="headers of every OTLP export "
                                         "(e.g. a vendor's API key), as JSON; never logged")
    otel_sample_ratio: float = Field(1.0, ge=0, le=1, description="the share of evaluations (and API "
                                     "requests) traced, decided once per trace")
    otel_service_name: str = Field("proctor", min_length=1, description="`service.name` of the spans")

    @field_validator("otel_protocol")
    @classmethod
    def _protocol_fits_endpoint(cls, value: str, info: ValidationInfo) -> str:
        endpoint = info.data.get("otel_endpoint") or ""
        if value == "http" and endpoint.startswith("grpc"):
            raise ValueError(f"http does not go with the gRPC endpoint {endpoint}; use http:// or https://")
        return value

    @property
    def sandbox_dir(self) -> Path:
        return self.home / "sandboxes"

    @property
    def outbox_dir(self) -> Path:
        """Where results wait while their store is away (`cluster/outbox.py`)."""
        return self.home / "outbox"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def ray_dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ray_dashboard_port}"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    @property
    def token_file(self) -> Path:
        return self.config_dir / "token"

    @property
    def jwt_secret_file(self) -> Path:
        return self.home / "jwt-secret"

    @property
    def state(self) -> str:
        return self.state_url or f"sqlite:///{self.home / 'state.db'}"

    @property
    def results(self) -> str:
        return self.results_uri or (self.home / "results").as_uri()

    def secret(self, name: str) -> str | None:
        """A credential named by a spec (e.g. a model's `api_key_env`), read outside any sandbox."""
        return os.environ.get(name)


class SettingsError(ValueError):
    """A setting has a bad value. Caught by the CLI, which prints it and exits 2."""


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]  # any field by name: pydantic checks the values
    except ValidationError as exc:
        err = exc.errors()[0]
        key = "PROCTOR_" + "_".join(str(p) for p in err["loc"]).upper()
        raise SettingsError(f"{key}: {err['msg']}") from None
