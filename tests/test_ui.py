"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against
the real API on the session's Ray cluster. Screenshots go to test-output/screenshots/."""

from __future__ import annotations

import gc
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from apiserver import auth, spec, stages_spec, wait_final
from ports import free_port

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-output" / "screenshots"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def dashboard(api: Any) -> str:
    """The dashboard as `proctor up` runs it: its own process (`python -m ui`), beside the API."""
    import subprocess
    import sys

    import httpx

    client, _, _ = api
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ui", "--port", str(port), "--api", str(client.base_url).rstrip("/")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(10)
    proc.stderr.close()


@contextmanager
def _their_loops() -> Any:
    """Playwright's sync API leaves an event loop unclosed (its self-pipe is an AF_UNIX
    socket pair); it is collected here, where that ResourceWarning of its is not an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        yield
        gc.collect()


@pytest.fixture(scope="module")
def browser() -> Any:
    from playwright.sync_api import sync_playwright

    with _their_loops():
        p = sync_playwright().start()
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    yield b
    with _their_loops():
        b.close()
        p.stop()


def open_as(browser: Any, dashboard: str, token: str) -> Any:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(dashboard)
    page.locator("#pr-token input, #pr-token textarea").first.fill(token)
    page.locator("#pr-login").click()
    page.wait_for_selector("#pr-who >> text=Signed in as")
    return page


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def row(page: Any, eval_id: str) -> Any:
    return page.locator(f'#pr-live tr[data-id="{eval_id}"]')


def pick(page: Any, eval_id: str) -> None:
    page.get_by_role("tab", name="Evaluation").click()
    box = page.locator("#pr-pick input").first
    box.fill(eval_id)
    box.press("Enter")
    page.wait_for_selector(f"#pr-detail >> text={eval_id}", timeout=20_000)


def slow_spec(name: str, samples: int, seconds: int) -> dict[str, Any]:
    s = spec(name, samples=samples)
    s["model"] = {"adapter": "python", "callable": "proctor.scripted.file_agent:solve"}
    s["agentic"] = True
    s["shard_size"] = 1
    s["scorers"] = [{"type": "includes"}]
    for i, sample in enumerate(s["dataset"]["samples"]):  # they end one after another
        sample["metadata"] = {"commands": [f"sleep {seconds * (i + 1)}"], "answer": sample["target"]}
    return s


def test_live_progress_advances_without_reload(api: Any, dashboard: str, browser: Any) -> None:
    client, tokens, _ = api
    eval_id = client.post("/api/v1/evaluations", json=slow_spec("ui-progress", 6, 2),
                          headers=auth(tokens["rita"])).json()["id"]
    page = open_as(browser, dashboard, tokens["rita"])
    page.wait_for_selector(f'#pr-live tr[data-id="{eval_id}"] [data-status="running"]', timeout=60_000)
    seen = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(seen) < 3:
        seen.add(row(page, eval_id).locator(".pr-done").inner_text())
        time.sleep(0.5)
    shot(page, "live")
    assert len(seen) >= 3, seen  # the row changed at least twice with no reload
    wait_final(client, tokens["rita"], eval_id)
    page.wait_for_selector(f'#pr-live tr[data-id="{eval_id}"] [data-status="succeeded"]', timeout=20_000)
    assert row(page, eval_id).locator(".pr-done").inner_text() == "6/6"
    page.close()


def test_finished_evaluation_detail_logs_and_filters(api: Any, dashboard: str, browser: Any) -> None:
    client, tokens, _ = api
    eval_id = client.post("/api/v1/evaluations", json=spec("ui-finished", samples=3),
                          headers=auth(tokens["rita"])).json()["id"]
    wait_final(client, tokens["rita"], eval_id)
    page = open_as(browser, dashboard, tokens["rita"])
    page.locator("#pr-search input, #pr-search textarea").first.fill("ui-finished")
    page.locator("#pr-search input, #pr-search textarea").first.press("Enter")
    page.wait_for_function("id => { const rows = [...document.querySelectorAll('#pr-live tbody tr')];"
                           " return rows.some(r => r.dataset.id === id)"
                           " && rows.every(r => r.innerText.includes('ui-finished')); }", arg=eval_id,
                           timeout=20_000)  # the filter applied: only matching rows, ours among them
    assert row(page, eval_id).count() == 1
    pick(page, eval_id)
    page.wait_for_selector("#pr-samples >> text=sample_id", timeout=20_000)
    page.wait_for_selector('#pr-shards [data-status="succeeded"]', timeout=20_000)  # the shard's state
    page.wait_for_function("() => document.querySelector('#pr-logs textarea').value.includes('harness ready')",
                           timeout=20_000)
    shot(page, "evaluation")
    page.locator("#pr-grep input, #pr-grep textarea").first.fill("no such line anywhere")
    page.locator("#pr-grep input, #pr-grep textarea").first.press("Enter")
    page.wait_for_function("() => document.querySelector('#pr-logs textarea').value === ''", timeout=20_000)
    page.close()


def test_the_shard_view_shows_each_stages_time_and_where_samples_failed(api: Any, dashboard: str,
                                                                        browser: Any) -> None:
    client, tokens, _ = api
    eval_id = client.post("/api/v1/evaluations", json=stages_spec("ui-stages"),
                          headers=auth(tokens["rita"])).json()["id"]
    wait_final(client, tokens["rita"], eval_id)
    page = open_as(browser, dashboard, tokens["rita"])
    pick(page, eval_id)
    page.wait_for_selector("#pr-shard-table td.pr-failed-stages >> text=setup × 1", timeout=20_000)
    cells = page.locator("#pr-shard-table tbody tr").evaluate_all(
        "rows => rows.map(r => [...r.querySelectorAll('td.pr-stage')].map(c => c.dataset.stage + '=' + c.innerText))")
    shot(page, "stages")
    assert len(cells) == 2
    timed = [dict(c.split("=") for c in row) for row in cells]
    full = next(t for t in timed if t["eval"])  # the sample that went through every stage
    assert all(re.fullmatch(r"\d+\.\d\d s", full[stage]) for stage in ("setup", "eval", "score", "cleanup")), full
    failed = next(t for t in timed if not t["eval"])  # the one whose setup failed: no eval, no score
    assert re.fullmatch(r"\d+\.\d\d s", failed["setup"]) and failed["score"] == "", failed
    page.close()


def test_the_owner_filter_lists_only_that_owners_evaluations(api: Any, dashboard: str, browser: Any) -> None:
    client, tokens, _ = api
    ids = {who: client.post("/api/v1/evaluations", json=spec(f"ui-owner-{who}", samples=1),
                            headers=auth(tokens[who])).json()["id"] for who in ("rita", "rob")}
    for who, eval_id in ids.items():
        wait_final(client, tokens[who], eval_id)
    page = open_as(browser, dashboard, tokens["ada"])  # an admin sees everyone's
    owner = page.locator("#pr-owner input, #pr-owner textarea").first
    owner.fill("rob")
    owner.press("Enter")
    page.wait_for_function("id => { const rows = [...document.querySelectorAll('#pr-live tbody tr')];"
                           " return rows.some(r => r.dataset.id === id)"
                           " && rows.every(r => r.cells[4].innerText === 'rob'); }", arg=ids["rob"], timeout=20_000)
    assert row(page, ids["rita"]).count() == 0
    owner.fill("nobody-has-this-name")
    owner.press("Enter")
    page.wait_for_selector("#pr-live >> text=no evaluations", timeout=20_000)
    page.close()


def test_safety_stopped_evaluation_shows_its_incident(api: Any, dashboard: str, browser: Any) -> None:
    client, tokens, _ = api
    suite = yaml.safe_load((ROOT / "examples" / "red-team.yaml").read_text())
    sample = next(s for s in suite["dataset"]["samples"] if s["id"] == "fork-bomb")
    body = {**suite, "name": "ui-red-team", "dataset": {"samples": [sample]},
            "sandbox": {**suite["sandbox"], "runtime": "gvisor"}}
    eval_id = client.post("/api/v1/evaluations", json=body, headers=auth(tokens["rita"])).json()["id"]
    assert wait_final(client, tokens["rita"], eval_id)["status"] == "safety_stopped"
    page = open_as(browser, dashboard, tokens["sam"])
    page.wait_for_selector(f'#pr-live tr[data-id="{eval_id}"] [data-status="safety_stopped"]', timeout=20_000)
    page.get_by_role("tab", name="Safety").click()
    page.wait_for_selector(f"#pr-alerts >> text={eval_id}", timeout=20_000)
    assert "rules/fork-bomb" in page.locator("#pr-alerts").inner_text()
    shot(page, "safety")
    page.locator(f'#pr-alerts a.pr-eval:has-text("{eval_id}")').first.click()  # the incident's link
    page.wait_for_url(f"**/?eval={eval_id}")
    page.wait_for_selector("#pr-who >> text=Signed in as sam", timeout=20_000)  # the browser kept the token
    page.wait_for_selector(f"#pr-detail >> text={eval_id}", timeout=20_000)  # its detail, opened
    page.wait_for_selector("#pr-incidents >> text=rules/fork-bomb", timeout=20_000)
    page.get_by_role("tab", name="Cluster").click()
    page.wait_for_selector("#pr-cluster-html >> text=by resource and GPU type", timeout=30_000)
    assert re.search(r"GPUs H100\s+\d+ / 4", page.locator("#pr-cluster-use").inner_text())
    cpus = page.locator('#pr-cluster-use tr:has-text("CPUs") .pr-bar')  # a bar drawn to the share in use
    assert cpus.count() == 1 and re.fullmatch(r"\d+%", cpus.get_attribute("title") or "")
    shot(page, "cluster")
    page.get_by_role("tab", name="History").click()
    shot(page, "history")
    page.locator("#pr-logout").click()  # signing out forgets the token here and in the browser
    page.wait_for_selector("#pr-who >> text=Signed out", timeout=20_000)
    page.get_by_role("tab", name="Live").click()
    page.wait_for_selector("#pr-live-html >> text=sign in with an API token", timeout=20_000)
    assert row(page, eval_id).count() == 0
    page.wait_for_timeout(2.5 * 2000)  # refreshes while signed out answer quietly: no error pops up
    assert page.locator('[data-testid="toast-body"]').count() == 0
    page.reload()
    page.wait_for_selector("#pr-who >> text=Sign in with an API token", timeout=20_000)
    page.close()


def test_stop_needs_confirming_and_a_viewer_has_no_stop_button(api: Any, dashboard: str, browser: Any) -> None:
    client, tokens, _ = api
    eval_id = client.post("/api/v1/evaluations", json=slow_spec("ui-stop", 1, 60),
                          headers=auth(tokens["rita"])).json()["id"]
    other = client.post("/api/v1/evaluations", json=spec("ui-stop-other", samples=1),
                        headers=auth(tokens["rita"])).json()["id"]
    viewer = open_as(browser, dashboard, tokens["vera"])
    viewer.wait_for_selector(f'#pr-live tr[data-id="{eval_id}"] [data-status="running"]', timeout=60_000)
    pick(viewer, eval_id)
    viewer.wait_for_timeout(3000)  # a few refreshes
    assert viewer.locator("#pr-stop").count() == 0 or not viewer.locator("#pr-stop").is_visible()
    viewer.close()

    page = open_as(browser, dashboard, tokens["rita"])
    pick(page, eval_id)
    page.wait_for_selector("#pr-resources >> text=1 shard attempt(s)", timeout=20_000)  # resource graphs, live
    page.wait_for_selector("#pr-memory-plot canvas, #pr-memory-plot svg", timeout=20_000)
    page.locator("#pr-memory-plot").scroll_into_view_if_needed()
    shot(page, "evaluation-resources")
    page.locator("#pr-stop").click()
    page.wait_for_selector("#pr-confirm", state="visible")
    page.locator("#pr-abort").click()  # a misclick stops nothing
    page.wait_for_timeout(2500)
    status = client.get(f"/api/v1/evaluations/{eval_id}", headers=auth(tokens["rita"])).json()["status"]
    assert status == "running"
    page.locator("#pr-stop").click()
    page.wait_for_selector("#pr-confirm", state="visible")
    pick(page, other)  # another evaluation picked: the confirmation is withdrawn
    page.wait_for_selector("#pr-confirm", state="hidden", timeout=10_000)
    pick(page, eval_id)
    page.locator("#pr-stop").click()
    page.locator("#pr-confirm").click()
    page.wait_for_selector(f"#pr-stop-msg >> text=Stopped {eval_id}", timeout=20_000)
    assert wait_final(client, tokens["rita"], other)["status"] == "succeeded"  # only the one confirmed
    final = client.get(f"/api/v1/evaluations/{eval_id}", headers=auth(tokens["rita"])).json()
    assert final["status"] in ("cancelled", "failed") or wait_final(client, tokens["rita"], eval_id)["status"] == "cancelled"
    shot(page, "stopped")
    page.close()


def test_live_view_colours_every_status_it_lists(api: Any, dashboard: str, browser: Any) -> None:
    client, tokens, _ = api
    page = open_as(browser, dashboard, tokens["sam"])  # the safety role sees every owner's evaluations
    page.wait_for_selector('#pr-live [data-status="safety_stopped"]', timeout=20_000)
    colours = page.evaluate("() => Object.fromEntries([...document.querySelectorAll('#pr-live .pr-badge')]"
                            ".map(b => [b.dataset.status, getComputedStyle(b).backgroundColor]))")
    assert {"succeeded", "safety_stopped", "cancelled"} <= set(colours), colours
    assert len(set(colours.values())) == len(colours)  # one colour per status
    shot(page, "live-all")
    page.close()
