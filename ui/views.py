"""What the dashboard shows, as HTML and data frames: pure functions of what the API
answered (no client, no Gradio), so each is testable alone."""

from __future__ import annotations

import html
from collections import Counter
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

import pandas as pd

from proctor.statuses import TERMINAL

COLOURS = {"queued": "#6b7280", "scheduled": "#2563eb", "running": "#0891b2", "succeeded": "#16a34a",
           "failed": "#dc2626", "cancelled": "#d97706", "safety_stopped": "#7c3aed", "interrupted": "#6b7280"}
PAGE_ROWS = 100  # rows of the live table sent to the browser at once
RESOURCE_BUCKET_S = 2.0  # shards' samples summed per this many seconds for the evaluation's total


def _e(text: Any) -> str:
    return html.escape(str(text if text is not None else ""))


def badge(status: str) -> str:
    return (f'<span class="pr-badge" data-status="{_e(status)}" style="background:{COLOURS.get(status, "#6b7280")}">'
            f'{_e(status.replace("_", "-"))}</span>')


def _seconds(a: datetime | None, b: datetime | None = None) -> float | None:
    if a is None:
        return None
    return ((b or datetime.now(timezone.utc)) - a).total_seconds()


def _duration(s: float | None) -> str:
    if s is None:
        return ""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def live_table(evaluations: list[Any], page: int = 0, per_page: int = PAGE_ROWS) -> str:
    """One page of the evaluations (the browser redraws what it is sent: a page stays
    smooth where 1,000 rows do not), under a line counting all of them by status."""
    pages = max(1, -(-len(evaluations) // per_page))
    page = min(max(page, 0), pages - 1)
    shown = evaluations[page * per_page:(page + 1) * per_page]
    rows = []
    for ev in shown:
        share = ev.done_units / ev.total_units if ev.total_units else 0.0
        elapsed = _seconds(ev.started_at or ev.created_at, ev.finished_at)
        left = (elapsed / share - elapsed) if ev.status == "running" and share > 0 and elapsed else None
        rows.append(
            f'<tr data-id="{_e(ev.id)}"><td>{eval_link(ev.id)}</td><td>{_e(ev.name)}</td><td>{badge(ev.status)}</td>'
            f'<td class="pr-progress"><div class="pr-bar" title="{share:.0%}"><div style="width:{100 * share:.1f}%"></div></div> '
            f'<span class="pr-done">{ev.done_units}/{ev.total_units}</span></td>'
            f'<td>{_e(ev.owner)}</td><td>{_e(ev.model)}</td><td class="pr-gpus">{_e(gpus_text(ev))}</td>'
            f'<td>{_duration(elapsed)}</td>'
            f'<td>{_duration(left) if left is not None else ""}</td><td>{_e(ev.wait_reason or "")}</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("id", "name", "status", "progress", "owner", "model", "GPUs",
                                              "elapsed", "left", "waiting for"))
    body = "".join(rows) or '<tr><td colspan="10">no evaluations</td></tr>'
    counts = Counter(ev.status for ev in evaluations)
    by_status = " · ".join(f"{n} {status.replace('_', '-')}" for status, n in counts.most_common())
    where = (f"{page * per_page + 1}–{page * per_page + len(shown)} of {len(evaluations)}"
             if evaluations else "0 of 0")
    return (f'<p id="pr-live-count" data-page="{page}" data-pages="{pages}" data-total="{len(evaluations)}">'
            f'{where} · page {page + 1} of {pages}' + (f" · {_e(by_status)}" if by_status else "") + "</p>"
            f'<div class="pr-scroll"><table class="pr-table" id="pr-live"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')


def eval_link(eval_id: str) -> str:
    """A link that opens the evaluation's detail (the dashboard reads `?eval=`)."""
    return f'<a class="pr-eval" href="?{_e(urlencode({"eval": eval_id}))}"><code>{_e(eval_id)}</code></a>'


def turn_link(eval_id: str, where: dict[str, Any]) -> str:
    """A link that opens a transcript at the entry where an incident fired (its evidence's
    `transcript`: sample_id, epoch, n)."""
    query = urlencode({"eval": eval_id, "sample": where.get("sample_id", ""), "epoch": where.get("epoch", 1),
                       "turn": where.get("n", 0)})
    return f'<a class="pr-turn-link" href="?{_e(query)}">in the transcript ▸</a>'


def gpus_text(ev: Any) -> str:
    """`2 × A100 / shard`, or "" for a CPU-only evaluation."""
    n = getattr(ev, "gpus_per_shard", 0) or 0
    return f"{n} × {getattr(ev, 'gpu_type', None) or 'any'} / shard" if n else ""


def incidents_html(incidents: list[dict[str, Any]], link: bool = False) -> str:
    if not incidents:
        return '<p class="pr-none">no incidents</p>'
    rows = []
    for i in incidents:
        ev = i.get("evidence") or {}
        lines = "<br>".join(_e(x) for x in (ev.get("lines") or [])[:3])
        where = (f'{eval_link(i["eval_id"])} {_e(i.get("evaluation", ""))}' if link else _e(i.get("shard_id")))
        rows.append(f'<tr class="pr-incident"><td>{_e(i.get("created_at", ""))[:19]}</td><td>{where}</td>'
                    f'<td><b>{_e(i["rule"])}</b></td><td>{_e(i["severity"])}</td><td>{_e(i["action"])}</td>'
                    f'<td>{_e(ev.get("message", ""))}<br><small>{lines}</small>'
                    f'{" " + turn_link(i["eval_id"], ev["transcript"]) if isinstance(ev.get("transcript"), dict) else ""}'
                    f'</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("when", "evaluation" if link else "shard", "rule", "severity",
                                              "action", "what"))
    return f'<table class="pr-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def detail_html(ev: Any) -> str:
    s = ev.summary or {}
    metrics = "".join(f"<tr><td>{_e(k)}</td><td>{m.get('mean', 0) or 0:.3f}</td>"
                      f"<td>[{m.get('ci_low') or 0:.3f}, {m.get('ci_high') or 0:.3f}]</td><td>{_e(m.get('n', ''))}</td></tr>"
                      for k, m in (s.get("metrics") or {}).items())
    table = (f'<table class="pr-table"><thead><tr><th>scorer</th><th>mean</th><th>95% CI</th><th>n</th></tr></thead>'
             f'<tbody>{metrics}</tbody></table>' if metrics else "")
    return (f'<h3>{_e(ev.name)} {badge(ev.status)}</h3><p><code>{_e(ev.id)}</code> · owner {_e(ev.owner)} · '
            f'model {_e(ev.model)} · runtime {_e(ev.runtime)} · {ev.done_units}/{ev.total_units} samples · '
            f'{ev.total_shards} shards</p>'
            + (f'<p class="pr-error">{_e(ev.error)}</p>' if ev.error else "")
            + (f'<p>waiting for: {_e(ev.wait_reason)}</p>' if ev.wait_reason else "") + table)


