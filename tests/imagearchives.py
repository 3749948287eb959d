"""Image archives made by the tests themselves (tarfile, json, hashlib; no registry or
Docker): OCI image layouts, as folders or tars, and `docker save` archives in the legacy
shape and in Docker 25's (an OCI layout with manifest.json beside it)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from cluster.images.archive import host_architecture

MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {None: "application/vnd.oci.image.layer.v1.tar", "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, MTIME
    return info


def file(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0) -> tuple[tarfile.TarInfo, bytes]:
    info = _info(name, tarfile.REGTYPE, mode, uid, gid)
    info.size = len(data)
    return info, data


def folder(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> tuple[tarfile.TarInfo, bytes]:
    return _info(name, tarfile.DIRTYPE, mode, uid, gid), b""


def symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    info = _info(name, tarfile.SYMTYPE, 0o777)
    info.linkname = target
    return info, b""


def hardlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    info = _info(name, tarfile.LNKTYPE, 0o644)
    info.linkname = target
    return info, b""


def device(name: str, kind: bytes = tarfile.CHRTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = _info(name, kind, 0o666)
    info.devmajor, info.devminor = 1, 3
    return info, b""


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


@dataclass
class LayerBlob:
    data: bytes  # as stored in the archive
    diff_id: str  # digest of the uncompressed tar
    compression: str | None

    @property
    def digest(self) -> str:
        return sha(self.data)

    @property
    def media_type(self) -> str:
        return LAYER_TYPES[self.compression]


def layer(*members: tuple[tarfile.TarInfo, bytes], compression: str | None = "gzip",
          raw: bytes | None = None) -> LayerBlob:
    """A layer of these members (or of the uncompressed tar `raw`), compressed or not."""
    plain = raw if raw is not None else tar_bytes(list(members))
    if compression == "gzip":
        data = gzip.compress(plain, compresslevel=6, mtime=0)
    elif compression == "zstd":
        data = pa.Codec("zstd").compress(plain, asbytes=True)
    else:
        data = plain
    return LayerBlob(data, sha(plain), compression)


@dataclass
class ImageDef:
    layers: list[LayerBlob]
    env: list[str] = field(default_factory=lambda: ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"])
    user: str | None = "1000"
    workdir: str | None = "/work"
    cmd: list[str] | None = field(default_factory=lambda: ["/bin/sh"])
    architecture: str = field(default_factory=host_architecture)
    tag: str | None = "task:1"

    def config(self) -> bytes:
        run = {"Env": self.env, "Cmd": self.cmd}
        if self.user:
            run["User"] = self.user
        if self.workdir:
            run["WorkingDir"] = self.workdir
        doc = {"architecture": self.architecture, "os": "linux", "created": "2024-05-01T12:00:00.123456789Z",
               "config": run, "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in self.layers]}}
        return json.dumps(doc, sort_keys=True).encode()

    @property
    def digest(self) -> str:
        return sha(self.config())

    def manifest(self) -> bytes:
        config = self.config()
        return json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
            "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": len(b.data)} for b in self.layers],
        }).encode()


def _oci_files(image: ImageDef, tamper: dict[str, bytes] | None = None) -> dict[str, bytes]:
    config, manifest = image.config(), image.manifest()
    annotations = {"io.containerd.image.name": f"docker.io/library/{image.tag}",
                   "org.opencontainers.image.ref.name": image.tag.split(":")[-1]} if image.tag else {}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha(manifest), "size": len(manifest), "annotations": annotations,
         "platform": {"architecture": image.architecture, "os": "linux"}}]}
    files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": json.dumps(index).encode()}
    for blob in [config, manifest, *(b.data for b in image.layers)]:
        files["blobs/sha256/" + sha(blob).removeprefix("sha256:")] = blob
    files.update(tamper or {})
    return files


def oci_layout(path: Path, image: ImageDef, tamper: dict[str, bytes] | None = None) -> Path:
    """An OCI image layout folder; `tamper` overwrites files after the digests were taken."""
    for name, data in _oci_files(image, tamper).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), MTIME
            tar.addfile(info, io.BytesIO(data))
    return path


def oci_archive(path: Path, image: ImageDef, tamper: dict[str, bytes] | None = None) -> Path:
    """An OCI image layout as a tar (what `skopeo copy … oci-archive:` writes)."""
    return write_tar(path, _oci_files(image, tamper))


def docker_archive(path: Path, image: ImageDef, modern: bool = False, tags: list[str] | None = None) -> Path:
    """What `docker save` writes: legacy (`<id>.json`, `<n>/layer.tar`; layers uncompressed)
    or Docker 25's (`modern`: an OCI layout plus manifest.json)."""
    repo_tags = tags if tags is not None else ([image.tag] if image.tag else [])
    if modern:
        files = _oci_files(image)
        config_name = "blobs/sha256/" + image.digest.removeprefix("sha256:")
        layer_names = ["blobs/sha256/" + b.digest.removeprefix("sha256:") for b in image.layers]
    else:
        files = {}
        config_name = image.digest.removeprefix("sha256:") + ".json"
        files[config_name] = image.config()
        layer_names = []
        for i, blob in enumerate(image.layers):
            assert blob.compression is None, "legacy docker save layers are uncompressed"
            name = f"{i:064x}/layer.tar"
            files[name] = blob.data
            layer_names.append(name)
    files["manifest.json"] = json.dumps([{"Config": config_name, "RepoTags": repo_tags,
                                          "Layers": layer_names}]).encode()
    return write_tar(path, files)


BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: one static program, no libc beside it
TOOLS = ("sh", "id", "cat", "echo", "ls", "tr", "wc", "grep", "head", "env", "sleep", "seq")
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nsvc:x:999:999::/srv:/bin/sh\nplayer:x:1000:1000::/home/player:/bin/sh\n"


def busybox_image(user: str = "player", architecture: str | None = None, shell: bool = True,
                  compression: str | None = "gzip") -> ImageDef:
    members = [folder("bin"), file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755), folder("etc"),
               file("etc/passwd", PASSWD), file("etc/group", b"root:x:0:\nsvc:x:999:\nplayer:x:1000:\n"),
               folder("srv", mode=0o755, uid=999, gid=999),
               file("srv/secret.txt", b"only svc reads this\n", mode=0o400, uid=999, gid=999),
               folder("home"), folder("home/player", mode=0o755, uid=1000, gid=1000)]
    members += [symlink(f"bin/{tool}", "busybox") for tool in TOOLS if shell or tool != "sh"]
    return ImageDef([layer(*members, compression=compression)], env=["PATH=/bin", "TASK_MODE=image"], user=user, workdir=None,
                    tag="busybox-task:1", **({"architecture": architecture} if architecture else {}))
