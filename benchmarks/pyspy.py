"""Sampling profiles with py-spy (`ray[serve]` installs it), shared by the benchmarks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("ui/", "proctor/", "serve_app/", "cluster/", "eval_actors/")


def py_spy(pid: int, seconds: float, out: Path, rate: int = 50) -> subprocess.Popen | None:
    """py-spy recording `pid` for `seconds` into `out` (collapsed stacks), in the
    background; None (and a note on stderr) when py-spy is not installed."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("  py-spy is not installed: no profile", file=sys.stderr, flush=True)
        return None
    return subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate), "--format",
                             "raw", "-o", str(out), "--nonblocking"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def hottest(path: Path, n: int = 10) -> dict[str, list[tuple[str, float]]]:
    """From py-spy's collapsed stacks: the leaf functions (self), the project's functions
    by inclusive share of the samples, and every function by inclusive share."""
    total, leaf, mine, every = 0, Counter(), Counter(), Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        c = int(count)
        total += c
        frames = []
        for frame in stack.split(";"):
            if not frame.startswith(("process ", "thread ")):
                fn, _, where = frame.partition(" (")
                frames.append((fn, where.rsplit(":", 1)[0]))
        if frames:
            fn, where = frames[-1]
            leaf[f"{fn} ({'/'.join(where.split('/')[-2:])})"] += c
        for name in {f"{fn} ({where.removeprefix(str(ROOT) + '/')})" for fn, where in frames
                     if "/lib/python" not in where and any(f"/{d}" in f"/{where}" for d in PROJECT)}:
            mine[name] += c
        for name in {f"{fn} ({'/'.join(where.split('/')[-2:])})" for fn, where in frames}:
            every[name] += c
    share = lambda cnt: [(k, v / total) for k, v in cnt.most_common(n)] if total else []  # noqa: E731
    return {"self": share(leaf), "project, inclusive": share(mine), "all, inclusive": share(every),
            "samples": [("samples", float(total))]}
