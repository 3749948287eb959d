"""The `proctor` command.

Exit codes a script can rely on:
  0  done, and the evaluation (if any) succeeded
  1  an evaluation ran and failed, or was cancelled
  2  bad input: an invalid spec, setting or argument (nothing was changed)
  3  no sandbox runtime can run here (nothing was run)
  4  a store could not be read or written
  5  the platform's API could not be reached, or could not answer (down, 5xx, rate limited)
  6  the API refused the token (missing, unknown, revoked: 401) or its role (403)
  130 interrupted

The commands that talk to a running platform over HTTP (`submit`, `list`, `status`,
`logs`, `stop`, `results`, `token`) are in `commands.py`, through `proctor.Client`.
Commands that need the platform's internals (`run`, `up`, `down`) are contributed by the
lower layers through the `proctor.commands` entry-point group, so this module imports
nothing of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from typing import Any

from .spec import SpecError, load_spec, spec_json_schema

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NO_RUNTIME, EXIT_STORAGE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_UNAVAILABLE, EXIT_DENIED = 5, 6


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
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
