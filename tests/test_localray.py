"""cluster/localray.py without Ray: what proves a session is the recorded cluster's, and
that `stop` ends that session's processes and nothing else (tests/test_platform.py runs
it with a real `proctor up` beside the session's Ray cluster)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import localray
from cluster.localray import LocalHead, LocalRayError


def _session(*argv: str) -> subprocess.Popen[bytes]:
    """A sleeper leading a session of its own, with `argv` on its command line."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *argv], start_new_session=True)


def _head(proc: subprocess.Popen[bytes], ray_session: str) -> LocalHead:
    return LocalHead(proc.pid, ray_session, localray._boot_id(), 1, 2)


def test_stop_ends_the_recorded_session_and_nothing_else() -> None:
    ours, other = _session("--session-name=session_ours"), _session("--session-name=session_other")
    try:
        time.sleep(0.3)  # their command lines are written
        head = _head(ours, "session_ours")
        assert localray.processes(head) == [ours.pid]
        assert localray.stop(head) == 1
        assert ours.wait(5) == -9 and other.poll() is None
        assert localray.processes(head) == [] and localray.stop(head) == 0
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()


def test_a_record_that_proves_nothing_stops_nothing() -> None:
    """A session whose processes do not carry the recorded Ray session (another program's,
    after a reboot or a reused id), or another boot's record: nothing is signalled."""
    proc = _session("--session-name=session_other")
    try:
        time.sleep(0.3)
        assert localray.stop(_head(proc, "session_ours")) == 0
        assert localray.stop(LocalHead(proc.pid, "session_other", "another-boot", 1, 2)) == 0
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("data", [{}, {"session": "x"}, {"session": 1, "ray_session": "s", "boot_id": "b"}, []])
def test_a_damaged_record_reads_as_none(data: object) -> None:
    assert LocalHead.from_dict(data) is None  # type: ignore[arg-type]


def test_a_temp_dir_too_long_for_rays_sockets_is_refused_before_anything_starts(tmp_path: Path) -> None:
    long = tmp_path / ("x" * localray.MAX_TEMP_DIR)
    with pytest.raises(LocalRayError, match="sockets"):
        localray.start("/nonexistent/ray", 1, 2, long, {})


def test_rays_error_is_shown_without_its_traceback() -> None:
    err = ('Traceback (most recent call last):\n  File "node.py", line 440, in __init__\n    raise Exception(\n'
           "Exception: The current node timed out during startup.\n")
    assert localray._last_error(err) == "Exception: The current node timed out during startup."
