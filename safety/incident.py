"""Incidents: what a safety violation leaves behind, as JSON (stored) and Markdown (read).

`evidence_of` builds the stored evidence of one violation (bounded): the rule's message and
evidence lines, the shard's timeline and its resource trace around the violation.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any


TRACE_AROUND = 60  # resource samples kept in an incident (the last ones before the stop)


def evidence_of(v: dict[str, Any], safety: dict[str, Any], started_at: float | None = None) -> dict[str, Any]:
    """The stored evidence of violation `v` (`Violation.as_dict`) of one shard, whose guard
    summary is `safety`."""
    timeline: list[dict[str, Any]] = []
    if started_at is not None:
        timeline.append({"at": started_at, "what": "sandbox started"})
    for other in safety.get("violations", []):
        timeline.append({"at": other["at"], "what": f"{other['monitor']}/{other['rule']} ({other['action']}): "
                                                    f"{other['message']}"})
    if safety.get("stopped_by") and safety.get("killed_at"):
        timeline.append({"at": safety["killed_at"], "what": "sandbox dead (safety stop)"})
    timeline.sort(key=lambda e: e["at"])
    return {"monitor": v["monitor"], "message": v["message"], "lines": list(v["evidence"]),
            "timeline": timeline[:50], "resource_trace": list(safety.get("trace", []))[-TRACE_AROUND:],
            "kill_s": safety.get("kill_s"), "at": v["at"],
            "transcript": v.get("transcript")}  # where it fired: sample_id, epoch and n, the entry


def report_markdown(eval_id: str, incidents: list[dict[str, Any]]) -> str:
    """A readable report of an evaluation's incidents (dicts as the API returns them)."""
    lines = [f"# Safety incidents of evaluation {eval_id}", ""]
    if not incidents:
        return "\n".join(lines + ["No incidents.", ""])
    for inc in incidents:
        ev = inc.get("evidence") or {}
        lines += [f"## {inc.get('rule')} — {inc.get('severity')} ({inc.get('action')})", "",
                  f"- shard: `{inc.get('shard_id')}`", f"- when: {_when(ev.get('at'))}",
                  f"- monitor: {ev.get('monitor', '?')}", f"- what: {ev.get('message', '')}"]
        if ev.get("kill_s") is not None:
            lines.append(f"- sandbox dead {ev['kill_s'] * 1000:.0f} ms after the violation was seen")
        if ev.get("lines"):
            lines += ["", "Evidence (from the sandbox: untrusted):", "", "```text"]
            lines += [str(x).replace("```", "'''") for x in ev["lines"]] + ["```"]
        if ev.get("timeline"):
            lines += ["", "Timeline:", ""]
            lines += [f"- {_when(e['at'])} {e['what']}" for e in ev["timeline"]]
        trace = ev.get("resource_trace") or []
        if trace:
            peak = {k: max(s.get(k, 0) for s in trace) for k in ("memory", "pids", "disk", "output") if
                    any(k in s for s in trace)}
            lines += ["", "Resources at their peak: " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items())]
        lines.append("")
    return "\n".join(lines)


def report_json(eval_id: str, incidents: list[dict[str, Any]]) -> str:
    return json.dumps({"eval_id": eval_id, "incidents": incidents}, indent=2, default=str)


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "?"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
