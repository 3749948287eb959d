"""`proctor up` and `proctor down`: the embedded platform from the shell. (`proctor submit`
and the other commands that use it are in `proctor.commands`, over HTTP.)

Registered with the `proctor` CLI through the `proctor.commands` entry-point group.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from proctor.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNAVAILABLE, print_json
from proctor.settings import SettingsError, load_settings


def register_up(sub: Any) -> None:
    p = sub.add_parser("up", help="start the embedded platform: a local Ray cluster and the control plane")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_up)


def register_down(sub: Any) -> None:
    p = sub.add_parser("down", help="stop the embedded platform (state and results stay)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_down)


def _settings() -> Any:
    try:
        return load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def _up(args: argparse.Namespace) -> int:
    from .platform import PlatformError, up

    settings = _settings()
    try:
        info = up(settings)
    except PlatformError as exc:
        print(f"error: {exc}\n(`proctor down` stops what did start)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        print_json(info)
    else:
        print("Proctor is up.")
        print(f"  API             {info['api']}  (docs: {info['docs']})")
        print(f"  admin token     {info['token_file']}")
        print(f"  dashboard       {info['dashboard_ui']}  (signed in with the admin token)")
        print(f"  Ray dashboard   {info['dashboard']}")
        print(f"  Ray address     {info['address']}  (token: {info['ray_token_file']})")
        print(f"  state           {info['state']}")
        print(f"  results         {info['results']}")
    return EXIT_OK


def _down(args: argparse.Namespace) -> int:
    from .platform import down

    stopped = down(_settings())
    if args.json:
        print_json({"stopped": stopped})
    else:
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return EXIT_OK
