"""The `proctor` commands that talk to a running platform over HTTP, through `Client`:
`submit`, `list`, `status`, `logs`, `stop`, `results` (its rows and formats in `proctor.rows`), `token` and
`transcripts` (`transcript_cli.py`).

Each takes `--url` and `--token` (defaults: `Settings.api_url`, `$PROCTOR_TOKEN`, the file
`proctor up` writes); each reading command takes `--json`. A `ProctorError` becomes a
message on stderr and an exit code (`exit_code`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from itertools import islice
from typing import TYPE_CHECKING, Any

from . import rows
from .inspect_cli import inspect_args
from .cli import EXIT_BAD_INPUT, EXIT_DENIED, EXIT_FAILED, EXIT_OK, EXIT_STORAGE, EXIT_UNAVAILABLE, Subcommands, print_json
from .jsontypes import JsonObject

if TYPE_CHECKING:
    from rich.console import Console

    from .client import Client, Evaluation, ProctorError

ROLES = ("viewer", "researcher", "safety", "admin")
SORTS = ("created_at", "-created_at", "name", "-name", "status", "priority", "-priority")
COLOURS = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "safety_stopped": "red",
           "running": "cyan", "scheduled": "blue", "queued": "white", "interrupted": "magenta"}
LEVEL_STYLES = {"error": "red", "critical": "bold red", "warning": "yellow", "debug": "dim"}


def register(sub: Subcommands) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the API's URL (default: the local platform of `proctor up`)")
    common.add_argument("--token", help="API token (default: $PROCTOR_TOKEN, else the token `proctor up` wrote)")
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("submit", parents=[common, js], help="submit evaluation specs to the running platform")
    p.add_argument("spec", nargs="+", help="spec files (YAML or JSON), or Inspect tasks as file.py@task_name")
    p.add_argument("-f", "--follow", "--wait", dest="follow", action="store_true",
                   help="show progress until they end, then print their results")
    inspect_args(p)
    p.set_defaults(func=_handler(_submit))

    p = sub.add_parser("list", parents=[common, js], help="list evaluations")
    p.add_argument("--status", action="append", help="only this status (repeatable)")
    p.add_argument("--owner")
    p.add_argument("--label", metavar="KEY=VALUE")
    p.add_argument("--model", help="only this model, exactly")
    p.add_argument("--text", help="in the name or model")
    p.add_argument("--sort", choices=SORTS)
    p.add_argument("--limit", type=_positive, default=50, help="at most this many (default 50)")
    p.set_defaults(func=_handler(_list))

    p = sub.add_parser("status", parents=[common, js], help="one evaluation's state and results summary")
    p.add_argument("id")
    p.set_defaults(func=_handler(_status))

    p = sub.add_parser("logs", parents=[common, js], help="an evaluation's log lines")
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the evaluation ends")
    p.add_argument("--level", choices=["debug", "info", "warning", "error"], help="only this level and above")
    p.add_argument("--grep", metavar="TEXT", help="only lines containing TEXT")
    p.set_defaults(func=_handler(_logs))

    p = sub.add_parser("stop", parents=[common, js], help="cancel an evaluation, or stop it at once")
    p.add_argument("id", nargs="?")
    p.add_argument("--emergency", action="store_true", help="kill its sandboxes now instead of cancelling")
    p.add_argument("--all", action="store_true", help="emergency stop of every evaluation (admin)")
    p.set_defaults(func=_handler(_stop))

    p = sub.add_parser("results", parents=[common, js], help="an evaluation's sample rows (`results sync`: write "
                       "the rows waiting on this machine for an unreachable results store)")
    p.add_argument("id", help="the evaluation, or `sync`")
    p.add_argument("--format", choices=["table", "csv", "parquet", "json"], default="table")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of to stdout")
    show = _handler(rows.results)
    p.set_defaults(func=lambda args: rows.sync(args) if args.id == "sync" else show(args))

    p = sub.add_parser("token", help="API tokens (admin)")
    tok = p.add_subparsers(dest="token_command", metavar="ACTION")
    tok.required = True
    t = tok.add_parser("create", parents=[common, js], help="make a token for a user (its secret is shown once)")
    t.add_argument("user")
    t.add_argument("--role", choices=ROLES, required=True)
    t.add_argument("--name", default="cli", help="what the token is for")
    t.add_argument("--expires-in-days", type=_positive, metavar="D")
    t.set_defaults(func=_handler(_token_create))
    t = tok.add_parser("list", parents=[common, js], help="list tokens")
    t.set_defaults(func=_handler(_token_list))
    t = tok.add_parser("revoke", parents=[common, js], help="revoke a token")
    t.add_argument("token_id", type=int, metavar="ID")
    t.set_defaults(func=_handler(_token_revoke))

    from . import transcript_cli

    transcript_cli.register(sub, [common, js], _handler)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def exit_code(exc: ProctorError) -> int:
    """The exit code of a failed call: see `proctor.cli`'s docstring."""
    from .client import AuthenticationError, PermissionDeniedError, RateLimitError, ServerError

    if isinstance(exc, (AuthenticationError, PermissionDeniedError)):
        return EXIT_DENIED
    if isinstance(exc, (ServerError, RateLimitError)):
        return EXIT_UNAVAILABLE
    return EXIT_BAD_INPUT


