"""The sample browser's conversation view: one sample's transcript, live while it runs.

`transcript_html` draws what the API answered (`proctor.transcript.TranscriptPage`): each
entry with who said it and where it came from (the sandbox's word, the gateway's figures,
the safety guard's actions), tool calls and their outputs, long texts folded. Everything a
sandbox wrote is escaped: it is shown, never rendered. `TranscriptPane` puts it in the
Evaluation tab: a sample picker (also set by clicking a row of the samples table, or by an
incident's link `?eval=…&sample=…&epoch=…&turn=…`, which opens the transcript at the entry
where the incident fired), and a timer that refreshes it while the sample is live.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import gradio as gr

from proctor.client import ProctorError

from .views import _e

REFRESH_S = 2.0
VIEW_ENTRIES = 300  # entries drawn at once; the API and the CLI give the rest
FOLD_CHARS = 1500
FOLD_LINES = 16
PROVENANCE = {"sandbox": "from the sandbox (untrusted)", "gateway": "measured by the model gateway",
              "guard": "the safety guard", "platform": "the platform"}
CSS = """
#pr-transcript .pr-turn { border-left: 3px solid #d1d5db; margin: 6px 0; padding: 2px 8px; }
#pr-transcript .pr-turn pre { white-space: pre-wrap; word-break: break-word; margin: 2px 0; font-size: 13px; }
#pr-transcript .pr-model { border-color: #0891b2; }
#pr-transcript .pr-tool { border-color: #6b7280; background: #f9fafb; }
#pr-transcript .pr-safety { border-color: #dc2626; background: #fef2f2; }
#pr-transcript .pr-cut { border-color: #d97706; }
#pr-transcript .pr-focus { outline: 2px solid #7c3aed; background: #f5f3ff; }
#pr-transcript .pr-prov { font-size: 11px; color: #6b7280; border: 1px solid #d1d5db; border-radius: 3px; padding: 0 3px; }
#pr-transcript .pr-facts { font-size: 12px; color: #6b7280; }
#pr-transcript details pre { max-height: 480px; overflow: auto; }
"""


def choice(eval_id: str, sample_id: str, epoch: int) -> str:
    """A picker value: the evaluation, sample id and epoch, as JSON (ids may hold any character)."""
    return json.dumps([eval_id, sample_id, epoch])


def parse_choice(value: Any, eval_id: str | None) -> tuple[str, int] | None:
    """(sample id, epoch) of a picker value of evaluation `eval_id` (None for another's)."""
    if not value or not eval_id:
        return None
    try:
        ev, sample_id, epoch = json.loads(value)
    except (ValueError, TypeError):
        return str(value), 1  # typed by hand: a sample id
    return (str(sample_id), int(epoch)) if ev == eval_id else None


def choices(eval_id: str, listing: list[Any]) -> list[tuple[str, str]]:
    """(label, value) of each sample with a transcript, live ones first."""
    order = {"live": 0, "stored": 1, "quarantine": 2}
    items = sorted(listing, key=lambda s: (order.get(s.where, 3), s.sample_id, s.epoch))
    return [(f"{s.sample_id} · epoch {s.epoch} · {s.where} · {s.entries} entries",
             choice(eval_id, s.sample_id, s.epoch)) for s in items[:2000]]


def _folded(text: str, open_: bool = False) -> str:
    if len(text) <= FOLD_CHARS and text.count("\n") < FOLD_LINES:
        return f"<pre>{_e(text)}</pre>"
    first = text.strip().splitlines()[0][:120] if text.strip() else ""
    return (f'<details class="pr-fold"{" open" if open_ else ""}><summary>{_e(first)} … '
            f'({text.count(chr(10)) + 1} lines, {len(text)} characters)</summary><pre>{_e(text)}</pre></details>')


def _facts(e: Any) -> str:
    facts = e.facts()
    return f' <span class="pr-facts">{_e(" · ".join(facts))}</span>' if facts else ""


def entry_html(e: Any, focus: bool = False) -> str:
    when = datetime.fromtimestamp(e.at, timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    who = e.role or e.kind
    head = (f'<b>[{e.n}] {_e(who)}</b> <span class="pr-prov" title="{_e(PROVENANCE.get(e.provenance, ""))}">'
            f'{_e(e.provenance)}</span> <span class="pr-facts">{when}</span>{_facts(e)}')
    body = ""
    if e.kind == "safety" and e.safety is not None:
        s = e.safety
        what = ("stopped the sample" if s.stopped else "") + ("; the answer was held back" if s.held else "")
        body = (f'<div class="pr-safety-what"><b>{_e(s.monitor)}/{_e(s.rule)}</b> ({_e(s.action)}) {_e(s.message)}'
                f'{" — " + _e(what) if what else ""}</div>')
        body += "".join(f"<pre>{_e(x)}</pre>" for x in s.evidence[:5])
        body += "".join(f"<div>blocked: <code>{_e(c)}</code></div>" for c in s.blocked_commands)
    elif e.kind == "cut" and e.cut is not None:
        body = (f"<div>{_e(e.cut.reason)}: {e.cut.dropped_entries} more entries ({e.cut.dropped_bytes} bytes) "
                f"were left out</div>")
    else:
        if e.content:
            body = _folded(e.content, open_=focus)
        for call in e.tool_calls:
            body += f'<div class="pr-call">→ <code>{_e(call.function)}</code>{_folded(_command(call.arguments), focus)}</div>'
    return (f'<div class="pr-turn pr-{_e(e.kind)}{" pr-focus" if focus else ""}" id="pr-turn-{e.n}" '
            f'data-n="{e.n}" data-kind="{_e(e.kind)}" data-provenance="{_e(e.provenance)}">{head}{body}</div>')


def _command(arguments: str) -> str:
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value["command"] if isinstance(value, dict) and isinstance(value.get("command"), str) else arguments


def transcript_html(page: Any | None, focus: int | None = None) -> str:
    if page is None:
        return '<p class="pr-none">Pick a sample to see its conversation.</p>'
    state = {"live": "live: it is running", "stored": "stored", "quarantine": "quarantined"}.get(page.where, page.where)
    notes = [f"{page.total} entries", state] + (["cut at its bound"] if page.cut else []) \
        + (["stopped by a safety violation"] if page.stopped else [])
    shown = f"; showing {page.offset}–{page.offset + len(page.entries) - 1}" if page.total > len(page.entries) else ""
    head = (f'<p id="pr-transcript-head" data-where="{_e(page.where)}" data-total="{page.total}">'
            f'<b>{_e(page.sample_id)}</b> · epoch {page.epoch} · shard {_e(page.shard_id)} · '
            f'{_e(" · ".join(notes))}{_e(shown)}</p>')
    return head + "".join(entry_html(e, focus == e.n) for e in page.entries)


class TranscriptPane:
    """The conversation view of the Evaluation tab (built inside its layout)."""

    def __init__(self, session: Any):
        self.session = session

    def build(self) -> None:
        gr.Markdown("### Conversation")
        self.picker = gr.Dropdown(label="Sample (or click a row above)", choices=[], elem_id="pr-sample-pick",
                                  allow_custom_value=True)
        self.view = gr.HTML(transcript_html(None), elem_id="pr-transcript")
        self.focus = gr.State(None)
        self.timer = gr.Timer(REFRESH_S, active=False)

    def wire(self, token: Any, pick: Any, samples: Any, loaded: Any) -> None:
        """`pick` is the evaluation picker, `samples` the samples table, `loaded` the
        page-load event after which the token is known."""
        loaded.then(self.opened, [token, pick], [self.picker, self.focus])
        for trigger in (pick.change, self.picker.focus):
            trigger(self.listing, [token, pick], [self.picker])
        samples.select(self.from_row, [pick], [self.picker, self.focus])
        for trigger in (pick.change, self.picker.change, self.timer.tick):
            trigger(self.show, [token, pick, self.picker, self.focus], [self.view, self.timer])
        self.view.change(None, None, None, js="() => { const f = document.querySelector('#pr-transcript .pr-focus');"
                                              " if (f) f.scrollIntoView({block: 'center'}); }")

    def opened(self, token: str, eval_id: str | None, request: gr.Request) -> tuple[Any, ...]:
        """An incident's link names a sample, its epoch and the entry where it fired."""
        query = request.query_params if request is not None else {}
        sample = str(query.get("sample") or "")[:1024]
        if not sample or not eval_id:
            return gr.update(), None
        try:
            epoch, turn = int(query.get("epoch") or 1), int(query.get("turn") or 0)
        except ValueError:
            epoch, turn = 1, 0
        return gr.update(value=choice(eval_id, sample, epoch)), turn

    def listing(self, token: str, eval_id: str | None) -> Any:
        if not token or not eval_id:
            return gr.update(choices=[])
        try:
            return gr.update(choices=choices(eval_id, self.session.client(token).transcripts(eval_id)))
        except ProctorError:
            return gr.update(choices=[])

    @staticmethod
    def from_row(eval_id: str | None, evt: gr.SelectData) -> tuple[Any, ...]:
        row = evt.row_value or []
        if not eval_id or len(row) < 2 or row[0] in (None, ""):
            return gr.update(), None
        try:
            return gr.update(value=choice(eval_id, str(row[0]), int(row[1]))), None
        except (TypeError, ValueError):
            return gr.update(), None

    def show(self, token: str, eval_id: str | None, value: Any, focus: int | None) -> tuple[Any, ...]:
        picked = parse_choice(value, eval_id)
        if not token or picked is None:
            return transcript_html(None), gr.Timer(active=False)
        offset = max(0, (focus or 0) - VIEW_ENTRIES // 2) if focus else 0
        try:
            page = self.session.client(token).transcript(eval_id, picked[0], epoch=picked[1], offset=offset,
                                                          limit=VIEW_ENTRIES)
        except ProctorError as exc:  # not started yet (404): looked for again at the next tick
            return f'<p class="pr-none">{_e(exc.message)}</p>', gr.Timer(active=exc.status == 404)
        return transcript_html(page, focus), gr.Timer(active=page.where == "live")
