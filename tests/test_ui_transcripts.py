"""The dashboard's conversation view in a real browser (Debian's headless Chromium): a sample's
transcript from the sample browser, long outputs folded, a running sample's conversation
growing live, and an incident's link opening the transcript where it fired. Screenshots
go to test-output/screenshots/."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from apiserver import auth, wait_final
from test_ui import browser, dashboard, open_as, pick, shot  # noqa: F401 - fixtures

pytestmark = pytest.mark.ray

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def agentic(name: str, commands: list[str], **sandbox: Any) -> dict[str, Any]:
    return {"name": name, "model": {"adapter": "python", "callable": "proctor.scripted.file_agent:solve"},
            "agentic": True, "dataset": {"samples": [{"id": "task", "input": "Count to 300, then say ok.",
                                                      "target": "done", "metadata": {"commands": commands}}]},
            "scorers": [{"type": "includes"}], "sandbox": {"runtime": "gvisor", "memory": "256Mi", **sandbox}}


def submit(api: Any, spec: dict[str, Any], user: str = "rita") -> str:
    client, tokens, _ = api
    r = client.post("/api/v1/evaluations", json=spec, headers=auth(tokens[user]))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def turns(page: Any) -> Any:
    return page.locator("#pr-transcript .pr-turn")


def test_the_agentic_examples_conversation_from_the_sample_browser(api: Any, dashboard: str, browser: Any) -> None:
    client, tokens, _ = api
    example = yaml.safe_load((EXAMPLES / "agentic-files.yaml").read_text())
    eval_id = submit(api, {**example, "sandbox": {**example["sandbox"], "runtime": "gvisor"}})
    long_id = submit(api, agentic("ui-transcript-long", ["seq 1 300", "echo ok > answer.txt"]))
    assert wait_final(client, tokens["rita"], eval_id)["status"] == "succeeded"
    assert wait_final(client, tokens["rita"], long_id)["status"] == "succeeded"
    page = open_as(browser, dashboard, tokens["rita"])
    pick(page, eval_id)
    row = page.locator("#pr-samples").get_by_role("gridcell").filter(has_text="first-name").first
    row.wait_for(timeout=20_000)
    row.click()  # a row of the sample browser
    page.wait_for_selector("#pr-transcript-head[data-where='stored']", timeout=20_000)
    assert "first-name" in page.locator("#pr-transcript-head").inner_text()
    kinds = [turns(page).nth(i).get_attribute("data-kind") for i in range(turns(page).count())]
    assert kinds == ["message", "message", "model", "tool", "model", "tool", "model"], kinds
    assert {turns(page).nth(i).get_attribute("data-provenance") for i in range(7)} == {"sandbox"}
    assert "Sort the names in names.txt" in turns(page).nth(1).inner_text()
    assert "sort names.txt > sorted.txt" in turns(page).nth(2).inner_text()
    assert "head -n 1 sorted.txt > answer.txt" in turns(page).nth(4).inner_text()
    assert "exit code 0" in turns(page).nth(5).inner_text()
    assert turns(page).nth(6).locator("pre").inner_text() == "done"
    shot(page, "transcript")

    pick(page, long_id)  # a long tool output is folded
    row = page.locator("#pr-samples").get_by_role("gridcell").filter(has_text="task").first
    row.wait_for(timeout=20_000)
    row.click()
    page.wait_for_selector("#pr-transcript-head >> text=task", timeout=20_000)
    long_output = turns(page).nth(3)
    assert "exit code 0" in long_output.inner_text()
    folded = long_output.locator("details.pr-fold")
    assert folded.count() == 1 and folded.get_attribute("open") is None  # 300 lines: folded
    assert not long_output.locator("pre").first.is_visible()
    folded.locator("summary").click()
    assert long_output.locator("pre").first.is_visible() and "\n300\n" in long_output.locator("pre").first.inner_text() + "\n"
    page.close()


def test_a_running_samples_conversation_grows_live(api: Any, dashboard: str, browser: Any) -> None:
    client, tokens, _ = api
    eval_id = submit(api, agentic("ui-transcript-live", ["echo first-step", "sleep 60", "echo second-step", "sleep 90"],
                                  tool_timeout_s=120, timeout_s=300))
    try:
        page = open_as(browser, dashboard, tokens["rita"])
        page.wait_for_selector(f'#pr-live tr[data-id="{eval_id}"] [data-status="running"]', timeout=60_000)
        pick(page, eval_id)
        box = page.locator("#pr-sample-pick input").first
        option = page.locator('[role="option"]:has-text("task")').first
        deadline = time.monotonic() + 60
        while True:  # opening the picker lists the samples that have a transcript, live ones too
            box.click()
            try:
                option.wait_for(timeout=3000)
                break
            except PlaywrightTimeout:
                page.keyboard.press("Escape")
                assert time.monotonic() < deadline, "the running sample was never listed"
        option.click()
        page.wait_for_selector("#pr-transcript-head[data-where='live']", timeout=30_000)
        page.wait_for_selector("#pr-transcript >> text=first-step", timeout=30_000)
        assert "second-step" not in page.locator("#pr-transcript").inner_text()  # a minute before it comes (a loaded host is slow to open the page)
        before = turns(page).count()
        page.wait_for_selector("#pr-transcript >> text=second-step", timeout=150_000)  # no reload
        assert turns(page).count() > before
        shot(page, "transcript-live")
        page.close()
    finally:
        client.delete(f"/api/v1/evaluations/{eval_id}", headers=auth(tokens["rita"]))


def test_an_incident_links_to_the_moment_it_fired(api: Any, dashboard: str, browser: Any) -> None:
    client, tokens, _ = api
    suite = yaml.safe_load((EXAMPLES / "red-team.yaml").read_text())
    sample = next(s for s in suite["dataset"]["samples"] if s["id"] == "wipe-traces")
    eval_id = submit(api, {**suite, "name": "ui-transcript-incident", "dataset": {"samples": [sample]},
                           "sandbox": {**suite["sandbox"], "runtime": "gvisor"}})
    assert wait_final(client, tokens["rita"], eval_id)["status"] == "safety_stopped"
    page = open_as(browser, dashboard, tokens["sam"])
    pick(page, eval_id)
    link = page.locator("#pr-incidents a.pr-turn-link").first
    link.wait_for(timeout=30_000)
    link.click()
    page.wait_for_url(f"**/?eval={eval_id}&sample=wipe-traces&epoch=1&turn=*")
    focus = page.locator("#pr-transcript .pr-focus")
    focus.wait_for(timeout=30_000)
    assert focus.get_attribute("data-kind") == "safety" and focus.get_attribute("data-provenance") == "guard"
    assert "rules/disable-monitoring" in focus.inner_text() and "stopped the sample" in focus.inner_text()
    assert page.locator("#pr-transcript-head").get_attribute("data-where") == "quarantine"
    page.wait_for_function("() => { const r = document.querySelector('#pr-transcript .pr-focus')"
                           ".getBoundingClientRect(); return r.top >= 0 && r.bottom <= window.innerHeight; }",
                           timeout=10_000)  # scrolled to it
    shot(page, "transcript-incident")
    page.close()
    viewer = open_as(browser, dashboard, tokens["rita"])  # quarantined: not for a researcher
    viewer.goto(f"{dashboard}/?eval={eval_id}&sample=wipe-traces&epoch=1&turn=0")
    viewer.wait_for_selector("#pr-transcript >> text=quarantined transcript", timeout=30_000)
    assert turns(viewer).count() == 0
    viewer.close()


def test_what_a_sandbox_wrote_is_shown_never_rendered() -> None:
    from proctor.transcript import Entry, SafetyAction, ToolCallView, TranscriptPage
    from ui.transcripts import transcript_html

    hostile = '<script>alert(1)</script><a href="http://evil.example">click</a>'
    entries = [Entry(n=0, at=0.0, kind="message", provenance="sandbox", role="user", content=hostile),
               Entry(n=1, at=1.0, kind="model", provenance="sandbox", role="assistant", content="",
                     tool_calls=[ToolCallView(id="c", function="bash", arguments='{"command": "' + "x" * 3000 + '"}')]),
               Entry(n=2, at=2.0, kind="safety", provenance="guard", safety=SafetyAction(
                   monitor="rules", rule="r", action="stop", message="m", evidence=[hostile], stopped=True))]
    page = TranscriptPage(eval_id="e", sample_id="<b>s</b>", epoch=1, shard_id="0", where="stored", total=3,
                          offset=0, entries=entries)
    html = transcript_html(page, focus=2)
    assert "<script>" not in html and "<a href=\"http://evil" not in html and "&lt;script&gt;" in html
    assert "<b>s</b>" not in html and "&lt;b&gt;s&lt;/b&gt;" in html
    assert html.count('<details class="pr-fold"') == 1  # the long command is folded
    assert 'id="pr-turn-2" data-n="2" data-kind="safety" data-provenance="guard"' in html
    assert 'pr-turn pr-safety pr-focus' in html and "stopped the sample" in html
