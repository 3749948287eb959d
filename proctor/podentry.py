"""`python -m proctor.podentry [--service] [-- COMMAND ...]`: the entrypoint of a Kubernetes sandbox pod.

A pod has no network and no host folder: its one channel is its attached stdin/stdout.
The runtime ships the shard's workspace over that same channel before the runner
protocol starts: one header line, `{"proctor_workspace": 1, "format": "tar", "size": N}`,
then exactly N bytes of an uncompressed tar. This reads exactly that from file
descriptor 0 (unbuffered: nothing after it is consumed), unpacks it into
`$PROCTOR_WORKSPACE` (default /workspace) — regular files and folders only: no absolute
paths, no '..', no links or devices, at most `MAX_WORKSPACE_BYTES` — and then runs the
harness on the rest of stdin/stdout (in its service mode with `--service`), or execs
COMMAND (its `python` being this one) with the same stdin/stdout.

Artifacts come back over the same channel: the runtime asks the harness to send their
content in `artifact` events (`ShardMessage.inline_artifact_bytes`), in pieces of
`proctor.protocol.INLINE_ARTIFACT_BYTES`, up to 3/8 of the shard's output cap in all; the
ones beyond that stay in the pod's emptyDir and are deleted with the pod.

`pack_workspace` is the other end, used by the runtime on the host. Imports: the standard
library only, like the harness (never Ray).
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import tarfile
from pathlib import Path, PurePosixPath

MAX_WORKSPACE_BYTES = 64 * 1024**2
MAX_HEADER_BYTES = 4096
TAR_OVERHEAD_BYTES = 1024**2  # tar headers and padding beyond the files' bytes
HEADER_KEY = "proctor_workspace"


class WorkspaceError(ValueError):
    """The workspace sent to the pod is malformed or unsafe. Caught by `main` (exit 2)
    and by the runtime when packing (a failed launch)."""


def header(size: int) -> bytes:
    return json.dumps({HEADER_KEY: 1, "format": "tar", "size": size}).encode() + b"\n"


def pack_workspace(folder: Path, limit: int = MAX_WORKSPACE_BYTES) -> bytes:
    """The header line and tar of `folder`'s regular files and folders (links are left out).
    Raises `WorkspaceError` when its files hold more than `limit` bytes."""
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            st = path.lstat()
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                continue
            info = tarfile.TarInfo(path.relative_to(folder).as_posix())
            info.mtime = int(st.st_mtime)
            if stat.S_ISDIR(st.st_mode):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                continue
            total += st.st_size
            if total > limit:
                raise WorkspaceError(f"the workspace holds more than {limit} bytes; a pod receives at most that")
            info.size, info.mode = st.st_size, 0o755 if st.st_mode & 0o100 else 0o644
            with path.open("rb") as f:
                tar.addfile(info, f)
            if buf.tell() > limit + TAR_OVERHEAD_BYTES:  # what the pod accepts: headers count too
                raise WorkspaceError(f"the workspace's tar is over {limit + TAR_OVERHEAD_BYTES} bytes "
                                     "(its files and their names); a pod receives at most that")
    data = buf.getvalue()
    return header(len(data)) + data


def read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise WorkspaceError(f"stdin ended {left} bytes before the end of the workspace")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_header(fd: int) -> int:
    """The size announced by the header line, read byte by byte (nothing past it)."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            raise WorkspaceError("stdin ended before the workspace header")
        line += byte
        if len(line) > MAX_HEADER_BYTES:
            raise WorkspaceError("the workspace header is too long")
    try:
        head = json.loads(line)
        size = head["size"] if head.get(HEADER_KEY) == 1 and head.get("format") == "tar" else None
    except (ValueError, AttributeError, KeyError):
        size = None
    if not isinstance(size, int) or not 0 <= size <= MAX_WORKSPACE_BYTES + TAR_OVERHEAD_BYTES:
        raise WorkspaceError(f"not a workspace header: {bytes(line[:200])!r}")
    return size


def unpack(data: bytes, root: Path, limit: int = MAX_WORKSPACE_BYTES) -> int:
    """Write the tar's files under `root`; returns how many. Raises `WorkspaceError` on
    anything but a relative regular file or folder, and past `limit` bytes."""
    root.mkdir(parents=True, exist_ok=True)
    files = total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                rel = PurePosixPath(member.name)
                if member.name in ("", ".") or rel.is_absolute() or ".." in rel.parts or "\\" in member.name:
                    raise WorkspaceError(f"{member.name!r} is not a relative path inside the workspace")
                target = root.joinpath(*rel.parts)
                if member.isdir():
                    _make_dirs(root, target)
                    continue
                if not member.isreg():
                    raise WorkspaceError(f"{member.name!r} is not a regular file (links and devices are refused)")
                total += member.size
                if total > limit:
                    raise WorkspaceError(f"the workspace holds more than {limit} bytes")
                _make_dirs(root, target.parent)
                source = tar.extractfile(member)
                assert source is not None
                mode = 0o755 if member.mode & 0o100 else 0o644
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
                with os.fdopen(fd, "wb") as out:
                    out.write(source.read())
                files += 1
    except tarfile.TarError as exc:
        raise WorkspaceError(f"the workspace is not a valid tar: {exc}") from None
    return files


def _make_dirs(root: Path, folder: Path) -> None:
    """`folder` and its parents below `root`, none of them a link."""
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            raise WorkspaceError(f"{current} is a link")
        current.mkdir(exist_ok=True)


HARNESS_FLAGS = ("--service",)  # passed on to the harness (before any `--`)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[args.index("--") + 1:] if "--" in args else []
    flags = args[:args.index("--")] if "--" in args else args
    unknown = [f for f in flags if f not in HARNESS_FLAGS]
    if unknown:
        sys.stderr.write(f"proctor.podentry: unknown option {unknown[0]!r}; known: {', '.join(HARNESS_FLAGS)}\n")
        return 2
    workspace = Path(os.environ.get("PROCTOR_WORKSPACE") or "/workspace")
    try:
        unpack(read_exactly(0, read_header(0)), workspace)
    except (WorkspaceError, OSError) as exc:
        sys.stderr.write(f"proctor.podentry: no workspace: {exc}\n")
        return 2
    os.chdir(workspace)
    if command:
        if command[0] == "python":
            command[0] = sys.executable
        os.execvp(command[0], command)
    from proctor.harness.__main__ import main as harness

    return harness(["--workspace", str(workspace), *flags])


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the harness's stdin reader thread may hold stdin's lock (see proctor.harness)
