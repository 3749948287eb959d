"""The artifacts a shard's sandbox declares: checked, read and kept, apart from any sandbox.

A sandbox names files of its workspace in `artifact` events. Each name is checked against
the spec's `sandbox.artifacts` patterns (a plain relative path under a sample's folder);
the file is then read from the workspace without following a symlink (a local runtime:
the host shares the workspace), or put together from the pieces its events carry inline
(a pod: the host cannot read it) and kept only if they add up to the size and SHA-256 its
first piece declared. Every artifact is bounded (`MAX_ARTIFACT_BYTES`, and
`MAX_ARTIFACTS_TOTAL` a shard), one file per name, and scanned by the policy's cleanup
stage: a flagged one is quarantined, never published. What is refused becomes a
`Rejection`, never an exception: the sandbox's words are untrusted input.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from proctor.protocol import MAX_ARTIFACT_BYTES, ArtifactEvent, Rejection
from safety.scan import OutputScan
from safety.violations import Violation

MAX_ARTIFACTS_TOTAL = 64 * 1024**2
MAX_LEFT_BEHIND = 32  # files per pattern collected after a safety stop


@dataclass
class InlinePieces:
    """An inline artifact arriving in pieces: what its first event declared, and the bytes so far."""

    path: str
    size: int
    sha256: str
    data: bytearray = field(default_factory=bytearray)
    received: int = 0
    dropped: bool = False  # refused at its first piece (too large): the rest is counted, not kept


@dataclass
class ArtifactCollector:
    """What one shard's artifacts came to: kept, quarantined (flagged by the cleanup scan)
    and refused (appended to `rejections`, which the shard's outcome shares).

    `workspace` is the host's view of the sandbox's workspace, or None when the host
    cannot read it (the content then comes inline). `scan` checks each kept artifact and
    `report` hears what it found (the shard's guard); both may be set once the sandbox runs."""

    patterns: Sequence[str]
    workspace: Path | None
    rejections: list[Rejection] = field(default_factory=list)
    scan: OutputScan | None = None
    report: Callable[[Violation], None] | None = None
    artifacts: list[tuple[str, bytes]] = field(default_factory=list)
    quarantined: list[tuple[str, bytes]] = field(default_factory=list)
    kept_bytes: int = 0
    inline: InlinePieces | None = None  # the inline artifact being put together from its pieces

    def collect(self, event: ArtifactEvent) -> None:
        """Keep, quarantine or refuse the artifact (or piece of one) that `event` reports."""
        problem = artifact_name_problem(event.path, self.patterns)
        if problem is not None:
            self._refuse(f"artifact {str(event.path)[:200]!r}: {problem}")
            return
        if self.workspace is None:
            self._collect_inline(event)
        else:
            self._collect_file(self.workspace, event.path)

    def collect_left_behind(self) -> None:
        """After a safety stop: the declared artifacts the sandbox left in its workspace but
        was killed before reporting (evidence for the quarantine), with the same bounds and
        no symlinks followed. Nothing when the host cannot read the workspace."""
        if self.workspace is None:
            return
        kept = {path for path, _ in (*self.artifacts, *self.quarantined)}
        for pattern in self.patterns:
            for path in sorted(self.workspace.glob(f"*/{pattern}"))[:MAX_LEFT_BEHIND]:
                rel = str(path.relative_to(self.workspace))
                if rel not in kept and not path.is_symlink():
                    problem = artifact_name_problem(rel, self.patterns)
                    if problem is not None:
                        self._refuse(f"artifact {rel[:200]!r}: {problem}")
                    else:
                        self._collect_file(self.workspace, rel)
                    kept.add(rel)

    def finish(self) -> None:
        """The shard has ended: an inline artifact still missing pieces is refused."""
        if self.inline is not None and not self.inline.dropped:
            self._reject_inline("arrived incomplete")
        self.inline = None

    def room(self) -> int:
        """Bytes the shard's next artifact may have."""
        return min(MAX_ARTIFACT_BYTES, MAX_ARTIFACTS_TOTAL - self.kept_bytes)

    def _refuse(self, reason: str) -> None:
        self.rejections.append(Rejection(reason, "", 0))

    def _collect_file(self, workspace: Path, named: str) -> None:
        try:
            fd = open_beneath(workspace, Path(named))
        except OSError as exc:
            self._refuse(f"artifact {named!r}: {exc.strerror}")
            return
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # checked before fdopen, which raises on a folder
            os.close(fd)
            self._refuse(f"artifact {named!r} is not a regular file")
            return
        with os.fdopen(fd, "rb") as f:
            data = f.read(self.room() + 1)
        self._keep(named, data)

    def _collect_inline(self, event: ArtifactEvent) -> None:
        """A piece of an artifact whose content comes in its events. Pieces come in order,
        one artifact at a time; the artifact is kept only if they add up to exactly the
        size and SHA-256 its first event declared."""
        if event.data is None:
            self._refuse(f"artifact {event.path!r} ({event.size} bytes) was not sent inline (over the shard's "
                         "inline budget: 3/8 of its output cap)")
            return
        piece = self.inline
        if event.offset == 0:
            if piece is not None and not piece.dropped:
                self._reject_inline("arrived incomplete")
            piece = self.inline = InlinePieces(event.path, event.size, event.sha256)
            if event.size > self.room():
                self._refuse(f"artifact {event.path!r} is over the size limit")
                piece.dropped = True
        elif piece is None or (piece.path, piece.size, piece.sha256) != (event.path, event.size, event.sha256) \
                or event.offset != piece.received:
            if piece is not None and not piece.dropped:
                self._reject_inline("arrived out of order")
            self.inline = None
            self._refuse(f"artifact {event.path!r}: a piece at offset {event.offset} that follows nothing sent")
            return
        try:
            data: bytes | None = base64.b64decode(event.data, validate=True)
        except ValueError:
            data = None
        if data is None or piece.received + len(data) > piece.size:
            if not piece.dropped:
                self._reject_inline("its content is not base64" if data is None else
                                    "its content does not match its size and SHA-256 (more bytes)")
            self.inline = None
            return
        piece.received += len(data)
        if not piece.dropped:
            piece.data += data
        if piece.received < piece.size:
            return
        self.inline = None
        if piece.dropped:
            return
        if hashlib.sha256(piece.data).hexdigest() != piece.sha256:
            self._refuse(f"artifact {event.path!r}: its content does not match its size and SHA-256")
            return
        self._keep(event.path, bytes(piece.data))

    def _reject_inline(self, why: str) -> None:
        assert self.inline is not None
        self._refuse(f"artifact {self.inline.path!r}: {why}")
        self.inline = None

    def _keep(self, named: str, data: bytes) -> None:
        if len(data) > self.room():
            self._refuse(f"artifact {named!r} is over the size limit")
            return
        path = str(Path(named))
        for kept, _ in (*self.artifacts, *self.quarantined):  # one file per name: no duplicate, no file that is another's folder
            if kept == path or kept.startswith(path + "/") or path.startswith(kept + "/"):
                self._refuse(f"artifact {named!r} clashes with the artifact {kept!r}")
                return
        self.kept_bytes += len(data)
        found = self.scan.check(f"artifact {path!r}", data) if self.scan is not None else []
        if not found:
            self.artifacts.append((path, data))
            return
        self.quarantined.append((path, data))  # the cleanup stage's scan flagged it: kept, never published
        if self.report is not None:
            for v in found:
                self.report(v)


def artifact_name_problem(name: object, patterns: Sequence[str]) -> str | None:
    """Why a sandbox's artifact name cannot be kept (None if it can): a relative path of
    plain parts (no "", ".", "..", control characters), matching `<sample dir>/<pattern>`
    for one of the spec's `sandbox.artifacts` patterns."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        return "not a path of 1 to 1,024 characters"
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return "leaves the workspace or has empty parts"
    if any(ord(c) < 32 or ord(c) == 127 for c in name) or any(len(p.encode()) > 255 for p in parts):
        return "has control characters or a part over 255 bytes"
    if not any(fnmatch.fnmatchcase(name, f"*/{form}") for pattern in patterns for form in _glob_forms(pattern)):
        return "matches none of the spec's sandbox.artifacts patterns"
    return None


@functools.lru_cache(maxsize=256)
def _glob_forms(pattern: str) -> frozenset[str]:
    """`pattern` as fnmatch patterns that together match what `Path.glob` matches with it
    (fnmatch's `*` crosses folders; glob's `**/` may also stand for no folder at all).
    Cached: every artifact event (each inline piece) is checked against the spec's patterns."""
    forms = {pattern}
    while True:
        more = {f.replace("/**/", "/", 1) for f in forms} | {f[3:] for f in forms if f.startswith("**/")}
        if more <= forms:
            return frozenset(forms)
        forms |= more


def open_beneath(root: Path, rel: Path) -> int:
    """A read-only descriptor of `root/rel`, opened one part at a time without following
    any symlink (a sandbox may plant one in a folder of its workspace: O_NOFOLLOW alone
    guards only the last part). Raises OSError."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in rel.parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        return os.open(rel.parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)


def inline_budget(output_cap: int) -> int:
    """Bytes of artifact content a pod may send in its events: 3/8 of its output cap (half
    the cap once base64 has grown them), so that artifacts never stop a shard at its cap."""
    return min(output_cap * 3 // 8, MAX_ARTIFACTS_TOTAL)
