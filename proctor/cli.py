"""The `proctor` command.

Exit codes a script can rely on:
  0  done, and the evaluation (if any) succeeded (`status`: or is still queued or running)
  1  an evaluation ran and failed, was cancelled or safety-stopped
  2  bad input: an invalid spec, setting or argument (nothing was changed)
  3  no sandbox runtime can run here (nothing was run)
  4  a store could not be read or written
  5  the platform's API could not be reached, or could not answer (down, 5xx, rate limited),
     or `proctor up` could not bring the platform up
  6  the API refused the token (missing, unknown, revoked: 401) or its role (403)
  130 interrupted
  141 the reader of stdout went away (`proctor results ... | head`): output stops quietly,
     as a Unix tool killed by SIGPIPE

The commands that talk to a running platform over HTTP (`submit`, `list`, `status`,
`logs`, `stop`, `results`, `token`) are in `commands.py`, through `proctor.Client`.
Commands that need the platform's internals (`run`, `up`, `down`) are contributed by the
lower layers through the `proctor.commands` entry-point group, so this module imports
nothing of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import entry_points
from typing import TypeAlias

from .spec import SpecError, load_spec, spec_json_schema

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NO_RUNTIME, EXIT_STORAGE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_UNAVAILABLE, EXIT_DENIED = 5, 6
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(spec_json_schema(), indent=2))
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        if args.json:
            print(json.dumps({"valid": False, "errors": [{"field": f, "reason": r} for f, r in exc.errors]}))
        else:
            print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps({"valid": True, "name": spec.name}))
    else:
        print(f"{args.spec}: valid evaluation spec {spec.name!r}")
    return EXIT_OK


# what `add_subparsers` gives, where each command registers its parser (argparse names it only privately)
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proctor", description="Evaluate AI models for dangerous capabilities, safely.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("schema", help="print the JSON Schema of an evaluation spec")
    p.set_defaults(func=_schema)
    p = sub.add_parser("validate", help="check an evaluation spec (YAML or JSON)")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_validate)
    from . import commands

    commands.register(sub)
    for ep in sorted(entry_points(group="proctor.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The program (`argv` None: it also configures this process's logs), or one command
    for a caller that passes `argv` (and keeps its own logging)."""
    args = build_parser().parse_args(argv)
    if argv is None:
        _configure_logs()
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, not at exit: a reader that went away is handled below
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE


def _drop_stdout() -> None:
    """The reader of stdout has gone (`| head`): whatever is still buffered goes nowhere,
    so that Python's flush at exit has no broken pipe to report."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (a test's StringIO)
        pass


def _configure_logs() -> None:
    from .observability import configure_logging
    from .settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError:
        return  # the command that needs the settings says what is wrong with them
    configure_logging(settings, "cli", default_level="warning")


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
