"""Image archives: an OCI image layout (a folder, or a tar of one) and `docker save` archives.

`open_archive` reads what describes the image (the layout's index and manifest, or
Docker's `manifest.json`, and the image config), verifies each against its digest, picks
the image for this machine's platform, and returns an `ArchiveImage` whose layers are
read later, once each, by the store (which checks them against their digests and the
config's `diff_ids` while unpacking). Every name an archive's JSON gives (a blob, a
layer file) is checked before it is opened: archives are untrusted.

`docker save` archives come in two shapes, both read through `manifest.json`: the legacy
one (`<id>.json` config and `<id>/layer.tar` layers) and Docker 25's (an OCI layout with
`manifest.json` beside it, blobs under `blobs/sha256/`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from proctor.imageref import DIGEST_RE, parse_image_ref

from .image import ImageError

MAX_JSON_BYTES = 4 * 1024**2
MAX_LAYERS = 256
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json"}
CONFIG_TYPES = {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le",
                 "s390x": "s390x", "riscv64": "riscv64"}
_BLOB = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
_LEGACY_CONFIG = re.compile(r"^([0-9a-f]{64})\.json$")


def host_architecture() -> str:
    machine = platform.machine()
    return ARCHITECTURES.get(machine, machine)


@dataclass(frozen=True)
class Layer:
    """One layer blob of an archive, not yet read."""

    label: str
    size: int
    digest: str | None  # the blob's own digest, where the archive names it
    diff_id: str | None  # the digest of its uncompressed tar, from the config (None: not known beforehand)
    open: Callable[[], BinaryIO]


@dataclass(frozen=True)
class ArchiveImage:
    kind: str  # "oci-layout" | "docker-archive"
    digest: str  # the config's digest: the image's id
    config: dict[str, Any]
    config_bytes: bytes
    layers: tuple[Layer, ...]
    names: tuple[str, ...]
    manifest_digest: str | None


@contextlib.contextmanager
def open_archive(path: Path) -> Iterator[ArchiveImage]:
    """The image in the archive or layout at `path`. Raises `ImageError` naming the file."""
    label = str(path)
    if path.is_dir():
        files: _Files = _FolderFiles(path, label)
    elif path.is_file():
        try:
            files = _TarFiles(tarfile.open(path, "r:*"), label)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ImageError(f"{label} is not a tar archive or an OCI image layout folder ({exc})") from None
    else:
        raise ImageError(f"{label}: no such file or folder")
    try:
        if files.size("manifest.json") is not None:
            yield _docker(files, label)
        elif files.size("index.json") is not None and files.size("oci-layout") is not None:
            yield _oci(files, label)
        else:
            raise ImageError(f"{label} is neither an OCI image layout (no oci-layout and index.json) nor a "
                             "`docker save` archive (no manifest.json)")
    finally:
        files.close()


# ---------------------------------------------------------------- the two formats


def _oci(files: "_Files", label: str) -> ArchiveImage:
    layout = _json(files, "oci-layout", label)
    version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
    if not isinstance(version, str) or not version.startswith("1."):
        raise ImageError(f"{label}: oci-layout has imageLayoutVersion {version!r}; this store reads 1.x")
    found = _manifests(files, _json(files, "index.json", label), label, {}, depth=0)
    arch = host_architecture()
    fits = [m for m in found if m[0] is None or m[0] == f"linux/{arch}"]
    if len(fits) != 1:
        have = ", ".join(sorted({m[0] or "(no platform)" for m in found})) or "none"
        raise ImageError(f"{label} holds {len(fits)} images for linux/{arch} (platforms: {have}); "
                         "export exactly one image for this platform")
    _, manifest, manifest_digest, annotations = fits[0]
    config_desc = _descriptor(manifest.get("config"), "the manifest's config", label)
    if config_desc.get("mediaType") not in CONFIG_TYPES:
        raise ImageError(f"{label}: its config has media type {config_desc.get('mediaType')!r}: not a container "
                         "image")
    config, raw, digest = _config(files, _blob_name(config_desc["digest"]), label, config_desc)
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"{label}: the manifest has no list of layers")
    descs = [_descriptor(d, f"layer {i + 1}", label) for i, d in enumerate(layers)]
    names = [annotations.get("io.containerd.image.name"), annotations.get("org.opencontainers.image.ref.name")]
    return ArchiveImage("oci-layout", digest, config, raw,
                        _layers(files, [(_blob_name(d["digest"]), d["digest"], d["size"]) for d in descs], config,
                                label),
                        _names([n for n in names if isinstance(n, str) and (":" in n or "/" in n)], label),
                        manifest_digest)


def _manifests(files: "_Files", index: Any, label: str, seen: dict[str, bool],
               depth: int) -> list[tuple[str | None, dict[str, Any], str, dict[str, str]]]:
    """(platform, manifest, its digest, annotations) of every image manifest an index holds."""
    if depth > 3 or not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ImageError(f"{label}: an image index has no list of manifests (or they nest too deeply)")
    found = []
    for raw in index["manifests"][:64]:
        desc = _descriptor(raw, "a manifest", label)
        if desc["digest"] in seen:
            continue
        seen[desc["digest"]] = True
        doc = _json(files, _blob_name(desc["digest"]), label, desc)
        kind = desc.get("mediaType") or (doc.get("mediaType") if isinstance(doc, dict) else None)
        if kind in INDEX_TYPES:
            found += _manifests(files, doc, label, seen, depth + 1)
        elif kind in MANIFEST_TYPES or (kind is None and isinstance(doc, dict) and "config" in doc):
            plat = desc.get("platform")
            where = f"{plat.get('os')}/{plat.get('architecture')}" if isinstance(plat, dict) else None
            if where != "unknown/unknown":  # build attestations, not images
                notes = desc.get("annotations") if isinstance(desc.get("annotations"), dict) else {}
                found.append((where, doc, desc["digest"], notes))
    return found


def _docker(files: "_Files", label: str) -> ArchiveImage:
    manifest = _json(files, "manifest.json", label)
    if not isinstance(manifest, list) or not manifest or not all(isinstance(m, dict) for m in manifest):
        raise ImageError(f"{label}: manifest.json is not a list of images")
    if len(manifest) > 1:
        tags = [t for m in manifest for t in (m.get("RepoTags") or []) if isinstance(t, str)]
        raise ImageError(f"{label} holds {len(manifest)} images ({', '.join(tags) or 'untagged'}); "
                         "`docker save` one image per archive")
    entry = manifest[0]
    config_name, layer_names = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list) or \
            not all(isinstance(n, str) for n in layer_names):
        raise ImageError(f"{label}: manifest.json's entry has no Config file or no list of Layers")
    known = _BLOB.match(config_name) or _LEGACY_CONFIG.match(config_name)
    expect = {"digest": f"sha256:{known.group(1)}"} if known else None
    config, raw, digest = _config(files, config_name, label, expect)
    layers = []
    for name in layer_names:
        blob = _BLOB.match(name)
        layers.append((name, f"sha256:{blob.group(1)}" if blob else None, None))
    tags = entry.get("RepoTags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ImageError(f"{label}: manifest.json's RepoTags is not a list of names")
    return ArchiveImage("docker-archive", digest, config, raw, _layers(files, layers, config, label),
                        _names(tags, label), None)


# ---------------------------------------------------------------- shared parts


def _config(files: "_Files", name: str, label: str,
            desc: dict[str, Any] | None) -> tuple[dict[str, Any], bytes, str]:
    raw = _read(files, name, label, desc)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ImageError(f"{label}: the image config {name} is not JSON") from None
    if not isinstance(config, dict):
        raise ImageError(f"{label}: the image config {name} is not a JSON object")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or not isinstance(diff_ids, list) or \
            not all(isinstance(d, str) and DIGEST_RE.match(d) for d in diff_ids):
        raise ImageError(f"{label}: the image config has no rootfs of type 'layers' with sha256 diff_ids")
    os_name, arch = config.get("os"), config.get("architecture")
    if os_name != "linux" or arch != host_architecture():
        raise ImageError(f"{label}: the image is for {os_name}/{arch}; this machine runs linux/{host_architecture()}")
    return config, raw, digest


def _layers(files: "_Files", entries: list[tuple[str, str | None, int | None]], config: dict[str, Any],
            label: str) -> tuple[Layer, ...]:
    diff_ids = config["rootfs"]["diff_ids"]
    if len(entries) != len(diff_ids):
        raise ImageError(f"{label}: {len(entries)} layers but the config lists {len(diff_ids)} diff_ids")
    if len(entries) > MAX_LAYERS:
        raise ImageError(f"{label}: {len(entries)} layers; at most {MAX_LAYERS} are accepted")
    layers = []
    for i, ((name, digest, declared), diff_id) in enumerate(zip(entries, diff_ids), 1):
        size = files.size(name)
        if size is None:
            raise ImageError(f"{label}: layer {i} ({name}) is missing from the archive")
        if declared is not None and declared != size:
            raise ImageError(f"{label}: layer {i} ({name}) is {size} bytes; its descriptor says {declared}")
        layers.append(Layer(f"layer {i}/{len(entries)} ({_short(name)})", size, digest, diff_id,
                            lambda name=name: files.open(name)))
    return tuple(layers)


def _names(names: list[str], label: str) -> tuple[str, ...]:
    out = []
    for name in names:
        try:
            ref = parse_image_ref(name)
        except ValueError as exc:
            raise ImageError(f"{label}: the archive names its image {name!r}: {exc}") from None
        if ref.named and ref.named not in out:
            out.append(ref.named)
    return tuple(out)


def _descriptor(desc: Any, what: str, label: str) -> dict[str, Any]:
    if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str) or \
            not isinstance(desc.get("size"), int) or isinstance(desc.get("size"), bool) or desc["size"] < 0:
        raise ImageError(f"{label}: {what} is not a descriptor with a digest and a size")
    if not DIGEST_RE.match(desc["digest"]):
        raise ImageError(f"{label}: {what} has the digest {desc['digest'][:80]!r}; only sha256 is supported")
    return desc


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _short(name: str) -> str:
    match = _BLOB.match(name)
    return f"sha256:{match.group(1)[:12]}" if match else name


def _read(files: "_Files", name: str, label: str, desc: dict[str, Any] | None = None) -> bytes:
    size = files.size(name)
    if size is None:
        raise ImageError(f"{label}: {name} is missing from the archive")
    if size > MAX_JSON_BYTES:
        raise ImageError(f"{label}: {name} is {size} bytes; JSON documents of an image are at most {MAX_JSON_BYTES}")
    with files.open(name) as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if desc is not None:
        actual = "sha256:" + hashlib.sha256(raw).hexdigest()
        if actual != desc["digest"]:
            raise ImageError(f"{label}: {name} has the digest {actual}, not {desc['digest']}: the archive is "
                             "damaged or was altered")
        if "size" in desc and desc["size"] != len(raw):
            raise ImageError(f"{label}: {name} is {len(raw)} bytes; its descriptor says {desc['size']}")
    return raw


def _json(files: "_Files", name: str, label: str, desc: dict[str, Any] | None = None) -> Any:
    try:
        return json.loads(_read(files, name, label, desc))
    except (ValueError, UnicodeDecodeError):
        raise ImageError(f"{label}: {name} is not JSON") from None


# ---------------------------------------------------------------- where the files are


def _member_name(name: str, label: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or not parts or "\x00" in name:
        raise ImageError(f"{label}: the archive refers to {name!r}, which is not a file inside it")
    return "/".join(parts)


class _Files:
    def size(self, name: str) -> int | None:
        raise NotImplementedError

    def open(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _FolderFiles(_Files):
    """A layout (or an unpacked `docker save`) in a folder; its files may not lead out of it."""

    def __init__(self, root: Path, label: str):
        self.root, self.label = root.resolve(), label

    def _path(self, name: str) -> Path | None:
        path = (self.root / _member_name(name, self.label)).resolve()
        if not path.is_relative_to(self.root):
            raise ImageError(f"{self.label}: {name} leads out of the folder")
        return path if path.is_file() else None

    def size(self, name: str) -> int | None:
        path = self._path(name)
        return path.stat().st_size if path else None

    def open(self, name: str) -> BinaryIO:
        path = self._path(name)
        if path is None:
            raise ImageError(f"{self.label}: {name} is missing")
        return path.open("rb")


class _TarFiles(_Files):
    """A tar archive's members, read in place; links inside it are followed inside it only."""

    def __init__(self, tar: tarfile.TarFile, label: str):
        self.tar, self.label = tar, label
        self.members = {_normal(m.name): m for m in tar.getmembers()}

    def _member(self, name: str) -> tarfile.TarInfo | None:
        member = self.members.get(_member_name(name, self.label))
        for _ in range(8):
            if member is None or member.isreg():
                return member
            if member.issym():  # relative to its folder (legacy `docker save`: ../<id>/layer.tar)
                target = posixpath.normpath(posixpath.join(_normal(member.name).rpartition("/")[0],
                                                           member.linkname))
                member = self.members.get(_member_name(target, self.label))
            elif member.islnk():
                member = self.members.get(_member_name(member.linkname, self.label))
            else:
                return None
        raise ImageError(f"{self.label}: {name} is a chain of links")

    def size(self, name: str) -> int | None:
        member = self._member(name)
        return member.size if member else None

    def open(self, name: str) -> BinaryIO:
        member = self._member(name)
        reader = self.tar.extractfile(member) if member else None
        if reader is None:
            raise ImageError(f"{self.label}: {name} is missing")
        return reader

    def close(self) -> None:
        self.tar.close()


def _normal(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))
