"""What a sandbox sees: the read-only files the harness needs, and nothing else.

On the host's userland (no image), the root of a local sandbox is an empty skeleton;
onto it go read-only binds of the system's `/usr` (programs and libraries), the Python
installation that runs the harness, the site-packages holding its dependencies, and the
`proctor` package itself. No `/etc` of the host (a generated minimal one instead), no
home folders, no credentials, no host environment.

In a task's image (`injected_layout`), the image is the root and the harness is injected
read-only under `/opt/proctor`: the host's `/usr` at `/opt/proctor/host/usr`, its Python,
dependencies and `proctor` beside it, run through the host's own dynamic loader with an
explicit library path, so the image needs nothing of Proctor's — no Python, not even the
same C library — and the agent's programs are the image's own.
"""

from __future__ import annotations

import compileall
import functools
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import proctor
from proctor.harness.__main__ import ENTRY as HARNESS_ENTRY

SANDBOX_USER = 65534  # nobody: the agent, on the host's own userland
WORKSPACE = "/workspace"
# the generated /etc of a sandbox on the host's userland: the harness is root, the agent nobody
ETC_PASSWD = f"root:x:0:0::/nonexistent:/usr/sbin/nologin\nnobody:x:{SANDBOX_USER}:{SANDBOX_USER}::{WORKSPACE}:/bin/sh\n"
ETC_GROUP = f"root:x:0:\nnogroup:x:{SANDBOX_USER}:\n"
INJECTED = "/opt/proctor"  # everything of Proctor's in an image's sandbox (a mount point every image has)
LIB = "/opt/proctor/lib"
HOST = "/opt/proctor/host"  # where the host's userland is injected into an image


def is_harness(argv: tuple[str, ...] | list[str]) -> bool:
    """Whether `argv` starts the harness (`HarnessLayout.argv`, or `-m proctor.harness`)."""
    return any((a, b) in (("-c", HARNESS_ENTRY), ("-m", "proctor.harness")) for a, b in zip(argv, argv[1:]))


@dataclass(frozen=True)
class HarnessLayout:
    """Read-only binds (host → sandbox), the harness command and its environment."""

    ro_binds: tuple[tuple[str, str], ...]
    python: str
    env: tuple[tuple[str, str], ...]
    launcher: tuple[str, ...] = ()  # what runs the Python (in an image: the host's dynamic loader)

    def argv(self, *args: str) -> tuple[str, ...]:
        # -S skips site (faster start); -B writes no .pyc on a read-only root; -c, not -m,
        # skips runpy's imports (the harness's own `ENTRY`, which `is_harness` recognises)
        return (*self.launcher, self.python, "-S", "-B", "-c", HARNESS_ENTRY, *args)


@functools.lru_cache(maxsize=4)
def harness_layout(unprivileged: bool = False) -> HarnessLayout:
    """The binds that let this machine's Python run `proctor.harness` in a sandbox on the
    host's userland.

    `unprivileged`: the runtime resolves binds as an unprivileged host user (bubblewrap),
    so the Python must be readable by others; when this one is not (a pyenv under /root),
    the system's Python of the same version is used instead.
    """
    base = _python_base(unprivileged)
    binds: list[tuple[str, str]] = [("/usr", "/usr")]
    if Path("/etc/alternatives").is_dir():
        binds.append(("/etc/alternatives", "/etc/alternatives"))  # awk, pager, ... are links through here
    if not str(base).startswith("/usr/"):
        binds.append((str(base), str(base)))
    package_binds, paths = _harness_code(inside=lambda p: p)
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
    return HarnessLayout(tuple(binds + package_binds), python, env)


@functools.lru_cache(maxsize=4)
def injected_layout(unprivileged: bool = False) -> HarnessLayout:
    """The harness injected into an image's root: everything it runs on comes from the
    host, under `HOST`, started by the host's dynamic loader (so the image's own C
    library, or its lack of one, does not matter). Its command's child processes (the
    agent's) run the image's programs, with the environment the harness gives them."""
    base = _python_base(unprivileged)
    python = base / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    loader = Path(_interpreter(python)).resolve()
    binds: list[tuple[str, str]] = [("/usr", HOST + "/usr")]
    if not str(base).startswith("/usr/"):
        binds.append((str(base), HOST + str(base)))
    package_binds, paths = _harness_code(inside=lambda p: HOST + p)
    if not str(loader).startswith("/usr/"):
        raise FileNotFoundError(f"the host's dynamic loader {loader} is not under /usr; images need a merged-/usr host")
    libraries = dict.fromkeys([str(loader.parent), *(str(Path(d).resolve()) for d in _library_dirs()),
                               str(base / "lib")])
    launcher = (HOST + str(loader), "--library-path", ":".join(HOST + d for d in libraries))
    env = (
        ("PYTHONHOME", HOST + str(base)),
        ("PYTHONPATH", ":".join(paths)),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("PYTHONUNBUFFERED", "1"),
        ("LANG", "C.UTF-8"),
    )
    return HarnessLayout(tuple(binds + package_binds), HOST + str(python), env, launcher)


def _python_base(unprivileged: bool) -> Path:
    base = Path(sys.base_prefix).resolve()
    if unprivileged and not others_can_reach(base / "bin"):
        system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
        if not system.exists():
            raise FileNotFoundError(
                f"the Python at {base} is not readable by the sandbox user and there is no {system}; "
                f"install python3 (apt-get install python3) or use the gvisor runtime"
            )
        base = Path("/usr")
    return base


def _harness_code(inside: Callable[[str], str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Binds of the `proctor` package and the harness's dependencies, and the sandbox's
    PYTHONPATH for them; `inside(host path)` is where a path under /usr is seen."""
    package = Path(proctor.__file__).resolve().parent
    # the sandbox's root is read-only: without bytecode on the host every launch recompiles
    compileall.compile_dir(str(package), quiet=1)
    binds = [(str(package), f"{LIB}/proctor")]
    paths = [LIB]
    for i, sp in enumerate(_dependency_dirs()):
        if sp.startswith("/usr/"):
            paths.append(inside(sp))  # already inside the /usr bind
        else:
            binds.append((sp, f"/opt/proctor/site{i}"))
            paths.append(f"/opt/proctor/site{i}")
    return binds, paths


def _library_dirs() -> list[str]:
    """Where the host's C library and its neighbours are (Debian's multiarch folder)."""
    arch = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(os.uname().machine, "")
    return [d for d in (f"/usr/lib/{arch}" if arch else "", "/usr/lib64", "/usr/lib") if d and Path(d).is_dir()]


def _interpreter(program: Path) -> str:
    """The ELF interpreter (dynamic loader) a 64-bit little-endian program names."""
    with program.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise FileNotFoundError(f"{program} is not a 64-bit little-endian ELF program")
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            kind, _flags, offset, _vaddr, _paddr, size = struct.unpack("<IIQQQQ", f.read(40))
            if kind == 3:  # PT_INTERP
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode()
    raise FileNotFoundError(f"{program} names no dynamic loader (a static build cannot be injected)")


def _dependency_dirs() -> list[str]:
    """site-packages folders that hold the harness's dependencies (pydantic, yaml)."""
    import pydantic
    import pydantic_core
    import typing_extensions
    import yaml

    dirs: list[str] = []
    for mod in (pydantic, pydantic_core, yaml, typing_extensions):
        if mod.__file__ is None:  # a namespace package: none of these is one
            raise TypeError(f"{mod.__name__} has no file")
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
