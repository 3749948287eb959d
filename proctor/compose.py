"""What a task's sandbox configuration asks of Proctor: services, images, users, limits.

Inspect hands a provider `None` (one default service), a file name (`compose.yaml`, or a
Proctor file with the same `services:`), or a config object (`ProctorConfig`). A compose
file maps onto Proctor's sandboxes key by key; what Proctor cannot honour is refused by
name, never ignored: `build:` (with how to import or build the image instead), ports,
volumes, networks, privileges. `x-proctor:` at the top carries Proctor's own settings
(runtime, safety policy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proctor.policy import SafetyPolicy
from proctor.spec import parse_size

CONFIG_FILES = ["proctor.yaml", "compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml"]
TOP_KEYS = {"services", "x-proctor", "name", "version"}
DEFAULT_SERVICE = "default"


class ConfigError(ValueError):
    """A sandbox configuration Proctor cannot honour; the message names the key and the
    fix. Raised by `load_config`, and so by the provider's task_init and sample_init."""


class ServiceConfig(BaseModel):
    """One service of a sample: one sandbox."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    image: str | None = Field(None, description="an image of Proctor's image store (name:tag or digest); "
                              "none: the host's own userland")
    default: bool = Field(False, alias="x-default", description="the service the agent's tools use")
    working_dir: str | None = Field(None, description="absolute; /workspace when not given")
    user: str | None = Field(None, description="who commands run as: a name, 'uid' or 'uid:gid' of the image; "
                             "the image's own non-root user, else nobody, when not given")
    environment: dict[str, str] = Field(default_factory=dict)
    command: str | list[str] | None = Field(None, description="started in the background when the sample starts")
    init: bool | None = Field(None, description="accepted: the harness reaps the sandbox's processes")
    cpus: float | None = Field(None, gt=0, le=256)
    mem_limit: int | None = Field(None, description="bytes, or a size such as 512m or 1Gi")
    pids_limit: int | None = Field(None, ge=8, le=100_000)
    network_mode: Literal["none"] | None = Field(None, description="none: this service joins no network; "
                                                 "else it shares the sample's private network")
    hostname: str | None = Field(None, description="accepted when it is the service's own name")

    @field_validator("environment", mode="before")
    @classmethod
    def _env(cls, v: object) -> object:
        if isinstance(v, list):  # compose's list form: KEY=VALUE (or KEY, which compose takes from the host)
            out = {}
            for item in v:
                key, sep, value = str(item).partition("=")
                if not sep:
                    raise ValueError(f"{item!r}: give KEY=VALUE; Proctor passes nothing of the host's environment")
                out[key] = value
            return out
        if isinstance(v, dict):
            for key, val in v.items():
                if isinstance(val, bool) or not isinstance(val, (str, int, float, type(None))):
                    raise ValueError(f"{key}: {val!r} is not a string or a number; quote it (as compose asks)")
            return {str(k): "" if val is None else str(val) for k, val in v.items()}
        return v

    @field_validator("mem_limit", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> object:  # the YAML's value, whatever it is: parse_size refuses what is no size
        if isinstance(v, str) and v[-1:] in "bkmgBKMG" and v[:-1].replace(".", "").isdigit():
            v = v[:-1] + {"b": "", "k": "Ki", "m": "Mi", "g": "Gi"}[v[-1].lower()]
        return None if v is None else parse_size(v, "mem_limit")

    @field_validator("working_dir")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"{v!r} is not an absolute path")
        return v


class ProctorConfig(BaseModel):
    """A task's sandboxes, as `sandbox=("proctor", ProctorConfig(...))` or read from a file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    services: dict[str, ServiceConfig] = Field(default_factory=lambda: {DEFAULT_SERVICE: ServiceConfig()},
                                               min_length=1, max_length=32)
    runtime: Literal["auto", "gvisor", "bubblewrap", "kubernetes"] = Field(
        "auto", description="auto: gVisor, else bubblewrap; kubernetes: one pod per service, in the cluster "
        "that PROCTOR_KUBECONFIG names")
    policy: SafetyPolicy = Field(default_factory=SafetyPolicy, description="the safety policy every exec runs under")
    timeout_s: float = Field(24 * 3600.0, gt=0, description="the longest a sample's sandboxes live")
    home: str | None = Field(None, description="Proctor's data folder (images, sandboxes, incidents); "
                             "the settings' home (PROCTOR_HOME) when not given")
    evaluation: str | None = Field(None, description="set by Proctor's own Inspect shards: the evaluation whose "
                                   "samples these are (its emergency stop finds their sandboxes by it)")
    stops: str | None = Field(None, description="set with `evaluation`: the platform's folder of stop markers "
                              "(a sample of an evaluation being stopped starts no sandbox)")

    @model_validator(mode="after")
    def _one_default(self) -> "ProctorConfig":
        defaults = [name for name, s in self.services.items() if s.default]
        if len(defaults) > 1:
            raise ValueError(f"x-default is set on {', '.join(defaults)}; set it on one service")
        for name, s in self.services.items():
            if s.hostname is not None and s.hostname != name:
                raise ValueError(f"services.{name}.hostname: a service is reached by its name ({name!r}); "
                                 f"remove hostname {s.hostname!r}")
        return self

    def default_service(self) -> str:
        """The service Inspect's `sandbox()` returns: x-default, else `default`, else the first."""
        for name, s in self.services.items():
            if s.default:
                return name
        return DEFAULT_SERVICE if DEFAULT_SERVICE in self.services else next(iter(self.services))

    def networked(self) -> list[str]:
        """The services that share the sample's private network (all but network_mode: none),
        when there are two or more of them."""
        names = [n for n, s in self.services.items() if s.network_mode != "none"]
        return names if len(names) > 1 else []


