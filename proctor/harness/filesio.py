"""Reading and writing a file as one of the sandbox's users.

The harness holds capabilities that override file permissions; a request from Inspect
must meet the sandbox's own. Each operation runs in a child process that first becomes
the user (`popen_args` of `identity.Users`; none: the harness's own user), so the kernel
(gVisor's, in a gVisor sandbox) decides. The child streams the content over a pipe and
reports a failure as one line on another: `<kind>\\t<message>`, `kind` one of
`proctor.requests.ErrorKind`.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING, Callable

from proctor.requests import RequestFailed

if TYPE_CHECKING:
    from proctor.harness.identity import UserArgs

_KINDS: tuple[tuple[type[OSError], str], ...] = (
    (FileNotFoundError, "not_found"), (NotADirectoryError, "not_found"), (IsADirectoryError, "is_a_directory"),
    (PermissionError, "permission"),
)


def read_as(user: UserArgs, path: str, limit: int, on_piece: Callable[[bytes], None],
            piece_bytes: int) -> int:
    """Hand `path`'s content to `on_piece` in pieces of up to `piece_bytes`; returns its
    size. Raises `RequestFailed` (`too_large` beyond `limit` bytes)."""
    pid, data_r, err_r = _fork(user, lambda fd: _copy_out(path, limit, fd), child_reads=False)
    size, buffer, too_large = 0, bytearray(), False
    try:
        while chunk := os.read(data_r, 1024 * 1024):
            size += len(chunk)
            if size > limit:
                too_large = True
                break
            buffer += chunk
            while len(buffer) >= piece_bytes:
                on_piece(bytes(buffer[:piece_bytes]))
                del buffer[:piece_bytes]
    finally:
        os.close(data_r)
    failure = _finish(pid, err_r, kill=too_large)
    if too_large:
        raise RequestFailed("too_large", f"{path} is larger than the limit of {limit} bytes")
    if failure is not None:
        raise failure
    if buffer:
        on_piece(bytes(buffer))
    return size


def write_as(user: UserArgs, path: str, content: bytes) -> None:
    """Write `content` to `path`, making its missing parent folders. Raises `RequestFailed`."""
    pid, data_w, err_r = _fork(user, lambda fd: _copy_in(path, fd), child_reads=True)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(data_w, view[:1024 * 1024]):]
    except BrokenPipeError:
        pass  # the child failed before reading it all: it says why
    finally:
        os.close(data_w)
    failure = _finish(pid, err_r)
    if failure is not None:
        raise failure


def _copy_out(path: str, limit: int, out: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        raise IsADirectoryError(f"{path} is a directory")
    if os.fstat(fd).st_size > limit:
        raise RequestFailed("too_large", f"{path} is larger than the limit of {limit} bytes")
    while chunk := os.read(fd, 1024 * 1024):
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view):]


def _copy_in(path: str, data: int) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    while chunk := os.read(data, 1024 * 1024):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]
    os.close(fd)


def _fork(user: UserArgs, work: Callable[[int], None], child_reads: bool) -> tuple[int, int, int]:
    """Fork a child that becomes `user` and runs `work` on its end of a data pipe. Returns
    the child's pid, the parent's end of the data pipe and the read end of the error pipe."""
    data_r, data_w = os.pipe()
    err_r, err_w = os.pipe()
    mine, theirs = (data_w, data_r) if child_reads else (data_r, data_w)
    pid = os.fork()
    if pid == 0:
        os.close(mine)
        os.close(err_r)
        _child(user, err_w, lambda: work(theirs))
    os.close(theirs)
    os.close(err_w)
    return pid, mine, err_r


def _child(user: UserArgs, err: int, work: Callable[[], None]) -> None:
    """Become `user`, do `work`, and exit: 0, or 1 with the failure written to `err`."""
    try:
        if user:
            os.setgroups([])
            os.setgid(user["group"])
            os.setuid(user["user"])
        work()
        os._exit(0)
    except BaseException as exc:  # noqa: BLE001 - the child reports everything, then exits
        kind = exc.kind if isinstance(exc, RequestFailed) else next(
            (k for t, k in _KINDS if isinstance(exc, t)), "failed")
        if isinstance(exc, OSError) and exc.errno == errno.EROFS:  # the sandbox's read-only root
            kind = "permission"
        try:
            os.write(err, f"{kind}\t{exc}".encode("utf-8", "replace")[:8000])
        finally:
            os._exit(1)


def _finish(pid: int, err_r: int, kill: bool = False) -> RequestFailed | None:
    if kill:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    said = b""
    try:
        while chunk := os.read(err_r, 8192):
            said += chunk
    finally:
        os.close(err_r)
    _, status = os.waitpid(pid, 0)
    if kill or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and not said):
        return None
    kind, _, message = said.decode("utf-8", "replace").partition("\t")
    if kind not in ("not_found", "permission", "is_a_directory", "too_large", "failed"):
        kind, message = "failed", f"the file operation ended with status {status}"
    return RequestFailed(kind, message)  # type: ignore[arg-type]  # one of the ErrorKinds, checked just above
