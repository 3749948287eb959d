"""Store faults without Ray: transient errors told apart, bounded retries, and the outbox
(cluster/retry.py, cluster/storage.py, cluster/outbox.py). The store is the session's moto
S3 server behind a real TCP fault proxy (tests/faultproxy.py) that refuses, resets and
stalls connections."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from cluster.outbox import Outbox
from cluster.retry import backoff_s, is_transient, retrying
from cluster.storage import StorageError, StoreUnavailableError, list_files, read_bytes, write_bytes
from faultproxy import FaultProxy
from proctor.settings import Settings


@pytest.fixture
def proxy(s3_server) -> Iterator[FaultProxy]:  # noqa: ANN001 - MotoS3Server
    target = urlparse(s3_server.endpoint)
    with FaultProxy((target.hostname or "127.0.0.1", target.port or 80)) as p:
        yield p


@pytest.fixture
def settings(s3_server, proxy: FaultProxy, tmp_path: Path) -> Settings:  # noqa: ANN001
    """S3 through the proxy, a fresh prefix, a home for the outbox; retries for 1.5 s."""
    return s3_server.settings(f"faults-{uuid.uuid4().hex[:8]}", s3_endpoint_url=proxy.endpoint, home=tmp_path,
                              store_retry_s=1.5)


# ------------------------------------------------------------ telling errors apart


def test_transient_errors_are_told_apart_from_permanent_ones() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    transient = [
        ConnectionRefusedError(), ConnectionResetError(), TimeoutError(),
        OSError("When uploading part for key 'a' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                "UploadPart operation: curlCode: 7, Couldn't connect to server"),
        OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate."),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        client_error(503, "SlowDown"), client_error(500, "InternalError"), client_error(429, "Throttling"),
    ]
    permanent = [
        FileNotFoundError("no such file"), PermissionError("denied"), ValueError("bad"),
        OSError("AWS Error NO_SUCH_BUCKET during ListObjects operation: The specified bucket does not exist"),
        client_error(403, "AccessDenied"), client_error(404, "NoSuchKey"),
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)
    wrapped = StorageError("cannot write s3://b/k")
    wrapped.__cause__ = ConnectionResetError()
    assert is_transient(wrapped)


def test_retrying_backs_off_with_jitter_until_its_window_then_says_the_store_is_away() -> None:
    now = [0.0]
    pauses: list[float] = []

    def sleep(s: float) -> None:
        pauses.append(s)
        now[0] += s

    calls = []

    def refused() -> None:
        calls.append(now[0])
        raise ConnectionRefusedError("refused")

    with pytest.raises(RuntimeError, match="away after") as info:
        retrying(refused, 30.0, unavailable=lambda exc, waited: RuntimeError(f"away after {waited:.0f}s"),
                 sleep=sleep, clock=lambda: now[0], rand=lambda: 1.0)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert pauses[:5] == [0.4, 0.8, 1.6, 3.2, 5.0] and max(pauses) == 5.0  # capped
    assert sum(pauses) <= 30.0 and len(calls) == len(pauses) + 1
    assert backoff_s(3, rand=lambda: 0.5) == 0.8  # full jitter: a share of the exponential

    flaky = iter([ConnectionResetError(), ConnectionResetError(), "ok"])

    def answer() -> str:
        item = next(flaky)
        if isinstance(item, Exception):
            raise item
        return item

    assert retrying(answer, 30.0, unavailable=lambda e, w: RuntimeError(), sleep=sleep, clock=lambda: now[0]) == "ok"
    with pytest.raises(FileNotFoundError):  # not retried: raised at once
        retrying(lambda: (_ for _ in ()).throw(FileNotFoundError("x")), 30.0, unavailable=lambda e, w: RuntimeError(),
                 sleep=lambda s: pytest.fail("slept on a permanent error"))


# ------------------------------------------------------------ storage through faults


@pytest.mark.parametrize("mode", ["refuse", "reset"])
def test_a_storage_operation_rides_out_an_outage_shorter_than_its_retry_window(
        mode: str, s3_server, proxy: FaultProxy, tmp_path: Path) -> None:  # noqa: ANN001
    settings = s3_server.settings(f"faults-{uuid.uuid4().hex[:8]}", s3_endpoint_url=proxy.endpoint,
                                  home=tmp_path, store_retry_s=20)
    uri = f"{settings.results}/a.txt"
    timer = proxy.outage(2.0, mode)  # type: ignore[arg-type]
    write_bytes(uri, b"kept", settings)
    timer.join()
    assert read_bytes(uri, settings) == b"kept"
    assert [f.uri for f in list_files(settings.results, settings)] == [uri]
    assert proxy.reset + proxy.accepted > 0  # the outage was seen


@pytest.mark.parametrize("mode", ["refuse", "reset", "stall"])
def test_a_store_away_past_the_retry_window_is_unavailable_and_transient(
        mode: str, settings: Settings, proxy: FaultProxy, s3_server) -> None:  # noqa: ANN001
    if mode == "stall":  # a stalled request ends at the request timeout, then is retried
        settings = settings.model_copy(update={"store_retry_s": 0.5})
    proxy.set_mode(mode)  # type: ignore[arg-type]
    uri = f"{settings.results}/never.txt"
    with pytest.raises(StoreUnavailableError, match="did not answer") as info:
        write_bytes(uri, b"x", settings)
    assert info.value.transient and isinstance(info.value, StorageError)
    proxy.set_mode("pass")
    assert s3_server.client().list_objects_v2(Bucket=s3_server.bucket,
                                              Prefix=uri.split("/", 3)[3]).get("KeyCount") == 0


def test_a_missing_bucket_is_not_retried(s3_server, proxy: FaultProxy, tmp_path: Path) -> None:  # noqa: ANN001
    settings = s3_server.settings(home=tmp_path, s3_endpoint_url=proxy.endpoint, store_retry_s=60,
                                  results_uri="s3://no-such-bucket-here/x")
    with pytest.raises(StorageError) as info:
        list_files(settings.results, settings)
    assert not info.value.transient and not isinstance(info.value, StoreUnavailableError)
    assert "no-such-bucket-here" in str(info.value)


# ------------------------------------------------------------ the outbox


def test_the_outbox_keeps_writes_while_the_store_is_away_and_writes_them_in_order_once_it_returns(
        settings: Settings, proxy: FaultProxy, s3_server) -> None:  # noqa: ANN001
    box = Outbox.from_settings(settings)
    a, b = f"{settings.results}/eval_id=e1/a.bin", f"{settings.results}/eval_id=e1/b.bin"
    proxy.set_mode("refuse")
    box.put(a, b"first", "e1")
    box.put(b, b"other", "e1")
    box.put(a, b"second", "e1")  # a later write of the same file: the store ends with this one
    away = box.drain()
    assert (away.written, away.waiting) == (0, 3) and "did not answer" in (away.error or "")
    status = box.status()
    assert status["degraded"] and status["waiting"] == 3 and status["evaluations"] == ["e1"]

    restarted = Outbox.from_settings(settings)  # another process (a restarted aggregator)
    assert [e.uri for e in restarted.entries()] == [a, b, a]
    proxy.set_mode("pass")
    back = restarted.drain()
    assert (back.written, back.waiting, back.error) == (3, 0, None)
    assert read_bytes(a, settings) == b"second" and read_bytes(b, settings) == b"other"
    assert restarted.entries() == [] and not restarted.status()["degraded"]
    assert restarted.drain().written == 0  # nothing twice


def test_an_entry_whose_write_reached_the_store_but_was_not_deleted_is_written_again_harmlessly(
        settings: Settings) -> None:
    box = Outbox.from_settings(settings)
    uri = f"{settings.results}/eval_id=e2/part.bin"
    entry = box.put(uri, b"rows", "e2")
    write_bytes(uri, b"rows", settings)  # as if a drain wrote it and died before deleting the entry
    assert box.drain().written == 1 and not entry.path.exists()
    assert read_bytes(uri, settings) == b"rows"
    assert [f.uri for f in list_files(settings.results, settings)] == [uri]


def test_concurrent_drains_write_each_entry_and_leave_none(settings: Settings) -> None:
    box = Outbox.from_settings(settings)
    uris = [f"{settings.results}/eval_id=e3/{i}.bin" for i in range(12)]
    for i, uri in enumerate(uris):
        box.put(uri, str(i).encode(), "e3")
    results = []
    threads = [threading.Thread(target=lambda: results.append(Outbox.from_settings(settings).drain()))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.written for r in results) == 12 and box.entries() == []
    assert [read_bytes(u, settings) for u in uris] == [str(i).encode() for i in range(12)]


def test_the_outbox_is_bounded_and_says_so(settings: Settings) -> None:
    box = Outbox.from_settings(settings.model_copy(update={"store_spill_max_bytes": 1000}))
    box.put(f"{settings.results}/x", b"a" * 500, "e4")
    with pytest.raises(StorageError, match="store_spill_max_bytes"):
        box.put(f"{settings.results}/y", b"b" * 600, "e4")
    assert [e.uri for e in box.entries()] == [f"{settings.results}/x"]


def test_a_damaged_entry_stops_the_drain_with_an_error_naming_it(settings: Settings) -> None:
    box = Outbox.from_settings(settings)
    first = box.put(f"{settings.results}/eval_id=e5/one", b"12345", "e5")
    box.put(f"{settings.results}/eval_id=e5/two", b"678", "e5")
    header = json.loads(first.path.read_bytes().split(b"\n", 1)[0])
    first.path.write_bytes(json.dumps(header).encode() + b"\n" + b"12")  # cut short on disk
    drained = box.drain()
    assert drained.written == 0 and drained.waiting == 2
    assert str(first.path) in (drained.error or "") and "damaged" in (drained.error or "")
    assert list_files(settings.results, settings) == []  # nothing written out of order


def test_proctor_results_sync_writes_what_waits_and_says_what_still_waits(
        settings: Settings, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`proctor results sync` (through the `proctor.sync` entry point: reinstall after adding it)."""
    from proctor.cli import EXIT_OK, EXIT_STORAGE, main

    for name in ("home", "results_uri", "s3_endpoint_url", "s3_access_key_id", "s3_secret_access_key",
                 "store_retry_s"):
        monkeypatch.setenv(f"PROCTOR_{name.upper()}", str(getattr(settings, name)))
    uri = f"{settings.results}/eval_id=e6/_summary.json"
    Outbox.from_settings(settings).put(uri, b"{}", "e6")
    proxy.set_mode("refuse")
    assert main(["results", "sync"]) == EXIT_STORAGE
    assert "0 writes reached the results store; 1 still wait in" in capsys.readouterr().err
    proxy.set_mode("pass")
    assert main(["results", "sync", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == {"written": 1, "waiting": 0, "error": None,
                                                   "folder": str(settings.outbox_dir)}
    assert read_bytes(uri, settings) == b"{}"


def test_retargeted_entries_keep_their_order_and_bytes_and_go_to_their_new_place(settings: Settings) -> None:
    """A safety-stopped shard's parts that wait for the store go to the quarantine prefix."""
    box = Outbox.from_settings(settings)
    part = f"{settings.results}/eval_id=e7/part-s1-a2-00000.parquet"
    other = f"{settings.results}/eval_id=e7/part-s2-a2-00000.parquet"
    box.put(part, b"stopped", "e7")
    box.put(other, b"fine", "e7")
    quarantine = f"{settings.results}/_quarantine/eval_id=e7/s1/part-s1-a2-00000.parquet"
    assert box.retarget("e7", lambda uri: quarantine if uri == part else None) == 1
    assert [e.uri for e in box.entries()] == [quarantine, other]
    assert box.drain().written == 2
    assert read_bytes(quarantine, settings) == b"stopped" and read_bytes(other, settings) == b"fine"
    assert sorted(f.uri for f in list_files(settings.results, settings)) == sorted([quarantine, other])
