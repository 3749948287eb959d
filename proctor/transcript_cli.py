"""`proctor transcripts EVAL`: an evaluation's transcripts, through the API.

    proctor transcripts EVAL                          the samples that have one
    proctor transcripts EVAL --grep PATTERN           where PATTERN appears (case-insensitive)
    proctor transcripts EVAL --sample ID [--epoch N]  one sample's conversation

Each takes `--json`. Registered by `commands.register`, with its shared options.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import TYPE_CHECKING, Callable

from .cli import EXIT_OK, Subcommands, print_json

if TYPE_CHECKING:
    from rich.console import Console

    from .client import Client
    from .transcript import Entry

USAGE = """An evaluation's transcripts (every sample's conversation), through the API:

    proctor transcripts EVAL                          the samples that have one
    proctor transcripts EVAL --grep PATTERN           where PATTERN appears (case-insensitive)
    proctor transcripts EVAL --sample ID [--epoch N]  one sample's conversation"""
SHOWN_CHARS = 2000  # of one entry's text, in the conversation view (--json has all of it)


Command = Callable[["Client", argparse.Namespace], int]


def register(sub: Subcommands, parents: list[argparse.ArgumentParser],
             handler: Callable[[Command], Callable[[argparse.Namespace], int]]) -> None:
    p = sub.add_parser("transcripts", parents=parents, help="an evaluation's transcripts: list, search, show one",
                       description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("id", metavar="EVAL")
    p.add_argument("--grep", metavar="PATTERN", help="find the samples and turns where PATTERN appears "
                                                     "(case-insensitive text)")
    p.add_argument("--sample", metavar="ID", help="show this sample's conversation")
    p.add_argument("--epoch", type=int, default=1, help="the sample's epoch (default 1)")
    p.add_argument("--limit", type=int, default=100, help="at most this many matches (default 100)")
    p.set_defaults(func=handler(_transcripts))


def _transcripts(client: Client, args: argparse.Namespace) -> int:
    from .commands import _console

    console = _console(highlight=False)
    if args.grep is not None:
        found = client.search_transcripts(args.id, args.grep, limit=max(1, min(args.limit, 1000)))
        if args.json:
            print_json(found.model_dump(mode="json"))
            return EXIT_OK
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, header_style="bold")
        for col in ("SAMPLE", "EPOCH", "ENTRY", "KIND", "FROM", "WHERE", "TEXT"):
            table.add_column(col, overflow="fold")
        for m in found.matches:
            table.add_row(m.sample_id, str(m.epoch), str(m.n), m.role or m.kind, m.provenance, m.where,
                          Text(m.excerpt.replace("\n", " ")))
        console.print(table if found.matches else f"no match for {args.grep!r}")
        more = " (more not shown: raise --limit)" if found.truncated else ""
        console.print(f"{len(found.matches)} matches in {found.samples} of {found.searched} samples{more}")
        return EXIT_OK
    if args.sample is not None:
        page = client.transcript(args.id, args.sample, epoch=args.epoch)
        if args.json:
            print_json(page.model_dump(mode="json", exclude_none=True))
            return EXIT_OK
        console.print(f"[bold]{page.sample_id}[/] epoch {page.epoch} · shard {page.shard_id} · {page.where} · "
                      f"{page.total} entries" + (" · cut" if page.cut else "") + (" · safety-stopped" if page.stopped
                                                                                 else ""))
        for entry in page.entries:
            _print_entry(console, entry)
        return EXIT_OK
    listed = client.transcripts(args.id)
    if args.json:
        print_json([s.model_dump(mode="json") for s in listed])
        return EXIT_OK
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("SAMPLE", "EPOCH", "SHARD", "WHERE", "ENTRIES"):
        table.add_column(col, overflow="fold")
    for s in listed:
        table.add_row(s.sample_id, str(s.epoch), s.shard_id, s.where, str(s.entries))
    console.print(table if listed else "no transcripts")
    return EXIT_OK


def _print_entry(console: Console, e: Entry) -> None:
    from rich.text import Text

    when = datetime.fromtimestamp(e.at).strftime("%H:%M:%S")
    head = Text(f"[{e.n}] {when} ", style="dim")
    head.append(e.role or e.kind, style="bold")
    head.append(f" ({e.provenance})", style="dim")
    if e.kind == "safety" and e.safety is not None:
        s = e.safety
        head.append(f" {s.monitor}/{s.rule} {s.action}" + (" — stopped the sample" if s.stopped else "")
                    + (" — answer held back" if s.held else ""), style="red")
    if facts := e.facts():
        head.append("  " + ", ".join(facts), style="dim")
    console.print(head, soft_wrap=True)
    body = e.content if e.kind != "safety" or e.safety is None else e.safety.message
    for call in e.tool_calls:
        body += f"\n→ {call.function} {call.arguments}"
    if e.kind == "cut" and e.cut is not None:
        body += f"\n({e.cut.dropped_entries} entries, {e.cut.dropped_bytes} bytes left out)"
    if body.strip():
        shown = body if len(body) <= SHOWN_CHARS else body[:SHOWN_CHARS] + f"… [{len(body) - SHOWN_CHARS} more characters]"
        console.print(Text("    " + shown.replace("\n", "\n    ")), soft_wrap=True)
