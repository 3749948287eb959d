"""Where files live: `file://` folders and `s3://` buckets behind one pyarrow filesystem.

pyarrow ignores the usual S3 endpoint variables, so an S3 filesystem (and the boto3
client used for batch deletes and presigned URLs) is always built explicitly from
`Settings`. Errors from pyarrow, boto3 and the store become `StorageError` here, with
the URI in the message. Every operation on the store retries transient failures (refused,
reset, timed out, 5xx, throttled) with backoff and jitter for `Settings.store_retry_s`
(`retried`, `cluster/retry.py`); a store away for longer raises `StoreUnavailableError`.

On S3, deletes go through boto3's `DeleteObjects`: pyarrow's `delete_file` leaves an
empty directory marker behind, one more object for every reader to skip.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from proctor.settings import Settings

from .retry import StoreUnavailable, is_transient, retrying

T = TypeVar("T")


class StorageError(OSError):
    """A store could not be reached, read or written. Caught by the CLI, the executor and
    the aggregator, which report it with the URI. `transient`: the store was away or busy
    (refused, reset, timed out, 5xx, throttled), so the same call may succeed later."""

    transient: bool = False


class StoreUnavailableError(StorageError, StoreUnavailable):
    """A store stayed away through a whole retry window (`Settings.store_retry_s`). The
    aggregator spills what it was writing to its outbox; others report it as any
    `StorageError`."""

    transient = True


@dataclass(frozen=True)
class StoredFile:
    """A file under a listed prefix."""

    uri: str
    size: int


@contextlib.contextmanager
def storage_errors(action: str, uri: str) -> Iterator[None]:
    """Turn pyarrow/boto errors raised inside into `StorageError("cannot <action> <uri>: …")`."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageError(f"cannot {action} {uri}: not found (no such file, folder or bucket)") from exc
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise _error(f"cannot {action} {uri}: {exc}", exc) from exc
    except Exception as exc:
        if type(exc).__module__.startswith(("botocore", "boto3")):
            raise _error(f"cannot {action} {uri}: {exc}", exc) from exc
        raise


def _error(message: str, cause: BaseException) -> StorageError:
    error = StorageError(message)
    error.transient = is_transient(cause)
    return error