STAGES = ("setup", "eval", "score", "cleanup")


def stage_cells(x: dict[str, Any]) -> str:
    """A shard's seconds in each stage (summed over its samples) and the stages its samples failed in."""
    took = x.get("stages") if isinstance(x.get("stages"), dict) else {}
    cells = "".join(f'<td class="pr-stage" data-stage="{stage}">'
                    + (f"{float(took[stage]):.2f} s" if isinstance(took.get(stage), (int, float)) else "") + "</td>"
                    for stage in STAGES)
    failed = x.get("failed_stages") if isinstance(x.get("failed_stages"), dict) else {}
    return cells + f'<td class="pr-failed-stages">{_e(", ".join(f"{k} × {v}" for k, v in failed.items()))}</td>'


def shards_html(shards: list[dict[str, Any]]) -> str:
    rows = "".join(
        f'<tr><td><code>{_e(x["shard_id"])}</code></td><td>{badge(x["status"])}</td><td>{_e(x["units"])}</td>'
        f'<td>{_e(x["attempt"])}/{_e(x["max_attempts"])}</td><td>{_e(x.get("supervisor") or "")}</td>'
        f'{stage_cells(x)}<td>{_e(x.get("error") or "")}</td></tr>' for x in shards[:500])
    head = "".join(f"<th>{h}</th>" for h in ("shard", "status", "units", "attempt", "supervisor", *STAGES,
                                              "failed in", "error"))
    more = f"<p>and {len(shards) - 500} more</p>" if len(shards) > 500 else ""
    return f'<table class="pr-table" id="pr-shard-table"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{more}'


def cluster_html(c: dict[str, Any], ray_dashboard: str | None) -> str:
    cpus, mem = c.get("cpus", {}), c.get("memory", {})
    used = [("CPUs", cpus.get("total", 0) - cpus.get("free", 0), cpus.get("total", 0), "{:g}"),
            ("memory, GiB", (mem.get("total", 0) - mem.get("free", 0)) / 2**30, mem.get("total", 0) / 2**30, "{:.1f}")]
    used += [(f"GPUs {t}", g["total"] - g["free"], g["total"], "{:g}") for t, g in (c.get("gpus") or {}).items()]
    rows = "".join(f'<tr><td>{_e(name)}</td><td>{use_bar(n, total)}</td><td>{form.format(n)} / {form.format(total)}</td></tr>'
                   for name, n, total, form in used)
    if not c.get("gpus"):
        rows += '<tr><td>GPUs</td><td colspan="2">none in the cluster</td></tr>'
    waiting = "".join(f"<li><code>{_e(k)}</code>: {_e(v)}</li>" for k, v in (c.get("waiting") or {}).items())
    link = f'<p><a href="{_e(ray_dashboard)}" target="_blank">Ray dashboard</a></p>' if ray_dashboard else ""
    return (f'{store_banner(c.get("results_store"))}<h4>Capacity in use, by resource and GPU type</h4>'
            f'<table class="pr-table" id="pr-cluster-use"><tbody>{rows}</tbody></table>'
            f'<h4>Shards</h4><table class="pr-table" id="pr-cluster"><tbody>'
            f'<tr><td>queued</td><td>{_e(c.get("queued_shards", 0))}</td></tr>'
            f'<tr><td>running</td><td>{_e(c.get("running_shards", 0))}</td></tr></tbody></table>'
            f'<h4>Waiting</h4><ul>{waiting or "<li>nothing waits</li>"}</ul>{link}')


