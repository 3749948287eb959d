"""What the dashboard draws, from what the API answers (no browser): resource series and
graphs, the GPU column, the cluster's use, history by suite."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

from serve_app.resources import clean, merge
from ui.views import (PAGE_ROWS, cluster_html, gpus_text, history_frames, live_table, resource_frames, shards_html,
                      use_bar)


def test_samples_are_cleaned_and_cpu_derived() -> None:
    raw = [{"t": 12.0, "cpu_s": 3.0, "memory": 200.0}, {"t": 10.0, "cpu_s": 1.0, "memory": 100.0},
           {"t": "x"}, "junk", {"t": 14.0, "cpu_s": 3.5, "memory": float("nan"), "pids": True},
           {"t": 16.0, "cpu_s": 3.0}]  # a counter that went back (a new attempt's sandbox): never negative
    got = clean(raw)
    assert [x["t"] for x in got] == [10.0, 12.0, 14.0, 16.0]
    assert "cpu" not in got[0] and got[1]["cpu"] == 1.0 and got[2]["cpu"] == 0.25 and got[3]["cpu"] == 0.0
    assert "memory" not in got[2] and "pids" not in got[2]


def test_live_series_win_over_stored_ones_of_the_same_attempt() -> None:
    stored = [{"shard_id": "00001", "attempt": 1, "samples": [{"t": 1.0, "memory": 5.0}]},
              {"shard_id": "00000", "attempt": 1, "samples": [{"t": 1.0, "memory": 1.0}]}]
    live = [{"shard_id": "00001", "attempt": 1, "live": True, "samples": [{"t": 1.0}, {"t": 2.0, "memory": 7.0}]}]
    res = merge("ev-1", {"sandbox": {"gpu": {"count": 2, "type": "A100"}}}, stored, live)
    assert [(s.shard_id, s.live, len(s.samples)) for s in res.shards] == [("00000", False, 1), ("00001", True, 2)]
    assert (res.gpus_per_shard, res.gpu_type) == (2, "A100")


def test_resource_frames_total_and_per_shard() -> None:
    res = {"gpus_per_shard": 1, "gpu_type": "H100", "shards": [
        {"shard_id": f"{i:05d}", "attempt": 1, "samples": [{"t": 100.0, "cpu": 0.5, "memory": 2**20},
                                                          {"t": 102.0, "cpu": 1.0, "memory": 2 * 2**20}]}
        for i in range(10)]}
    cpu, memory, caption = resource_frames(res, shards_drawn=3)
    total = cpu[cpu["series"] == "all shards"]
    assert list(total["cores"]) == [5.0, 10.0] and list(total["seconds"]) == [0.0, 2.0]
    assert set(cpu["series"]) == {"00000", "00001", "00002", "all shards"}
    assert list(memory[memory["series"] == "all shards"]["MiB"]) == [10.0, 20.0]
    assert "10 shard attempt(s), 7 more not drawn apart" in caption and "1 × H100 per shard" in caption
    empty_cpu, _, caption = resource_frames({"shards": []})
    assert empty_cpu.empty and "no GPUs" in caption


def _ev(**kw: object) -> SimpleNamespace:
    now = datetime.now(timezone.utc)
    base = dict(id="ev-1", name="n", status="succeeded", done_units=1, total_units=1, owner="o", model="m",
                started_at=now, created_at=now, finished_at=now, wait_reason=None, gpus_per_shard=0,
                gpu_type=None, suite="arith", summary=None)
    return SimpleNamespace(**{**base, **kw})


def test_gpu_column_and_outcomes_by_suite() -> None:
    assert gpus_text(_ev()) == "" and gpus_text(_ev(gpus_per_shard=8, gpu_type="H100")) == "8 × H100 / shard"
    html = live_table([_ev(id="a<b", gpus_per_shard=1, gpu_type="A100")])
    assert "1 × A100 / shard" in html and "a&lt;b" in html and "<th>GPUs</th>" in html
    _, suites, _, _ = history_frames([_ev(), _ev(status="failed"), _ev(suite="cyber"), _ev(status="running")])
    got = {(r.suite, r.status): r.evaluations for r in suites.itertuples()}
    assert got == {("arith", "succeeded"): 1, ("arith", "failed"): 1, ("cyber", "succeeded"): 1}


def test_the_live_table_sends_one_page_and_counts_them_all() -> None:
    evs = [_ev(id=f"ev-{i:04d}", status="running" if i % 5 else "queued") for i in range(250)]
    first = live_table(evs)
    assert first.count("<tr data-id=") == PAGE_ROWS and 'data-id="ev-0000"' in first
    assert f"1–{PAGE_ROWS} of 250" in first and "200 running · 50 queued" in first
    last = live_table(evs, page=2)
    assert last.count("<tr data-id=") == 50 and 'data-id="ev-0249"' in last and "page 3 of 3" in last
    assert live_table(evs, page=99) == last  # past the end: the last page
    assert "0 of 0" in live_table([]) and "no evaluations" in live_table([])


def test_cluster_use_is_drawn_as_bars_per_resource_and_gpu_type() -> None:
    c = {"cpus": {"total": 8, "free": 2}, "memory": {"total": 16 * 2**30, "free": 16 * 2**30},
         "gpus": {"A100": {"total": 4, "free": 0}}, "queued_shards": 3, "running_shards": 5,
         "waiting": {"ev-1/s0": "1 x H100: none in the cluster"}}
    html = cluster_html(c, "http://ray:8265")
    assert 'title="75%"' in html and "6 / 8" in html  # CPUs
    assert 'title="0%"' in html and "0.0 / 16.0" in html  # memory
    assert 'class="pr-bar pr-full" title="100%"' in html and "GPUs A100" in html and "4 / 4" in html
    assert "GPUs</td><td colspan=\"2\">none in the cluster" in cluster_html({**c, "gpus": {}}, None)
    assert "<code>ev-1/s0</code>: 1 x H100: none in the cluster" in html and 'href="http://ray:8265"' in html
    assert use_bar(1, 0) == '<div class="pr-bar" title="0%"><div style="width:0.0%"></div></div>'


def test_the_shard_table_shows_each_stages_seconds_and_failures() -> None:
    shard = {"shard_id": "00000", "status": "succeeded", "units": 2, "attempt": 1, "max_attempts": 3,
             "stages": {"setup": 0.5, "eval": 12.345, "cleanup": 0.01}, "failed_stages": {"setup<b>": 1}}
    html = shards_html([shard, {**shard, "shard_id": "00001", "stages": "junk", "failed_stages": None}])
    assert "<th>setup</th><th>eval</th><th>score</th><th>cleanup</th><th>failed in</th>" in html
    assert '<td class="pr-stage" data-stage="eval">12.35 s</td>' in html
    assert '<td class="pr-stage" data-stage="score"></td>' in html  # not reached
    assert "setup&lt;b&gt; × 1" in html  # what the API relays is escaped
    assert html.count('<td class="pr-stage" data-stage="setup"></td>') == 1  # a malformed answer draws nothing


def test_the_cluster_view_warns_while_the_results_store_is_degraded() -> None:
    c = {"cpus": {"total": 8, "free": 8}, "memory": {"total": 2**30, "free": 2**30}, "gpus": {}}
    assert "pr-store-degraded" not in cluster_html({**c, "results_store": None}, None)
    assert "pr-store-degraded" not in cluster_html({**c, "results_store": {"degraded": False}}, None)
    html = cluster_html({**c, "results_store": {"degraded": True, "since": 1_767_225_600.0, "waiting": 12,
                                                "bytes": 4096, "folder": "/var/x/<outbox>"}}, None)
    assert "Results store degraded" in html and "since 2026-01-01 00:00:00 UTC" in html
    assert "12 writes (4096 bytes)" in html and "/var/x/&lt;outbox&gt;" in html  # escaped
