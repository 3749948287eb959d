"""Where and how each shard runs: the sandbox (`SandboxSpec`, its GPUs and egress), the
setup stage's steps and what is kept of each sample's transcript. Part of the spec;
import them from `proctor.spec`."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .imageref import parse_image_ref
from .spec_base import StrictModel, _check_workspace_path, parse_size

KNOWN_GPU_TYPES = ("A10G", "A100", "A100-80G", "H100", "H200", "L4", "L40S", "T4", "V100")


# ---------------------------------------------------------------- sandbox


class GpuRequest(StrictModel):
    count: int = Field(0, ge=0, le=16)
    type: str | None = Field(None, description=f"one of {', '.join(KNOWN_GPU_TYPES)}")

    @field_validator("type")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in KNOWN_GPU_TYPES:
            raise ValueError(f"{v!r} is not a known GPU type; known: {', '.join(KNOWN_GPU_TYPES)}")
        return v

    @model_validator(mode="after")
    def _type_needs_count(self) -> "GpuRequest":
        if self.type is not None and self.count == 0:
            raise ValueError("a GPU type is given but count is 0; set count to at least 1")
        return self


class SandboxSpec(StrictModel):
    """Where and with what limits each shard runs."""

    runtime: Literal["auto", "gvisor", "bubblewrap", "kubernetes"] = "auto"
    image: str | None = Field(None, description="the image the sandbox runs in: name, name:tag, sha256:<digest> or "
                              "name@sha256:<digest> from the image store (`proctor image list`); the kubernetes "
                              "runtime needs name@sha256:<digest>. None: the host's own userland")
    cpus: float = Field(1.0, gt=0, le=256)
    memory: int = Field(parse_size("1Gi"), description="bytes, or a size such as 512Mi")
    gpu: GpuRequest = Field(default_factory=GpuRequest)
    timeout_s: float = Field(600.0, gt=0, le=7 * 24 * 3600, description="wall-clock deadline of one shard")
    pids: int = Field(128, ge=8, le=65536, description="most processes and threads at once")
    output_cap: int = Field(parse_size("16Mi"), description="most bytes a shard may write to its channel")
    disk: int = Field(parse_size("1Gi"), description="most bytes in the workspace")
    files: dict[str, str] = Field(default_factory=dict, description="files placed in every workspace: path → content")
    tool_timeout_s: float = Field(60.0, gt=0, le=3600, description="deadline of one shell command the model runs")
    artifacts: list[str] = Field(default_factory=list, max_length=32,
                                 description="glob patterns, relative to each sample's folder, of files kept as artifacts")
    user: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$",
                             description="the user the agent's commands run as: a name or uid of the sandbox's "
                             "image, or 'uid:gid'; never root; nobody (65534) if unset")
    egress: list[str] = Field(default_factory=list, max_length=64,
                              description="network destinations the sandbox may reach, as 'CIDR:port' (TCP), e.g. "
                              "'10.0.0.0/8:443'; only the kubernetes runtime has a network (none by default)")

    @field_validator("image")
    @classmethod
    def _image_ref(cls, v: str | None) -> str | None:
        if v is not None:
            parse_image_ref(v)  # its ValueError names the reference and the accepted forms
        return v

    @field_validator("memory", "output_cap", "disk", mode="before")
    @classmethod
    def _size(cls, v: Any, info: ValidationInfo) -> int:  # v: the document's value; parse_size refuses what is no size
        return parse_size(v, info.field_name or "size")  # a field validator's info always names its field

    @field_validator("memory")
    @classmethod
    def _memory_floor(cls, v: int) -> int:
        if v < 64 * 1024**2:
            raise ValueError(f"{v} bytes is too little memory for the harness; give at least 64Mi")
        return v

    @field_validator("output_cap")
    @classmethod
    def _cap_floor(cls, v: int) -> int:
        if v < 64 * 1024:
            raise ValueError("output_cap must be at least 64Ki")
        return v

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, v: dict[str, str]) -> dict[str, str]:
        for path in v:
            _check_workspace_path(path)
        return v

    @field_validator("artifacts")
    @classmethod
    def _relative_globs(cls, v: list[str]) -> list[str]:
        for pattern in v:
            _check_workspace_path(pattern)
        return v

    @field_validator("user")
    @classmethod
    def _not_root(cls, v: str | None) -> str | None:
        if v is not None and v.partition(":")[0] in ("root", "0"):
            raise ValueError("the agent never runs as root; give an unprivileged user of the image")
        return v

    @field_validator("egress")
    @classmethod
    def _egress(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if v and info.data.get("runtime") != "kubernetes":
            raise ValueError(
                f"runtime {info.data.get('runtime', 'auto')!r} cannot allow egress: local sandboxes (gvisor, "
                "bubblewrap) have no network; use runtime 'kubernetes' or remove egress"
            )
        return [parse_egress(entry) for entry in v]


def parse_egress(entry: str) -> str:
    """'10.0.0.0/8:443' → the same, normalised; '[2001:db8::/32]:443' and '2001:db8::/32:443'
    for IPv6. Raises `ValueError` naming the entry."""
    example = "write 'CIDR:port', e.g. '10.0.0.0/8:443' or '203.0.113.7/32:8080'"
    host, sep, port = entry.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"egress entry {entry!r} has no port; {example}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"egress entry {entry!r}: port {port!r} is not a number from 1 to 65535; {example}")
    try:
        network = ipaddress.ip_network(host.removeprefix("[").removesuffix("]"), strict=True)
    except ValueError as exc:
        raise ValueError(f"egress entry {entry!r}: {exc}; {example}") from None
    return f"{network}:{int(port)}"



# ---------------------------------------------------------------- stages


class SetupStep(StrictModel):
    """A command of the setup stage: run in each sample's folder, inside its sandbox,
    before the agent starts. A failing step ends the sample with 'setup failed' (no score)."""

    command: str = Field(min_length=1, max_length=100_000)
    user: str = Field("root", max_length=64, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$",
                      description="who runs it: the sandbox's root (default), or a name or uid of its image")
    timeout_s: float = Field(60.0, gt=0, le=3600)


# ---------------------------------------------------------------- transcripts


class TranscriptSpec(StrictModel):
    """What is kept of each sample's conversation: its messages, tool calls and outputs,
    model calls and safety actions, as an Inspect AI `.eval` log beside the results."""

    enabled: bool = Field(True, description="record every sample's transcript")
    max_bytes: int = Field(parse_size("1Mi"), description="most bytes of one sample's (sample × epoch) "
                           "transcript; the rest is cut, and the transcript says where and how much")
    max_entries: int = Field(2000, ge=10, le=100_000, description="most entries (messages, model calls, tool "
                             "results) of one sample's transcript; the rest is cut the same way")

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:  # the document's value; parse_size refuses what is no size
        size = parse_size(v, "max_bytes")
        if not 4 * 1024 <= size <= 64 * 1024**2:
            raise ValueError(f"{size} bytes: give between 4Ki and 64Mi per sample")
        return size

