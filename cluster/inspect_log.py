"""Proctor's transcripts as Inspect AI logs (`.eval`), both ways.

To Inspect (`eval_sample`, `eval_log`): each entry of a `SampleTranscript` becomes
Inspect's own kind of record, so that `inspect view` and Inspect's readers and data frames
show it natively: the messages in `messages` (the Messages tab), a model turn as a
`ModelEvent` (its output, usage and latency; its input a range of the sample's message
pool, as Inspect's own condensed logs have it), a tool result as a `ToolEvent` (output,
truncation, timeout or error), a safety action or a cut as an `InfoEvent`. Each carries
the entry's Proctor fields (its place, provenance, figures) under `metadata["proctor"]`,
so that `entries_of` gives back exactly the entries, from a stored sample's JSON, with no
Inspect import (the API reads logs on every request). The scores, output and error of a
sample come from its Parquet row, the platform's trusted record.

Every log says `viewer.trust_content: false`: what a sandbox wrote is shown as plain
text, never rendered.

A sample is written as the plain JSON Inspect writes for one (`eval_sample`); Inspect AI is
imported only to build a log's header (`eval_log`): it takes seconds to import, and most
of the platform never writes a log.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from proctor.transcript import Entry, SampleTranscript

ATTACHMENT = "attachment://"
TOOL_OUTPUT_CAP = 64 * 1024  # the harness's cap on what a tool call returns (proctor.harness.tools.OUTPUT_CAP)


def model_name(spec: Any) -> str:
    """The evaluation's model as Inspect names models (`provider/model`)."""
    m = spec.model
    return {"reference": "proctor/reference", "python": f"python/{getattr(m, 'callable', '')}",
            "openai": f"openai/{getattr(m, 'model', '')}", "inspect": getattr(m, "model", "")}.get(m.adapter, f"proctor/{m.adapter}")


def iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts or 0.0, timezone.utc).isoformat()


def _meta(entry: Entry, keep_content: bool = False) -> dict[str, Any]:
    return {"proctor": entry.model_dump(mode="json", exclude_none=True,
                                        exclude=None if keep_content else {"content"})}


def _arguments(text: str) -> tuple[dict[str, Any], str | None]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}, text
    return (value, None) if isinstance(value, dict) else ({"value": value}, None)


