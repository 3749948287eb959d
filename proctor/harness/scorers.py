"""Scorers: how good one answer is, as a number (1.0 correct, 0.0 wrong for most).

Each scorer is built from its spec (`proctor.spec.ScorerSpec`) by `build_scorer` and
has `name` (the spec's `name`, else its `type`) and
`score(output, sample, workdir) -> Score(value, answer, explanation)`. A scorer raises
`ValueError` when the sample cannot be scored that way (a numeric target that is not a
number, say); the run loop records it as the sample's error and goes on.

A list target is a set of acceptable answers: any one of them scores 1.0. `sample` is a
`ShardSample` inside the sandbox, or the dataset's `proctor.spec.Sample` outside it
(`score_outside`); scorers read only its `id`, `target` and `choices`.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol

from proctor.harness.channel import clip
from proctor.harness.tools import run_command
from proctor.protocol import ShardSample
from proctor.spec import (
    ChoiceScorer,
    CommandScorer,
    ExactScorer,
    IncludesScorer,
    NumericScorer,
    RegexScorer,
    ScorerSpec,
)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NUMBER = re.compile(r"(?<![\d.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|(?<![\d.])[-+]?\.\d+")
_TARGET_ENV_CAP = 64 * 1024


@dataclass(frozen=True)
class Score:
    value: float
    answer: str | None = None
    explanation: str | None = None


class Scorer(Protocol):
    name: str

    def score(self, output: str, sample: ShardSample, workdir: Path) -> Score: ...


class SampleTargets(Protocol):
    """What a scorer of the output reads of a sample: a `ShardSample` in the sandbox, the
    dataset's own `proctor.spec.Sample` outside it (`score_outside`)."""

    @property
    def target(self) -> str | list[str]: ...

    @property
    def choices(self) -> list[str] | None: ...


def targets(sample: SampleTargets) -> list[str]:
    return [sample.target] if isinstance(sample.target, str) else list(sample.target)


