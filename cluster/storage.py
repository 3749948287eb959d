"""Where files live: `file://` folders and `s3://` buckets behind one pyarrow filesystem.

pyarrow ignores the usual S3 endpoint variables, so an S3 filesystem is always built
explicitly from `Settings`. Errors from pyarrow and the store become `StorageError`.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from proctor.settings import Settings


class StorageError(OSError):
    """A store could not be reached, read or written. Caught by the CLI and the executor,
    which report it with the URI."""


def filesystem(uri: str, settings: Settings) -> tuple[pafs.FileSystem, str]:
    """The filesystem for `uri` and the path inside it. Plain paths are local files."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme else uri
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3 URI needs a bucket: s3://bucket/prefix")
        fs = pafs.S3FileSystem(
            endpoint_override=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key=settings.s3_access_key_id,
            secret_key=settings.s3_secret_access_key,
            scheme=urlparse(settings.s3_endpoint_url).scheme if settings.s3_endpoint_url else "https",
            allow_bucket_creation=False,
        )
        return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
    raise StorageError(f"{uri}: unsupported scheme {parsed.scheme!r}; use file:// or s3://")


def read_bytes(uri: str, settings: Settings, limit: int = 1024**3) -> bytes:
    fs, path = filesystem(uri, settings)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read(limit + 1)
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from exc
    if len(data) > limit:
        raise StorageError(f"{uri} is larger than {limit} bytes")
    return data


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])