def retried(action: str, uri: str, settings: Settings, call: Callable[[], T]) -> T:
    """`call()` under `storage_errors(action, uri)`, again on each transient failure
    (with backoff and jitter) for up to `settings.store_retry_s`; then raises
    `StoreUnavailableError`. Other `StorageError`s are raised at once."""

    def once() -> T:
        with storage_errors(action, uri):
            return call()

    def unavailable(exc: BaseException, waited: float) -> StorageError:
        return StoreUnavailableError(f"{exc} (the store did not answer for {waited:.0f}s of retries)")

    return retrying(once, settings.store_retry_s, unavailable=unavailable)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem(uri: str, settings: Settings) -> tuple[pafs.FileSystem, str]:
    """The filesystem for `uri` and the path inside it. Plain paths are local files.

    Raises `StorageError` for an unsupported scheme or an S3 URI without a bucket."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme else uri
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3 URI needs a bucket: s3://bucket/prefix")
        return _s3_filesystem(*_s3_key(settings)), f"{parsed.netloc}{parsed.path}".rstrip("/")
    raise StorageError(f"{uri}: unsupported scheme {parsed.scheme!r}; use file:// or s3://")


def _s3_key(settings: Settings) -> tuple[str | None, str, str | None, str | None]:
    return settings.s3_endpoint_url, settings.s3_region, settings.s3_access_key_id, settings.s3_secret_access_key


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str, key: str | None, secret: str | None) -> pafs.S3FileSystem:
    options: dict[str, Any] = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
    if key and secret:
        options.update(access_key=key, secret_key=secret)
    return pafs.S3FileSystem(
        region=region,
        allow_bucket_creation=False,
        allow_bucket_deletion=False,
        background_writes=True,  # uploads of a part overlap with encoding the next
        connect_timeout=5,
        request_timeout=15,  # a stalled connection is an error to retry, not a hang
        **options,
    )


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str, key: str | None, secret: str | None) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=key, aws_secret_access_key=secret,
        config=Config(signature_version="s3v4", retries={"max_attempts": 1, "mode": "standard"},  # ours: `retried`
                      connect_timeout=5, read_timeout=15,
                      s3={"addressing_style": "path" if endpoint else "auto"}),  # as pyarrow does
    )


def _bucket_key(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def list_files(uri: str, settings: Settings) -> list[StoredFile]:
    """Every file under the folder/prefix `uri`, recursively, sorted by URI; [] when
    there is none. Raises `StorageError` (e.g. a missing bucket)."""
    fs, path = filesystem(uri, settings)
    base = uri.rstrip("/")

    def listing() -> list[pafs.FileInfo]:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        if not infos and is_s3(uri) and fs.get_file_info(path.split("/")[0]).type == pafs.FileType.NotFound:
            raise StorageError(f"cannot list {uri}: bucket {path.split('/')[0]!r} does not exist; create it "
                               "or fix the results URI")
        return infos

    infos = retried("list", uri, settings, listing)
    return sorted(
        (StoredFile(base + i.path[len(path):], i.size or 0) for i in infos if i.type == pafs.FileType.File),
        key=lambda f: f.uri,
    )


def delete(uri: str, settings: Settings) -> None:
    """Delete the file or the folder (everything under the prefix) at `uri`. A missing
    one is not an error: deleting is idempotent. Raises `StorageError`."""
    fs, path = filesystem(uri, settings)
    info = retried("delete", uri, settings, lambda: fs.get_file_info(path))
    with storage_errors("delete", uri):
        if is_s3(uri):
            if info.type == pafs.FileType.File:
                delete_files([uri], settings)
            elif info.type == pafs.FileType.Directory:
                files = [f.uri for f in list_files(uri, settings)]
                delete_files([*files, uri.rstrip("/") + "/"], settings)  # and its marker, if any
        elif info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)


def delete_files(uris: list[str], settings: Settings) -> None:
    """Delete these files (S3: in batches of 1,000 keys); missing ones are skipped."""
    local = [u for u in uris if not is_s3(u)]
    for uri in local:
        fs, path = filesystem(uri, settings)
        with storage_errors("delete", uri), contextlib.suppress(FileNotFoundError):
            fs.delete_file(path)  # local: nothing transient to retry
    by_bucket: dict[str, list[str]] = {}
    for uri in uris:
        if is_s3(uri):
            bucket, key = _bucket_key(uri)
            if key.strip("/"):
                by_bucket.setdefault(bucket, []).append(key)
    client = _s3_client(*_s3_key(settings)) if by_bucket else None
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            answer = retried("delete", f"s3://{bucket}/{batch[0]}", settings, functools.partial(
                client.delete_objects, Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}))
            if answer.get("Errors"):
                err = answer["Errors"][0]
                raise StorageError(f"cannot delete s3://{bucket}/{err['Key']}: {err.get('Code')}: "
                                   f"{err.get('Message')} ({len(answer['Errors'])} keys failed)")


def move(src_uri: str, dst_uri: str, settings: Settings) -> None:
    """Rename a file (atomic on a local filesystem; a copy and a delete on S3)."""
    fs, src = filesystem(src_uri, settings)
    _, dst = filesystem(dst_uri, settings)

    def moving() -> None:
        if not is_s3(dst_uri):
            fs.create_dir(dst.rpartition("/")[0], recursive=True)
        elif fs.get_file_info(src).type == pafs.FileType.NotFound and \
                fs.get_file_info(dst).type == pafs.FileType.File:
            return  # moved by an attempt whose answer was lost
        fs.move(src, dst)

    retried("move", f"{src_uri} to {dst_uri}", settings, moving)


def read_bytes(uri: str, settings: Settings, limit: int = 1024**3) -> bytes:
    fs, path = filesystem(uri, settings)

    def reading() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read(limit + 1)

    data = retried("read", uri, settings, reading)
    if len(data) > limit:
        raise StorageError(f"{uri} is larger than {limit} bytes")
    return data


def write_bytes(uri: str, data: bytes, settings: Settings) -> None:
    """Write a whole file atomically: a temp file and a rename locally, one PUT on S3."""
    fs, path = filesystem(uri, settings)

    def writing() -> None:
        if is_s3(uri):
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        parent, _, name = path.rpartition("/")
        fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{name}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)

    retried("write", uri, settings, writing)


def presigned_url(uri: str, settings: Settings, expires_s: int = 3600) -> str | None:
    """A URL that downloads the S3 object at `uri` without credentials for `expires_s`
    seconds; None for a local file (serve it another way). Raises `StorageError`."""
    if not is_s3(uri):
        filesystem(uri, settings)  # rejects unknown schemes
        return None
    bucket, key = _bucket_key(uri)
    if not bucket or not key:
        raise StorageError(f"{uri}: a presigned URL needs an object: s3://bucket/key")
    with storage_errors("presign", uri):
        return _s3_client(*_s3_key(settings)).generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(expires_s))


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])
