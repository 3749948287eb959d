"""`proctor up`, `proctor down` and `proctor submit`: the embedded platform from the shell.

Registered with the `proctor` CLI through the `proctor.commands` entry-point group.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from proctor.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, print_json
from proctor.settings import SettingsError, load_settings
from proctor.spec import SpecError, load_spec


def register_up(sub: Any) -> None:
    p = sub.add_parser("up", help="start the embedded platform: a local Ray cluster and the control plane")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_up)


def register_down(sub: Any) -> None:
    p = sub.add_parser("down", help="stop the embedded platform (state and results stay)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_down)


def register_submit(sub: Any) -> None:
    p = sub.add_parser("submit", help="submit evaluation specs to the running platform")
    p.add_argument("spec", nargs="+")
    p.add_argument("--wait", action="store_true", help="wait for the results and print them")
    p.add_argument("--owner", default="local", help="user the evaluations belong to")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_submit)


def _settings() -> Any:
    try:
        return load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def _up(args: argparse.Namespace) -> int:
    from .platform import up

    settings = _settings()
    info = up(settings)
    if args.json:
        print_json(info)
    else:
        print("Proctor is up.")
        print(f"  API             {info['api']}  (docs: {info['docs']})")
        print(f"  admin token     {info['token_file']}")
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


def _submit(args: argparse.Namespace) -> int:
    from .platform import attach

    settings = _settings()
    try:
        specs = [load_spec(p) for p in args.spec]
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    plane = attach(settings)
    ids = [plane.submit(spec, owner=args.owner) for spec in specs]
    if not args.wait:
        if args.json:
            print_json([{"eval_id": i, "status": "queued"} for i in ids])
        else:
            for path, i in zip(args.spec, ids):
                print(f"{i}  queued  {path}")
        return EXIT_OK
    finals = [_wait(plane, i, show=not args.json) for i in ids]
    if args.json:
        print_json([_as_dict(ev) for ev in finals])
    else:
        from eval_actors.commands import print_summary

        for ev in finals:
            print_summary(ev.summary or {"name": ev.name, "metrics": {}}, ev.id, ev.status, ev.results_uri, ev.error)
    return EXIT_OK if all(ev.status == "succeeded" for ev in finals) else EXIT_FAILED


def _wait(plane: Any, eval_id: str, show: bool) -> Any:
    if not show:
        return plane.wait(eval_id)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done: dict[str, int] = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn()) as bar:
        task = bar.add_task(eval_id, total=None, status="queued")

        def progress(ev: Any, events: list[dict]) -> None:
            for e in events:
                if e["type"] == "progress":
                    done[e["shard_id"]] = e["done"]
            bar.update(task, completed=sum(done.values()), total=ev.total_units, status=ev.status,
                       description=ev.name)

        final = plane.wait(eval_id, on_progress=progress)
        bar.update(task, completed=final.total_units, total=final.total_units, status=final.status)
    return final


def _as_dict(ev: Any) -> dict[str, Any]:
    return {"eval_id": ev.id, "name": ev.name, "status": ev.status, "summary": ev.summary,
            "results_uri": ev.results_uri, "error": ev.error}