def parse_number(text: str) -> float | None:
    try:
        value = float(text.strip().replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def last_number(text: str) -> float | None:
    """The last number written in `text` ('1,234.5', '-3', '2e-3'), or None."""
    for match in reversed(list(_NUMBER.finditer(text))):
        value = parse_number(match.group(0))
        if value is not None:
            return value
    return None


def choice_letter(target: str, choices: list[str] | None) -> str | None:
    """The letter a target stands for: the letter of the choice it names, or the target
    itself when it is a letter such as 'B' or '(b)'. None if it is neither."""
    if choices:
        stripped = [c.strip().casefold() for c in choices]
        if target.strip().casefold() in stripped:
            return LETTERS[stripped.index(target.strip().casefold())]
    m = re.fullmatch(r"\s*\(?([A-Za-z])\)?\s*", target)
    return m.group(1).upper() if m else None


def extract_letter(output: str, choices: list[str] | None) -> str | None:
    """The choice letter an answer gives: 'B', '(B)', 'Answer: B', 'the answer is (b)'."""
    valid = LETTERS[: len(choices)] if choices else LETTERS
    found: list[str] = re.findall(r"(?i)\banswer\b\W{0,3}(?:is\W{0,3})?\(?([A-Z])\)?(?![A-Za-z])", output)
    found = [f.upper() for f in found if f.upper() in valid]
    if found:
        return found[-1]
    m = re.fullmatch(r"\W*([A-Za-z])\W*", output)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    for pattern in (r"\(([A-Z])\)", r"(?m)^\s*([A-Z])[).:]", r"\b([A-Z])\b"):
        found = [f for f in re.findall(pattern, output) if f in valid]
        if found:
            return found[-1]
    return None


class ExactMatch:
    def __init__(self, spec: ExactScorer):
        self.name = spec.name or spec.type
        self._spec = spec

    def _norm(self, text: str) -> str:
        text = text.strip() if self._spec.strip else text
        return text.casefold() if self._spec.ignore_case else text

    def score(self, output: str, sample: SampleTargets, workdir: Path) -> Score:
        answer = self._norm(output)
        hit = any(answer == self._norm(t) for t in targets(sample))
        return Score(float(hit), clip(output))


class Includes:
    def __init__(self, spec: IncludesScorer):
        self.name = spec.name or spec.type
        self._fold = str.casefold if spec.ignore_case else str

    def score(self, output: str, sample: SampleTargets, workdir: Path) -> Score:
        hit = any(self._fold(t) in self._fold(output) for t in targets(sample))
        return Score(float(hit), clip(output))


class RegexMatch:
    def __init__(self, spec: RegexScorer):
        self.name = spec.name or spec.type
        self._pattern = spec.pattern

    def score(self, output: str, sample: SampleTargets, workdir: Path) -> Score:
        patterns = (
            [self._pattern.replace("{target}", re.escape(t)) for t in targets(sample)]
            if "{target}" in self._pattern
            else [self._pattern]
        )
        for pattern in patterns:
            match = re.search(pattern, output)
            if match:
                return Score(1.0, clip(match.group(0)), f"matched {clip(pattern, 1000)!r}")
        return Score(0.0, None, f"no match for {clip(patterns[0], 1000)!r}" if patterns else "no target")


class NumericMatch:
    def __init__(self, spec: NumericScorer):
        self.name = spec.name or spec.type
        self._spec = spec

    def score(self, output: str, sample: SampleTargets, workdir: Path) -> Score:
        wanted = []
        for t in targets(sample):
            value = parse_number(t)
            if value is None:
                raise ValueError(f"numeric scorer: target {clip(t, 200)!r} is not a number")
            wanted.append(value)
        got = last_number(output)
        if got is None:
            return Score(0.0, None, "no number in the output")
        for value in wanted:
            tolerance = self._spec.tolerance * (abs(value) if self._spec.relative else 1.0)
            if abs(got - value) <= tolerance:
                return Score(1.0, repr(got))
        return Score(0.0, repr(got), f"{got!r} is not within {self._spec.tolerance:g} of the target")


class ChoiceMatch:
    def __init__(self, spec: ChoiceScorer):
        self.name = spec.name or spec.type

    def score(self, output: str, sample: SampleTargets, workdir: Path) -> Score:
        wanted = set()
        for t in targets(sample):
            letter = choice_letter(t, sample.choices)
            if letter is None:
                raise ValueError(f"choice scorer: target {clip(t, 200)!r} is neither a letter nor one of the choices")
            wanted.add(letter)
        got = extract_letter(output, sample.choices)
        if got is None:
            return Score(0.0, None, "no choice letter in the output")
        return Score(float(got in wanted), got)


class CommandCheck:
    """Runs the spec's command in the sample directory after the model has answered.

    The command reads the model's output on stdin and finds `PROCTOR_SAMPLE_ID` and
    `PROCTOR_TARGET` (the first target) in its environment.
    """

    def __init__(self, spec: CommandScorer, cancelled: threading.Event | None = None,
                 env: Mapping[str, str] | None = None):
        self.name = spec.name or spec.type
        self._spec = spec
        self._cancelled = cancelled
        self._env = env

    def score(self, output: str, sample: ShardSample, workdir: Path) -> Score:
        env = dict(os.environ if self._env is None else self._env)
        env.update(
            PROCTOR_SAMPLE_ID=sample.id,
            PROCTOR_TARGET=clip((targets(sample) or [""])[0], _TARGET_ENV_CAP),
        )
        merge = self._spec.parse == "exit_code"
        result = run_command(
            self._spec.command, workdir, self._spec.timeout_s, self._cancelled,
            merge_stderr=merge, stdin_data=output.encode(), env=env,
        )
        shown = clip((result.output + result.stderr).strip(), 4000)
        if result.timed_out:
            return Score(0.0, None, f"timed out after {self._spec.timeout_s:g}s\n{shown}")
        if merge:
            return Score(float(result.exit_code == 0), None, f"exit code {result.exit_code}\n{shown}".strip())
        value = parse_number(result.output)
        if value is None:
            return Score(0.0, None, f"stdout is not a number (exit code {result.exit_code}): {shown!r}")
        return Score(value, result.output.strip()[:200], clip(result.stderr.strip(), 4000) or None)


def build_scorer(spec: ScorerSpec, cancelled: threading.Event | None = None,
                 env: Mapping[str, str] | None = None) -> Scorer:
    """A scorer for a validated `ScorerSpec`. `cancelled` lets a cancel kill a command
    scorer; `env` is its environment (the agent's, plus the sample's id and target)."""
    if isinstance(spec, CommandScorer):
        return CommandCheck(spec, cancelled, env)
    return _output_scorer(spec)


def _output_scorer(spec: ExactScorer | IncludesScorer | RegexScorer | NumericScorer | ChoiceScorer
                   ) -> ExactMatch | Includes | RegexMatch | NumericMatch | ChoiceMatch:
    match spec:
        case ExactScorer():
            return ExactMatch(spec)
        case IncludesScorer():
            return Includes(spec)
        case RegexScorer():
            return RegexMatch(spec)
        case NumericScorer():
            return NumericMatch(spec)
        case ChoiceScorer():
            return ChoiceMatch(spec)


def score_outside(specs: Sequence[ScorerSpec], output: str, sample: SampleTargets) -> dict[str, float]:
    """The scores that depend only on the output and the target, recomputed outside the
    sandbox from the trusted dataset sample (a `proctor.spec.Sample`), so that a sandbox
    cannot forge them. Command scorers need the workspace and are left out, as is a
    scorer that cannot score this sample."""
    scores = {}
    for spec in specs:
        if isinstance(spec, CommandScorer):
            continue
        scorer = _output_scorer(spec)
        try:
            scores[scorer.name] = scorer.score(output, sample, Path("."))
        except ValueError:
            continue
    return {name: s.value for name, s in scores.items()}
