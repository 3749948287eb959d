"""`proctor results`: an evaluation's sample rows as a table, CSV, Parquet or JSON.

The rows come from the API; for an evaluation the platform does not know (one made by
`proctor run`, which writes to the local results root and nothing else) they come from
that root, through the readers of the `proctor.results` entry-point group (`cluster`
registers one), so that this module imports nothing of the layers below.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, TextIO

from .jsontypes import JsonObject

from .cli import EXIT_BAD_INPUT, EXIT_OK

if TYPE_CHECKING:
    import pyarrow

    from .client import Client


def results(client: Client, args: argparse.Namespace) -> int:
    """`proctor results ID [--format F] [-o FILE]`."""
    fmt = "json" if args.json else args.format
    if fmt == "parquet" and not args.output and sys.stdout.isatty():
        print("error: Parquet is binary; write it to a file with -o FILE, or redirect stdout", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .client import is_partial

    table = results_of(client, args.id)
    if is_partial(table):  # on stderr: the output stays what was asked for
        print(f"note: {args.id} is still running; these are the {table.num_rows} rows its shards have "
              "written so far", file=sys.stderr)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        pq.write_table(table, sink)
        if args.output:
            with open(args.output, "wb") as f:
                f.write(sink.getvalue())
        else:
            sys.stdout.flush()
            sys.stdout.buffer.write(sink.getvalue())
            sys.stdout.buffer.flush()
        return EXIT_OK
    out = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        if fmt == "json":
            out.write(json.dumps(as_dicts(table), indent=2, default=str) + "\n")
        elif fmt == "csv":
            rows = as_dicts(table)
            writer = csv.DictWriter(out, fieldnames=table.column_names, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()})
        else:
            print_table(table, out)
    finally:
        if out is not sys.stdout:
            out.close()
    return EXIT_OK


def results_of(client: Client, eval_id: str) -> pyarrow.Table:
    """The evaluation's rows from the API; when the API does not know the id (or is not
    running), from the local results root, where `proctor run` writes evaluations that the
    platform never sees. Raises the API's error when neither has it."""
    from .client import NotFoundError, UnavailableError

    try:
        return client.results(eval_id)
    except (NotFoundError, UnavailableError) as exc:
        found = read_local_results(eval_id)
        if found is None:
            raise
        table, uri = found
        why = "does not know it" if isinstance(exc, NotFoundError) else "is not reachable"
        print(f"note: the platform {why}; these are the rows of {eval_id} in the local results root "
              f"({uri}, where `proctor run` writes)", file=sys.stderr)
        return table


def sync(args: argparse.Namespace) -> int:
    """`proctor results sync`: write what waits in this machine's outbox (rows, artifacts,
    logs kept while the results store was away) to the store now, through the
    `proctor.sync` entry-point group (cluster's). Exit 0 when nothing waits any more, 4
    when the store still refuses."""
    from .cli import EXIT_STORAGE, print_json
    from .settings import SettingsError

    found = sorted(entry_points(group="proctor.sync"), key=lambda e: e.name)
    if not found:
        print("error: this installation has no outbox to sync (reinstall Proctor: `pip install -e .`)",
              file=sys.stderr)
        return EXIT_STORAGE
    try:
        done: JsonObject = found[0].load()()  # the group's sync: what it did, as `--json` prints it
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print_json(done)
    elif done["waiting"]:
        print(f"{done['written']} writes reached the results store; {done['waiting']} still wait in "
              f"{done['folder']}: {done['error']}", file=sys.stderr)
    else:
        print(f"{done['written']} writes reached the results store; nothing waits in {done['folder']}")
    return EXIT_STORAGE if done["waiting"] else EXIT_OK


def read_local_results(eval_id: str) -> tuple[pyarrow.Table, str] | None:
    """The rows of `eval_id` under this machine's results root, and their URI, through the
    readers registered in the `proctor.results` entry-point group (cluster's); None when
    none has it. Raises `OSError` when it is there but cannot be read."""
    for ep in sorted(entry_points(group="proctor.results"), key=lambda e: e.name):
        # an entry point's reader says nothing of its types: the group's contract is in the docstring
        found: tuple[pyarrow.Table, str] | None = ep.load()(eval_id)
        if found is not None:
            return found
    return None


def as_dicts(table: pyarrow.Table) -> list[dict[str, object]]:
    """Rows as plain dicts; map columns (`scores`, `answers`) become dicts."""
    import pyarrow as pa

    maps = {f.name for f in table.schema if pa.types.is_map(f.type)}
    return [{k: dict(v) if k in maps and v is not None else v for k, v in row.items()} for row in table.to_pylist()]


def print_table(table: pyarrow.Table, out: TextIO) -> None:
    from rich.table import Table

    shown = [c for c in ("sample_id", "epoch", "score", "target", "output", "error") if c in table.column_names]
    view = Table(box=None, header_style="bold")
    for col in shown:
        view.add_column(col, overflow="fold", max_width=40 if col in ("target", "output", "error") else None)
    for row in table.select(shown).to_pylist():
        view.add_row(*("" if row[c] is None else f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])
                       for c in shown))
    from .commands import _console  # the CLI's console (rich); imported late: commands imports this module

    console = _console(file=out, highlight=False) if out is not sys.stdout else _console(highlight=False)
    console.print(view)
    console.print(f"{table.num_rows} rows")
