"""The one settings object. Nothing else in Proctor reads the environment.

Every key can be set as `PROCTOR_<NAME>` (e.g. `PROCTOR_RESULTS_URI`); a bad value fails
with a message that names the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
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
    api_port: int = Field(8000, ge=1, le=65535, description="port of the HTTP API on 127.0.0.1 (proctor up)")
    ui_port: int = Field(8001, ge=1, le=65535, description="port of the dashboard on 127.0.0.1 (proctor up)")
    config_dir: Path = Field(default_factory=lambda: Path.home() / ".config" / "proctor",
                             description="where the CLI and client find the local token")
    supervisors: int = Field(2, ge=1, le=1024, description="supervisor actors, each running many shards")
    s3_endpoint_url: str | None = Field(None, description="endpoint of an S3-compatible store")
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
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
    kube_instance: str = Field("proctor", pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$",
                               description="label value telling apart the pods of platforms sharing a namespace")
    kube_pending_timeout_s: float = Field(120.0, gt=0, description="how long a pod may stay unschedulable "
                                          "before its launch fails and the pod is deleted")
    kube_gpu_node_label: str = Field("nvidia.com/gpu.product", min_length=1,
                                     description="node label naming the GPU model (NVIDIA GPU feature discovery's)")
    kube_runtime_class: str = Field("gvisor", min_length=1, description="RuntimeClass of the sandbox pods")

    @property
    def sandbox_dir(self) -> Path:
        return self.home / "sandboxes"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

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
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        key = "PROCTOR_" + "_".join(str(p) for p in err["loc"]).upper()
        raise SettingsError(f"{key}: {err['msg']}") from None