def _handler(command: Callable[[Client, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from .client import Client, ProctorError
        from .settings import SettingsError

        try:
            with Client(url=args.url, token=args.token) as client:
                return command(client, args)
        except SettingsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except ProctorError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exit_code(exc)
        except OSError as exc:  # a local file: the results root (`results`), an output file (-o)
            if isinstance(exc, BrokenPipeError):
                raise  # the reader of stdout went away: `proctor.cli.main` ends quietly
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_STORAGE

    return run


def _console(**kw: Any) -> Console:  # kw: rich Console's own keyword arguments
    """A rich console; into a pipe or file, as wide as its lines (rich would cut them at 80)."""
    from rich.console import Console

    console = Console(**kw)
    if not console.is_terminal:
        console.width = 1000  # tables do not expand: they stay as wide as their cells
    return console


# -- submit, list, status ---------------------------------------------------------------------

def _submit(client: Client, args: argparse.Namespace) -> int:
    from .inspect_cli import inspect_spec_of, is_task_ref
    from .spec import SpecError, load_spec

    try:  # every file checked before anything is queued
        specs = [inspect_spec_of(path, args) if is_task_ref(path) else load_spec(path) for path in args.spec]
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    ids = [client.submit(spec) for spec in specs]
    if not args.follow:
        if args.json:
            print_json([{"id": i, "status": "queued", "spec": path} for path, i in zip(args.spec, ids)])
        else:
            for path, i in zip(args.spec, ids):
                print(f"{i}  queued  {path}")
        return EXIT_OK
    finals = [client.wait(i) for i in ids] if args.json else _follow(client, ids)
    if args.json:
        print_json([ev.model_dump(mode="json") for ev in finals])
    else:
        for ev in finals:
            print_summary(ev)
    return EXIT_OK if all(ev.status == "succeeded" for ev in finals) else EXIT_FAILED


def _follow(client: Client, ids: list[str]) -> list[Evaluation]:
    """A progress bar per evaluation until all have ended; their final states."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .client import RateLimitError

    finals: dict[str, Evaluation] = {}
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[status]}"), TimeElapsedColumn()) as bar:
            tasks = {i: bar.add_task(i, total=None, status="queued") for i in ids}
            while len(finals) < len(ids):
                for i in ids:
                    if i in finals:
                        continue
                    try:
                        ev = client.get(i)
                    except RateLimitError as exc:
                        time.sleep(exc.retry_after or 1)
                        break
                    status = ev.wait_reason if ev.status == "queued" and ev.wait_reason else ev.status
                    bar.update(tasks[i], description=ev.name, completed=ev.done_units, total=ev.total_units or None,
                               status=f"[{COLOURS.get(ev.status, 'white')}]{status}[/]")
                    if ev.finished:
                        finals[i] = ev
                else:
                    time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"still running on the platform; `proctor stop ID` cancels: {' '.join(sorted(set(ids) - set(finals)))}",
              file=sys.stderr)
        raise
    return [finals[i] for i in ids]


def print_summary(ev: Evaluation) -> None:
    """The results table of one evaluation from the API: see `print_summary_of`."""
    print_summary_of(ev.summary or {"name": ev.name, "metrics": {}}, ev.id, ev.status, ev.results_uri, ev.error,
                     name=ev.name, total_shards=ev.total_shards)


def print_summary_of(s: JsonObject, eval_id: str, status: str, results_uri: str | None,
                     error: str | None = None, *, name: str | None = None, total_shards: int | None = None) -> None:
    """The results table of one evaluation's summary (metrics with 95% CIs per scorer),
    and where its Parquet is; `proctor run` prints the same."""
    from rich.table import Table

    console = _console()
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(status, "red")
    table = Table(title=f"[bold]{s.get('name') or name or eval_id}[/]  [{colour}]{status}[/]", caption=eval_id,
                  title_justify="left", caption_justify="left")
    for col in ("scorer", "mean", "95% CI", "n"):
        table.add_column(col, justify="left" if col == "scorer" else "right")
    for scorer, m in s.get("metrics", {}).items():
        known = m.get("mean") is not None
        ci = f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if known and m.get("ci_low") is not None else "-"
        table.add_row(scorer, f"{m['mean']:.3f}" if known else "-", ci, str(m.get("n", "")))
    console.print(table)
    groups = s.get("groups") or {}
    first = next(iter(s.get("metrics", {})), None)
    if groups and first:
        parts = [f"{g} {v['metrics'][first]['mean']:.3f} (n={v['samples']})" for g, v in groups.items()
                 if v.get("metrics", {}).get(first, {}).get("mean") is not None]
        console.print(f"by group ({first}): " + "   ".join(parts))
    if "samples" in s:
        weak = " (weaker isolation)" if "weak" in s.get("isolation", []) else ""
        shards = s.get("shards", {})
        console.print(
            f"samples {s['samples']}  errors {s.get('errors', 0)}  shards {shards.get('total', total_shards or '?')} "
            f"({shards.get('failed', 0)} failed)  runtime {', '.join(s.get('runtimes', []))}{weak}  "
            f"{s.get('duration_s', 0):.1f}s", highlight=False)
    for err in ([error] if error else s.get("shard_errors", []))[:3]:
        console.print(f"[red]error:[/] {err}", highlight=False)
    if results_uri:
        console.print(f"results: {results_uri.removeprefix('file://')}", highlight=False, soft_wrap=True)


def _list(client: Client, args: argparse.Namespace) -> int:
    found = list(islice(client.list(status=args.status, owner=args.owner, label=args.label, model=args.model,
                                    text=args.text, sort=args.sort, limit=min(args.limit, 500)), args.limit))
    if args.json:
        print_json([ev.model_dump(mode="json") for ev in found])
        return EXIT_OK
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("ID", "NAME", "OWNER", "STATUS", "DONE", "MODEL", "CREATED"):
        table.add_column(col, no_wrap=col in ("ID", "STATUS"), overflow="fold")
    for ev in found:
        table.add_row(ev.id, ev.name, ev.owner, f"[{COLOURS.get(ev.status, 'white')}]{ev.status}[/]",
                      f"{ev.done_units}/{ev.total_units}", ev.model, _when(ev.created_at))
    _console().print(table if found else "no evaluations")
    return EXIT_OK


def _when(at: datetime | None) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M") if at else "-"


def _status(client: Client, args: argparse.Namespace) -> int:
    """0 while it runs and once it succeeded; 1 once it failed, was cancelled or safety-stopped."""
    ev = client.get(args.id)
    code = EXIT_FAILED if ev.finished and ev.status != "succeeded" else EXIT_OK
    if args.json:
        print_json(ev.model_dump(mode="json"))
        return code
    console = _console(highlight=False)
    rows = [("id", ev.id), ("name", ev.name), ("owner", ev.owner),
            ("status", f"[{COLOURS.get(ev.status, 'white')}]{ev.status}[/]"),
            ("progress", f"{ev.done_units}/{ev.total_units} units, {ev.total_shards} shards"),
            ("model", ev.model), ("runtime", ev.runtime), ("priority", str(ev.priority)),
            ("labels", ", ".join(f"{k}={v}" for k, v in ev.labels.items()) or "-"),
            ("waiting", ev.wait_reason), ("error", ev.error),
            ("created", _when(ev.created_at)), ("started", _when(ev.started_at)), ("finished", _when(ev.finished_at)),
            ("trace", ev.trace_id)]
    for key, value in rows:
        if value:
            console.print(f"[bold]{key:<9}[/] {value}", soft_wrap=True)
    if ev.finished:
        console.print()
        print_summary(ev)
    return code


# -- logs, stop ---------------------------------------------------------------------------------

def _logs(client: Client, args: argparse.Namespace) -> int:
    from rich.text import Text

    console = _console(highlight=False)
    for line in client.logs(args.id, follow=args.follow, level=args.level, text=args.grep):
        if args.json:
            print(json.dumps(line), flush=True)
            continue
        ts = datetime.fromtimestamp(line.get("ts", 0)).strftime("%H:%M:%S.%f")[:-3]
        level = str(line.get("level", "info"))
        text = Text(f"{ts} {line.get('shard_id', '-')} {level.upper():<7} ", style="dim")
        text.append(str(line.get("message", "")), style=LEVEL_STYLES.get(level.lower(), ""))
        console.print(text, soft_wrap=True)
    return EXIT_OK


def _stop(client: Client, args: argparse.Namespace) -> int:
    if args.all == bool(args.id):
        print("error: give an evaluation ID, or --all", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.all:
        stopped = client.stop_all()
        if args.json:
            print_json({"stopped": stopped})
        else:
            print(f"stopped {len(stopped)}: {' '.join(stopped)}" if stopped else "nothing was running")
        return EXIT_OK
    result = client.stop(args.id) if args.emergency else client.cancel(args.id)
    if args.json:
        print_json(result.model_dump(mode="json"))
    else:
        done = ("stopped" if args.emergency else "cancelled") if result.stopped else "had already ended"
        print(f"{result.id} {done} (status {result.status})")
    return EXIT_OK


# -- tokens ------------------------------------------------------------------------------------------

def _token_create(client: Client, args: argparse.Namespace) -> int:
    made = client.create_token(args.user, args.role, args.name, args.expires_in_days)
    if args.json:
        print_json(made.model_dump(mode="json"))
        return EXIT_OK
    expires = _when(made.expires_at) if made.expires_at else "never"
    print(f"token {made.id} for {made.user} ({made.role}), expires {expires}")
    print(made.token)
    print("this secret is shown once: keep it now", file=sys.stderr)
    return EXIT_OK


def _token_list(client: Client, args: argparse.Namespace) -> int:
    found = client.tokens()
    if args.json:
        print_json([t.model_dump(mode="json") for t in found])
        return EXIT_OK
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("ID", "USER", "ROLE", "NAME", "CREATED", "EXPIRES", "REVOKED"):
        table.add_column(col, overflow="fold")
    for t in found:
        table.add_row(str(t.id), t.user, t.role, t.name, _when(t.created_at),
                      _when(t.expires_at) if t.expires_at else "never", "yes" if t.revoked else "")
    _console().print(table)
    return EXIT_OK


def _token_revoke(client: Client, args: argparse.Namespace) -> int:
    revoked = client.revoke_token(args.token_id)
    if args.json:
        print_json({"id": args.token_id, "revoked": revoked})
    else:
        print(f"token {args.token_id} {'revoked' if revoked else 'was not revoked'}")
    return EXIT_OK if revoked else EXIT_FAILED
