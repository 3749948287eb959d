from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from proctor.harness.channel import Cancelled
from proctor.harness.scorers import build_scorer, extract_letter, last_number, score_outside
from proctor.protocol import ShardSample
from proctor.spec import Sample, ScorerSpec


def scorer(cancelled: threading.Event | None = None, **spec: Any):
    return build_scorer(TypeAdapter(ScorerSpec).validate_python(spec), cancelled)


def sample(target: str | list[str] = "", **fields: Any) -> ShardSample:
    return ShardSample(id=fields.pop("id", "s1"), input=fields.pop("input", "q"), target=target, **fields)


def value(spec: dict[str, Any], output: str, target: str | list[str] = "", workdir: Path = Path("."), **fields: Any) -> float:
    return scorer(**spec).score(output, sample(target, **fields), workdir).value


def test_score_name_is_the_name_else_the_type():
    assert scorer(type="exact").name == "exact"
    assert scorer(type="exact", name="strict").name == "strict"


def test_exact_matches_after_strip_and_case_folding():
    assert value({"type": "exact"}, "  Paris\n", "paris") == 1.0
    assert value({"type": "exact"}, "Paris is the capital", "paris") == 0.0


def test_exact_respects_case_and_strip_options():
    spec = {"type": "exact", "ignore_case": False, "strip": False}
    assert value(spec, "Paris", "Paris") == 1.0
    assert value(spec, "paris", "Paris") == 0.0
    assert value(spec, " Paris", "Paris") == 0.0


def test_exact_accepts_any_target_of_a_list():
    assert value({"type": "exact"}, "four", ["4", "four"]) == 1.0
    assert value({"type": "exact"}, "five", ["4", "four"]) == 0.0


def test_includes_finds_the_target_inside_the_output():
    assert value({"type": "includes"}, "The capital is PARIS.", "paris") == 1.0
    assert value({"type": "includes"}, "The capital is Lyon.", "paris") == 0.0
    assert value({"type": "includes", "ignore_case": False}, "PARIS", "paris") == 0.0


def test_regex_searches_with_the_escaped_target():
    spec = {"type": "regex", "pattern": r"answer: {target}\b"}
    result = scorer(**spec).score("final answer: 3.5 units", sample("3.5"), Path("."))
    assert result.value == 1.0 and result.answer == "answer: 3.5"
    assert value(spec, "final answer: 385", "3.5") == 0.0


def test_regex_without_target_placeholder_searches_the_pattern():
    assert value({"type": "regex", "pattern": r"^\d+$"}, "42") == 1.0
    assert value({"type": "regex", "pattern": r"^\d+$"}, "forty-two") == 0.0


def test_numeric_compares_the_last_number_in_the_output():
    assert value({"type": "numeric"}, "First 3, then 1,234.0", "1234") == 1.0
    assert value({"type": "numeric"}, "It is 41 or maybe 42", "41") == 0.0
    assert value({"type": "numeric"}, "no number here", "41") == 0.0
    assert value({"type": "numeric"}, "The result is -2.5e3.", "-2500") == 1.0


def test_numeric_tolerance_absolute_and_relative():
    assert value({"type": "numeric", "tolerance": 0.1}, "3.05", "3") == 1.0
    assert value({"type": "numeric", "tolerance": 0.1}, "3.2", "3") == 0.0
    assert value({"type": "numeric", "tolerance": 0.01, "relative": True}, "1005", "1000") == 1.0
    assert value({"type": "numeric", "tolerance": 0.01, "relative": True}, "1011", "1000") == 0.0


def test_numeric_target_that_is_not_a_number_raises():
    with pytest.raises(ValueError, match="not a number"):
        value({"type": "numeric"}, "3", "three")


def test_last_number_reads_common_formats():
    assert last_number("x = 1,000,000") == 1_000_000
    assert last_number("costs $.5 each") == 0.5
    assert last_number("version 2.") == 2.0
    assert last_number("none") is None


@pytest.mark.parametrize("output", ["B", "(B)", "Answer: B", "the answer is (b).", "I think B is right", "B) Paris"])
def test_choice_extracts_the_letter(output):
    assert value({"type": "choice"}, output, "B", choices=["Lyon", "Paris", "Nice"]) == 1.0


@pytest.mark.parametrize("output", ["A", "Answer: C", "I do not know", "(D)"])
def test_choice_rejects_other_or_missing_letters(output):
    assert value({"type": "choice"}, output, "B", choices=["Lyon", "Paris", "Nice"]) == 0.0


def test_choice_maps_a_target_given_as_choice_text_to_its_letter():
    choices = ["Lyon", "Paris", "Nice"]
    assert value({"type": "choice"}, "Answer: B", "Paris", choices=choices) == 1.0
    assert value({"type": "choice"}, "Answer: A", "Paris", choices=choices) == 0.0


def test_choice_target_that_is_neither_letter_nor_choice_raises():
    with pytest.raises(ValueError, match="neither a letter nor one of the choices"):
        value({"type": "choice"}, "A", "Marseille", choices=["Lyon", "Paris"])


def test_extract_letter_ignores_letters_beyond_the_choices():
    assert extract_letter("I guess D, no, A", ["x", "y", "z"]) == "A"
    assert extract_letter("nothing", ["x", "y"]) is None


def test_command_exit_code_scores_the_workspace(tmp_path):
    spec = {"type": "command", "command": "test -f out.txt"}
    assert value(spec, "", workdir=tmp_path) == 0.0
    (tmp_path / "out.txt").write_text("x")
    result = scorer(**spec).score("", sample(), tmp_path)
    assert result.value == 1.0 and result.explanation.startswith("exit code 0")


def test_command_reads_the_output_on_stdin_and_the_target_from_the_environment(tmp_path):
    spec = {"type": "command", "command": 'grep -qx "$PROCTOR_TARGET"'}
    assert value(spec, "42", "42", workdir=tmp_path) == 1.0
    assert value(spec, "41", "42", workdir=tmp_path) == 0.0


def test_command_stdout_float_parses_the_printed_number(tmp_path):
    assert value({"type": "command", "command": "echo 0.75; echo noise >&2", "parse": "stdout_float"}, "", workdir=tmp_path) == 0.75
    result = scorer(type="command", command="echo lots", parse="stdout_float").score("", sample(), tmp_path)
    assert result.value == 0.0 and "not a number" in result.explanation


def test_command_that_times_out_scores_zero(tmp_path):
    result = scorer(type="command", command="sleep 5", timeout_s=0.2).score("", sample(), tmp_path)
    assert result.value == 0.0 and result.explanation.startswith("timed out")


def test_command_is_killed_on_cancel(tmp_path):
    cancelled = threading.Event()
    threading.Timer(0.2, cancelled.set).start()
    with pytest.raises(Cancelled):
        scorer(cancelled, type="command", command="sleep 5").score("", sample(), tmp_path)


def test_score_outside_recomputes_output_scores_and_skips_command_scorers():
    specs = [TypeAdapter(ScorerSpec).validate_python(s) for s in (
        {"type": "exact"}, {"type": "numeric", "name": "num"}, {"type": "command", "command": "true"})]
    assert score_outside(specs, "42", Sample(id=3, input="q", target="42")) == {"exact": 1.0, "num": 1.0}
    assert score_outside(specs, "41", Sample(id=3, input="q", target="forty-two")) == {"exact": 0.0}
