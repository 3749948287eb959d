"""`proctor image …`: the image store from the shell (import, build, list, inspect, tag,
export, rm, gc). Registered with the `proctor` CLI through the `proctor.commands` entry-point
group. Exit codes as `proctor.cli` documents: 2 for a refused archive or recipe, a
missing image or an image in use (nothing changed), 4 when the store cannot be written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cluster.storage import StorageError
from proctor.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_STORAGE, print_json
from proctor.settings import SettingsError, load_settings

from .image import Image, ImageError
from .store import ImageStore


def register(sub: Any) -> None:
    image = sub.add_parser("image", help="task images: import, build, list, inspect, tag, export, rm, gc")
    cmds = image.add_subparsers(dest="image_command", metavar="COMMAND")
    cmds.required = True
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", help="machine-readable output")

    p = cmds.add_parser("import", parents=[js], help="import an OCI image layout (folder or tar) or a docker save archive")
    p.add_argument("file")
    p.add_argument("--name", help="a name for the image (name or name:tag), besides those the archive gives")
    p.add_argument("--strip-setuid", action="store_true", help="remove setuid/setgid bits instead of refusing them")
    p.set_defaults(func=_guarded(_import))

    p = cmds.add_parser("build", parents=[js], help="build an image from a recipe (Debian packages via mmdebstrap)")
    p.add_argument("recipe")
    p.set_defaults(func=_guarded(_build))

    p = cmds.add_parser("list", parents=[js], help="the stored images")
    p.set_defaults(func=_guarded(_list))

    p = cmds.add_parser("inspect", parents=[js], help="one image: digest, names, config, root filesystem")
    p.add_argument("ref", help="name[:tag], sha256:<digest> (12 digits are enough) or name@sha256:<digest>")
    p.set_defaults(func=_guarded(_inspect))

    p = cmds.add_parser("tag", parents=[js], help="give an image one more name")
    p.add_argument("ref")
    p.add_argument("name")
    p.set_defaults(func=_guarded(_tag))

    p = cmds.add_parser("export", parents=[js], help="write an image as an OCI layout tar (flattened to one layer)")
    p.add_argument("ref")
    p.add_argument("file")
    p.set_defaults(func=_guarded(_export))

    p = cmds.add_parser("rm", parents=[js], help="remove a name (and the image with its last name), or an image "
                        "by digest; refused while a sandbox uses it")
    p.add_argument("ref")
    p.set_defaults(func=_guarded(_rm))

    p = cmds.add_parser("gc", parents=[js], help="delete images without a name that no sandbox uses")
    p.set_defaults(func=_guarded(_gc))


def _guarded(command: Callable[[ImageStore, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(ImageStore.from_settings(load_settings()), args)
        except (ImageError, SettingsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except (StorageError, OSError) as exc:
            print(f"error: the image store could not be written: {exc}", file=sys.stderr)
            return EXIT_STORAGE
    return run


def _import(store: ImageStore, args: argparse.Namespace) -> int:
    with _progress(args, "import") as (on_progress, _):
        image = store.import_archive(args.file, name=args.name, strip_setuid=args.strip_setuid,
                                     on_progress=on_progress)
    return _done(image, args, "imported")


def _build(store: ImageStore, args: argparse.Namespace) -> int:
    with _progress(args, "build") as (on_progress, on_line):
        image = store.build(args.recipe, on_progress=on_progress, on_line=on_line)
    return _done(image, args, "built")


def _list(store: ImageStore, args: argparse.Namespace) -> int:
    images = store.list()
    if args.json:
        print_json([i.to_json() for i in images])
        return EXIT_OK
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("names", "digest", "size", "created", "source"):
        table.add_column(column)
    for i in images:
        table.add_row(", ".join(i.names) or "(none)", i.short_id, _size(i.size_bytes),
                      i.created.strftime("%Y-%m-%d %H:%M"), i.source)
    _console().print(table if images else "no images")
    return EXIT_OK


def _inspect(store: ImageStore, args: argparse.Namespace) -> int:
    image = store.resolve(args.ref)
    if args.json:
        print_json(image.to_json())
        return EXIT_OK
    c = image.config
    rows = [("digest", image.digest), ("names", ", ".join(image.names) or "(none)"), ("size", _size(image.size_bytes)),
            ("created", image.created.isoformat()), ("imported", image.imported_at.isoformat()),
            ("source", image.source), ("platform", f"{c.os}/{c.architecture}"), ("user", c.user or "(root)"),
            ("workdir", c.working_dir or "/"), ("entrypoint", " ".join(c.entrypoint or ()) or "-"),
            ("cmd", " ".join(c.cmd or ()) or "-"), ("env", " ".join(f"{k}={v}" for k, v in c.env) or "-"),
            ("layers", str(len(image.layers))), ("setuid stripped", str(image.setuid_stripped)),
            ("rootfs", str(image.rootfs))]
    for key, value in rows:
        print(f"{key:<16}{value}")
    return EXIT_OK


def _tag(store: ImageStore, args: argparse.Namespace) -> int:
    return _done(store.tag(args.ref, args.name), args, "tagged")


def _export(store: ImageStore, args: argparse.Namespace) -> int:
    digest = store.export(args.ref, args.file)
    if args.json:
        print_json({"file": args.file, "digest": digest})
    else:
        print(f"exported {args.ref} to {args.file} as {digest} (one layer: a new digest)")
    return EXIT_OK


def _rm(store: ImageStore, args: argparse.Namespace) -> int:
    removal = store.remove(args.ref)
    if args.json:
        print_json({"untagged": list(removal.names), "deleted": removal.deleted})
    else:
        for name in removal.names:
            print(f"untagged {name}")
        if removal.deleted:
            print(f"deleted {removal.deleted}")
    return EXIT_OK


def _gc(store: ImageStore, args: argparse.Namespace) -> int:
    removed = store.gc()
    if args.json:
        print_json({"deleted": removed})
    else:
        print("\n".join(f"deleted {d}" for d in removed) or "nothing to delete")
    return EXIT_OK


def _done(image: Image, args: argparse.Namespace, verb: str) -> int:
    if args.json:
        print_json(image.to_json())
    else:
        names = ", ".join(image.names) or "(no name)"
        print(f"{verb} {names} {image.digest} ({_size(image.size_bytes)}, {len(image.layers)} "
              f"layer{'s' * (len(image.layers) != 1)})")
    return EXIT_OK


@contextmanager
def _progress(args: argparse.Namespace, what: str) -> Iterator[tuple[Any, Any]]:
    """(on_progress, on_line) that drive a progress bar when stdout is a terminal."""
    if args.json or not sys.stdout.isatty():
        yield None, None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("building" if what == "build" else "unpacking", total=None)

        def on_line(line: str) -> None:
            if line.startswith("proctor-step: "):
                bar.update(task, description=line.removeprefix("proctor-step: ")[:60])

        yield (lambda done, total: bar.update(task, completed=done, total=total)), on_line


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _console() -> Any:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=1000)
