"""Hostile-layer extraction: image layers applied onto a root filesystem as root.

A layer is untrusted input. Every member is checked before anything is written, and
written without ever following a link the image planted: folders are opened one path
part at a time with `O_NOFOLLOW` (a member under a symlink is refused, never written
through it), files are created with `O_EXCL | O_NOFOLLOW` under those folder handles.
Refused: absolute paths, `..`, relative symlinks that climb out of the root, hard links
that leave the root or point at nothing, device nodes, sparse files, unknown member
types, and setuid/setgid bits on anything but a folder (unless `strip_setuid`, which
removes the bits). Ownership, modes and times are kept (numeric ids); extended
attributes (file capabilities among them) are not.

Whiteouts follow the OCI layer spec: `.wh.NAME` hides NAME of the lower layers,
`.wh..wh..opq` hides everything the lower layers put in its folder; neither touches what
the same layer adds. The caller extracts into a private staging folder and keeps it only
when every layer succeeded and verified.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from pathlib import Path

from cluster.storage import StorageError

from .image import ImageError
from .streams import CHUNK

MOUNT_POINTS = ("proc", "dev", "tmp", "workspace", "opt/proctor")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}
MAX_CACHED_FOLDERS = 256
OPAQUE = ".wh..wh..opq"


class RootfsWriter:
    """Applies layers, in order, onto the empty folder `root` (which it owns until `close`)."""

    def __init__(self, root: Path, label: str, strip_setuid: bool = False):
        self.label, self.strip_setuid = label, strip_setuid
        self.stripped = 0
        self._root_fd = os.open(root, DIR_FLAGS)
        self._folders: dict[tuple[str, ...], int] = {}
        self._dir_times: dict[tuple[str, ...], int] = {}
        self._layer_paths: set[str] = set()
        self._layer = ""

    def close(self) -> None:
        self._forget()
        os.close(self._root_fd)

    def apply(self, tar: tarfile.TarFile, layer: str) -> None:
        """Apply one layer's members. Raises `ImageError` naming the image, layer and member."""
        self._layer, self._layer_paths = layer, set()
        for member in tar:
            self._trim()
            try:
                self._member(tar, member)
            except ImageError:
                raise
            except RecursionError:
                self._refuse(member.name, "is nested too deeply")
            except ValueError as exc:  # e.g. a NUL in a name or link target
                self._refuse(member.name, f"cannot be written: {exc}")
            except OSError as exc:
                if exc.errno is None:  # a gzip or zstd error, not a write error
                    raise
                if exc.errno in STORAGE_ERRNOS:
                    raise StorageError(f"image {self.label}: writing {member.name!r} failed: {exc.strerror}") from None
                self._refuse(member.name, f"cannot be written: {exc.strerror}")

    def finish(self) -> None:
        """Make the mount points, then set the folders' times (children first)."""
        for path in MOUNT_POINTS:
            self._ensure_folder(tuple(path.split("/")))
        for parts in sorted(self._dir_times, key=len, reverse=True):
            self._trim()
            try:
                fd = self._folder(parts, "", create=False)
            except (FileNotFoundError, ImageError):
                continue  # removed or replaced by a later layer
            os.utime(fd, ns=(self._dir_times[parts],) * 2)

    # ------------------------------------------------------------ members

    def _member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = self._parts(m.name, m.name)
        if not parts:
            if not m.isdir():
                self._refuse(m.name, "stands for the image's root, which must be a folder")
            self._owner(m)
            os.fchown(self._root_fd, m.uid, m.gid)
            os.fchmod(self._root_fd, m.mode & 0o7777)
            self._dir_times[()] = _ns(m.mtime)
            return
        if parts[-1].startswith(".wh."):
            self._whiteout(m, parts)
            return
        self._mark(parts)
        if m.issparse():
            self._refuse(m.name, "is a sparse file, which images may not carry")
        elif m.isdir():
            self._mkdir(m, parts)
        elif m.isreg():
            self._file(tar, m, parts)
        elif m.issym():
            self._symlink(m, parts)
        elif m.islnk():
            self._hardlink(m, parts)
        elif m.isfifo():
            self._fifo(m, parts)
        elif m.ischr() or m.isblk():
            self._refuse(m.name, f"is a {'character' if m.ischr() else 'block'} device node "
                         f"({m.devmajor}:{m.devminor}); images may not carry device nodes")
        else:
            self._refuse(m.name, f"has an unsupported tar type {m.type!r}")

    def _mkdir(self, m: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        self._owner(m)
        parent = self._folder(parts[:-1], m.name)
        self._clear(parent, parts, keep_folder=True)
        try:
            os.mkdir(parts[-1], 0o700, dir_fd=parent)
        except FileExistsError:
            pass
        fd = self._folder(parts, m.name)
        os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode & 0o7777)
        self._dir_times[parts] = _ns(m.mtime)

    def _file(self, tar: tarfile.TarFile, m: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        mode = self._mode(m)
        parent = self._folder(parts[:-1], m.name)
        self._clear(parent, parts)
        fd = os.open(parts[-1], FILE_FLAGS, 0o600, dir_fd=parent)
        try:
            if m.size:
                source = tar.extractfile(m)
                assert source is not None
                left = m.size
                while left:
                    chunk = source.read(min(CHUNK, left))
                    if not chunk:
                        self._refuse(m.name, "is cut short: the layer ends inside it")
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                    left -= len(chunk)
            os.fchown(fd, m.uid, m.gid)
            os.fchmod(fd, mode)
            os.utime(fd, ns=(_ns(m.mtime),) * 2)
        finally:
            os.close(fd)

    def _symlink(self, m: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        self._owner(m)
        target = m.linkname
        if not target:
            self._refuse(m.name, "is a symlink with an empty target")
        if not target.startswith("/") and _climbs_out(parts, target):
            self._refuse(m.name, f"is a symlink to {target!r}, which leads out of the image's root")
        parent = self._folder(parts[:-1], m.name)
        self._clear(parent, parts)
        os.symlink(target, parts[-1], dir_fd=parent)
        os.chown(parts[-1], m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
        os.utime(parts[-1], ns=(_ns(m.mtime),) * 2, dir_fd=parent, follow_symlinks=False)

    def _hardlink(self, m: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        target = self._parts(m.linkname, m.name, what="hard link target")
        if not target or target == parts:
            self._refuse(m.name, f"is a hard link to {m.linkname!r}, which is not a file of the image")
        missing = f"is a hard link to {m.linkname!r}, which is not in the image (yet)"
        try:
            st = os.stat(target[-1], dir_fd=self._folder(target[:-1], m.name, create=False), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            self._refuse(m.name, missing)
        if stat.S_ISDIR(st.st_mode):
            self._refuse(m.name, f"is a hard link to the folder {m.linkname!r}")
        parent = self._folder(parts[:-1], m.name)
        self._clear(parent, parts)
        source = self._folder(target[:-1], m.name, create=False)
        os.link(target[-1], parts[-1], src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False)

    def _fifo(self, m: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        mode = self._mode(m)
        parent = self._folder(parts[:-1], m.name)
        self._clear(parent, parts)
        os.mkfifo(parts[-1], 0o600, dir_fd=parent)
        os.chown(parts[-1], m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
        os.chmod(parts[-1], mode, dir_fd=parent)  # a FIFO we just made in a private folder
        os.utime(parts[-1], ns=(_ns(m.mtime),) * 2, dir_fd=parent, follow_symlinks=False)

    def _whiteout(self, m: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        folder, base = parts[:-1], parts[-1]
        victim = None if base == OPAQUE else base[len(".wh."):]
        if victim in ("", ".", ".."):
            self._refuse(m.name, "is a whiteout of nothing")
        self._mark(folder)
        try:
            fd = os.dup(self._folder(folder, m.name, create=False))
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing below to hide
        try:
            if victim is None:
                self._prune(fd, folder)
            elif "/".join((*folder, victim)) not in self._layer_paths:
                self._clear(fd, (*folder, victim))
        finally:
            os.close(fd)

    def _prune(self, fd: int, folder: tuple[str, ...]) -> None:
        """Remove what lower layers put under `folder`, keeping this layer's own entries."""
        for name in os.listdir(fd):
            path = (*folder, name)
            if "/".join(path) not in self._layer_paths:
                self._clear(fd, path)
                continue
            try:
                sub = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue  # this layer's file or symlink: kept as it is
            try:
                self._prune(sub, path)
            finally:
                os.close(sub)

    # ------------------------------------------------------------ checks

    def _refuse(self, name: str, reason: str) -> None:
        where = f"{self._layer}: " if self._layer else ""
        raise ImageError(f"image {self.label}: {where}member {name!r} {reason}; nothing was stored")

    def _parts(self, name: str, member: str, what: str = "path") -> tuple[str, ...]:
        if name.startswith("/"):
            self._refuse(member, f"has an absolute {what} ({name!r}); layer paths must be relative to the image's root")
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            self._refuse(member, f"has a {what} with '..' ({name!r}), which could lead out of the image's root")
        return parts

    def _owner(self, m: tarfile.TarInfo) -> None:
        if not (0 <= m.uid < 2**32 - 1 and 0 <= m.gid < 2**32 - 1):
            self._refuse(m.name, f"has an impossible owner {m.uid}:{m.gid}")

    def _mode(self, m: tarfile.TarInfo) -> int:
        self._owner(m)
        mode = m.mode & 0o7777
        if mode & 0o6000:
            if not self.strip_setuid:
                self._refuse(m.name, f"has the setuid or setgid bit (mode {mode:04o}); "
                             "`proctor image import --strip-setuid` imports the image with those bits removed")
            self.stripped += 1
            mode &= ~0o6000
        return mode

    def _mark(self, parts: tuple[str, ...]) -> None:
        """Remember `parts` and its folders as this layer's (whiteouts leave them alone)."""
        for end in range(len(parts), 0, -1):
            key = "/".join(parts[:end])
            if key in self._layer_paths:
                return
            self._layer_paths.add(key)

    # ------------------------------------------------------------ folders, never through a link

    def _folder(self, parts: tuple[str, ...], member: str, create: bool = True) -> int:
        """A handle on the folder `parts`, opened part by part without following symlinks
        (missing folders are made, 0755 root, when `create`). Raises `FileNotFoundError`
        when one is missing and not `create`; refuses a symlink or a file on the way."""
        fd = self._folders.get(parts)
        if fd is not None:
            return fd
        start = len(parts)
        while start and parts[:start] not in self._folders:
            start -= 1
        fd = self._folders[parts[:start]] if start else self._root_fd
        for end in range(start + 1, len(parts) + 1):
            leaf = parts[end - 1]
            try:
                fd = os.open(leaf, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(leaf, 0o755, dir_fd=fd)
                fd = os.open(leaf, DIR_FLAGS, dir_fd=fd)
                os.fchmod(fd, 0o755)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                kind = "symlink" if stat.S_ISLNK(os.stat(leaf, dir_fd=fd, follow_symlinks=False).st_mode) else "file"
                where = "/".join(parts[:end])
                if kind == "symlink":
                    self._refuse(member, f"would be written through the symlink {where!r}, which is never followed")
                self._refuse(member, f"needs {where!r} to be a folder, but a lower entry made it a file")
            self._folders[parts[:end]] = fd
        return fd

    def _trim(self) -> None:
        """Bound the open folder handles; called only between members, when none is in use."""
        if len(self._folders) > MAX_CACHED_FOLDERS:
            self._forget()

    def _forget(self, under: tuple[str, ...] | None = None) -> None:
        """Close the cached handles (only those at or under `under`, if given)."""
        for parts in [p for p in self._folders if under is None or p[: len(under)] == under]:
            os.close(self._folders.pop(parts))

    def _clear(self, parent: int, parts: tuple[str, ...], keep_folder: bool = False) -> None:
        """Remove what is at `parts` (in the folder `parent`; a folder with everything in
        it), unless it is a folder and `keep_folder`."""
        leaf = parts[-1]
        try:
            st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(leaf, dir_fd=parent)
        elif not keep_folder:
            self._forget(under=parts)
            shutil.rmtree(leaf, dir_fd=parent)

    def _ensure_folder(self, parts: tuple[str, ...]) -> None:
        """`parts` as a real folder (made 0755 root; a file or symlink there is replaced)."""
        fd = self._root_fd
        for end, leaf in enumerate(parts, 1):
            try:
                st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(leaf, dir_fd=fd)
                    raise FileNotFoundError
            except FileNotFoundError:
                os.mkdir(leaf, 0o755, dir_fd=fd)
                os.chmod(leaf, 0o755, dir_fd=fd)
            fd = self._folder(parts[:end], "/".join(parts))


def _climbs_out(parts: tuple[str, ...], target: str) -> bool:
    """Whether a relative symlink at `parts` pointing at `target` leads above the root."""
    depth = len(parts) - 1
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def _ns(mtime: float) -> int:
    return min(max(int(mtime * 1_000_000_000), 0), 2**63 - 1)
