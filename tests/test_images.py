"""The image store: OCI layouts and `docker save` archives made here are imported, layers
applied in order with their whiteouts, names kept, and images listed, removed, leased and
collected. Hostile archives are in test_image_unpack.py, the CLI in test_image_commands.py."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cluster.images import ImageError, ImageInUse, ImageStore, check_spec_images
from imagearchives import (MTIME, ImageDef, docker_archive, file, folder, hardlink, layer, oci_archive, oci_layout,
                           sha, symlink, write_tar)
from proctor.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def task_image(compression: str | None = "gzip", tag: str | None = "task:1") -> ImageDef:
    return ImageDef([
        layer(folder("etc"), file("etc/secret", b"only the service user", mode=0o400, uid=999, gid=998),
              folder("srv", mode=0o750, uid=1000, gid=1000), symlink("bin", "usr/bin"), folder("usr/bin"),
              file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755), hardlink("usr/bin/tool2", "usr/bin/tool"),
              symlink("etc/localtime", "/usr/share/zoneinfo/UTC"), folder("var/mail", mode=0o2775, gid=8),
              compression=compression),
        layer(file("srv/data.txt", b"data", uid=1000, gid=1000), compression=compression),
    ], tag=tag)


def test_an_oci_layout_folder_is_imported_with_owners_modes_links_and_times(store: ImageStore, tmp_path: Path) -> None:
    image = task_image()
    img = store.import_archive(oci_layout(tmp_path / "layout", image))
    assert img.digest == image.digest == sha(image.config())
    assert img.names == ("task:1",)  # docker.io/library/ dropped
    assert img.source == f"oci-layout {tmp_path / 'layout'}"
    assert img.manifest_digest == sha(image.manifest())
    assert img.layers == tuple(b.diff_id for b in image.layers)
    assert img.config.env == (("PATH", "/usr/bin:/bin"), ("LANG", "C.UTF-8"))
    assert (img.config.user, img.config.working_dir, img.config.cmd) == ("1000", "/work", ("/bin/sh",))
    assert img.created.isoformat() == "2024-05-01T12:00:00.123456+00:00"
    root = img.rootfs
    secret = (root / "etc/secret").stat()
    assert (secret.st_uid, secret.st_gid, stat.S_IMODE(secret.st_mode)) == (999, 998, 0o400)
    assert (root / "etc/secret").read_bytes() == b"only the service user"
    assert int(secret.st_mtime) == MTIME
    srv = (root / "srv").stat()
    assert (srv.st_uid, stat.S_IMODE(srv.st_mode), int(srv.st_mtime)) == (1000, 0o750, MTIME)
    assert stat.S_IMODE((root / "var/mail").stat().st_mode) == 0o2775  # a folder's setgid is kept
    assert os.readlink(root / "bin") == "usr/bin"
    assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/UTC"  # kept, never followed
    assert (root / "usr/bin/tool").stat().st_ino == (root / "usr/bin/tool2").stat().st_ino
    assert (root / "srv/data.txt").read_text() == "data"
    for mount_point in ("proc", "dev", "tmp", "workspace", "opt/proctor"):
        st = (root / mount_point).lstat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 0
        assert not any((root / mount_point).iterdir())
    assert img.size_bytes == sum(len(_plain(b)) for b in image.layers)
    assert list((store.root / "tmp").iterdir()) == []


def _plain(blob) -> bytes:  # noqa: ANN001 - LayerBlob
    import gzip

    return gzip.decompress(blob.data) if blob.compression == "gzip" else blob.data


def test_one_image_has_one_digest_in_every_archive_shape_and_reimports_only_add_names(
        store: ImageStore, tmp_path: Path) -> None:
    gz, plain = task_image("gzip"), task_image(None)
    assert gz.digest == plain.digest  # the config names the uncompressed layers only
    first = store.import_archive(oci_archive(tmp_path / "oci.tar", gz))
    inode = (first.rootfs / "etc/secret").stat().st_ino
    legacy = store.import_archive(docker_archive(tmp_path / "legacy.tar", plain, tags=["task:2"]))
    modern = store.import_archive(docker_archive(tmp_path / "modern.tar", gz, modern=True, tags=["ghcr.io/lab/task:3"]))
    named = store.import_archive(oci_layout(tmp_path / "layout", gz), name="ctf")
    assert first.digest == legacy.digest == modern.digest == named.digest == gz.digest
    assert named.names == ("ctf:latest", "ghcr.io/lab/task:3", "task:1", "task:2")
    assert (named.rootfs / "etc/secret").stat().st_ino == inode  # not unpacked again
    assert [i.digest for i in store.list()] == [gz.digest]
    for ref in ("task:2", "ctf", gz.digest, gz.digest[:19], f"ghcr.io/lab/task@{gz.digest}",
                f"docker.io/library/task:1", f"task@{first.manifest_digest}"):
        assert store.resolve(ref).digest == gz.digest, ref


def test_zstd_and_uncompressed_layers_are_read(store: ImageStore, tmp_path: Path) -> None:
    image = ImageDef([layer(file("a", b"zstd layer"), compression="zstd"),
                      layer(file("b", b"plain layer"), compression=None)])
    img = store.import_archive(oci_archive(tmp_path / "oci.tar", image))
    assert (img.rootfs / "a").read_text() == "zstd layer" and (img.rootfs / "b").read_text() == "plain layer"


def test_whiteouts_hide_lower_layers_and_opaque_folders_keep_only_their_own_layer(
        store: ImageStore, tmp_path: Path) -> None:
    image = ImageDef([
        layer(file("a/keep", b"1"), file("a/gone", b"2"), file("b/old"), file("b/sub/older"), file("c/x"),
              symlink("link", "a/keep")),
        layer(file("a/.wh.gone"), file("b/new", b"3"), file("b/.wh..wh..opq"), file(".wh.c"), file("d/new"),
              file(".wh.link"), file("a/.wh.never-there")),
        layer(folder("c"), file("c/again", b"4")),
    ])
    img = store.import_archive(oci_layout(tmp_path / "layout", image))
    root = img.rootfs
    tree = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not str(p.relative_to(root)).startswith(
        ("proc", "dev", "tmp", "workspace", "opt")))
    assert tree == ["a", "a/keep", "b", "b/new", "c", "c/again", "d", "d/new"]
    assert not any(p.name.startswith(".wh.") for p in root.rglob("*"))


def test_a_later_layer_replaces_files_folders_and_links(store: ImageStore, tmp_path: Path) -> None:
    image = ImageDef([
        layer(folder("x"), file("x/inner"), file("y", b"file"), symlink("z", "/etc")),
        layer(file("x", b"now a file"), folder("y"), file("y/inside"), folder("z"), file("z/real", b"not /etc")),
    ])
    img = store.import_archive(oci_layout(tmp_path / "layout", image))
    assert (img.rootfs / "x").read_text() == "now a file"
    assert (img.rootfs / "y").is_dir() and (img.rootfs / "y/inside").is_file()
    assert not (img.rootfs / "z").is_symlink() and (img.rootfs / "z/real").read_text() == "not /etc"


def _tree(root: Path) -> list[tuple[str, int, int, int, int, str]]:
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            st = path.lstat()
            found.append((str(path.relative_to(root)), st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime),
                          os.readlink(path) if path.is_symlink() else path.read_text() if path.is_file() else ""))
    return sorted(found)


def test_an_exported_image_imports_elsewhere_with_the_same_files(store: ImageStore, tmp_path: Path) -> None:
    img = store.import_archive(oci_layout(tmp_path / "layout", task_image()))
    digest = store.export("task:1", tmp_path / "export.tar")
    assert digest != img.digest  # flattened: one layer, so a new config
    other = ImageStore(tmp_path / "other")
    copy = other.import_archive(tmp_path / "export.tar")
    assert (copy.digest, copy.names, copy.config) == (digest, ("task:1",), img.config)
    assert len(copy.layers) == 1 and _tree(copy.rootfs) == _tree(img.rootfs)
    assert (copy.rootfs / "usr/bin/tool").stat().st_ino == (copy.rootfs / "usr/bin/tool2").stat().st_ino
    with pytest.raises(ImageError, match="does not exist"):
        store.export("task:1", tmp_path / "missing" / "x.tar")


def test_names_move_between_images_and_gc_deletes_images_left_without_one(store: ImageStore, tmp_path: Path) -> None:
    old = store.import_archive(oci_layout(tmp_path / "old", ImageDef([layer(file("v", b"1"))], tag="app:1")))
    new = store.import_archive(oci_layout(tmp_path / "new", ImageDef([layer(file("v", b"2"))], tag="app:1")))
    assert store.resolve("app:1").digest == new.digest
    assert {i.digest: i.names for i in store.list()} == {old.digest: (), new.digest: ("app:1",)}
    assert store.gc() == [old.digest]
    assert not old.rootfs.exists() and [i.digest for i in store.list()] == [new.digest]
    assert store.gc() == []


def test_rm_takes_a_name_then_the_image_and_refuses_a_leased_one(store: ImageStore, tmp_path: Path) -> None:
    img = store.import_archive(oci_layout(tmp_path / "layout", task_image()), name="task:2")
    removal = store.remove("task:1")
    assert (removal.names, removal.deleted) == (("task:1",), None)
    assert store.resolve("task:2").names == ("task:2",)
    with store.lease("task:2") as leased:
        assert leased.digest == img.digest
        with pytest.raises(ImageInUse, match="in use by a running sandbox; nothing was removed"):
            store.remove("task:2")
        assert store.resolve("task:2").digest == img.digest
        store.tag(img.digest, "spare")
        assert store.remove("task:2").deleted is None  # another name is left
        with pytest.raises(ImageInUse):
            store.remove("spare")  # the last name of a leased image stays too
    assert store.resolve("spare").digest == img.digest
    with store.lease(img.digest):
        store.catalog.write_names({})  # the name gone, the image held: gc leaves it
        assert store.gc() == []
    assert store.gc() == [img.digest]
    assert not img.rootfs.exists()


def test_rm_by_digest_deletes_the_image_and_all_its_names(store: ImageStore, tmp_path: Path) -> None:
    img = store.import_archive(oci_layout(tmp_path / "layout", task_image()), name="task:2")
    removal = store.remove(img.digest)
    assert (sorted(removal.names), removal.deleted) == (["task:1", "task:2"], img.digest)
    assert store.list() == [] and store.catalog.names() == {}
    with pytest.raises(ImageError, match="'task:1' is not in the image store"):
        store.resolve("task:1")


def test_a_lease_dies_with_its_process(store: ImageStore, tmp_path: Path) -> None:
    img = store.import_archive(oci_layout(tmp_path / "layout", task_image()))
    with subprocess.Popen(
            [sys.executable, "-c", "import sys, time\nfrom cluster.images import ImageStore\n"
             f"with ImageStore({str(store.root)!r}).lease({img.digest!r}):\n"
             "    print('held', flush=True)\n    time.sleep(120)\n"],
            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT))) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            store.catalog.write_names({})
            assert store.gc() == []  # held by a live process
        finally:
            holder.send_signal(signal.SIGKILL)
    assert store.gc() == [img.digest]
    assert not (store.root / "leases" / img.digest.removeprefix("sha256:")).exists()


def test_gc_removes_staging_left_by_dead_processes_only(store: ImageStore) -> None:
    dead = store.catalog.staging().with_name("999999999-left")
    store.catalog.staging().rename(dead)
    (dead / "rootfs").mkdir()
    mine = store.catalog.staging()
    store.gc()
    assert not dead.exists() and mine.exists()


def test_missing_and_malformed_references_name_the_reference(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"image .nope:1. is not in the image store .*`proctor image import FILE`"):
        store.resolve("nope:1")
    with pytest.raises(ImageError, match="name part 'Bad' must be lower-case"):
        store.resolve("Bad/name")
    img = store.import_archive(oci_layout(tmp_path / "layout", task_image()))
    with pytest.raises(ImageError, match=r"not under the name 'other' \(its names: task:1\)"):
        store.resolve(f"other@{img.digest}")
    with pytest.raises(ImageError, match="no image has the digest"):
        store.resolve("sha256:" + "0" * 64)
    with pytest.raises(ImageError, match="--name: 'sha256:.*' is a digest"):
        store.import_archive(tmp_path / "layout", name=img.digest)


def test_a_multi_image_docker_archive_is_refused(store: ImageStore, tmp_path: Path) -> None:
    path = docker_archive(tmp_path / "two.tar", task_image(None))
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    entry = json.loads(members["manifest.json"])[0]
    members["manifest.json"] = json.dumps([entry, dict(entry, RepoTags=["other:1"])]).encode()
    write_tar(path, members)
    with pytest.raises(ImageError, match=r"holds 2 images \(task:1, other:1\); `docker save` one image per archive"):
        store.import_archive(path)
    assert store.list() == []


def test_specs_naming_an_image_are_checked_against_the_store(store: ImageStore, tmp_path: Path) -> None:
    store.import_archive(oci_layout(tmp_path / "layout", task_image()))

    def spec(image: str, runtime: str = "gvisor"):  # noqa: ANN202
        return parse_spec({"name": "t", "model": {"adapter": "reference"}, "dataset": {"samples": [{"input": "x"}]},
                           "scorers": [{"type": "exact"}], "sandbox": {"runtime": runtime, "image": image}})

    assert check_spec_images(spec("task:1"), store).names == ("task:1",)
    with pytest.raises(SpecError) as info:
        check_spec_images(spec("task:9"), store)
    assert info.value.errors[0][0] == "sandbox.image" and "'task:9' is not in the image store" in str(info.value)
    pinned = "ghcr.io/lab/task@sha256:" + "a" * 64
    assert check_spec_images(spec(pinned, "kubernetes"), store) is None  # pulled by digest in the cluster
    assert check_spec_images(spec(pinned, "auto"), store, default_runtime="kubernetes") is None
    with pytest.raises(SpecError, match="kubernetes runtime runs images from a registry by digest only"):
        check_spec_images(spec("task:1", "kubernetes"), store)
    with pytest.raises(SpecError, match="no image has the digest"):
        check_spec_images(spec(pinned, "auto"), store, default_runtime="auto")


def test_proctor_run_refuses_a_spec_whose_image_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from eval_actors.commands import register

    monkeypatch.setenv("PROCTOR_HOME", str(tmp_path / "home"))
    (tmp_path / "spec.yaml").write_text(
        "name: t\nmodel: {adapter: reference}\ndataset: {samples: [{input: x, target: x}]}\n"
        "scorers: [{type: exact}]\nsandbox: {runtime: gvisor, image: 'ctf-task:1'}\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["run", str(tmp_path / "spec.yaml"), "--json"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert f"invalid evaluation spec in {tmp_path / 'spec.yaml'}" in err
    assert "sandbox.image: image 'ctf-task:1' is not in the image store" in err
    assert not (tmp_path / "home" / "results").exists()  # nothing ran
