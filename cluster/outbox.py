"""The outbox: results that wait on local disk while their store is away.

When the results store stays away through a whole retry window, the aggregator puts what
it was writing (a Parquet part, an artifact, a log file, a summary) here instead: one file
per write, named so that names sort in the order the writes were made, written to a
temporary name, fsync'd and renamed, so that an entry is either whole or absent after a
crash of the aggregator, the platform or the host. Every later write goes here too while
entries wait, so that the store receives the writes in the order they were made.

`drain` writes the entries to the store oldest first and deletes each one once the store
has it; it stops at the first that the store refuses (it is still away) and leaves that
one and the rest for later. A write that reached the store but whose entry was not yet
deleted is written again: every entry puts whole bytes at a fixed URI, so writing it twice
leaves the store as writing it once. Drains (the aggregator's loop, `proctor results
sync`) take a file lock, one at a time.

The outbox is bounded (`Settings.store_spill_max_bytes`): a write that would pass the bound
raises `StorageError` and is not kept.

Layout: `<home>/outbox/<time ns:020d>-<pid>-<n:06d>.entry`, a JSON header line
`{"uri", "eval_id", "bytes", "at"}` and then the bytes.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proctor.settings import Settings

from .storage import StorageError, write_bytes

SUFFIX = ".entry"


@dataclass(frozen=True)
class Entry:
    """One write waiting for the store."""

    path: Path
    uri: str
    eval_id: str
    size: int
    at: float  # when it was spilled (epoch seconds)


@dataclass(frozen=True)
class Drained:
    """What a drain did: entries written, entries still waiting, and why it stopped."""

    written: int
    waiting: int
    error: str | None = None


class Outbox:
    """A bounded, ordered, crash-safe queue of writes for the results store."""

    def __init__(self, folder: Path, settings: Settings,
                 write: Callable[[str, bytes], None] | None = None) -> None:
        self.folder = folder
        self.settings = settings
        self.max_bytes = settings.store_spill_max_bytes
        self.write = write or (lambda uri, data: write_bytes(uri, data, settings))
        self._names = threading.Lock()
        self._last_ns = 0
        self._n = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Outbox:
        return cls(settings.outbox_dir, settings)

    def put(self, uri: str, data: bytes, eval_id: str) -> Entry:
        """Keep one write, durably. Raises `StorageError` when it would pass the bound."""
        used = self.size_bytes()
        if used + len(data) > self.max_bytes:
            raise StorageError(f"cannot spill {uri}: the outbox {self.folder} holds {used} bytes and may hold "
                               f"{self.max_bytes} (store_spill_max_bytes); the results store has been away "
                               "too long for this machine's disk")
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = Entry(self.folder / f"{self._name()}{SUFFIX}", uri, eval_id, len(data), time.time())
        _write_entry(entry, data)
        _fsync_dir(self.folder)
        return entry

    def entries(self, eval_id: str | None = None) -> list[Entry]:
        """The waiting writes, oldest first (of one evaluation if `eval_id`). An entry that
        cannot be read (damaged on disk) is skipped, never written."""
        found = []
        for path in self._paths():
            header = _header(path)
            if header is not None and (eval_id is None or header["eval_id"] == eval_id):
                found.append(Entry(path, header["uri"], header["eval_id"], header["bytes"], header["at"]))
        return found

    def waiting(self) -> bool:
        """Whether any write waits (cheap: names only)."""
        return bool(self._paths())

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._paths() if p.exists())

    def status(self) -> dict[str, Any]:
        """What `/health`, the metrics and the dashboard show: degraded while writes wait."""
        entries = self.entries()
        return {"degraded": bool(entries), "waiting": len(entries), "bytes": sum(e.size for e in entries),
                "since": min((e.at for e in entries), default=None), "folder": str(self.folder),
                "evaluations": sorted({e.eval_id for e in entries})}

    def drain(self) -> Drained:
        """Write the waiting entries oldest first; stop at the first the store refuses.
        Raises nothing: a store error is in `Drained.error`."""
        written = 0
        with self._locked():
            entries = self.entries()
            for i, entry in enumerate(entries):
                try:
                    data = _payload(entry.path)
                    if data is None:
                        continue  # deleted by a drain that held the lock before us
                    self.write(entry.uri, data)
                except StorageError as exc:
                    return Drained(written, len(entries) - i, str(exc))
                entry.path.unlink(missing_ok=True)
                written += 1
            if written:
                _fsync_dir(self.folder)
        return Drained(written, 0)

    def retarget(self, eval_id: str, where: Callable[[str], str | None]) -> int:
        """Send waiting writes of `eval_id` elsewhere: each entry whose URI `where` maps to
        a new URI keeps its place in the order and its bytes, with the new URI (a
        safety-stopped shard's spilled parts go to quarantine, never to the results).
        Returns how many were retargeted."""
        moved = 0
        with self._locked():
            for entry in self.entries(eval_id):
                target = where(entry.uri)
                data = _payload(entry.path) if target is not None else None
                if target is None or data is None:
                    continue
                _write_entry(Entry(entry.path, target, eval_id, len(data), entry.at), data)
                moved += 1
            if moved:
                _fsync_dir(self.folder)
        return moved

    def _paths(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))

    def _name(self) -> str:
        with self._names:  # strictly increasing within a process; the pid parts processes
            self._last_ns = max(time.time_ns(), self._last_ns + 1)
            self._n += 1
            return f"{self._last_ns:020d}-{os.getpid()}-{self._n % 1_000_000:06d}"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _write_entry(entry: Entry, data: bytes) -> None:
    """Write (or replace) one entry whole: a temporary name, fsync'd, then renamed."""
    header = json.dumps({"uri": entry.uri, "eval_id": entry.eval_id, "bytes": len(data), "at": entry.at})
    tmp = entry.path.with_name(f".tmp-{entry.path.name}")
    with open(tmp, "wb") as f:
        f.write(header.encode() + b"\n")
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, entry.path)


def _header(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline(64 * 1024))
    except (OSError, ValueError):
        return None
    ok = isinstance(header, dict) and isinstance(header.get("uri"), str) and isinstance(header.get("bytes"), int) \
        and isinstance(header.get("eval_id"), str) and isinstance(header.get("at"), int | float)
    return header if ok else None


def _payload(path: Path) -> bytes | None:
    """The entry's bytes, or None if it is gone. Raises `StorageError` for a damaged one."""
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline(64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StorageError(f"the outbox entry {path} cannot be read: {exc}") from exc
    if len(data) != header.get("bytes"):
        raise StorageError(f"the outbox entry {path} is damaged: {len(data)} bytes, its header says "
                           f"{header.get('bytes')}; move it aside to go on")
    return data


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync() -> dict[str, Any]:
    """`proctor results sync` (entry point `proctor.sync: outbox`): drain this machine's
    outbox now. Returns what was written and what still waits."""
    from proctor.settings import load_settings

    box = Outbox.from_settings(load_settings())
    drained = box.drain()
    return {"written": drained.written, "waiting": drained.waiting, "error": drained.error,
            "folder": str(box.folder)}