def eval_sample(t: SampleTranscript, record: Any | None, model: str) -> dict[str, Any]:
    """The Inspect `EvalSample` of one transcript and its row (a `SampleRecord`, or None when
    the sample has no row), as the JSON Inspect writes for one: built as plain data, not
    through Inspect's models (a tenth of the time, for every sample of every evaluation).
    Inspect's readers validate it on reading; the tests read every kind of entry back."""
    ids = hashlib.sha1(f"{t.eval_id}\0{t.sample_id}\0{t.epoch}".encode()).hexdigest()[:12]
    start = t.started_at or (t.entries[0].at if t.entries else 0.0)
    messages: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    arguments: dict[str, tuple[str, dict[str, Any]]] = {}  # tool call id -> (function, arguments)
    gateway = {"input_tokens": 0, "output_tokens": 0}
    for e in t.entries:
        head = {"uuid": f"{ids}-e{e.n}", "timestamp": iso(e.at), "working_start": max(0.0, e.at - start)}
        if e.kind == "message":
            messages.append({"id": f"{ids}-m{e.n}", "content": e.content, "metadata": _meta(e), "role": e.role})
        elif e.kind == "model":
            calls = []
            for c in e.tool_calls:
                args, problem = _arguments(c.arguments)
                arguments[c.id] = (c.function, args)
                calls.append({"id": c.id, "function": c.function, "arguments": args, "type": "function",
                              **({"parse_error": problem} if problem is not None else {})})
            message = {"id": f"{ids}-m{e.n}", "content": e.content, "source": "generate", "role": "assistant",
                       **({"tool_calls": calls} if calls else {}), "model": model}
            asked = len(messages)  # the conversation it answered: a range of the pool, not a copy each turn
            messages.append(message)
            usage = e.usage or {}
            used = {"input_tokens": usage.get("input_tokens", 0), "output_tokens": usage.get("output_tokens", 0)}
            if e.provenance == "gateway":
                gateway = {k: gateway[k] + used[k] for k in gateway}
            output = {"model": model, "choices": [{"message": message, "stop_reason": "tool_calls" if calls else "stop"}],
                      "completion": e.content, "usage": {**used, "total_tokens": sum(used.values())},
                      **_some(time=e.latency_s, error=e.error)}
            events.append({**head, "metadata": _meta(e), "event": "model", "model": model, "input": [],
                           **({"input_refs": [[0, asked]]} if asked else {}), "tools": [], "tool_choice": "auto",
                           "config": {}, "output": output, **_some(error=e.error, working_time=e.latency_s)})
        elif e.kind == "tool":
            error = ({"type": "timeout", "message": "the command timed out and was killed"} if e.timed_out
                     else {"type": "unknown", "message": e.error} if e.error else None)
            function, args = arguments.get(e.tool_call_id or "", (e.function or "bash", {}))
            messages.append({"id": f"{ids}-m{e.n}", "content": e.content, "role": "tool",
                             "tool_call_id": e.tool_call_id, "function": function, **_some(error=error)})
            events.append({**head, "metadata": _meta(e), "event": "tool", "type": "function",
                           "id": e.tool_call_id or "", "function": function, "arguments": args, "result": e.content,
                           **_some(truncated=[e.output_bytes or 0, TOOL_OUTPUT_CAP] if e.truncated else None,
                                   error=error), "events": [], **_some(working_time=e.latency_s)})
        else:  # safety, cut: the platform's and the guard's notes
            data = e.model_dump(mode="json", exclude_none=True, include={"safety", "cut", "content"})
            events.append({**head, "metadata": _meta(e, keep_content=True), "event": "info",
                           "source": f"proctor/{e.kind}", "data": data})
    sample: dict[str, Any] = {"id": t.sample_id, "epoch": t.epoch, "input": "", "target": "", "messages": messages,
                              "output": {"model": model, "choices": [], "completion": ""}, "scores": {},
                              "metadata": {"proctor": {"shard_id": t.shard_id, "entries": len(t.entries), "cut": t.cut,
                                                       "stopped": t.stopped}},
                              "store": {}, "events": events, "model_usage": {}, "attachments": {},
                              "events_data": {"messages": messages, "calls": []}}
    if record is not None:
        answer = {"id": f"{ids}-out", "content": record.output, "source": "generate", "role": "assistant",
                  "model": model}
        sample.update(input=record.input, target=record.target, output={
            "model": model, "choices": [{"message": answer, "stop_reason": "stop"}], "completion": record.output},
            scores={name: {"value": value, **_some(answer=record.answers.get(name)), "history": []}
                    for name, value in record.scores.items()})
        if record.error:
            sample["error"] = {"message": record.error, "traceback": "", "traceback_ansi": ""}
        if record.started_at:
            sample.update(started_at=iso(record.started_at), completed_at=iso(record.completed_at or record.started_at),
                          total_time=round(max(0.0, (record.completed_at or 0) - record.started_at), 6))
        if not any(gateway.values()):
            gateway = {"input_tokens": record.input_tokens, "output_tokens": record.output_tokens}
    if any(gateway.values()):
        sample["model_usage"] = {model: {**gateway, "total_tokens": sum(gateway.values())}}
    return sample


def sample_summary(sample: dict[str, Any]) -> dict[str, Any]:
    """The summary Inspect keeps of a sample (its `summaries.json` entry)."""
    keys = ("id", "epoch", "input", "target", "metadata", "scores", "model_usage", "started_at", "completed_at",
            "total_time")
    error = sample.get("error")
    return {**{k: sample[k] for k in keys if k in sample}, **_some(error=error["message"] if error else None),
            "completed": True, "message_count": len(sample["messages"])}


def _some(**fields: Any) -> dict[str, Any]:
    """The fields that have a value (Inspect's logs leave out the empty ones)."""
    return {k: v for k, v in fields.items() if v is not None}


