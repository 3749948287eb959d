"""`proctor run`: one evaluation on this machine, with a progress bar and a results table.

Registered with the `proctor` CLI through the `proctor.commands` entry-point group.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from cluster.images import ImageStore, check_spec_images
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
        if args.runtime:
            specs = [s.model_copy(update={"sandbox": s.sandbox.model_copy(update={"runtime": args.runtime})})
                     for s in specs]
        images = ImageStore.from_settings(settings)
        for path, spec in zip(args.spec, specs):
            try:
                check_spec_images(spec, images, settings.runtime)  # before anything runs
            except SpecError as exc:
                raise SpecError(exc.errors, path) from None
    except (SpecError, SettingsError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    results: list[EvaluationResult] = []
    try:
        for path, spec in zip(args.spec, specs):
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
    """The results table of one evaluation, and where its Parquet is (as the CLI prints it)."""
    from proctor.commands import print_summary_of

    print_summary_of(s, eval_id, status, results_uri, error)
