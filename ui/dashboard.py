"""The monitoring dashboard (Gradio): what runs, what ended, what was stopped and why.

It talks to the platform only through `proctor.Client` and the API, with the user's own
token, like any user: a viewer sees no stop buttons, a researcher sees only their own.
Pages: Live (evaluations with status and progress, updated every `REFRESH_S`), Evaluation
(summary, shards, logs with filters, sample browser, artifacts, incidents, the spec,
emergency stop with a confirmation step), Safety (incidents as they come; stop-all for admins), Cluster
(capacity, queue, wait reasons, the Ray dashboard), History (rates, durations, scores).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from itertools import islice
from typing import Any

import gradio as gr

from proctor.client import ProctorError
from proctor.statuses import STATUSES, TERMINAL

from .kept import MAX_TABS, Sent, Session
from .transcripts import CSS as TRANSCRIPT_CSS
from .transcripts import TranscriptPane
from .views import (PAGE_ROWS, cluster_html, detail_html, history_frames, incidents_html, live_table, resource_frames,
                    shards_html, _e)

REFRESH_S = 2.0
MAX_LISTED = 1000
SIGNED_OUT = "signed-out"  # kept in the browser after signing out (an empty value is not stored)
SLOW_REFRESH_S = 10.0
LOG_LINES = 200  # the view keeps the last lines only
CSS = """
.pr-table { width: 100%; border-collapse: collapse; font-size: 14px; }
.pr-table th, .pr-table td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e5e7eb; }
.pr-badge { color: white; border-radius: 4px; padding: 1px 6px; font-size: 12px; white-space: nowrap; }
.pr-bar { background: #e5e7eb; border-radius: 3px; height: 10px; width: 120px; display: inline-block; }
.pr-bar > div { background: #0891b2; height: 10px; border-radius: 3px; }
.pr-bar.pr-full > div { background: #d97706; }
.pr-scroll { max-height: 640px; overflow-y: auto; }
.pr-table code, .pr-progress { white-space: nowrap; }
.pr-scroll tr { content-visibility: auto; contain-intrinsic-size: auto 29px; }
"""


def build(api_url: str, token: str | None = None, ray_dashboard: str | None = None) -> gr.Blocks:
    session = Session(api_url)
    sent = Sent(most=8 * MAX_TABS)  # five refreshers per tab

    def sign_in(secret: str) -> tuple[Any, ...]:
        try:
            me = session.client(secret.strip()).me()
        except ProctorError as exc:
            if exc.status == 401:  # not a token: its client is not kept
                session.drop(secret.strip())
            return "", "", f"**Not signed in:** {exc.message}"
        return secret.strip(), me["role"], f"Signed in as **{me['name']}** ({me['role']})"

    def sign_in_and_keep(secret: str) -> tuple[Any, ...]:
        signed = sign_in(secret)
        return (*signed, signed[0])  # kept in the browser (local storage) for the next visit

    def sign_out(secret: str, request: gr.Request) -> tuple[Any, ...]:
        """Forget the token in this tab and in the browser; the views empty on their next refresh."""
        session.drop(secret)
        session.choices.pop(getattr(request, "session_hash", None) or secret)
        sent.forget(request)
        return ("", "", "Signed out; sign in with an API token", SIGNED_OUT, gr.update(value=""),
                gr.update(choices=[], value=None), "<p>Sign in with an API token.</p>")

    def opened(secret: str, kept: str, request: gr.Request) -> tuple[Any, ...]:
        """On page load: sign in (the local token, else the one this browser kept) and open
        the evaluation a link names (`?eval=<id>`, from the live table or an incident)."""
        secret = secret or (kept if kept != SIGNED_OUT else "")
        signed = sign_in(secret) if secret else ("", "", "Sign in with an API token")
        wanted = str(request.query_params.get("eval") or "").strip()[:128] if request is not None else ""
        if wanted and signed[0]:
            return (*signed, gr.update(value=wanted), gr.Tabs(selected="detail"))
        return (*signed, gr.update(), gr.update())

    def refresh_live(secret: str, statuses: list[str] | None, text: str | None, owner: str | None, page: int,
                     request: gr.Request) -> tuple[Any, ...]:
        return sent.changed("live", request, live_outputs(secret, statuses, text, owner, page, request))

    def live_outputs(secret: str, statuses: list[str] | None, text: str | None, owner: str | None, page: int,
                     request: gr.Request) -> tuple[Any, ...]:
        try:
            found = list(islice(session.client(secret).list(status=statuses or None, text=text or None,
                                                            owner=(owner or "").strip() or None, limit=500),
                                MAX_LISTED))
        except ProctorError as exc:
            return f"<p>{_e(exc.message)}</p>", gr.update(), page
        page = min(max(page, 0), max(0, (len(found) - 1) // PAGE_ROWS))
        choices = [(f"{ev.name} · {ev.id}", ev.id) for ev in found[:500]]
        tab = getattr(request, "session_hash", None) or secret  # one browser tab
        if session.choices.put(tab, choices) == choices:  # unchanged: not sent again
            return live_table(found, page), gr.update(), page
        return live_table(found, page), gr.update(choices=choices), page

    def turn(page: int, step: int) -> int:
        return max(0, page + step)  # the refresh clamps it to the last page

    def refresh_detail(secret: str, role: str, eval_id: str | None, level: str, grep: str,
                       request: gr.Request) -> tuple[Any, ...]:
        return sent.changed("detail", request, detail_outputs(secret, role, eval_id, level, grep))

    def detail_outputs(secret: str, role: str, eval_id: str | None, level: str, grep: str) -> tuple[Any, ...]:
        hidden = gr.update(visible=False)
        if not secret or not eval_id:
            return "", "", None, "", "", hidden, hidden, hidden, "", None, None, None, ""
        c = session.client(secret)
        try:
            ev = c.get(eval_id)
            stored = c.shards(eval_id)
            lines = list(c.logs(eval_id, level=level or None, text=grep or None))[-LOG_LINES:]
            kept = session.finished.get(ev.id)
            if kept is None:
                kept = (session.rows(c, ev), resource_frames(c.resources(eval_id)))
                if ev.status in TERMINAL:
                    session.finished.put(ev.id, kept)
            rows, (cpu, memory, caption) = kept
            incidents = c.incidents(eval_id)
            artifacts = c.artifacts(eval_id)
        except ProctorError as exc:
            return f"<p>{_e(exc.message)}</p>", "", None, "", "", hidden, hidden, hidden, "", None, None, None, ""
        log_text = "\n".join(f"{_clock(x.get('ts'))} {x.get('shard_id', '')} {str(x.get('level', '')).upper():7} "
                             f"{x.get('message', '')}" for x in lines)
        files = "".join(f"<li><code>{_e(a.path)}</code> ({a.size} bytes)</li>" for a in artifacts) or "<li>none</li>"
        can_stop = role in ("researcher", "safety", "admin") and ev.status not in TERMINAL
        confirming = gr.update() if can_stop else gr.update(visible=False)  # nothing left to confirm
        return (detail_html(ev), log_text, rows, incidents_html(incidents), f"<ul>{files}</ul>",
                gr.update(visible=can_stop), confirming, confirming, shards_html(stored["shards"]), stored["spec"],
                cpu, memory, caption)

    def arm(eval_id: str | None) -> tuple[Any, ...]:
        """Ask to confirm stopping `eval_id`: the confirmation stops that one, whatever is picked by then."""
        return gr.update(visible=True), gr.update(visible=True), eval_id

    def emergency_stop(secret: str, eval_id: str | None) -> tuple[Any, ...]:
        if not eval_id:
            return "nothing selected", gr.update(visible=False), gr.update(visible=False)
        try:
            done = session.client(secret).stop(eval_id)
            msg = f"Stopped `{eval_id}`: now **{done.status}**"
        except ProctorError as exc:
            msg = f"Not stopped: {exc.message}"
        return msg, gr.update(visible=False), gr.update(visible=False)

    def refresh_safety(secret: str, role: str, request: gr.Request) -> tuple[Any, ...]:
        try:
            found = session.client(secret).recent_incidents(100) if secret else []
        except ProctorError as exc:
            return sent.changed("safety", request, (f"<p>{_e(exc.message)}</p>", gr.update(visible=False)))
        return sent.changed("safety", request, (incidents_html(found, link=True), gr.update(visible=role == "admin")))

    def stop_everything(secret: str) -> tuple[Any, ...]:
        try:
            stopped = session.client(secret).stop_all()
            msg = f"Stopped {len(stopped)} evaluations"
        except ProctorError as exc:
            msg = f"Not stopped: {exc.message}"
        return msg, gr.update(visible=False), gr.update(visible=False)

    def refresh_cluster(secret: str, request: gr.Request) -> Any:
        try:
            shown = cluster_html(session.client(secret).cluster(), ray_dashboard) if secret else ""
        except ProctorError as exc:
            shown = f"<p>{_e(exc.message)}</p>"
        return sent.changed("cluster", request, (shown,))[0]

    def refresh_history(secret: str, text: str | None, request: gr.Request) -> tuple[Any, ...]:
        try:
            found = list(islice(session.client(secret).list(text=text or None, limit=500), MAX_LISTED)) if secret else []
        except ProctorError:
            found = []
        return sent.changed("history", request, tuple(history_frames(found)))

    ticking = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pr-tick")  # one tick's three parts at once

    def refresh_tick(secret: str, role: str, statuses: list[str] | None, text: str | None, owner: str | None,
                     page: int, eval_id: str | None, level: str, grep: str, request: gr.Request) -> tuple[Any, ...]:
        """Every `REFRESH_S`: the live table, the open evaluation and the incidents, in one
        answer (one event a tick costs the browser a third of three); fetched side by side."""
        live = ticking.submit(refresh_live, secret, statuses, text, owner, page, request)
        detail = ticking.submit(refresh_detail, secret, role, eval_id, level, grep, request)
        safety = ticking.submit(refresh_safety, secret, role, request)
        return (*live.result(), *detail.result(), *safety.result())

    def show(*_: Any) -> tuple[Any, ...]:
        return gr.update(visible=True), gr.update(visible=True)

    def hide(*_: Any) -> tuple[Any, ...]:
        return gr.update(visible=False), gr.update(visible=False)

    with gr.Blocks(title="Proctor") as demo:
        token_state = gr.State(token or "")
        kept_token = gr.BrowserState("", storage_key="proctor-token")
        role_state = gr.State("")
        gr.Markdown("# Proctor")
        with gr.Row():
            token_box = gr.Textbox(label="API token", type="password", elem_id="pr-token", scale=4)
            login = gr.Button("Sign in", elem_id="pr-login", scale=1)
            logout = gr.Button("Sign out", elem_id="pr-logout", scale=1, variant="secondary")
            who = gr.Markdown(elem_id="pr-who")
        with gr.Tabs() as tabs:
            with gr.Tab("Live", id="live", elem_id="pr-tab-live"):
                with gr.Row():
                    status_filter = gr.Dropdown(STATUSES, multiselect=True, label="Status", elem_id="pr-status")
                    text_filter = gr.Textbox(label="Search name or model", elem_id="pr-search")
                    owner_filter = gr.Textbox(label="Owner", elem_id="pr-owner")
                live = gr.HTML(elem_id="pr-live-html")
                with gr.Row():
                    newer = gr.Button("◀ Newer", elem_id="pr-newer", size="sm")
                    older = gr.Button("Older ▶", elem_id="pr-older", size="sm")
            with gr.Tab("Evaluation", id="detail", elem_id="pr-tab-detail"):
                pick = gr.Dropdown(label="Evaluation", choices=[], elem_id="pr-pick", allow_custom_value=True)
                detail = gr.HTML(elem_id="pr-detail")
                with gr.Row():
                    stop = gr.Button("Emergency stop", variant="stop", elem_id="pr-stop", visible=False)
                    confirm = gr.Button("Confirm: kill its sandboxes now", variant="stop", elem_id="pr-confirm",
                                        visible=False)
                    abort = gr.Button("Keep it running", elem_id="pr-abort", visible=False)
                stop_msg = gr.Markdown(elem_id="pr-stop-msg")
                with gr.Row():
                    level = gr.Dropdown(["debug", "info", "warning", "error"], value="debug", label="Log level",
                                        elem_id="pr-level")
                    grep = gr.Textbox(label="Log filter", elem_id="pr-grep")
                logs = gr.Textbox(label=f"Logs (last {LOG_LINES} lines)", lines=12, max_lines=12, elem_id="pr-logs",
                                  interactive=False)
                samples = gr.Dataframe(label="Samples", elem_id="pr-samples", interactive=False)
                conversation = TranscriptPane(session)
                conversation.build()
                gr.Markdown("### Resources")
                resources_caption = gr.Markdown(elem_id="pr-resources")
                with gr.Row():
                    cpu_plot = gr.LinePlot(x="seconds", y="cores", color="series", label="CPU (cores)",
                                           elem_id="pr-cpu-plot")
                    memory_plot = gr.LinePlot(x="seconds", y="MiB", color="series", label="Memory (MiB)",
                                              elem_id="pr-memory-plot")
                gr.Markdown("### Shards")
                shard_table = gr.HTML(elem_id="pr-shards")
                gr.Markdown("### Incidents")
                incidents = gr.HTML(elem_id="pr-incidents")
                gr.Markdown("### Artifacts")
                artifacts = gr.HTML(elem_id="pr-artifacts")
                with gr.Accordion("Spec", open=False):
                    spec_view = gr.JSON(elem_id="pr-spec")
            with gr.Tab("Safety", id="safety", elem_id="pr-tab-safety"):
                alerts = gr.HTML(elem_id="pr-alerts")
                with gr.Row():
                    stop_all = gr.Button("Stop everything", variant="stop", elem_id="pr-stop-all", visible=False)
                    confirm_all = gr.Button("Confirm: stop every evaluation now", variant="stop",
                                            elem_id="pr-confirm-all", visible=False)
                    abort_all = gr.Button("Keep them running", elem_id="pr-abort-all", visible=False)
                stop_all_msg = gr.Markdown(elem_id="pr-stop-all-msg")
            with gr.Tab("Cluster", id="cluster", elem_id="pr-tab-cluster"):
                cluster = gr.HTML(elem_id="pr-cluster-html")
            with gr.Tab("History", id="history", elem_id="pr-tab-history"):
                history_text = gr.Textbox(label="Search name or model", elem_id="pr-history-search")
                with gr.Row():
                    outcomes = gr.BarPlot(x="model", y="evaluations", color="status", label="Outcomes by model")
                    suites = gr.BarPlot(x="suite", y="evaluations", color="status", label="Outcomes by suite")
                durations = gr.ScatterPlot(x="finished", y="seconds", color="model", label="Durations (s)")
                scores = gr.LinePlot(x="finished", y="score", color="model", label="Score over time (first scorer)")
        timer = gr.Timer(REFRESH_S)

        signed = login.click(sign_in_and_keep, [token_box], [token_state, role_state, who, kept_token])
        signed_out = logout.click(sign_out, [token_state], [token_state, role_state, who, kept_token, token_box, pick, live])
        loaded = demo.load(opened, [token_state, kept_token], [token_state, role_state, who, pick, tabs])
        conversation.wire(token_state, pick, samples, loaded)
        page_state = gr.State(0)
        live_args = ([token_state, status_filter, text_filter, owner_filter, page_state], [live, pick, page_state])
        detail_args = ([token_state, role_state, pick, level, grep],
                       [detail, logs, samples, incidents, artifacts, stop, confirm, abort, shard_table, spec_view,
                        cpu_plot, memory_plot, resources_caption])
        signed.then(refresh_live, *live_args)
        for button, step in ((newer, -1), (older, 1)):
            button.click(lambda p, step=step: turn(p, step), [page_state], [page_state]).then(refresh_live, *live_args)
        for trigger in (status_filter.change, text_filter.submit, owner_filter.submit):  # a new filter starts at its first page
            trigger(lambda: 0, None, [page_state]).then(refresh_live, *live_args)
        for trigger in (pick.change, level.change, grep.submit):
            trigger(refresh_detail, *detail_args)
        timer.tick(refresh_tick, [token_state, role_state, status_filter, text_filter, owner_filter, page_state, pick,
                                  level, grep], [*live_args[1], *detail_args[1], alerts, stop_all])
        slow = gr.Timer(SLOW_REFRESH_S)  # the cluster and the archive change slowly; listing 1,000 costs
        for trigger in (slow.tick, signed.then):
            trigger(refresh_cluster, [token_state], [cluster])
            trigger(refresh_history, [token_state, history_text], [outcomes, suites, durations, scores])
        history_text.submit(refresh_history, [token_state, history_text], [outcomes, suites, durations, scores])
        stop_target = gr.State(None)  # the evaluation whose stop awaits its confirmation
        stop.click(arm, [pick], [confirm, abort, stop_target])
        abort.click(hide, None, [confirm, abort])
        # another evaluation picked withdraws the confirmation; the live list refreshing the
        # pick (its choices) while the armed one is still picked does not
        pick.change(lambda picked, armed: hide() if picked != armed else (gr.update(), gr.update()),
                    [pick, stop_target], [confirm, abort])
        confirm.click(emergency_stop, [token_state, stop_target], [stop_msg, confirm, abort])
        for changed in (signed, signed_out):  # another user, another role: nothing stays armed
            changed.then(lambda: (gr.update(visible=False),) * 4, None, [confirm, abort, confirm_all, abort_all])
        stop_all.click(show, None, [confirm_all, abort_all])
        abort_all.click(hide, None, [confirm_all, abort_all])
        confirm_all.click(stop_everything, [token_state], [stop_all_msg, confirm_all, abort_all])
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 8001, block: bool = True) -> None:
    """Serve the dashboard (Gradio's own server: one process, as Gradio needs)."""
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, css=CSS + TRANSCRIPT_CSS, quiet=True,
                show_error=True)




def _clock(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return " " * 12
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%H:%M:%S.%f")[:-3]


