"""`proctor run`: one evaluation on this machine, with a progress bar and a results table.

Registered with the `proctor` CLI through the `proctor.commands` entry-point group.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from cluster.runtimes import RuntimeUnavailable
from cluster.storage import StorageError
from proctor.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NO_RUNTIME, EXIT_OK, EXIT_STORAGE, print_json
from proctor.settings import SettingsError, load_settings
from proctor.spec import SpecError, load_spec

from .local_run import EvaluationResult, run_evaluation


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run an evaluation spec on this machine and print its results")
    p.add_argument("spec", nargs="+", help="one or more spec files (YAML or JSON)")
    p.add_argument("--runtime", choices=["auto", "gvisor", "bubblewrap"], help="override the sandbox runtime")
    p.add_argument("--results", metavar="URI", help="results root (file:///… or s3://bucket/prefix)")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON, no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides: dict[str, Any] = {}
        if args.results:
            overrides["results_uri"] = args.results
        if args.runtime:
            overrides["runtime"] = args.runtime
        settings = load_settings(**overrides)
        specs = [load_spec(path) for path in args.spec]
    except (SpecError, SettingsError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    results: list[EvaluationResult] = []
    try:
        for path, spec in zip(args.spec, specs):
            if args.runtime:
                spec = spec.model_copy(update={"sandbox": spec.sandbox.model_copy(update={"runtime": args.runtime})})
            results.append(asyncio.run(_one(spec, settings, show_progress=not args.json, label=path)))
    except RuntimeUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_RUNTIME
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    if args.json:
        print_json([dict(r.summary, results_uri=r.results_uri) for r in results])
    else:
        for r in results:
            print_result(r)
    return EXIT_OK if all(r.status == "succeeded" for r in results) else EXIT_FAILED


async def _one(spec: Any, settings: Any, show_progress: bool, label: str) -> EvaluationResult:
    if not show_progress:
        return await run_evaluation(spec, settings)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task(f"{spec.name}", total=None)
        return await run_evaluation(spec, settings, on_progress=lambda d, t: bar.update(task, completed=d, total=t))


def print_result(r: EvaluationResult) -> None:
    print_summary(r.summary, r.eval_id, r.status, r.results_uri)


def print_summary(s: dict[str, Any], eval_id: str, status: str, results_uri: str | None,
                  error: str | None = None) -> None:
    """The results table of one evaluation, and where its Parquet is."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(status, "red")
    table = Table(title=f"[bold]{s.get('name', eval_id)}[/]  [{colour}]{status}[/]", caption=eval_id,
                  title_justify="left", caption_justify="left")
    for col in ("scorer", "mean", "95% CI", "n"):
        table.add_column(col, justify="left" if col == "scorer" else "right")
    for name, m in s.get("metrics", {}).items():
        ci = f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m["mean"] is not None else "-"
        table.add_row(name, f"{m['mean']:.3f}" if m["mean"] is not None else "-", ci, str(m["n"]))
    console.print(table)
    groups = s.get("groups") or {}
    if groups:
        first = next(iter(s.get("metrics", {})), None)
        parts = [f"{g} {v['metrics'][first]['mean']:.3f} (n={v['samples']})" for g, v in groups.items()
                 if first and v["metrics"].get(first, {}).get("mean") is not None]
        console.print(f"by group ({first}): " + "   ".join(parts))
    if "samples" in s:
        weak = " (weaker isolation)" if "weak" in s.get("isolation", []) else ""
        shards = s.get("shards", {})
        console.print(
            f"samples {s['samples']}  errors {s['errors']}  shards {shards.get('total', '?')} "
            f"({shards.get('failed', 0)} failed)  runtime {', '.join(s.get('runtimes', []))}{weak}  "
            f"{s.get('duration_s', 0):.1f}s"
        )
    for err in ([error] if error else s.get("shard_errors", []))[:3]:
        console.print(f"[red]error:[/] {err}")
    if results_uri:
        console.print(f"results: {_local(results_uri)}")


def _local(uri: str) -> str:
    return uri.removeprefix("file://")
