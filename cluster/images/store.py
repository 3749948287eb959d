"""The image store: content-addressed images, each unpacked once into a root filesystem
that every sandbox using it shares, read-only.

An image's address is the digest of its image config (Docker's image id: the same for
the OCI and the `docker save` export of one image). Imports and builds unpack into a
private staging folder and appear in the store by one rename only once every layer has
been checked and verified (`unpack.py`, `streams.py`), so a refused archive leaves
nothing behind. Names (`name:tag`) point at digests, several per image; importing an
image the store already has only adds the name. See `catalog.py` for the layout on disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cluster.storage import StorageError
from proctor.imageref import parse_image_ref
from proctor.settings import Settings

from .archive import Layer, open_archive
from .catalog import Catalog, remove_tree
from .image import Image, ImageConfig, ImageError, ImageInUse, ImageLimits, parse_time
from .streams import DECOMPRESS_ERRORS, open_counted
from .unpack import RootfsWriter

Progress = Callable[[int, int], None]
_SHORT = re.compile(r"^sha256:[0-9a-f]{12,63}$")
TAR_BUFFER = 64 * 1024  # tarfile copies its buffer on every header read: larger costs more


@dataclass(frozen=True)
class Removal:
    """What `ImageStore.remove` did: the names it took away and the image it deleted."""

    names: tuple[str, ...]
    deleted: str | None


class ImageStore:
    """The images under `root` (normally `Settings.images_dir`). Reading needs no
    privileges; importing and building need root (files keep their owners)."""

    def __init__(self, root: Path | str, limits: ImageLimits | None = None, *, apt_mirror: str | None = None,
                 build_timeout_s: float = 1800.0):
        self.root = Path(root)
        self.limits = limits or ImageLimits()
        self.apt_mirror, self.build_timeout_s = apt_mirror, build_timeout_s
        self.catalog = Catalog(self.root)

    @classmethod
    def from_settings(cls, settings: Settings) -> "ImageStore":
        return cls(settings.images_dir, ImageLimits.from_settings(settings), apt_mirror=settings.image_apt_mirror,
                   build_timeout_s=settings.image_build_timeout_s)

    # ------------------------------------------------------------ reading

    def resolve(self, ref: str) -> Image:
        """The image `ref` names: `name[:tag]`, `sha256:<hex>` (or a unique prefix of at
        least 12 hex digits) or `name@sha256:<hex>`. Raises `ImageError` naming `ref`."""
        text = ref.strip() if isinstance(ref, str) else ""
        if _SHORT.match(text):
            return self._by_prefix(text)
        parsed = _parse(text)
        names = self.catalog.names()
        if parsed.digest is None:
            digest = names.get(str(parsed.named))
            image = self._image(digest, names) if digest else None
            if image is None:
                raise ImageError(f"image {ref!r} is not in the image store ({self.root}); `proctor image list` shows "
                                 "what is, `proctor image import FILE` or `proctor image build RECIPE` adds it")
            return image
        image = self._image(parsed.digest, names) or next(
            (i for i in self.list() if i.manifest_digest == parsed.digest), None)
        if image is None:
            raise ImageError(f"image {ref!r} is not in the image store ({self.root}): no image has the digest "
                             f"{parsed.digest}")
        if parsed.name and not any(n.rsplit(":", 1)[0] == parsed.name for n in image.names):
            raise ImageError(f"image {ref!r}: the store has {image.digest} but not under the name {parsed.name!r} "
                             f"(its names: {', '.join(image.names) or 'none'}); refer to it by its digest alone, or "
                             f"name it with `proctor image tag {image.digest} {parsed.name}:TAG`")
        return image

    def list(self) -> list[Image]:
        names = self.catalog.names()
        images = [i for i in (self._image(d, names) for d in self.catalog.digests()) if i is not None]
        return sorted(images, key=lambda i: i.imported_at, reverse=True)

    def _by_prefix(self, ref: str) -> Image:
        found = [d for d in self.catalog.digests() if d.startswith(ref)]
        if len(found) != 1:
            raise ImageError(f"image {ref!r} is not in the image store ({self.root})" if not found else
                             f"image {ref!r} is ambiguous: {len(found)} images' digests start with it; give more digits")
        image = self._image(found[0], self.catalog.names())
        assert image is not None
        return image

    def _image(self, digest: str, names: dict[str, str]) -> Image | None:
        rec = self.catalog.record(digest)
        if rec is None:
            return None
        return Image(
            digest=rec["digest"], names=tuple(sorted(n for n, d in names.items() if d == digest)),
            rootfs=self.catalog.image_dir(digest) / "rootfs", config=ImageConfig.from_json(rec["config"]),
            size_bytes=rec["size_bytes"], created=datetime.fromisoformat(rec["created"]), source=rec["source"],
            imported_at=datetime.fromisoformat(rec["imported_at"]), layers=tuple(rec["layers"]),
            manifest_digest=rec.get("manifest_digest"), setuid_stripped=rec.get("setuid_stripped", 0))

    # ------------------------------------------------------------ adding

    def import_archive(self, path: Path | str, name: str | None = None, strip_setuid: bool = False,
                       on_progress: Progress | None = None) -> Image:
        """Import an OCI image layout (folder or tar) or a `docker save` archive. Importing
        an image the store has only adds the names. Raises `ImageError` (nothing stored)."""
        _need_root("importing an image")
        extra = self._check_name(name)
        path = Path(path)
        with open_archive(path) as archive:
            label = f"{path} ({archive.digest[:19]})"
            names = (*archive.names, *extra)
            if self.catalog.record(archive.digest) is not None:
                return self.add_names(archive.digest, names)
            config = ImageConfig.from_oci(archive.config, label)
            staging = self.catalog.staging()
            try:
                diff_ids, size, stripped = self.unpack(archive.layers, staging / "rootfs", label, strip_setuid,
                                                       on_progress)
                record = new_record(archive.digest, config, size, archive.config.get("created"),
                                 f"{archive.kind} {path.resolve()}", diff_ids, archive.manifest_digest, stripped)
                return self.commit(staging, record, archive.config_bytes, names)
            except BaseException:
                remove_tree(staging)
                raise

    def build(self, recipe_path: Path | str, on_progress: Progress | None = None,
              on_line: Callable[[str], None] | None = None) -> Image:
        """Build an image from a recipe (`recipe.py`) with mmdebstrap, then import its root
        filesystem like any untrusted archive (setuid bits stripped). A recipe built before
        (same content hash) is not built again. Raises `ImageError` naming the failed step."""
        from .builder import build_image

        _need_root("building an image")
        return build_image(self, Path(recipe_path), on_progress, on_line)

    def tag(self, ref: str, name: str) -> Image:
        """Give the image `ref` names one more name (moved from another image if it had it)."""
        image = self.resolve(ref)
        return self.add_names(image.digest, self._check_name(name))

    def export(self, ref: str, dest: Path | str) -> str:
        """Write the image as an OCI layout tar (flattened to one layer: `export.py`).
        Returns the exported image's digest (new: the layers differ)."""
        from .export import export_image

        dest = Path(dest)
        if not dest.parent.is_dir():
            raise ImageError(f"{dest}: the folder {dest.parent} does not exist")
        with self.lease(ref) as image:
            return export_image(image, (self.catalog.image_dir(image.digest) / "config.json").read_bytes(), dest)

    # ------------------------------------------------------------ removing

    def remove(self, ref: str) -> Removal:
        """By name: take the name away, and delete the image if it was its last name. By
        digest: delete the image and all its names. Raises `ImageInUse` (and changes
        nothing) when that would delete an image a sandbox holds."""
        text = ref.strip()
        by_name = None if text.startswith("sha256:") or "@" in text else _parse(text).named
        with self.catalog.locked():
            image = self.resolve(ref)
            names = self.catalog.names()
            gone = (by_name,) if by_name else image.names
            left = [n for n in image.names if n not in gone]
            if not left and self.catalog.in_use(image.digest):
                raise ImageInUse(f"image {ref!r} ({image.digest}) is in use by a running sandbox; nothing was "
                                 "removed: stop the evaluation first")
            self.catalog.write_names({n: d for n, d in names.items() if n not in gone})
            if left:
                return Removal(tuple(gone), None)
            self.catalog.discard(image.digest)
            return Removal(tuple(gone), image.digest)

    def gc(self) -> list[str]:
        """Delete the images no name points at and no sandbox holds, staging left by dead
        processes and build records of deleted images. Returns the deleted digests."""
        removed = []
        if not self.root.is_dir():
            return removed
        with self.catalog.locked():
            named = set(self.catalog.names().values())
            for digest in self.catalog.digests():
                if digest not in named and not self.catalog.in_use(digest):
                    self.catalog.discard(digest)
                    removed.append(digest)
            for path in self.catalog.stale_staging():
                remove_tree(path)
            for record in self.catalog.builds.glob("*.json"):
                if self.catalog.build_digest(record.stem) not in self.catalog.digests():
                    record.unlink(missing_ok=True)
        return removed

    @contextlib.contextmanager
    def lease(self, ref: str) -> Iterator[Image]:
        """Hold an image while a sandbox uses it: `gc` and `remove` leave it alone."""
        with self.catalog.locked():
            image = self.resolve(ref)
            lease = self.catalog.lease(image.digest)
            lease.__enter__()
        try:
            yield image
        finally:
            lease.__exit__(None, None, None)

    # ------------------------------------------------------------ the shared steps

    def unpack(self, layers: Sequence[Layer], rootfs: Path, label: str, strip_setuid: bool,
               on_progress: Progress | None = None) -> tuple[list[str], int, int]:
        """Unpack `layers` in order into the new folder `rootfs`, verifying each blob's digest
        and diff_id as it streams. Returns (diff_ids, uncompressed bytes, setuid bits
        stripped). Raises `ImageError`; the caller removes `rootfs` on failure."""
        budget, why = self._room([layer.size for layer in layers], label)
        rootfs.mkdir(mode=0o755)
        writer = RootfsWriter(rootfs, label, strip_setuid)
        total_in, done, diff_ids = sum(layer.size for layer in layers), 0, []
        total = 0

        def progress(n: int) -> None:
            nonlocal done
            done += n
            if on_progress:
                on_progress(done, total_in)

        try:
            for layer in layers:
                def over(count: int, bound: int, layer: Layer = layer) -> ImageError:
                    if bound == self.limits.layer_bytes:
                        return ImageError(f"image {label}: {layer.label} unpacks to more than {bound} bytes, the "
                                          "layer limit (PROCTOR_IMAGE_LAYER_MAX_BYTES); nothing was stored")
                    return ImageError(f"image {label}: unpacks to more than {budget} bytes, {why}; nothing was stored")

                with layer.open() as raw:
                    outer, inner, kind = open_counted(
                        raw, f"image {label}: {layer.label}", compressed_limit=layer.size,
                        limit=lambda: min(self.limits.layer_bytes, budget - total), over=over, on_read=progress)
                    try:
                        try:
                            with tarfile.open(fileobj=inner, mode="r|", bufsize=TAR_BUFFER) as tar:  # type: ignore[call-overload]
                                writer.apply(tar, layer.label)
                        except tarfile.ReadError:
                            if inner.count:  # an empty blob is an empty layer, not a broken tar
                                raise
                        inner.drain()
                        outer.drain()
                    except (tarfile.TarError, *DECOMPRESS_ERRORS) as exc:
                        if inner.error or outer.error:
                            raise (inner.error or outer.error) from None
                        if isinstance(exc, OSError) and exc.errno is not None:
                            raise
                        raise ImageError(f"image {label}: {layer.label} is not a valid {kind} tar stream ({exc}); "
                                         "nothing was stored") from None
                if layer.digest and outer.digest != layer.digest:
                    raise ImageError(f"image {label}: {layer.label} has the digest {outer.digest}, not "
                                     f"{layer.digest}: the archive is damaged or was altered; nothing was stored")
                if layer.diff_id and inner.digest != layer.diff_id:
                    raise ImageError(f"image {label}: {layer.label} unpacks to content with the digest "
                                     f"{inner.digest}, but the image config says {layer.diff_id}: the archive is "
                                     "damaged or was altered; nothing was stored")
                diff_ids.append(inner.digest)
                total += inner.count
            writer.finish()
        except OSError as exc:
            if isinstance(exc, StorageError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise StorageError(f"image {label}: the disk filled up while unpacking; nothing was stored") from None
        finally:
            writer.close()
        return diff_ids, total, writer.stripped

    def _room(self, sizes: list[int], label: str) -> tuple[int, str]:
        """The most bytes the image may unpack to, and which limit that is. Refuses, before
        anything is unpacked, an image whose compressed layers alone would not fit."""
        lim = self.limits
        for i, size in enumerate(sizes, 1):
            if size > lim.layer_bytes:
                raise ImageError(f"image {label}: layer {i} is {size} bytes compressed, over the layer limit of "
                                 f"{lim.layer_bytes} (PROCTOR_IMAGE_LAYER_MAX_BYTES); nothing was stored")
        need = sum(sizes)
        self.catalog.ensure()
        free = shutil.disk_usage(self.root).free - lim.min_free_bytes
        rooms = [(lim.image_bytes, f"the image limit (PROCTOR_IMAGE_MAX_BYTES={lim.image_bytes})"),
                 (free, f"the free disk space of {self.root} less the PROCTOR_IMAGE_MIN_FREE_BYTES reserve "
                        f"({lim.min_free_bytes})")]
        if lim.store_bytes:
            used = sum(i.size_bytes for i in self.list())
            rooms.append((lim.store_bytes - used, f"the room left in the image store (PROCTOR_IMAGE_STORE_MAX_BYTES="
                                                  f"{lim.store_bytes}, {used} used)"))
        budget, why = min(rooms, key=lambda r: r[0])
        if need > budget:
            raise ImageError(f"image {label} is too large for the disk limit: its layers take {need} bytes "
                             f"compressed, more than {max(budget, 0)} bytes, {why}; nothing was unpacked")
        return budget, why

    def commit(self, staging: Path, record: dict[str, Any], config: bytes, names: Sequence[str]) -> Image:
        """Move a finished staging folder into the store (or drop it: the image is there).
        Used by imports and the builder."""
        (staging / "image.json").write_text(json.dumps(record, indent=1))
        (staging / "config.json").write_bytes(config)
        staging.chmod(0o755)
        digest = record["digest"]
        with self.catalog.locked():
            if self.catalog.record(digest) is None:
                os.rename(staging, self.catalog.image_dir(digest))
            self._set_names(digest, names)
        if staging.exists():
            remove_tree(staging)
        image = self._image(digest, self.catalog.names())
        assert image is not None
        return image

    def add_names(self, digest: str, names: Sequence[str]) -> Image:
        with self.catalog.locked():
            if self.catalog.record(digest) is None:
                raise ImageError(f"image {digest} was removed meanwhile")
            self._set_names(digest, names)
        image = self._image(digest, self.catalog.names())
        assert image is not None
        return image

    def _set_names(self, digest: str, names: Sequence[str]) -> None:
        if names:
            current = self.catalog.names()
            current.update({n: digest for n in names})
            self.catalog.write_names(current)

    @staticmethod
    def _check_name(name: str | None) -> tuple[str, ...]:
        if name is None:
            return ()
        try:
            ref = parse_image_ref(name)
        except ValueError as exc:
            raise ImageError(f"--name: {exc}") from None
        if ref.digest or not ref.named:
            raise ImageError(f"--name: {name!r} is a digest; give a name such as ctf-task or ctf-task:1")
        return (ref.named,)


def new_record(digest: str, config: ImageConfig, size: int, created: Any, source: str, layers: list[str],
               manifest_digest: str | None, stripped: int) -> dict[str, Any]:
    """What image.json holds of a new image (`created`: its config's, else now)."""
    now = datetime.now(timezone.utc)
    return {"digest": digest, "config": config.to_json(), "size_bytes": size,
            "created": (parse_time(created) or now).isoformat(), "source": source, "imported_at": now.isoformat(),
            "layers": layers, "manifest_digest": manifest_digest, "setuid_stripped": stripped}


def _parse(ref: str) -> Any:
    try:
        return parse_image_ref(ref)
    except ValueError as exc:
        raise ImageError(str(exc)) from None


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ImageError(f"{what} needs root: the image's files keep their owners and modes (a file only a "
                         "service user may read must stay so); run it as root")