_REFUSED_HINTS = {
    "build": "Proctor does not build images at sample time: build it once with `docker build` and import it "
             "(`docker save IMAGE -o image.tar && proctor image import image.tar --name NAME`), or build it "
             "from a recipe (`proctor image build recipe.yaml`), then give `image: NAME`",
    "ports": "a sample's services reach each other by name on its private network; nothing is published",
    "volumes": "sandboxes have a private /workspace; put files in with the sample's `files`",
    "networks": "each sample has one private network of its own; remove `networks`",
    "privileged": "sandboxes never run privileged",
    "cap_add": "sandboxes never gain capabilities",
    "network_mode": "only `network_mode: none` is supported",
}


def load_config(config: object) -> ProctorConfig:
    """The configuration Inspect passed (None, a file name, a dict or a `ProctorConfig`).
    Raises `ConfigError`."""
    if config is None:
        return ProctorConfig()
    if isinstance(config, ProctorConfig):
        return config
    if isinstance(config, str):
        path = Path(config)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"proctor sandbox config {config}: cannot read it ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"proctor sandbox config {config}: not YAML ({exc})") from None
        return parse_config(data, where=config)
    if isinstance(config, dict):
        return parse_config(config, where="the sandbox config")
    raise ConfigError(f"proctor sandbox config: {type(config).__name__} is not a config; give a file name "
                      "(compose.yaml) or a ProctorConfig")


def parse_config(data: object, where: str) -> ProctorConfig:
    """A compose-shaped mapping (`services:`, `x-proctor:`) as a `ProctorConfig`."""
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict) or not data["services"]:
        raise ConfigError(f"{where}: needs a `services:` mapping with at least one service")
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"{where}: `{key}` is not supported ({_REFUSED_HINTS.get(key, 'unknown key')}); "
                              f"known: {', '.join(sorted(TOP_KEYS))}")
    own = data.get("x-proctor") or {}
    if not isinstance(own, dict):
        raise ConfigError(f"{where}: x-proctor must be a mapping")
    for name, service in data["services"].items():
        if not isinstance(service, dict):
            raise ConfigError(f"{where}: services.{name} must be a mapping")
        for key, value in service.items():
            if key == "network_mode" and value == "none":
                continue
            if key in _REFUSED_HINTS:
                raise ConfigError(f"{where}: services.{name}.{key} is not supported: {_REFUSED_HINTS[key]}")
            if key not in ServiceConfig.model_fields and key != "x-default":
                known = sorted(["x-default", *(k for k in ServiceConfig.model_fields if k != "default")])
                raise ConfigError(f"{where}: services.{name}.{key} is not supported by Proctor; "
                                  f"known: {', '.join(known)}")
    try:
        return ProctorConfig.model_validate({**own, "services": data["services"]})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"{where}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
