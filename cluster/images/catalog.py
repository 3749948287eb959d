"""The image store's records on disk, and the lock and leases that guard them.

    <root>/sha256/<hex>/rootfs/       the unpacked root filesystem (never changed)
    <root>/sha256/<hex>/image.json    what the store knows of it (`Image` without names)
    <root>/sha256/<hex>/config.json   the image config, byte for byte (its sha256 is <hex>)
    <root>/names.json                 name:tag -> digest
    <root>/builds/<key>.json          a recipe's content hash -> the digest it built
    <root>/leases/<hex>/<pid>-<rand>  one per sandbox using the image, held with flock
    <root>/tmp/<pid>-<rand>/          private (0700) staging of imports and builds
    <root>/apt-cache/                 Debian packages kept between recipe builds

An image appears by one `rename` of its finished staging folder and disappears by one
`rename` back into tmp/ before it is deleted, so a reader never sees half an image.
Changes to names, images and leases happen under an exclusive `flock` on `<root>/.lock`.
A lease is a file held with a shared `flock` for as long as the sandbox runs: a crashed
holder's lease is released by the kernel, and `gc` deletes its file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cluster.storage import StorageError

HEX_LEN = 64


class Catalog:
    def __init__(self, root: Path):
        self.root = root
        self.images = root / "sha256"
        self.tmp = root / "tmp"
        self.leases = root / "leases"
        self.builds = root / "builds"
        self.apt_cache = root / "apt-cache"
        self.names_file = root / "names.json"

    def ensure(self) -> None:
        """Make the store's folders (readable by sandboxes; tmp/ private)."""
        for path, mode in ((self.root, 0o755), (self.images, 0o755), (self.tmp, 0o700), (self.leases, 0o700),
                           (self.builds, 0o700), (self.apt_cache, 0o700)):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(mode)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.ensure()
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------ records

    def image_dir(self, digest: str) -> Path:
        return self.images / digest.removeprefix("sha256:")

    def digests(self) -> list[str]:
        if not self.images.is_dir():
            return []
        return sorted(f"sha256:{p.name}" for p in self.images.iterdir()
                      if len(p.name) == HEX_LEN and (p / "image.json").is_file())

    def record(self, digest: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.image_dir(digest) / "image.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StorageError(f"image store {self.root}: cannot read the record of {digest}: {exc}") from None

    def names(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.names_file.read_text())["names"])
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"image store {self.root}: cannot read {self.names_file}: {exc}") from None

    def write_names(self, names: dict[str, str]) -> None:
        """Replace the names (under `locked`)."""
        self._write_json(self.names_file, {"version": 1, "names": dict(sorted(names.items()))})

    def build_digest(self, key: str) -> str | None:
        try:
            return json.loads((self.builds / f"{key}.json").read_text())["digest"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write_build(self, key: str, digest: str, recipe: str) -> None:
        self._write_json(self.builds / f"{key}.json", {"digest": digest, "recipe": recipe})

    def _write_json(self, path: Path, doc: Any) -> None:
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(doc, indent=1))
        os.replace(partial, path)

    # ------------------------------------------------------------ staging and removal

    def staging(self) -> Path:
        """A new private folder in tmp/, named after this process (gc removes a dead one's)."""
        self.ensure()
        path = self.tmp / f"{os.getpid()}-{secrets.token_hex(6)}"
        path.mkdir(mode=0o700)
        return path

    def discard(self, digest: str) -> None:
        """Take an image out of the store (under `locked`): out of sight at once, then deleted."""
        doomed = self.tmp / f"{os.getpid()}-rm-{secrets.token_hex(6)}"
        os.rename(self.image_dir(digest), doomed)
        remove_tree(doomed)

    def stale_staging(self) -> list[Path]:
        """Staging folders of processes that are gone."""
        if not self.tmp.is_dir():
            return []
        return [p for p in self.tmp.iterdir() if not _alive(p.name.split("-", 1)[0])]

    # ------------------------------------------------------------ leases

    @contextlib.contextmanager
    def lease(self, digest: str) -> Iterator[None]:
        """Hold the image (call under `locked`; the lease outlives the lock)."""
        folder = self.leases / digest.removeprefix("sha256:")
        folder.mkdir(exist_ok=True)
        path = folder / f"{os.getpid()}-{secrets.token_hex(6)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)

    def in_use(self, digest: str) -> bool:
        """Whether a live lease holds the image (under `locked`); dead holders' leases go."""
        folder = self.leases / digest.removeprefix("sha256:")
        held = False
        for path in folder.iterdir() if folder.is_dir() else ():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = True
                continue
            finally:
                os.close(fd)
            path.unlink(missing_ok=True)
        if not held:
            with contextlib.suppress(OSError):
                folder.rmdir()
        return held


def remove_tree(path: Path) -> None:
    """Delete a folder, first detaching anything mounted under it (a build that was killed
    can leave its chroot's /proc, /sys or /dev mounted: deleting through those would delete
    the host's own)."""
    mounts = _mounts_under(path)
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", mount], capture_output=True, check=False)
    if _mounts_under(path):
        raise StorageError(f"cannot delete {path}: something is still mounted under it; unmount it and run "
                           "`proctor image gc`")
    shutil.rmtree(path, ignore_errors=True)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