def store_banner(results_store: dict[str, Any] | None) -> str:
    """A warning while the results store is away (its rows wait on the platform's disk)."""
    if not results_store or not results_store.get("degraded"):
        return ""
    ts = results_store.get("since")
    since = datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "unknown"
    return (f'<p class="pr-warn" id="pr-store-degraded"><b>Results store degraded</b>: unreachable since '
            f'{_e(since)}; {_e(results_store.get("waiting"))} writes ({_e(results_store.get("bytes"))} bytes) '
            f'wait in <code>{_e(results_store.get("folder"))}</code> and are written when it returns.</p>')


def use_bar(used: float, total: float) -> str:
    """A bar filled to the share in use (the live table's progress bar, in amber past 90%)."""
    share = min(1.0, max(0.0, used / total)) if total else 0.0
    full = " pr-full" if share > 0.9 else ""
    return f'<div class="pr-bar{full}" title="{share:.0%}"><div style="width:{100 * share:.1f}%"></div></div>'


def history_frames(evaluations: list[Any]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(outcomes by model, outcomes by suite, durations, first-scorer score over time per model)."""
    counts: dict[tuple[str, str], int] = Counter()
    by_suite: dict[tuple[str, str], int] = Counter()
    durations, scores = [], []
    for ev in evaluations:
        if ev.status not in TERMINAL:
            continue
        counts[(ev.model, ev.status)] += 1
        by_suite[(getattr(ev, "suite", "") or ev.name, ev.status)] += 1
        took = _seconds(ev.created_at, ev.finished_at)
        if took is not None:
            durations.append({"finished": ev.finished_at, "seconds": took, "model": ev.model})
        metrics = (ev.summary or {}).get("metrics") or {}
        first = next(iter(metrics.values()), None)
        if first and first.get("mean") is not None and ev.finished_at is not None:
            scores.append({"finished": ev.finished_at, "score": first["mean"], "model": ev.model})
    outcomes = pd.DataFrame([{"model": m, "status": s, "evaluations": n} for (m, s), n in counts.items()],
                            columns=["model", "status", "evaluations"])
    suites = pd.DataFrame([{"suite": m, "status": s, "evaluations": n} for (m, s), n in by_suite.items()],
                          columns=["suite", "status", "evaluations"])
    return (outcomes, suites, pd.DataFrame(durations, columns=["finished", "seconds", "model"]),
            pd.DataFrame(scores, columns=["finished", "score", "model"]))


def resource_frames(res: dict[str, Any], shards_drawn: int = 8) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(CPU cores, memory MiB) over the seconds since the evaluation's first sample, and a
    caption, from its resources as the API gives them: the evaluation's total, and the
    first `shards_drawn` shard attempts apart."""
    cpu: list[dict[str, Any]] = []
    mem: list[dict[str, Any]] = []
    totals: dict[float, dict[str, float]] = {}
    series = res.get("shards") or []
    first = min((x["t"] for s in series for x in s.get("samples") or []), default=0.0)
    for i, s in enumerate(series):
        name = f"{s['shard_id']}" + (f" (attempt {s['attempt']})" if (s.get("attempt") or 1) > 1 else "")
        for x in s.get("samples") or []:
            at = round(x["t"] - first, 1)
            bucket = totals.setdefault(round(at / RESOURCE_BUCKET_S) * RESOURCE_BUCKET_S, {"cpu": 0.0, "memory": 0.0})
            bucket["cpu"] += x.get("cpu", 0.0)
            bucket["memory"] += x.get("memory", 0.0)
            if i < shards_drawn:
                if "cpu" in x:
                    cpu.append({"seconds": at, "cores": x["cpu"], "series": name})
                if "memory" in x:
                    mem.append({"seconds": at, "MiB": x["memory"] / 2**20, "series": name})
    if len(series) > 1:
        for at, b in sorted(totals.items()):
            cpu.append({"seconds": at, "cores": b["cpu"], "series": "all shards"})
            mem.append({"seconds": at, "MiB": b["memory"] / 2**20, "series": "all shards"})
    gpus = res.get("gpus_per_shard") or 0
    caption = (f"{len(series)} shard attempt(s)" + (f", {len(series) - shards_drawn} more not drawn apart"
                                                      if len(series) > shards_drawn else "")
               + (f"; GPUs: {gpus} × {res.get('gpu_type') or 'any'} per shard (utilisation not reported by the runtime)"
                  if gpus else "; no GPUs"))
    return (pd.DataFrame(cpu, columns=["seconds", "cores", "series"]),
            pd.DataFrame(mem, columns=["seconds", "MiB", "series"]), caption)
