"""kuberay/monitoring: the alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`, tests/promtool/), the Grafana dashboards are well formed, and every
metric a rule or a panel reads is one Proctor's API exports. Also the API's metrics that
feed them (serve_app/metrics.py)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from promql import PromQLError, metric_names
from serve_app.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "kuberay" / "monitoring"
DASHBOARDS = sorted((MONITORING / "dashboards").glob("*.json"))
RULES = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
ALERTS = {"ProctorSafetyStop", "ProctorEvaluationsFailing", "ProctorQueueWaitingTooLong", "ProctorStoreDegraded",
          "ProctorSandboxLaunchesFailing"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: `bash scripts/setup.sh --test` installs Debian's prometheus",
                    pytrace=False)
    return found


def rules_file(folder: Path, rules: dict[str, Any] = RULES) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rules file."""
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rules["spec"]["groups"]}, sort_keys=False))
    return path


def exported() -> set[str]:
    """Every series name the API's /api/v1/metrics can serve (a counter's `_total`, a
    histogram's `_bucket`, `_sum` and `_count`, and prometheus_client's `_created`)."""
    names = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "gauge": ("",)}[family.type]
        names |= {family.name + s for s in suffixes}
    return names


def rule_exprs(rules: dict[str, Any] = RULES) -> dict[str, str]:
    return {r.get("alert") or r["record"]: r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]}


def panel_exprs(board: dict[str, Any]) -> dict[str, str]:
    out = {}
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                out[f"{inner['title']} / {target['refId']}"] = target["expr"]
    return out


def unknown_metrics(exprs: dict[str, str]) -> dict[str, set[str]]:
    known = exported()
    return {where: names for where, expr in exprs.items() if (names := metric_names(expr) - known)}


# ------------------------------------------------------------------------------ rules