def eval_log(*, eval_id: str, name: str, model: str, created: float, samples: list[Any], status: str,
             started: float | None, completed: float | None, metrics: dict[str, dict[str, Any]],
             total_samples: int, completed_samples: int, dataset: str | None, epochs: int,
             metadata: dict[str, Any], error: str | None = None, usage: dict[str, int] | None = None) -> Any:
    """An Inspect `EvalLog` of one shard or evaluation. `status` is Proctor's (succeeded,
    failed, cancelled, safety_stopped); `metrics` maps scorer names to `mean_ci` results."""
    from inspect_ai.log import (EvalConfig, EvalDataset, EvalLog, EvalMetric, EvalPlan, EvalResults, EvalScore,
                                EvalSpec, EvalStats)
    from inspect_ai.log._log import EvalError
    from inspect_ai.model import ModelUsage
    from inspect_ai.viewer import ViewerConfig

    spec = EvalSpec(eval_id=eval_id, run_id=eval_id, created=iso(created), task=name, task_id=eval_id,
                    dataset=EvalDataset(name=dataset or name, samples=total_samples), model=model,
                    config=EvalConfig(epochs=epochs), metadata={"proctor": metadata},
                    viewer=ViewerConfig(trust_content=False))
    scores = [EvalScore(name=scorer, scorer=scorer, scored_samples=m.get("n"), metrics={
        key: EvalMetric(name=key, value=m[key]) for key in ("mean", "stderr", "ci_low", "ci_high")
        if isinstance(m.get(key), (int, float))}) for scorer, m in metrics.items()]
    used = {model: ModelUsage(input_tokens=usage.get("input_tokens", 0), output_tokens=usage.get("output_tokens", 0),
                              total_tokens=usage.get("input_tokens", 0) + usage.get("output_tokens", 0))} \
        if usage and any(usage.values()) else {}
    return EvalLog(eval=spec, plan=EvalPlan(), status=inspect_status(status), samples=samples,
                   results=EvalResults(total_samples=total_samples, completed_samples=completed_samples, scores=scores),
                   stats=EvalStats(started_at=iso(started) if started else "",
                                   completed_at=iso(completed) if completed else "", model_usage=used),
                   error=EvalError(message=error, traceback="", traceback_ansi="") if error else None)


def inspect_status(status: str) -> str:
    return {"succeeded": "success", "failed": "error"}.get(status, "cancelled")


# ---------------------------------------------------------------- back


def _text(value: Any, attachments: dict[str, str]) -> str:
    """A stored content value as text: attachments resolved, content parts joined."""
    if isinstance(value, str):
        if value.startswith(ATTACHMENT):
            return str(attachments.get(value[len(ATTACHMENT):], value))
        return value
    if isinstance(value, list):
        return "".join(_text(part.get("text", ""), attachments) if isinstance(part, dict) else _text(part, attachments)
                       for part in value)
    return "" if value is None else str(value)


def entries_of(sample: dict[str, Any]) -> list[Entry]:
    """The entries of a stored sample (its JSON in a `.eval` log). Records that carry no
    Proctor metadata (a log Proctor did not write) are skipped."""
    attachments = sample.get("attachments") or {}
    found: list[Entry] = []

    def meta(record: dict[str, Any]) -> dict[str, Any] | None:
        m = (record.get("metadata") or {}).get("proctor") if isinstance(record, dict) else None
        return m if isinstance(m, dict) and "kind" in m else None

    for message in sample.get("messages") or []:
        m = meta(message)
        if m is not None and m["kind"] == "message":
            found.append(Entry.model_validate({**m, "content": _text(message.get("content"), attachments)}))
    for event in sample.get("events") or []:
        m = meta(event)
        if m is None:
            continue
        if m["kind"] == "model":
            choices = (event.get("output") or {}).get("choices") or [{}]
            content = _text((choices[0].get("message") or {}).get("content"), attachments)
        elif m["kind"] == "tool":
            content = _text(event.get("result"), attachments)
        else:
            content = _text(m.get("content"), attachments)
        found.append(Entry.model_validate({**m, "content": content}))
    found.sort(key=lambda e: e.n)
    return found


def transcript_of(sample: dict[str, Any], eval_id: str) -> SampleTranscript:
    """A stored sample's JSON as a `SampleTranscript`."""
    info = (sample.get("metadata") or {}).get("proctor") or {}
    entries = entries_of(sample)
    stamps = [e.at for e in entries]
    return SampleTranscript(eval_id=eval_id, shard_id=str(info.get("shard_id", "")), sample_id=str(sample.get("id")),
                            epoch=int(sample.get("epoch") or 1), entries=entries, cut=bool(info.get("cut")),
                            stopped=bool(info.get("stopped")), started_at=min(stamps, default=None),
                            completed_at=max(stamps, default=None))
