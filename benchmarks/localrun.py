"""What the benchmarks that run real gVisor sandboxes through the local driver share: a
folder of their own in the system's temp folder (never Proctor's home), removed after
them, the settings that point there, and a gVisor runtime in it."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cluster.runtimes import GvisorRuntime
from proctor.settings import Settings


@contextlib.contextmanager
def gvisor_folder() -> Iterator[tuple[Settings, GvisorRuntime]]:
    root = Path(tempfile.mkdtemp(prefix="proctor-bench-"))
    try:
        root.chmod(0o711)  # the sandbox user must reach its workspace
        yield Settings(home=root, results_uri=(root / "results").as_uri()), GvisorRuntime(root / "gvisor")
    finally:
        shutil.rmtree(root, ignore_errors=True)
