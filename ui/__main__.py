"""`python -m ui [--port 8001] [--api URL]`: the dashboard, beside the API.

`proctor up` starts it. On the embedded platform it signs in with the local admin token
(`~/.config/proctor/token`); anyone else signs in with their own token.
"""

from __future__ import annotations

import argparse

from proctor.observability import configure_logging
from proctor.settings import load_settings

from .dashboard import build, launch


def main() -> None:
    settings = load_settings()
    configure_logging(settings, "dashboard")
    parser = argparse.ArgumentParser(prog="python -m ui", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=settings.ui_port)
    parser.add_argument("--api", default=settings.api_url)
    parser.add_argument("--local-token", action="store_true", help="sign in with the token `proctor up` wrote")
    parser.add_argument("--ray-dashboard", default=settings.ray_dashboard_url)
    args = parser.parse_args()
    token = None
    if args.local_token and settings.token_file.exists():
        token = settings.token_file.read_text().strip()
    launch(build(args.api, token, args.ray_dashboard), args.host, args.port)


if __name__ == "__main__":
    main()
