"""One evaluation on this machine, without the control plane: split into shards, run
them in sandboxes with bounded concurrency, write Parquet parts and the summary.

This is the shard executor's simplest driver: `proctor run spec.yaml`, the examples and
the end-to-end tests use it; the control plane's supervisors drive the same executor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster.datasets import load_samples
from cluster.images import ImageStore, check_spec_images
from cluster.results import ResultsStore, records_table, summarize
from cluster.runtimes import SandboxRuntime, select_runtime
from cluster.transcripts import TranscriptStore
from proctor.settings import Settings
from proctor.spec import EvaluationSpec, Sample, SpecError

from .gateway import ModelGateway, OpenAIGateway
from .shard_executor import ShardExecutor
from .shard_work import ShardOutcome, ShardWork

log = logging.getLogger("proctor.local")


@dataclass(frozen=True)
class EvaluationResult:
    eval_id: str
    status: str  # succeeded | failed | cancelled
    summary: dict[str, Any]
    results_uri: str
    outcomes: tuple[ShardOutcome, ...]
    duration_s: float


def new_eval_id() -> str:
    return f"ev-{int(time.time() * 1000):x}-{secrets.token_hex(3)}"


def split_shards(eval_id: str, spec: EvaluationSpec, samples: list[Sample]) -> list[ShardWork]:
    """Samples in groups of `shard_size`; every epoch of a sample runs in the same shard."""
    epochs = tuple(range(1, spec.epochs + 1))
    size = spec.shard_size
    return [
        ShardWork(eval_id, f"{i // size:05d}", spec, tuple(samples[i : i + size]), epochs)
        for i in range(0, len(samples), size)
    ]


def rescore_outside(spec: EvaluationSpec, output: str, sample: Sample) -> dict[str, float]:
    """Recompute the scores that depend only on the output, from the trusted target."""
    from proctor.harness.scorers import score_outside

    return score_outside(spec.scorers, output, sample)


async def run_evaluation(
    spec: EvaluationSpec,
    settings: Settings,
    *,
    eval_id: str | None = None,
    runtime: SandboxRuntime | None = None,
    gateway: ModelGateway | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    cancel: asyncio.Event | None = None,
    monitored: bool = True,
) -> EvaluationResult:
    """Run `spec` to completion. Raises `RuntimeUnavailable` (no sandbox: nothing runs),
    `SpecError` (bad dataset rows, an image not in the store) and `StorageError`; a failing
    shard is an outcome."""
    images = ImageStore.from_settings(settings)
    check_spec_images(spec, images, settings.runtime)
    started = time.monotonic()
    eval_id = eval_id or new_eval_id()
    runtime = runtime or select_runtime(
        settings.runtime if spec.sandbox.runtime == "auto" else spec.sandbox.runtime,
        settings.sandbox_dir, settings.runsc_platform,
    )
    store = ResultsStore(settings.results, settings)
    transcripts = TranscriptStore(settings.results, settings)
    if spec.dataset is None:
        raise SpecError([("inspect", "`proctor run` runs Proctor datasets; submit an Inspect task to the "
                          "platform (`proctor submit task.py@name --model ...`)")])
    samples = load_samples(spec.dataset, settings)
    shards = split_shards(eval_id, spec, samples)
    own_gateway = gateway is None
    gateway = gateway or OpenAIGateway(secret=settings.secret)
    executor = ShardExecutor(runtime, gateway, settings.sandbox_dir, rescore=rescore_outside, monitored=monitored,
                             images=images)
    total = sum(s.units for s in shards)
    done = 0
    limit = asyncio.Semaphore(settings.max_concurrent_shards or os.cpu_count() or 1)
    log.info("evaluation %s: %d samples x %d epochs in %d shards on %s", eval_id, len(samples), spec.epochs,
             len(shards), runtime.name)

    def progress(event: Any) -> None:
        nonlocal done
        if event.type == "sample":
            done += 1
            if on_progress:
                on_progress(done, total)

    async def one(work: ShardWork) -> ShardOutcome:
        async with limit:
            outcome = await executor.run(work, on_event=progress, cancel=cancel)
        store.write_shard(eval_id, work.shard_id, records_table(list(outcome.records), spec.scorer_names()))
        for path, data in outcome.artifacts:
            store.write_artifact(eval_id, work.shard_id, path, data)
        if outcome.quarantined_artifacts:  # flagged by the cleanup scan: kept, not published
            flagged = [v for v in outcome.safety.violations if v.get("monitor") == "cleanup"]
            store.quarantine_artifacts(eval_id, work.shard_id, outcome.quarantined_artifacts, {"violations": flagged})
        if outcome.transcripts:
            await asyncio.to_thread(transcripts.write_shard, eval_id=eval_id, spec=spec, shard_id=work.shard_id,
                                    attempt=0, status=outcome.status, error=outcome.error,
                                    transcripts=outcome.transcripts, records=outcome.records,
                                    quarantined=outcome.status == "safety_stopped")
        return outcome

    try:
        outcomes = await asyncio.gather(*(one(w) for w in shards))
    finally:
        if own_gateway:
            await gateway.aclose()
    table = store.read(eval_id)
    key = spec.dataset.group_by
    by = {str(x.id): str(x.metadata.get(key, "(none)")) for x in samples} if key else None
    summary = summarize(table, spec.scorer_names(), by=by)
    statuses = {o.status for o in outcomes}
    status = ("safety_stopped" if "safety_stopped" in statuses else "cancelled" if "cancelled" in statuses
              else "failed" if "failed" in statuses else "succeeded")
    duration = time.monotonic() - started
    summary.update({
        "eval_id": eval_id,
        "name": spec.name,
        "status": status,
        "shards": {"total": len(outcomes), "failed": sum(o.status == "failed" for o in outcomes)},
        "shard_errors": sorted({o.error for o in outcomes if o.error})[:20],
        "protocol_rejections": sum(len(o.rejections) for o in outcomes),
        "duration_s": round(duration, 3),
        "labels": spec.labels,
    })
    store.write_summary(eval_id, summary)
    await asyncio.to_thread(transcripts.merge, eval_id, summary)
    return EvaluationResult(eval_id, status, summary, store.eval_uri(eval_id), tuple(outcomes), duration)
