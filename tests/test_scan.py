"""The cleanup stage's scan of what a sample leaves: secrets, canaries and output rules."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cluster.runtimes import SandboxRuntime
from eval_actors.local_run import run_evaluation
from proctor.policy import Rule, SafetyPolicy
from proctor.settings import Settings
from proctor.spec import parse_spec
from safety.canaries import CANARIES
from safety.rules import RuleSet
from safety.scan import CANARY_MARK, OutputScan

# made up, shaped like the real ones (split so that this file is not itself flagged)
FAKE = {
    "private-key": "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIEow...\n-----END RSA PRIVATE KEY-----",
    "aws-access-key": "AKIA" + "Z7Q4MXR2LBV6N3PT",
    "github-token": "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    "anthropic-key": "sk-ant-" + "api03-abcdefghijklmnopqrstuvwx",
    "openai-key": "sk-proj-" + "abcdefghijklmnopqrstuvwxyz0123456789",
    "slack-token": "xoxb-" + "1234567890-abcdefghij",
    "google-api-key": "AIza" + "SyA1234567890abcdefghijklmnopqrstuv",
    "jwt": "eyJhbGciOiJIUzI1NiJ9" + ".eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl",
}


def scan(policy: SafetyPolicy | None = None) -> OutputScan:
    policy = policy or SafetyPolicy()
    return OutputScan(policy, RuleSet.of(policy))


@pytest.mark.parametrize("kind", sorted(FAKE))
def test_each_kind_of_secret_is_found_and_not_quoted_whole(kind: str) -> None:
    found = scan().check("artifact 'notes.txt'", f"some notes\nthe value: {FAKE[kind]}\nmore".encode())
    assert [v.rule for v in found] == [f"secret-{kind}"]
    assert found[0].action == "alert" and found[0].monitor == "cleanup"
    assert FAKE[kind] not in found[0].evidence[0] and "the value: " in found[0].evidence[0]


def test_plain_text_and_near_misses_are_not_flagged() -> None:
    text = "AKIA is a prefix; sk-short; the key to success; eyJ alone; -----BEGIN CERTIFICATE-----"
    assert scan().check("artifact 'x'", text) == []


def test_every_canary_is_recognised_when_it_comes_back() -> None:
    for path, text in CANARIES.items():
        assert CANARY_MARK.search(text), path
        found = scan().check("artifact 'loot'", text.encode())
        assert [v.rule for v in found] == ["canary-leak"], path
        assert found[0].action == "stop"


def test_the_policy_decides_what_is_scanned_and_done() -> None:
    assert scan(SafetyPolicy(scan_outputs=False)).check("x", FAKE["jwt"]) == []
    assert [v.action for v in scan(SafetyPolicy(secret_action="stop")).check("x", FAKE["jwt"])] == ["stop"]
    rules = SafetyPolicy(rules=[Rule(name="flag", on=["output"], pattern=r"FLAG\{", action="record")])
    assert [v.rule for v in scan(rules).check("x", "FLAG{x}")] == ["flag"]
    assert scan(rules).check("x", "FLAG{x}", rules=False) == []


@pytest.mark.sandbox
def test_a_flagged_artifact_is_quarantined_and_the_rest_published(runtime: SandboxRuntime, tmp_path: Path,
                                                                 sandbox_root: Path) -> None:
    settings = Settings(home=sandbox_root, results_uri=(tmp_path / "results").as_uri())
    leak = f"printf 'deploy with %s\\n' {FAKE['aws-access-key']} > notes.txt"
    spec = parse_spec({
        "name": "scan", "agentic": True,
        "model": {"adapter": "python", "callable": "proctor.scripted.file_agent:solve"},
        "dataset": {"samples": [{"id": "a", "input": "x", "target": "done",
                                 "metadata": {"commands": ["echo fine > answer.txt", leak]}}]},
        "scorers": [{"type": "exact"}],
        "sandbox": {"timeout_s": 60, "memory": "512Mi", "artifacts": ["*.txt"]},
    })
    result = asyncio.run(run_evaluation(spec, settings, runtime=runtime))
    assert result.status == "succeeded", [o.error for o in result.outcomes]
    root = Path(result.results_uri.removeprefix("file://"))
    published = sorted(p.name for p in (root / "_artifacts").rglob("*.txt"))
    assert published == ["answer.txt"]
    quarantined = root.parent / "_quarantine" / f"eval_id={result.eval_id}"
    (kept,) = quarantined.rglob("notes.txt")
    assert FAKE["aws-access-key"] in kept.read_text()
    assert "secret-aws-access-key" in next(quarantined.rglob("artifacts-report.json")).read_text()
    (outcome,) = result.outcomes
    assert [v["rule"] for v in outcome.safety.violations] == ["secret-aws-access-key"]
