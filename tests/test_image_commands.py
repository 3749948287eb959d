"""`proctor image …`: exit codes (0, 2 for bad input, nothing changed) and --json."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cluster.images import ImageStore
from cluster.images.commands import register
from imagearchives import ImageDef, file, layer, oci_archive, symlink

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PROCTOR_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def proctor(*argv: str) -> int:
    """`proctor ARGV` as the CLI runs it (the `image` commands come from this entry point)."""
    parser = argparse.ArgumentParser(prog="proctor")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def output(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


def test_the_image_commands_are_an_entry_point_of_the_cli() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["proctor.commands"]
    assert scripts["image"] == "cluster.images.commands:register"


def test_import_list_inspect_tag_rm_and_gc(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = ImageDef([layer(file("etc/motd", b"hi"))])
    archive = oci_archive(tmp_path / "task.tar", image)
    assert proctor("image", "import", str(archive), "--name", "ctf:1", "--json") == 0
    imported = output(capsys)
    assert imported["digest"] == image.digest and imported["names"] == ["ctf:1", "task:1"]
    assert imported["rootfs"] == str(home / "images" / "sha256" / image.digest.removeprefix("sha256:") / "rootfs")
    assert proctor("image", "import", str(archive)) == 0
    assert capsys.readouterr().out.startswith(f"imported ctf:1, task:1 {image.digest} (")
    assert proctor("image", "list", "--json") == 0
    assert [i["digest"] for i in output(capsys)] == [image.digest]
    assert proctor("image", "list") == 0
    assert "ctf:1, task:1" in capsys.readouterr().out
    assert proctor("image", "inspect", image.digest[:19], "--json") == 0
    assert output(capsys)["config"]["user"] == "1000"
    assert proctor("image", "inspect", "ctf:1") == 0
    assert f"digest          {image.digest}" in capsys.readouterr().out
    assert proctor("image", "tag", "ctf:1", "ctf:latest", "--json") == 0
    assert output(capsys)["names"] == ["ctf:1", "ctf:latest", "task:1"]
    assert proctor("image", "rm", "ctf:1", "--json") == 0
    assert output(capsys) == {"untagged": ["ctf:1"], "deleted": None}
    assert proctor("image", "rm", image.digest, "--json") == 0
    assert output(capsys) == {"untagged": ["ctf:latest", "task:1"], "deleted": image.digest}
    assert proctor("image", "gc", "--json") == 0
    assert output(capsys) == {"deleted": []}
    assert proctor("image", "list") == 0
    assert capsys.readouterr().out.strip() == "no images"


def test_bad_input_exits_2_and_changes_nothing(home: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    hostile = oci_archive(tmp_path / "hostile.tar", ImageDef([layer(symlink("etc", "/etc"), file("etc/x", b"x"))]))
    assert proctor("image", "import", str(hostile)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: image {hostile} (sha256:") and "member 'etc/x' would be written through" in err
    assert proctor("image", "import", str(tmp_path / "missing.tar")) == 2
    assert "missing.tar: no such file or folder" in capsys.readouterr().err
    assert proctor("image", "inspect", "nope:1") == 2
    assert "image 'nope:1' is not in the image store" in capsys.readouterr().err
    assert proctor("image", "rm", "Not A Name") == 2
    assert proctor("image", "import", str(hostile), "--name", "UPPER") == 2
    assert "--name: 'UPPER' is not an image reference" in capsys.readouterr().err
    assert ImageStore(home / "images").list() == []


def test_removing_an_image_in_use_exits_2(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ImageStore(home / "images")
    image = store.import_archive(oci_archive(tmp_path / "task.tar", ImageDef([layer(file("a"))])))
    with store.lease("task:1"):
        assert proctor("image", "rm", "task:1") == 2
        assert "is in use by a running sandbox" in capsys.readouterr().err
    assert store.resolve(image.digest).names == ("task:1",)


def test_a_bad_setting_exits_2(home: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PROCTOR_IMAGE_MAX_BYTES", "lots")
    assert proctor("image", "list") == 2
    assert "PROCTOR_IMAGE_MAX_BYTES: " in capsys.readouterr().err
