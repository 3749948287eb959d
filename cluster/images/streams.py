"""Layer streams: read once, hashed and counted as they are read, decompressed on the fly.

A layer blob is read exactly once: its compressed bytes are hashed (the blob's digest)
and counted against its declared size, its decompressed bytes are hashed (the layer's
`diff_id`) and counted against the size limits, so that an archive that decompresses
without end is stopped after the limit, not after the disk is full. Compression is told
by the stream's first bytes: gzip (zlib), zstd (pyarrow's codec) or none.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Callable
from typing import BinaryIO, Protocol

import pyarrow as pa

from .image import ImageError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 256 * 1024


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Reader:
    """What gzip and pyarrow ask of a file object besides `read`."""

    closed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


class CountingReader(_Reader):
    """Hashes (sha256) and counts the bytes read from `raw`; raises the error `over(n)`
    returns as soon as more than `limit` bytes have been read. `on_read(n)` is told of
    every chunk (progress)."""

    def __init__(self, raw: Readable, limit: int, over: Callable[[int], ImageError],
                 on_read: Callable[[int], None] | None = None):
        self.raw, self.limit, self.over, self.on_read = raw, limit, over, on_read
        self.count = 0
        self.error: ImageError | None = None
        self._hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:  # to the end, still counted chunk by chunk
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        data = self.raw.read(n)
        if data:
            self.count += len(data)
            if self.count > self.limit:
                self.error = self.over(self.count)
                raise self.error
            self._hash.update(data)
            if self.on_read:
                self.on_read(len(data))
        return data

    def drain(self) -> None:
        """Read to the end (the hash covers every byte, tar padding and all)."""
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class _Prefixed(_Reader):
    """`head` (already read to tell the compression), then the rest of `rest`."""

    def __init__(self, head: bytes, rest: Readable):
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                data, self.head = self.head + self.rest.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.rest.read(n)


class _Arrow:
    """A pyarrow input stream as a Python reader."""

    def __init__(self, stream: pa.NativeFile):
        self.stream = stream

    def read(self, n: int = -1) -> bytes:
        return self.stream.read(n if n is not None and n >= 0 else CHUNK)


def decompressed(raw: CountingReader, label: str) -> tuple[Readable, str]:
    """The decompressed view of a blob, and the compression's name ('gzip', 'zstd', 'none')."""
    head = raw.read(4)
    source = _Prefixed(head, raw)
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=source, mode="rb"), "gzip"  # type: ignore[arg-type]
    if head.startswith(ZSTD_MAGIC):
        if not pa.Codec.is_available("zstd"):
            raise ImageError(f"{label} is zstd-compressed and this pyarrow has no zstd codec; "
                             "re-export the image with gzip or uncompressed layers")
        return _Arrow(pa.CompressedInputStream(pa.PythonFile(source, mode="r"), "zstd")), "zstd"
    return source, "none"


DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile, pa.ArrowException)


def open_counted(raw: BinaryIO, label: str, *, compressed_limit: int, limit: Callable[[], int],
                 over: Callable[[int, int], ImageError],
                 on_read: Callable[[int], None] | None = None) -> tuple[CountingReader, CountingReader, str]:
    """(compressed reader, decompressed reader, compression) for one layer blob. The
    compressed side may not exceed `compressed_limit` (its declared size); the
    decompressed side stops past `limit()` bytes, with the error `over(count, limit)`."""
    outer = CountingReader(raw, compressed_limit, lambda n: ImageError(
        f"{label} is larger than the {compressed_limit} bytes its descriptor declares"), on_read)
    inner_source, kind = decompressed(outer, label)
    bound = limit()
    inner = CountingReader(inner_source, bound, lambda n: over(n, bound))
    return outer, inner, kind
