"""An Inspect shard's `.eval` log as result rows: one `SampleRecord` per sample × epoch.

The log was written by the worker, which ran the task's own code: it is read with
Inspect's reader (which validates it) and bounded here; a sample the shard was given but
the log does not hold becomes a row with an error, so no sample is lost silently, and a
sample the shard was not given is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from .results import SampleRecord

MAX_TEXT = 256 * 1024


def _clip(text: Any) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # chat messages or a list of targets
        return "\n".join(f"{getattr(m, 'role', '')}: {getattr(m, 'text', m)}" if not isinstance(m, str) else m
                         for m in value)
    return "" if value is None else str(value)


def _ts(value: Any) -> float:
    if not value:
        return 0.0
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return 0.0


def _score(value: Any) -> float | None:
    from inspect_ai.scorer import value_to_float

    try:
        number = value_to_float()(value)
    except Exception:
        return None
    return float(number) if isinstance(number, (int, float)) else None


def records_of(log: Any, *, shard_id: str, expected: Iterable[tuple[str, int]], scorers: list[str],
               model: str, runtime: str, isolation: str, transcript: str | None) -> list[SampleRecord]:
    """The rows of `log` (an `EvalLog`) for the shard's `expected` (sample id, epoch) pairs,
    in that order."""
    found: dict[tuple[str, int], SampleRecord] = {}
    for sample in log.samples or []:
        key = (str(sample.id), int(sample.epoch))
        scores: dict[str, float] = {}
        answers: dict[str, str] = {}
        for name, score in (sample.scores or {}).items():
            if name not in scorers:
                continue
            value = _score(score.value)
            if value is not None:
                scores[name] = value
            if score.answer is not None:
                answers[name] = _clip(score.answer)
        usage = list((sample.model_usage or {}).values())
        events = getattr(sample, "events", None) or []
        error = sample.error.message if sample.error is not None else None
        if error is None and getattr(sample, "limit", None) is not None:
            error = f"{sample.limit.type} limit reached ({sample.limit.limit})"
        if error is None and not scores:
            error = "no score"
        started = _ts(getattr(sample, "started_at", None)) or _ts(events[0].timestamp if events else None)
        completed = _ts(getattr(sample, "completed_at", None)) or _ts(events[-1].timestamp if events else None)
        found[key] = SampleRecord(
            shard_id=shard_id, sample_id=key[0], epoch=key[1], input=_clip(_text(sample.input)),
            target=_clip(" | ".join(sample.target) if isinstance(sample.target, list) else sample.target),
            output=_clip(sample.output.completion if sample.output is not None else ""),
            scores=scores if error is None or scores else {}, answers=answers, error=_clip(error) if error else None,
            started_at=started, completed_at=completed or started,
            input_tokens=sum(u.input_tokens for u in usage), output_tokens=sum(u.output_tokens for u in usage),
            model_calls=sum(1 for e in events if getattr(e, "event", None) == "model"),
            turns=sum(1 for m in sample.messages or [] if getattr(m, "role", None) == "assistant"),
            model=model, runtime=runtime, isolation=isolation, failed_stage="eval" if error else None,
            transcript=transcript,
        )
    out = []
    for key in expected:
        record = found.get(key)
        if record is None:
            record = SampleRecord(shard_id=shard_id, sample_id=key[0], epoch=key[1], input="", target="", output="",
                                  error="the Inspect log of its shard does not hold this sample", model=model,
                                  runtime=runtime, isolation=isolation, failed_stage="eval")
        out.append(record)
    return out