def test_the_rules_pass_promtool_check(tmp_path: Path) -> None:
    result = subprocess.run([promtool(), "check", "rules", str(rules_file(tmp_path))], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(rule_exprs()) >= ALERTS


def test_a_broken_rule_fails_promtool_check(tmp_path: Path) -> None:
    broken = copy.deepcopy(RULES)
    broken["spec"]["groups"][0]["rules"][0]["expr"] = "max(increase(proctor_evaluations_finished_total[5m]) > "
    result = subprocess.run([promtool(), "check", "rules", str(rules_file(tmp_path, broken))], capture_output=True,
                            text=True)
    assert result.returncode != 0


def _unit_tests(tmp_path: Path, rules: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """tests/promtool/alerts.test.yaml against `rules`, each expected alert's annotations
    filled in from its rule (`{{ $labels.x }}` from the expected labels)."""
    rules_file(tmp_path, rules)
    annotations = {r["alert"]: r.get("annotations", {}) for g in rules["spec"]["groups"] for r in g["rules"]
                   if "alert" in r}
    doc = yaml.safe_load((ROOT / "tests" / "promtool" / "alerts.test.yaml").read_text())
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            for alert in case.get("exp_alerts", []):
                labels = alert.get("exp_labels", {})
                filled = {}
                for key, text in annotations.get(case["alertname"], {}).items():
                    for label, value in labels.items():
                        text = text.replace(f"{{{{ $labels.{label} }}}}", str(value))
                    assert "{{" not in text, f"{case['alertname']}: write this annotation in the test: {text}"
                    filled[key] = text
                alert.setdefault("exp_annotations", filled)
    test_file = tmp_path / "alerts.test.yaml"
    test_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    return subprocess.run([promtool(), "test", "rules", str(test_file)], capture_output=True, text=True, cwd=tmp_path)


def test_the_rules_pass_their_promtool_unit_tests(tmp_path: Path) -> None:
    result = _unit_tests(tmp_path, RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {case["alertname"] for t in yaml.safe_load((ROOT / "tests" / "promtool" / "alerts.test.yaml").read_text())
              ["tests"] for case in t.get("alert_rule_test", [])}
    assert tested == set(rule_exprs())  # every alert has a unit test


def test_the_unit_tests_catch_a_rule_that_never_fires(tmp_path: Path) -> None:
    changed = copy.deepcopy(RULES)
    for group in changed["spec"]["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "ProctorQueueWaitingTooLong":
                rule["expr"] = "max(proctor_queue_oldest_wait_seconds) > 86400"
    result = _unit_tests(tmp_path, changed)
    assert result.returncode != 0 and "ProctorQueueWaitingTooLong" in result.stdout + result.stderr


# ------------------------------------------------------------------------------ metrics referenced


def test_every_metric_the_rules_read_is_exported() -> None:
    assert unknown_metrics(rule_exprs()) == {}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_metric_a_dashboard_reads_is_exported(path: Path) -> None:
    board = json.loads(path.read_text())
    exprs = panel_exprs(board)
    assert len(exprs) >= 5
    assert unknown_metrics(exprs) == {}


def test_an_unknown_metric_is_caught() -> None:
    assert unknown_metrics({"x": "sum by (status) (rate(proctor_evaluation_finished_total[5m]))"}) == \
        {"x": {"proctor_evaluation_finished_total"}}


def test_the_dashboards_cover_the_platform() -> None:
    read = set().union(*(metric_names(e) for p in DASHBOARDS for e in panel_exprs(json.loads(p.read_text())).values()))
    for needed in ("proctor_evaluations", "proctor_queue_depth_shards", "proctor_queue_wait_seconds_bucket",
                   "proctor_gpus_allocated", "proctor_sandbox_start_seconds_bucket", "proctor_model_gateway_calls_total",
                   "proctor_model_gateway_tokens_total", "proctor_safety_violations_total",
                   "proctor_api_request_duration_seconds_bucket", "proctor_store_degraded"):
        assert needed in read, needed


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_are_grafana_dashboards_on_a_chosen_datasource(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["uid"] == path.stem and board["title"].startswith("Proctor") and board["schemaVersion"] >= 36
    [variable] = board["templating"]["list"]
    assert variable == {**variable, "name": "datasource", "type": "datasource", "query": "prometheus"}
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24


@pytest.mark.parametrize("expr, names", [
    ('sum by (le) (rate(a_bucket{job="x", le=~"1.*"}[5m]))', {"a_bucket"}),
    ("histogram_quantile(0.9, max by (le, route) (rate(b[$__rate_interval]))) > 0.5 offset 1h", {"b"}),
    ("a / on (pod) group_left (node) b unless c", {"a", "b", "c"}),
    ("max without (status) (x) and absent(y) or vector(1)", {"x", "y"}),
    ("sum(rate(z[5m:1m])) # a comment naming w", {"z"}),
])
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_promql_that_cannot_be_read_is_refused() -> None:
    with pytest.raises(PromQLError):
        metric_names("sum(rate(a[5m])")


# ------------------------------------------------------------------------------ the metrics fed


def _value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_bus_events_feed_the_new_metrics() -> None:
    m = Metrics()
    m.observe({"type": "shard", "status": "scheduled", "wait_s": 12.5})
    m.observe({"type": "shard", "status": "succeeded", "launched": True, "samples": 2})
    m.observe({"type": "shard", "status": "failed", "launched": False})
    m.observe({"type": "shard", "status": "failed"})  # an event of an older supervisor: no launch result
    m.observe({"type": "incident", "rule": "rules/credential-search", "action": "stop"})
    assert _value(m, "proctor_queue_wait_seconds_count") == 1 and _value(m, "proctor_queue_wait_seconds_sum") == 12.5
    assert _value(m, "proctor_sandbox_launches_total", result="ok") == 1
    assert _value(m, "proctor_sandbox_launches_total", result="failed") == 1
    assert _value(m, "proctor_safety_violations_total", rule="rules/credential-search", action="stop") == 1


def test_the_gauges_keep_their_values_when_a_source_cannot_be_read() -> None:
    m = Metrics()
    assert _value(m, "proctor_store_degraded", store="state") == 0  # present from the start: alerts see it
    m.refresh({"running": 2}, {"queued_shards": 3, "oldest_wait_s": 40.0, "running_shards": 1, "gpus": {}})
    m.store_degraded("state", True)
    m.refresh(None, None)
    assert _value(m, "proctor_evaluations", status="running") == 2
    assert _value(m, "proctor_queue_oldest_wait_seconds") == 40.0
    assert _value(m, "proctor_store_degraded", store="state") == 1
    m.store_degraded("state", False)
    assert _value(m, "proctor_store_degraded", store="state") == 0
    m.observe({"type": "store", "store": "results", "degraded": True})  # as an actor that sees S3 fail says
    assert _value(m, "proctor_store_degraded", store="results") == 1
    m.observe({"type": "store", "store": "results", "degraded": False})
    m.observe({"type": "store", "store": "elsewhere", "degraded": True})
    assert _value(m, "proctor_store_degraded", store="results") == 0
    assert _value(m, "proctor_store_degraded", store="elsewhere") is None
