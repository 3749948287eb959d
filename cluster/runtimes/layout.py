"""What a sandbox sees: the read-only files the harness needs, and nothing else.

The root of every local sandbox is an empty skeleton; onto it go read-only binds of
the system's `/usr` (programs and libraries), the Python installation that runs the
harness, the site-packages holding its dependencies, and the `proctor` package itself.
No `/etc` of the host (a generated minimal one instead), no home folders, no
credentials, no host environment.
"""

from __future__ import annotations

import compileall
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import proctor

SANDBOX_USER = 65534  # nobody
WORKSPACE = "/workspace"
LIB = "/opt/proctor/lib"


@dataclass(frozen=True)
class HarnessLayout:
    """Read-only binds (host → sandbox), the harness command and its environment."""

    ro_binds: tuple[tuple[str, str], ...]
    python: str
    env: tuple[tuple[str, str], ...]

    def argv(self, *args: str) -> tuple[str, ...]:
        # -S skips site (faster start); -B writes no .pyc on a read-only root
        return (self.python, "-S", "-B", "-m", "proctor.harness", *args)


@functools.lru_cache(maxsize=4)
def harness_layout(unprivileged: bool = False) -> HarnessLayout:
    """The binds that let this machine's Python run `proctor.harness` in a sandbox.

    `unprivileged`: the runtime resolves binds as the sandbox user (bubblewrap), so the
    Python must be readable by others; when this one is not (a pyenv under /root), the
    system's Python of the same version is used instead.
    """
    base = Path(sys.base_prefix).resolve()
    if unprivileged and not others_can_reach(base / "bin"):
        system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
        if not system.exists():
            raise FileNotFoundError(
                f"the Python at {base} is not readable by the sandbox user and there is no {system}; "
                f"install python3 (apt-get install python3) or use the gvisor runtime"
            )
        base = Path("/usr")
    binds: list[tuple[str, str]] = [("/usr", "/usr")]
    if Path("/etc/alternatives").is_dir():
        binds.append(("/etc/alternatives", "/etc/alternatives"))  # awk, pager, ... are links through here
    if not str(base).startswith("/usr/"):
        binds.append((str(base), str(base)))
    package = Path(proctor.__file__).resolve().parent
    # the sandbox's root is read-only: without bytecode on the host every launch recompiles
    compileall.compile_dir(str(package), quiet=1)
    binds.append((str(package), f"{LIB}/proctor"))
    paths = [LIB]
    for i, sp in enumerate(_dependency_dirs()):
        if sp.startswith("/usr/"):
            paths.append(sp)  # already inside the /usr bind
        else:
            binds.append((sp, f"/opt/proctor/site{i}"))
            paths.append(f"/opt/proctor/site{i}")
    python = str(base / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")
    env = (
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("HOME", WORKSPACE),
        ("LANG", "C.UTF-8"),
        ("PYTHONPATH", ":".join(paths)),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("PYTHONUNBUFFERED", "1"),
        ("TMPDIR", "/tmp"),
    )
    return HarnessLayout(tuple(binds), python, env)


def _dependency_dirs() -> list[str]:
    """site-packages folders that hold the harness's dependencies (pydantic, yaml)."""
    import pydantic
    import pydantic_core
    import typing_extensions
    import yaml

    dirs: list[str] = []
    for mod in (pydantic, pydantic_core, yaml, typing_extensions):
        f = Path(mod.__file__).resolve()
        d = str(f.parent.parent if f.name == "__init__.py" else f.parent)
        if d not in dirs:
            dirs.append(d)
    return dirs


def others_can_reach(path: Path) -> bool:
    """Whether a user with no special rights can reach `path` (every folder above has o+x)."""
    path = path.resolve()
    for p in (path, *path.parents):
        try:
            if not p.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True
