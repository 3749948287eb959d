"""The syscall monitor (`safety/syscalls.py`) on trace lines shaped as gVisor's strace
writes them, with task names the sandbox chooses. The red-team suite runs it on real
gVisor logs (tests/test_red_team.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from safety.syscalls import READ_CHUNK, SyscallMonitor

PREFIX = "I1127 04:16:33.123456  4242 strace.go:567] [   7:   9] "
CONNECT = "E connect(0x3 socket:[5], 0x7ffd41c0 {Family: AF_INET, Addr: 1.1.1.1, Port: 443}, 0x10)"


def monitor(log: Path) -> SyscallMonitor:
    return SyscallMonitor(log, ["connect", "socket", "ptrace", "openat"], "stop", canaries=[".aws/credentials"])


@pytest.mark.parametrize("comm", ["python3", "a b", "a E x(", "E x(", "x" * 15, "E connect(", " "])
def test_no_task_name_hides_the_call_after_it(comm: str, tmp_path: Path) -> None:
    v = monitor(tmp_path / "log").parse(PREFIX + f"{comm} " + CONNECT)
    assert v is not None and v.rule == "connect", comm


def test_a_name_holding_a_newline_does_not_hide_the_call(tmp_path: Path) -> None:
    m = monitor(tmp_path / "log")
    assert m.parse(PREFIX + "ab") is None  # the name's first part, on the traced line
    v = m.parse("cd " + CONNECT)  # the rest of it, on a line of its own
    assert v is not None and v.rule == "connect"


@pytest.mark.parametrize("line", [
    PREFIX + "python3 E connect(0x3 socket:[5], 0x7ffd {Family: AF_UNIX, Addr: \"/var/run/nscd/socket\"}, 0x6e)",
    PREFIX + "python3 X connect(0x3 socket:[5], 0x7ffd {Family: AF_INET, Addr: 1.1.1.1, Port: 443}, 0x10) = 0",
    "I1127 04:16:33.123456  4242 boot.go:12] starting: E connect(Family: AF_INET)",  # runsc's own words
    PREFIX + "python3 E openat(0xffffff9c /workspace/0-e1/out.txt, O_WRONLY|O_CREAT, 0o644)",
    PREFIX + "python3 E read(0x3, 0x7ffd, 0x1000)",
])
def test_ordinary_lines_are_not_violations(line: str, tmp_path: Path) -> None:
    assert monitor(tmp_path / "log").parse(line) is None


def test_canary_reads_and_writes_outside_are_seen(tmp_path: Path) -> None:
    m = monitor(tmp_path / "log")
    canary = m.parse(PREFIX + "cat E openat(0xffffff9c /workspace/0-e1/.aws/credentials, O_RDONLY, 0o0)")
    outside = m.parse(PREFIX + "sh E openat(0xffffff9c /etc/cron.d/x, O_WRONLY|O_CREAT|O_TRUNC, 0o644)")
    assert canary is not None and canary.rule == "canary-read"
    assert outside is not None and outside.rule == "write-outside"


def test_the_sweep_reads_to_the_end_of_the_log(tmp_path: Path) -> None:
    """A sandbox that floods the log just before its last call: the sweep still reads it."""
    log = tmp_path / "log"
    filler = (PREFIX + "python3 E read(0x3, 0x7ffd, 0x1000)\n").encode()
    log.write_bytes(filler * (3 * READ_CHUNK // len(filler)) + (PREFIX + "python3 " + CONNECT + "\n").encode())
    m = monitor(log)

    async def go() -> tuple[list, list]:
        return await m.check(), await m.drain()

    first, rest = asyncio.run(go())
    assert first == [] and [v.rule for v in rest] == ["connect"]
