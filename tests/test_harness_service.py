"""The harness's service mode on its own (a process, outside any sandbox): requests run once
and only once however often they are repeated, stdin and file content stream in pieces,
and what it cannot do comes back as a result that says why."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from proctor.requests import PIECE_BYTES

ROOT = Path(__file__).resolve().parent.parent


def converse(tmp_path: Path, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lines = [{"v": 2, "type": "service", "user": "0", "cwd": str(tmp_path)}, *messages]
    body = "".join(json.dumps({"v": 2, **m}) + "\n" for m in lines)
    out = subprocess.run([sys.executable, "-m", "proctor.harness", "--service"], input=body.encode(),
                         capture_output=True, cwd=ROOT, timeout=60).stdout
    return [json.loads(line) for line in out.splitlines()]


def data(rid: str, content: bytes) -> list[dict[str, Any]]:
    pieces = [content[i:i + PIECE_BYTES] for i in range(0, len(content), PIECE_BYTES)] or [b""]
    return [{"type": "data", "id": rid, "data": base64.b64encode(p).decode(), "eof": i == len(pieces) - 1}
            for i, p in enumerate(pieces)]


def results(events: list[dict[str, Any]], rid: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "result" and e["id"] == rid]


def test_a_repeated_request_runs_once(tmp_path: Path) -> None:
    """Repeated while it runs: answered once; repeated after: answered again from what was
    kept; never run twice."""
    proc = subprocess.Popen([sys.executable, "-m", "proctor.harness", "--service"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdin is not None and proc.stdout is not None

    def send(message: dict[str, Any]) -> None:
        proc.stdin.write((json.dumps({"v": 2, **message}) + "\n").encode())
        proc.stdin.flush()

    def until_result(rid: str) -> list[dict[str, Any]]:
        events = []
        while not events or events[-1]["type"] != "result" or events[-1]["id"] != rid:
            events.append(json.loads(proc.stdout.readline()))
        return events

    append = {"type": "exec", "id": "once", "argv": ["sh", "-c", "sleep 0.3; echo ran >> count.txt; cat count.txt"]}
    try:
        send({"type": "service", "user": "0", "cwd": str(tmp_path)})
        send(append)
        send(append)  # while it runs
        first = until_result("once")
        send(append)  # after it ran
        again = until_result("once")
        send({"type": "cancel"})
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    assert (tmp_path / "count.txt").read_text() == "ran\n"
    outputs = [base64.b64decode(e["data"]) for e in first + again if e["type"] == "chunk"]
    assert outputs == [b"ran\n", b"ran\n"]  # the second answer is the one run's, replayed
    assert [e["returncode"] for e in first + again if e["type"] == "result"] == [0, 0]


def test_content_streams_in_pieces_both_ways(tmp_path: Path) -> None:
    content = bytes(range(256)) * (3 * PIECE_BYTES // 256 + 7)  # four pieces
    events = converse(tmp_path, [{"type": "write_file", "id": "w", "path": "deep/er/blob.bin"}, *data("w", content),
                                 {"type": "exec", "id": "e", "argv": ["wc", "-c"], "input": True}, *data("e", content)])
    assert (tmp_path / "deep/er/blob.bin").read_bytes() == content
    wc = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "chunk" and e["id"] == "e")
    assert int(wc) == len(content)
    read = converse(tmp_path, [{"type": "read_file", "id": "r", "path": "deep/er/blob.bin"}])
    pieces = [base64.b64decode(e["data"]) for e in read if e["type"] == "chunk"]
    assert len(pieces) == 4 and b"".join(pieces) == content
    assert results(read, "r")[0]["size"] == len(content)


def test_what_cannot_be_done_says_why(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 2048)
    events = converse(tmp_path, [
        {"type": "read_file", "id": "missing", "path": "nope.txt"},
        {"type": "read_file", "id": "folder", "path": "."},
        {"type": "read_file", "id": "big", "path": "big", "limit": 1024},
        {"type": "exec", "id": "user", "argv": ["true"], "user": "no-such-user"},
        {"type": "exec", "id": "prog", "argv": ["/no/such/program"]},
        {"type": "exec", "id": "slow", "argv": ["sleep", "30"], "timeout_s": 0.5},
        {"type": "exec", "id": "x" * 300, "argv": ["true"]},  # refused: not a request at all
    ])
    kinds = {rid: results(events, rid)[0] for rid in ("missing", "folder", "big", "user", "prog", "slow")}
    assert kinds["missing"]["error"] == "not_found" and "nope.txt" in kinds["missing"]["message"]
    assert kinds["folder"]["error"] == "is_a_directory"
    assert kinds["big"]["error"] == "too_large"
    assert kinds["user"]["error"] == "unknown_user" and "no-such-user" in kinds["user"]["message"]
    assert kinds["prog"]["returncode"] == 127
    assert kinds["slow"]["timed_out"] is True
    assert any(e["type"] == "log" and "ignored a line" in e["message"] for e in events)
