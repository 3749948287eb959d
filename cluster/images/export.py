"""Export: a stored image as an OCI image layout tar, to take it to another machine or push
it to a registry (`skopeo copy oci-archive:FILE docker://…`, after which the kubernetes
runtime can run it by digest).

The store keeps unpacked root filesystems, not the original layers, so an export is
flattened: one gzip layer holding the root filesystem, and the image's config with that
layer's diff_id. Its digest is therefore new; owners, modes, times, links and the run
settings (environment, user, working folder, entrypoint, command) are the same. Owner
names are left out (numeric ids only, as in the store).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from .image import Image

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes on to `sink`."""

    def __init__(self, sink: Any):
        self.sink, self.hash, self.size = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def export_image(image: Image, config: bytes, dest: Path) -> str:
    """Write `image` (with its stored `config.json` bytes) to `dest` as an OCI layout tar.
    Returns the digest of the exported image. `dest` appears only when complete."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as work:
        layer_path = Path(work) / "layer"
        with open(layer_path, "wb") as out:
            packed = _Hashing(out)
            with gzip.GzipFile(fileobj=packed, mode="wb", compresslevel=6, mtime=0) as gz:
                plain = _Hashing(gz)
                with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    for entry in sorted(os.listdir(image.rootfs)):
                        tar.add(image.rootfs / entry, arcname=entry, filter=_numeric)
        doc = json.loads(config)
        doc["rootfs"] = {"type": "layers", "diff_ids": [plain.digest]}
        doc.setdefault("history", []).append({"created_by": f"proctor image export (flattened from {image.digest})"})
        config_bytes = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        config_digest = _sha(config_bytes)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": [{"mediaType": OCI_LAYER, "digest": packed.digest, "size": packed.size}],
        }).encode()
        described: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": _sha(manifest), "size": len(manifest),
                                     "platform": {"architecture": image.config.architecture, "os": image.config.os}}
        if image.names:
            described["annotations"] = {"io.containerd.image.name": image.names[0],
                                        "org.opencontainers.image.ref.name": image.names[0].rsplit(":", 1)[1]}
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [described]}).encode()
        partial = Path(work) / "image.tar"
        with tarfile.open(partial, "w") as tar:
            _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
            _add_bytes(tar, "index.json", index)
            _add_bytes(tar, _blob(config_digest), config_bytes)
            _add_bytes(tar, _blob(_sha(manifest)), manifest)
            tar.add(layer_path, arcname=_blob(packed.digest), filter=_numeric)
        os.replace(partial, dest)
    return config_digest


def _numeric(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
