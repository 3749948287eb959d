"""`inspect view` (Inspect AI's log viewer) serving a log folder, as a user starts it, for
tests that fetch its listing over HTTP."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from ports import free_port


class InspectView:
    """`inspect view start --log-dir DIR --port P` in a subprocess; `logs()` is its listing."""

    def __init__(self, log_dir: str | Path, start_timeout_s: float = 120.0):
        self.log_dir = str(log_dir)
        self.start_timeout_s = start_timeout_s
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> InspectView:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        inspect = shutil.which("inspect", path=str(Path(sys.executable).parent))
        assert inspect, "Inspect AI's `inspect` command is not installed beside this Python"
        self.proc = subprocess.Popen([inspect, "view", "start", "--log-dir", self.log_dir, "--port", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"{self.url}/api/logs", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "inspect view did not answer"
            time.sleep(0.5)

    def logs(self) -> list[dict[str, Any]]:
        """The logs it lists: [{name, task, task_id, ...}]."""
        r = httpx.get(f"{self.url}/api/logs", timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["files"]

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc.stderr.close()
