"""An image of the store: its digest, names, unpacked root filesystem and run settings.

`ImageConfig` is what the OCI image config's `config` section says about running the
image (environment, working folder, user, entrypoint, command) plus its platform; it is
parsed from untrusted JSON, so every field's type is checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from proctor.settings import Settings


class ImageError(ValueError):
    """An image is missing, or an archive or recipe is refused (bad digest, unsafe member,
    over a limit, a failed build). The message names the image and what is wrong; nothing
    was stored. Caught by the CLI (`proctor image …`: exit 2) and, as a `SpecError` on
    `sandbox.image`, by `proctor run` (exit 2) and the API (422)."""


class ImageInUse(ImageError):
    """An image cannot be removed: a sandbox holds a lease on it. Caught like `ImageError`."""


@dataclass(frozen=True)
class ImageLimits:
    """What an import may take; the defaults are `Settings`' (see there)."""

    image_bytes: int = Settings.model_fields["image_max_bytes"].default
    layer_bytes: int = Settings.model_fields["image_layer_max_bytes"].default
    store_bytes: int = Settings.model_fields["image_store_max_bytes"].default
    min_free_bytes: int = Settings.model_fields["image_min_free_bytes"].default

    @classmethod
    def from_settings(cls, settings: Settings) -> "ImageLimits":
        return cls(settings.image_max_bytes, settings.image_layer_max_bytes, settings.image_store_max_bytes,
                   settings.image_min_free_bytes)


@dataclass(frozen=True)
class ImageConfig:
    """How the image wants to be run, from its OCI config."""

    env: tuple[tuple[str, str], ...] = ()
    working_dir: str | None = None
    user: str | None = None
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    architecture: str = "amd64"
    os: str = "linux"

    @classmethod
    def from_oci(cls, doc: Any, label: str) -> "ImageConfig":
        """Parse an OCI image config document. Raises `ImageError` naming the bad field."""
        if not isinstance(doc, dict):
            raise ImageError(f"image {label}: its config is not a JSON object")
        run = doc.get("config") or {}
        if not isinstance(run, dict):
            raise ImageError(f"image {label}: config.config is not a JSON object")
        env = []
        for item in _strings(run.get("Env"), "config.Env", label) or ():
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ImageError(f"image {label}: config.Env entry {item!r} is not KEY=VALUE")
            env.append((key, value))
        return cls(
            env=tuple(env),
            working_dir=_string(run.get("WorkingDir"), "config.WorkingDir", label) or None,
            user=_string(run.get("User"), "config.User", label) or None,
            entrypoint=_strings(run.get("Entrypoint"), "config.Entrypoint", label),
            cmd=_strings(run.get("Cmd"), "config.Cmd", label),
            architecture=_string(doc.get("architecture"), "architecture", label) or "",
            os=_string(doc.get("os"), "os", label) or "",
        )

    def to_json(self) -> dict[str, Any]:
        return {"env": [list(pair) for pair in self.env], "working_dir": self.working_dir, "user": self.user,
                "entrypoint": list(self.entrypoint) if self.entrypoint is not None else None,
                "cmd": list(self.cmd) if self.cmd is not None else None,
                "architecture": self.architecture, "os": self.os}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ImageConfig":
        return cls(env=tuple((k, v) for k, v in doc["env"]), working_dir=doc["working_dir"], user=doc["user"],
                   entrypoint=tuple(doc["entrypoint"]) if doc["entrypoint"] is not None else None,
                   cmd=tuple(doc["cmd"]) if doc["cmd"] is not None else None,
                   architecture=doc["architecture"], os=doc["os"])


def _string(value: Any, name: str, label: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ImageError(f"image {label}: {name} is not a string")


def _strings(value: Any, name: str, label: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ImageError(f"image {label}: {name} is not a list of strings")


@dataclass(frozen=True)
class Image:
    """One stored image. `rootfs` is shared by every sandbox that runs it and never changes
    after the import; runtimes mount it read-only (it always has empty folders `/proc`,
    `/dev`, `/tmp`, `/workspace` and `/opt/proctor` to mount onto)."""

    digest: str
    names: tuple[str, ...]
    rootfs: Path
    config: ImageConfig
    size_bytes: int
    created: datetime
    source: str
    imported_at: datetime
    layers: tuple[str, ...] = ()
    manifest_digest: str | None = None
    setuid_stripped: int = 0

    @property
    def short_id(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "names": list(self.names), "rootfs": str(self.rootfs),
                "config": self.config.to_json(), "size_bytes": self.size_bytes,
                "created": self.created.isoformat(), "source": self.source,
                "imported_at": self.imported_at.isoformat(), "layers": list(self.layers),
                "manifest_digest": self.manifest_digest, "setuid_stripped": self.setuid_stripped}


def parse_time(value: Any) -> datetime | None:
    """An OCI `created` timestamp (RFC 3339), or None when absent or unreadable."""
    if not isinstance(value, str):
        return None
    text = value.strip().replace("Z", "+00:00")
    if "." in text:  # Go writes nanoseconds; Python reads at most microseconds
        head, _, rest = text.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        text = f"{head}.{digits[:6]}{rest[len(digits):]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
