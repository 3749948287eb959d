"""The artifacts a sandbox declares, checked and kept without a sandbox: names, symlinks,
inline pieces, bounds, the cleanup scan and what a stopped shard left behind."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest

from eval_actors.artifacts import (
    MAX_ARTIFACTS_TOTAL,
    ArtifactCollector,
    artifact_name_problem,
    inline_budget,
    open_beneath,
)
from proctor.policy import SafetyPolicy
from proctor.protocol import MAX_ARTIFACT_BYTES, ArtifactEvent
from safety.rules import RuleSet
from safety.scan import OutputScan
from safety.violations import Violation

FAKE_AWS_KEY = "AKIA" + "Z7Q4MXR2LBV6N3PT"  # shaped like one (split so that this file is not itself flagged)


def declared(path: str, data: bytes = b"", inline: bool = False, offset: int = 0, whole: bytes | None = None) -> ArtifactEvent:
    """An artifact event as a harness sends it: a file of the workspace, or (inline) a piece
    of its content starting at `offset` of `whole`."""
    whole = data if whole is None else whole
    return ArtifactEvent(seq=0, path=path, size=len(whole), sha256=hashlib.sha256(whole).hexdigest(), offset=offset,
                         data=base64.b64encode(data).decode() if inline else None)


def reasons(collector: ArtifactCollector) -> str:
    return " | ".join(r.reason for r in collector.rejections)


@pytest.mark.parametrize("name, why", [
    ("0-e1/answer.txt", None),
    ("0-e1/deep/er/notes.log", None),  # "**/*.log" also matches no folder at all, as glob does
    ("0-e1/notes.log", None),
    ("", "1 to 1,024 characters"),
    ("0-e1/../../etc/passwd", "leaves the workspace"),
    ("/etc/passwd", "leaves the workspace"),
    ("0-e1/./answer.txt", "empty parts"),
    ("0-e1//answer.txt", "empty parts"),
    ("0-e1/an\x00swer.txt", "control characters"),
    ("0-e1/a\nb.txt", "control characters"),
    ("0-e1/" + "x" * 300 + ".txt", "over 255 bytes"),
    ("0-e1/secret.key", "matches none of the spec's sandbox.artifacts patterns"),
    ("answer.txt", "matches none"),  # not under a sample's folder
])
def test_artifact_names_a_sandbox_may_report(name: str, why: str | None) -> None:
    problem = artifact_name_problem(name, ["answer.txt", "**/*.log"])
    assert (problem is None) if why is None else (problem is not None and why in problem), problem
    assert artifact_name_problem("0-e1/answer.txt", []) is not None  # none declared: none kept


def test_artifacts_are_read_without_following_a_planted_symlink(tmp_path: Path) -> None:
    """The workspace is the sandbox's: a symlinked folder in it must not lead the host's
    reader out (O_NOFOLLOW alone guards only the last part of the path)."""
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "secret.txt").write_text("host secret")
    ws = tmp_path / "ws"
    (ws / "0-e1" / "real").mkdir(parents=True)
    (ws / "0-e1" / "real" / "answer.txt").write_text("4")
    (ws / "0-e1" / "link").symlink_to(outside)
    os.close(open_beneath(ws, Path("0-e1/real/answer.txt")))
    with pytest.raises(OSError):
        open_beneath(ws, Path("0-e1/link/secret.txt"))

    collector = ArtifactCollector(["**/*.txt"], ws)
    for path in ("0-e1/real/answer.txt", "0-e1/link/secret.txt", "0-e1/real/answer.txt"):
        collector.collect(declared(path))
    assert collector.artifacts == [("0-e1/real/answer.txt", b"4")]
    why = reasons(collector)
    assert "'0-e1/link/secret.txt'" in why and "clashes with the artifact '0-e1/real/answer.txt'" in why


def test_a_workspace_artifact_must_be_a_regular_file_under_the_size_limit(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "0-e1" / "folder.txt").mkdir(parents=True)
    os.mkfifo(ws / "0-e1" / "pipe.txt")  # opened without blocking, refused without a read
    (ws / "0-e1" / "big.txt").write_bytes(b"x" * (MAX_ARTIFACT_BYTES + 1))
    (ws / "0-e1" / "ok.txt").write_bytes(b"fine")
    collector = ArtifactCollector(["*.txt"], ws)
    for name in ("folder.txt", "pipe.txt", "big.txt", "missing.txt", "ok.txt"):
        collector.collect(declared(f"0-e1/{name}"))
    assert collector.artifacts == [("0-e1/ok.txt", b"fine")] and collector.kept_bytes == 4
    why = reasons(collector)
    assert "'0-e1/pipe.txt' is not a regular file" in why and "'0-e1/big.txt' is over the size limit" in why
    assert "'0-e1/missing.txt': No such file or directory" in why and "'0-e1/folder.txt'" in why


def test_an_inline_artifact_is_kept_only_if_it_matches_what_it_declares() -> None:
    collector = ArtifactCollector(["*.txt", "*.bin"], None)
    good = b"evidence"
    forged = ArtifactEvent(seq=0, path="0-e1/forged.txt", size=len(good),
                           sha256=hashlib.sha256(b"something else").hexdigest(), data=base64.b64encode(good).decode())
    short = ArtifactEvent(seq=0, path="0-e1/short.txt", size=3, sha256=hashlib.sha256(good).hexdigest(),
                          data=base64.b64encode(good).decode())
    junk = ArtifactEvent(seq=0, path="0-e1/junk.txt", size=1, sha256="0" * 64, data="not base64!")
    for e in (declared("0-e1/ok.txt", good, inline=True), short, forged, junk,
              declared("../escape.txt", good, inline=True)):
        collector.collect(e)
    assert collector.artifacts == [("0-e1/ok.txt", good)]
    why = reasons(collector)
    assert why.count("does not match its size and SHA-256") == 2 and "not base64" in why
    assert "leaves the workspace" in why

    # a larger artifact comes in pieces, in order, one artifact at a time
    content = bytes(range(256)) * 10

    def piece(path: str, offset: int, length: int, whole: bytes = content) -> ArtifactEvent:
        return declared(path, whole[offset:offset + length], inline=True, offset=offset, whole=whole)

    collector.rejections.clear()
    steps = [piece("0-e1/whole.bin", 0, 1000), piece("0-e1/whole.bin", 1000, 1000), piece("0-e1/whole.bin", 2000, 560),
             piece("0-e1/gap.bin", 0, 1000), piece("0-e1/gap.bin", 1500, 1000),  # a piece skipped
             piece("0-e1/cut.bin", 0, 1000), piece("0-e1/next.bin", 0, 2560),  # cut.bin never finished
             piece("0-e1/empty.bin", 0, 0, whole=b""),
             piece("0-e1/tail.bin", 0, 1000)]  # still incomplete when the shard ends
    for e in steps:
        collector.collect(e)
    assert dict(collector.artifacts) == {"0-e1/ok.txt": good, "0-e1/whole.bin": content, "0-e1/next.bin": content,
                                         "0-e1/empty.bin": b""}
    why = reasons(collector)
    assert "'0-e1/gap.bin': arrived out of order" in why and "a piece at offset 1500" in why
    assert "'0-e1/cut.bin': arrived incomplete" in why
    assert collector.inline is not None and collector.inline.path == "0-e1/tail.bin"
    collector.finish()  # the shard ended: the unfinished one is refused
    assert collector.inline is None and reasons(collector).endswith("artifact '0-e1/tail.bin': arrived incomplete")

    # one over the size limit is refused once, at its first piece; the rest of it is ignored
    collector.rejections.clear()
    collector.kept_bytes = MAX_ARTIFACTS_TOTAL - 1000
    for offset in (0, 1000, 2000):
        collector.collect(piece("0-e1/large.bin", offset, 1000))
    collector.collect(piece("0-e1/large.bin", 3000, 1000))
    collector.finish()  # a refused one is not refused again
    assert [r.reason for r in collector.rejections] == ["artifact '0-e1/large.bin' is over the size limit",
                                                        "artifact '0-e1/large.bin': a piece at offset 3000 that "
                                                        "follows nothing sent"]


def test_an_artifact_sent_without_its_content_is_refused_when_it_must_come_inline() -> None:
    collector = ArtifactCollector(["*.txt"], None)
    collector.collect(declared("0-e1/big.txt", b"x" * 10))
    assert collector.artifacts == [] and "(10 bytes) was not sent inline" in reasons(collector)


def test_the_cleanup_scan_quarantines_a_flagged_artifact_and_reports_it(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "0-e1").mkdir(parents=True)
    (ws / "0-e1" / "notes.txt").write_text(f"the key: {FAKE_AWS_KEY}\n")
    (ws / "0-e1" / "answer.txt").write_text("4")
    policy = SafetyPolicy()
    reported: list[Violation] = []
    collector = ArtifactCollector(["*.txt"], ws, scan=OutputScan(policy, RuleSet.of(policy)), report=reported.append)
    collector.collect(declared("0-e1/notes.txt"))
    collector.collect(declared("0-e1/answer.txt"))
    assert collector.artifacts == [("0-e1/answer.txt", b"4")]
    assert [path for path, _ in collector.quarantined] == ["0-e1/notes.txt"]
    assert [(v.monitor, v.rule) for v in reported] == [("cleanup", "secret-aws-access-key")]
    collector.collect(declared("0-e1/notes.txt"))  # a quarantined name is taken too
    assert "clashes with the artifact '0-e1/notes.txt'" in reasons(collector)


def test_what_a_stopped_shard_left_behind_is_collected_with_the_same_checks(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "0-e1").mkdir(parents=True)
    (ws / "0-e1" / "reported.txt").write_text("already kept")
    (ws / "0-e1" / "unreported.txt").write_text("evidence")
    (ws / "0-e1" / "other.log").write_text("not declared")
    (ws / "1-e1").mkdir()
    (ws / "1-e1" / "link.txt").symlink_to(tmp_path)  # never followed
    collector = ArtifactCollector(["*.txt"], ws)
    collector.collect(declared("0-e1/reported.txt"))
    collector.collect_left_behind()
    assert dict(collector.artifacts) == {"0-e1/reported.txt": b"already kept", "0-e1/unreported.txt": b"evidence"}
    assert collector.rejections == []
    inline = ArtifactCollector(["*.txt"], None)  # the host cannot read a pod's workspace: nothing to collect
    inline.collect_left_behind()
    assert inline.artifacts == [] and inline.rejections == []


def test_the_inline_budget_is_three_eighths_of_the_output_cap_within_the_shards_total() -> None:
    assert inline_budget(8 * 1024**2) == 3 * 1024**2
    assert inline_budget(10 * MAX_ARTIFACTS_TOTAL) == MAX_ARTIFACTS_TOTAL
