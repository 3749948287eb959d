"""Hostile archives: every unsafe member, over-large layer, decompression bomb and bad
digest is refused with an error naming the image and the member (or layer), and leaves
nothing behind: no image, no name, no staging folder, nothing written outside."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from cluster.images import ImageError, ImageLimits, ImageStore
from imagearchives import (ImageDef, LayerBlob, device, docker_archive, file, folder, hardlink, layer, oci_archive,
                           oci_layout, sha, symlink)


def assert_nothing_left(store: ImageStore) -> None:
    for folder in ("sha256", "tmp"):
        assert not (store.root / folder).exists() or list((store.root / folder).iterdir()) == []
    assert store.catalog.names() == {}


def refused(store: ImageStore, archive: Path, *fragments: str, strip_setuid: bool = False) -> str:
    with pytest.raises(ImageError) as info:
        store.import_archive(archive, strip_setuid=strip_setuid)
    message = str(info.value)
    assert str(archive) in message  # the image is named
    for fragment in fragments:
        assert fragment in message, message
    assert_nothing_left(store)
    return message


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host folder that an escaping member would write into."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


HOSTILE: dict[str, tuple[Callable[[Path], list[LayerBlob]], list[str]]] = {
    "absolute path": (lambda out: [layer(file("etc/ok"), file(str(out / "planted"), b"x"))],
                      ["member '", "/outside/planted' has an absolute path"]),
    "dot-dot": (lambda out: [layer(file("../../planted", b"x"))],
                ["member '../../planted' has a path with '..'"]),
    "dot-dot inside": (lambda out: [layer(file("usr/../../planted", b"x"))],
                       ["member 'usr/../../planted' has a path with '..'"]),
    "write through a symlink": (lambda out: [layer(symlink("etc", str(out)), file("etc/planted", b"x"))],
                                ["member 'etc/planted' would be written through the symlink 'etc'"]),
    "write through a lower layer's symlink": (
        lambda out: [layer(folder("usr"), symlink("usr/lib", str(out))), layer(file("usr/lib/x/planted", b"x"))],
        ["layer 2/2", "member 'usr/lib/x/planted' would be written through the symlink 'usr/lib'"]),
    "whiteout through a symlink": (lambda out: [layer(symlink("etc", str(out))), layer(file("etc/.wh.keep"))],
                                   ["member 'etc/.wh.keep' would be written through the symlink 'etc'"]),
    "escaping symlink": (lambda out: [layer(folder("usr/lib"), symlink("usr/lib/evil", "../../../etc/shadow"))],
                         ["member 'usr/lib/evil' is a symlink to '../../../etc/shadow', which leads out"]),
    "escaping hard link": (lambda out: [layer(hardlink("passwd", "../etc/passwd"))],
                           ["member 'passwd' has a hard link target with '..'"]),
    "absolute hard link": (lambda out: [layer(hardlink("passwd", "/etc/passwd"))],
                           ["member 'passwd' has an absolute hard link target ('/etc/passwd')"]),
    "hard link through a symlink": (lambda out: [layer(symlink("d", "/etc"), hardlink("x", "d/passwd"))],
                                    ["member 'x' would be written through the symlink 'd'"]),
    "hard link to nothing": (lambda out: [layer(hardlink("x", "usr/missing"))],
                             ["member 'x' is a hard link to 'usr/missing', which is not in the image"]),
    "character device": (lambda out: [layer(device("dev/mem"))],
                         ["member 'dev/mem' is a character device node (1:3)"]),
    "block device": (lambda out: [layer(device("dev/sda", tarfile.BLKTYPE))],
                     ["member 'dev/sda' is a block device node"]),
    "setuid": (lambda out: [layer(file("usr/bin/su", b"\x7fELF", mode=0o4755))],
               ["member 'usr/bin/su' has the setuid or setgid bit (mode 4755)", "--strip-setuid"]),
    "setgid": (lambda out: [layer(file("usr/bin/wall", b"\x7fELF", mode=0o2755))],
               ["member 'usr/bin/wall' has the setuid or setgid bit (mode 2755)"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_an_unsafe_member_is_refused_and_nothing_is_left(case: str, store: ImageStore, tmp_path: Path,
                                                        outside: Path) -> None:
    make, fragments = HOSTILE[case]
    refused(store, oci_layout(tmp_path / "layout", ImageDef(make(outside))), *fragments, "nothing was stored")
    assert list(outside.iterdir()) == []


def test_setuid_bits_are_stripped_on_request(store: ImageStore, tmp_path: Path) -> None:
    image = ImageDef([layer(file("usr/bin/su", b"\x7fELF", mode=0o4755), file("usr/bin/wall", mode=0o2711),
                            folder("var/mail", mode=0o2775))])
    img = store.import_archive(oci_layout(tmp_path / "layout", image), strip_setuid=True)
    assert stat.S_IMODE((img.rootfs / "usr/bin/su").stat().st_mode) == 0o755
    assert stat.S_IMODE((img.rootfs / "usr/bin/wall").stat().st_mode) == 0o711
    assert stat.S_IMODE((img.rootfs / "var/mail").stat().st_mode) == 0o2775
    assert img.setuid_stripped == 2


def test_a_layer_over_the_limit_is_stopped_while_it_streams(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", ImageLimits(layer_bytes=256 * 1024))
    image = ImageDef([layer(file("zeros", bytes(1024 * 1024)))])  # compresses to ~1 KiB
    refused(store, oci_layout(tmp_path / "layout", image),
            "layer 1/1", "unpacks to more than 262144 bytes, the layer limit (PROCTOR_IMAGE_LAYER_MAX_BYTES)")


def test_a_compressed_layer_over_the_limit_is_refused_before_unpacking(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", ImageLimits(layer_bytes=64 * 1024))
    image = ImageDef([layer(file("noise", os.urandom(100 * 1024)))])
    refused(store, oci_layout(tmp_path / "layout", image), "layer 1 is", "bytes compressed, over the layer limit")


def _bomb(compression: str, size: int) -> LayerBlob:
    """A layer whose one file is `size` zero bytes, compressed without holding it in memory."""
    head = tarfile.TarInfo("bomb")
    head.size, head.mode = size, 0o644
    header = head.tobuf(tarfile.PAX_FORMAT)
    chunk = bytes(1 << 20)
    if compression == "gzip":
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as gz:
            gz.write(header)
            for _ in range(size // len(chunk)):
                gz.write(chunk)
            gz.write(bytes(1024))  # end of archive
        data = out.getvalue()
    else:
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as zst:
            zst.write(header)
            for _ in range(size // len(chunk)):
                zst.write(chunk)
            zst.write(bytes(1024))
        data = sink.getvalue().to_pybytes()
    plain = zlib.crc32(b"")  # the diff_id is never reached: the import stops at the limit
    return LayerBlob(data, "sha256:" + format(plain, "064x"), compression)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_decompression_bomb_is_stopped_at_the_image_limit(compression: str, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", ImageLimits(image_bytes=4 * 1024**2))
    bomb = _bomb(compression, 256 * 1024**2)
    assert len(bomb.data) < 2 * 1024**2
    refused(store, oci_layout(tmp_path / "layout", ImageDef([bomb])),
            "unpacks to more than 4194304 bytes, the image limit (PROCTOR_IMAGE_MAX_BYTES=4194304)")


def test_layers_together_over_the_image_limit_are_stopped(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", ImageLimits(image_bytes=1024 * 1024))
    image = ImageDef([layer(file("a", bytes(700 * 1024))), layer(file("b", bytes(700 * 1024)))])
    refused(store, oci_layout(tmp_path / "layout", image), "unpacks to more than 1048576 bytes, the image limit")


def test_an_image_too_large_for_the_disk_limit_is_refused_before_unpacking(tmp_path: Path) -> None:
    image = ImageDef([layer(file("noise", os.urandom(64 * 1024)))])
    archive = oci_archive(tmp_path / "image.tar", image)
    small = ImageStore(tmp_path / "store", ImageLimits(store_bytes=32 * 1024))
    refused(small, archive, "too large for the disk limit", "PROCTOR_IMAGE_STORE_MAX_BYTES=32768",
            "nothing was unpacked")
    full = ImageStore(tmp_path / "store", ImageLimits(min_free_bytes=2**60))
    refused(full, archive, "too large for the disk limit", "free disk space", "PROCTOR_IMAGE_MIN_FREE_BYTES")


def test_a_layer_blob_that_does_not_match_its_digest_is_refused(store: ImageStore, tmp_path: Path) -> None:
    good = layer(file("etc/motd", b"hello world"), compression=None)
    blob = "blobs/sha256/" + good.digest.removeprefix("sha256:")
    altered = good.data.replace(b"hello world", b"HELLO WORLD")
    refused(store, oci_layout(tmp_path / "layout", ImageDef([good]), tamper={blob: altered}),
            "layer 1/1", f"has the digest {sha(altered)}, not {good.digest}: the archive is damaged or was altered")


def test_a_layer_whose_content_does_not_match_its_diff_id_is_refused(store: ImageStore, tmp_path: Path) -> None:
    good = layer(file("etc/motd", b"hello world"), compression=None)
    archive = docker_archive(tmp_path / "legacy.tar", ImageDef([good]))
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    name = next(n for n in files if n.endswith("layer.tar"))
    files[name] = files[name].replace(b"hello world", b"HELLO WORLD")
    from imagearchives import write_tar

    write_tar(archive, files)
    refused(store, archive, "layer 1/1", f"but the image config says {good.diff_id}: the archive is damaged")


def test_an_altered_config_is_refused(store: ImageStore, tmp_path: Path) -> None:
    image = ImageDef([layer(file("a"))])
    config = "blobs/sha256/" + image.digest.removeprefix("sha256:")
    refused(store, oci_layout(tmp_path / "layout", image, tamper={config: image.config().replace(b"1000", b"0000")}),
            f"{config} has the digest", f"not {image.digest}")


def test_a_manifest_naming_files_outside_the_archive_is_refused(store: ImageStore, tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "legacy.tar", ImageDef([layer(file("a"), compression=None)]))
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    files["manifest.json"] = files["manifest.json"].replace(b'"Layers": ["', b'"Layers": ["../../')
    from imagearchives import write_tar

    write_tar(archive, files)
    refused(store, archive, "refers to '../../", "which is not a file inside it")


def test_a_truncated_or_corrupt_layer_is_refused(store: ImageStore, tmp_path: Path) -> None:
    good = layer(file("big", os.urandom(20000)))
    blob = "blobs/sha256/" + good.digest.removeprefix("sha256:")
    refused(store, oci_layout(tmp_path / "cut", ImageDef([good]), tamper={blob: good.data[:5000]}),
            "layer 1 (blobs/sha256/", "is 5000 bytes; its descriptor says")
    damaged = good.data[:3000] + bytes(1000) + good.data[4000:]
    refused(store, oci_layout(tmp_path / "damaged", ImageDef([good]), tamper={blob: damaged}),
            "layer 1/1", "is not a valid gzip tar stream")
    junk = LayerBlob(b"this is not a tar archive" * 40, sha(b"x"), None)
    refused(store, oci_layout(tmp_path / "junk", ImageDef([junk])), "is not a valid none tar stream")


def test_an_image_for_another_platform_is_refused(store: ImageStore, tmp_path: Path) -> None:
    image = ImageDef([layer(file("a"))], architecture="s390x" if os.uname().machine != "s390x" else "amd64")
    refused(store, oci_layout(tmp_path / "layout", image), "holds 0 images for linux/")
