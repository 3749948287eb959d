"""The self-contained harness bundle: what a Kubernetes pod injects into a task's image.

A pod cannot bind the host's `/usr` into its container, so the harness travels as a
folder of its own: this machine's dynamic loader and the C libraries its Python needs
(`lib/`), that Python (`bin/python3`) and its standard library (`lib/python3.X/`), and the
`proctor` package with the harness's dependencies (`site/`). Started through the bundle's
own loader with an explicit library path, as `layout.injected_layout` starts the host's,
it runs in any Linux image of the same architecture: no Python, no C library, nothing of
Proctor's needed in the image.

The bundle image (`docker/Dockerfile.bundle`) holds it at `BUNDLE_ROOT`; the pod's init
container copies it into an emptyDir that the task's container mounts read-only at
`layout.INJECTED` (`podspec.py`). `python -m cluster.runtimes.bundle DEST` builds it.

Standard library and `proctor` only (the bundle image's build stage has nothing else).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BUNDLE_ROOT = "/proctor-harness"  # where the bundle image holds it
LOADER = "lib/ld.so"  # the dynamic loader, whatever the host called it
PYTHON = "bin/python3"
SITE = "site"
# the harness's imports beyond the standard library (pydantic's own dependencies included)
PACKAGES = ("proctor", "pydantic", "pydantic_core", "yaml", "typing_extensions", "annotated_types",
            "typing_inspection")
STDLIB_LEFT_OUT = {"test", "site-packages", "dist-packages", "idlelib", "tkinter", "turtledemo", "ensurepip",
                   "lib2to3", "pydoc_data", "__phello__"}
DYNLOAD_LEFT_OUT = ("_tkinter", "_curses", "readline", "_test", "xxlimited", "_xxtestfuzz", "_ctypes_test")


@dataclass(frozen=True)
class BundleCommand:
    """How to start the bundle's Python where the bundle sits at `root`."""

    root: str

    @property
    def launcher(self) -> tuple[str, ...]:
        return (f"{self.root}/{LOADER}", "--library-path", f"{self.root}/lib")

    @property
    def python(self) -> str:
        return f"{self.root}/{PYTHON}"

    @property
    def env(self) -> tuple[tuple[str, str], ...]:
        return (("PYTHONHOME", self.root), ("PYTHONPATH", f"{self.root}/{SITE}"), ("PYTHONDONTWRITEBYTECODE", "1"),
                ("PYTHONUNBUFFERED", "1"), ("LANG", "C.UTF-8"))

    def argv(self, *args: str) -> list[str]:
        # -S: no site (faster, and nothing of the image's); -B: no .pyc on a read-only root
        return [*self.launcher, self.python, "-S", "-B", *args]

    def copy_to(self, dest: str) -> list[str]:
        """The command that copies the bundle from `root` to `dest` with nothing but itself."""
        return self.argv("-c", "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2], symlinks=True, "
                               "dirs_exist_ok=True)", self.root, dest)


def build_bundle(dest: Path) -> Path:
    """Build the bundle from the running Python into `dest` (made; it must not exist).
    Raises `FileExistsError`, `FileNotFoundError` (no dynamic loader, a package missing)."""
    from .layout import _interpreter

    dest = Path(dest)
    dest.mkdir(parents=True)
    base = Path(sys.base_prefix).resolve()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = (base / "bin" / version).resolve()
    stdlib = base / "lib" / version
    (dest / "bin").mkdir()
    (dest / "lib").mkdir()
    shutil.copy2(python, dest / PYTHON)
    loader = Path(_interpreter(python)).resolve()
    shutil.copy2(loader, dest / LOADER)
    dynload = [p for p in (stdlib / "lib-dynload").glob("*.so") if not p.name.startswith(DYNLOAD_LEFT_OUT)]
    _copy_tree(stdlib, dest / "lib" / version, skip=STDLIB_LEFT_OUT | {"lib-dynload"},
               also_skip_prefix="config-")
    (dest / "lib" / version / "lib-dynload").mkdir()
    for so in dynload:
        shutil.copy2(so, dest / "lib" / version / "lib-dynload" / so.name)
    site = dest / SITE
    site.mkdir()
    native = [python, *dynload]
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise FileNotFoundError(f"the harness bundle needs {name!r}: {exc}") from None
        source = Path(module.__file__ or "").resolve()
        if source.name == "__init__.py":
            # with its bytecode: on a read-only root, every start would compile it again
            _copy_tree(source.parent, site / name, skip=set())
            native += list((site / name).rglob("*.so"))
        else:
            shutil.copy2(source, site / source.name)
    for soname, path in _libraries(loader, native).items():
        shutil.copy2(path, dest / "lib" / soname)
    return dest


def _copy_tree(source: Path, dest: Path, skip: set[str], also_skip_prefix: str | None = None) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        if Path(folder) != source:
            return set()
        return {n for n in names if n in skip or (also_skip_prefix is not None and n.startswith(also_skip_prefix))}

    shutil.copytree(source, dest, ignore=ignore, symlinks=False)


def _libraries(loader: Path, programs: list[Path]) -> dict[str, str]:
    """soname → host path of every shared library `programs` load, as the loader resolves them."""
    found: dict[str, str] = {}
    for program in programs:
        out = subprocess.run([str(loader), "--list", str(program)], capture_output=True, text=True,
                             env={"PATH": os.defpath}, check=False).stdout
        for line in out.splitlines():
            name, arrow, rest = line.strip().partition(" => ")
            if arrow and rest.startswith("/") and "/" not in name:
                found.setdefault(name, rest.split(" (")[0])
    return found


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m cluster.runtimes.bundle DEST\n")
        return 2
    try:
        build_bundle(Path(args[0]))
    except OSError as exc:  # the folder exists, a package or the loader is missing, a copy failed
        sys.stderr.write(f"harness bundle: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
