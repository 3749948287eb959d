"""Recipe builds with the real mmdebstrap from Debian's archive (about a minute each):
packages, files, `run:` steps, a service user's private file, the build cache, and
failures that name their step. Recipes that are wrong on their face fail at once."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cluster.images import ImageError, ImageStore
from cluster.images.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent

RECIPE = """\
name: ctf-task:1
base: bookworm
packages: [hello]
files:
  /srv/flag: {content: "FLAG{recipe}\\n", mode: "0400", owner: "ctf:ctf"}
  /srv/check.sh: {source: check.sh, mode: "0755"}
run:
  - useradd --system --user-group --no-create-home ctf
  - hello > /srv/greeting
user: ctf
workdir: /srv/work
env: {GREETING: hi}
"""


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def recipe(folder: Path, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "check.sh").write_text("#!/bin/sh\necho ok\n")
    (folder / "recipe.yaml").write_text(text)
    return folder / "recipe.yaml"


def passwd_entry(rootfs: Path, user: str) -> list[str]:
    return next(line.split(":") for line in (rootfs / "etc/passwd").read_text().splitlines()
                if line.startswith(f"{user}:"))


@pytest.mark.slow
def test_a_recipe_builds_an_image_with_a_service_users_private_file(store: ImageStore, tmp_path: Path) -> None:
    path = recipe(tmp_path / "task", RECIPE)
    img = store.build(path)
    root = img.rootfs
    assert img.names == ("ctf-task:1",) and img.source.startswith(f"recipe {path} (sha256:")
    assert (root / "usr/bin/hello").is_file() and (root / "srv/greeting").read_text() == "Hello, world!\n"
    ctf = passwd_entry(root, "ctf")
    flag = (root / "srv/flag").stat()
    assert (flag.st_uid, flag.st_gid, stat.S_IMODE(flag.st_mode)) == (int(ctf[2]), int(ctf[3]), 0o400)
    assert (root / "srv/flag").read_text() == "FLAG{recipe}\n"
    check = (root / "srv/check.sh").stat()
    assert stat.S_IMODE(check.st_mode) == 0o755 and check.st_uid == 0
    assert (root / "srv/work").is_dir()
    assert (img.config.user, img.config.working_dir) == ("ctf", "/srv/work")
    assert ("GREETING", "hi") in img.config.env and img.config.env[0][0] == "PATH"
    assert img.setuid_stripped > 0  # Debian's su, mount, passwd…: a recipe build always strips
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), os.path.join(folder, name)
            assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode))
    assert list((root / "dev").iterdir()) == [] and not list((root / "var/cache/apt/archives").glob("*.deb"))
    assert list((store.root / "tmp").iterdir()) == []
    again = store.build(path)  # the same recipe: from the build cache, not built again
    assert (again.digest, again.imported_at) == (img.digest, img.imported_at)


@pytest.mark.slow
def test_a_failing_run_step_is_named_with_its_output_and_nothing_is_stored(store: ImageStore, tmp_path: Path) -> None:
    # pip (from PyPI, with the image's own pip) and the first run: step succeed: the second fails
    path = recipe(tmp_path / "task", "name: broken\nbase: bookworm\npackages: [python3-pip]\npip: [six==1.16.0]\n"
                                      "run:\n  - python3 -c 'import six; print(six.__version__)'\n"
                                      "  - echo about to fail >&2; exit 3\n")
    with pytest.raises(ImageError) as info:
        store.build(path)
    message = str(info.value)
    assert f"recipe {path}: the step run[2]: echo about to fail >&2; exit 3 failed; nothing was stored" in message
    assert "    about to fail" in message and "\n    1.16.0\n" in message  # run[1] saw six
    assert store.list() == [] and list((store.root / "tmp").iterdir()) == []


def test_an_unknown_package_fails_the_packages_step(store: ImageStore, tmp_path: Path) -> None:
    path = recipe(tmp_path / "task", "name: broken\nbase: bookworm\npackages: [no-such-package-proctor]\n")
    with pytest.raises(ImageError) as info:
        store.build(path)
    message = str(info.value)
    assert "the step packages (mmdebstrap: downloading and installing the Debian packages) failed" in message
    assert "no-such-package-proctor" in message.split("Its output ended with:")[1]
    assert store.list() == [] and list((store.root / "tmp").iterdir()) == []


@pytest.mark.parametrize(("text", "reason"), [
    ("name: t\nbase: bookworm\npip: [requests]\n", "pip: installing Python packages needs the image's own pip: "
                                                   "add python3-pip to packages"),
    ("name: t\nbase: bookworm\nfiles:\n  /srv/x: {content: x, mode: 0400}\n", "files./srv/x.mode: Input should be "
                                                                               "a valid string"),
    ("name: t\nbase: bookworm\nfiles:\n  /srv/x: {content: x, mode: '4755'}\n", "no setuid bits"),
    ("name: t\nbase: bookworm\nfiles:\n  srv/x: {content: x}\n", "'srv/x' must be an absolute path in the image"),
    ("name: t\nbase: bookworm\nfiles:\n  /srv/x: {source: missing.txt}\n", "source 'missing.txt' is not a file"),
    ("name: t\nbase: bookworm\npackages: ['curl; rm -rf /']\n", "is not a Debian package name"),
    ("name: t\nbase: bookworm\npip: ['--index-url=http://evil']\n", "options such as --index-url are not accepted"),
    ("name: T\nbase: bookworm\n", "name: 'T' is not an image reference"),
    ("name: t\nbase: bookworm\npackage: [hello]\n", "package: unknown field"),
    ("- just a list\n", "must be a mapping of fields"),
])
def test_a_wrong_recipe_is_refused_before_building(text: str, reason: str, store: ImageStore, tmp_path: Path) -> None:
    path = recipe(tmp_path / "task", text)
    with pytest.raises(ImageError) as info:
        store.build(path)
    assert f"recipe {path}" in str(info.value) and reason in str(info.value).replace("Value error, ", "")
    assert not store.root.exists()


def test_the_example_recipe_is_valid() -> None:
    recipe = load_recipe(ROOT / "examples" / "images" / "shell-task.yaml")
    assert (recipe.name, recipe.packages, recipe.user) == ("shell-task:1", ["file", "hello"], "65534")
    assert recipe.files["/srv/task/answer"].mode == "0400"
