"""Text rules over what a sandbox says and what a model answers (`SafetyPolicy.all_rules`).

`RuleSet.check(source, text)` runs every rule that reads `source` (log, command,
generation, output): a regular expression is searched; a detector
(`module:function(text) -> str | None`) is called and its answer is the evidence. A
detector that raises is itself a violation (`detector-failed`, action stop): a rule that
cannot be checked fails closed.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proctor.policy import Rule, SafetyPolicy

from .violations import Violation, clip

MAX_TEXT = 64 * 1024  # a rule reads at most this much of one text (the rest is checked in windows)


@dataclass(frozen=True)
class _Compiled:
    rule: Rule
    regex: re.Pattern[str] | None
    detector: Callable[[str], Any] | None


class RuleSet:
    def __init__(self, rules: list[Rule]):
        self.rules = [_Compiled(r, re.compile(r.pattern) if r.pattern else None,
                                _load(r.detector) if r.detector else None) for r in rules]

    @classmethod
    def of(cls, policy: SafetyPolicy) -> "RuleSet":
        return cls(policy.all_rules())

    def check(self, source: str, text: str) -> list[Violation]:
        found: list[Violation] = []
        for chunk in _windows(text):
            for c in self.rules:
                if source not in c.rule.on:
                    continue
                try:
                    hit = self._match(c, chunk)
                except Exception as exc:  # fail closed: a text no one could check is a violation
                    found.append(Violation("rules", "detector-failed", "stop",
                                           f"detector {c.rule.detector} of rule {c.rule.name} failed on a {source}",
                                           (f"{type(exc).__name__}: {exc}", chunk[:500])))
                    continue
                if hit is not None:
                    found.append(Violation("rules", c.rule.name, c.rule.action,
                                           f"{c.rule.name} in a {source}: {c.rule.description or 'rule matched'}",
                                           (hit,)))
            if found:
                break
        return found

    @staticmethod
    def _match(c: _Compiled, text: str) -> str | None:
        if c.regex is not None:
            m = c.regex.search(text)
            if m is None:
                return None
            start, end = max(0, m.start() - 80), min(len(text), m.end() + 80)
            return clip(text[start:end])
        answer = c.detector(text)  # type: ignore[misc]
        return clip(answer) if answer else None


def _windows(text: str) -> list[str]:
    """`text` in overlapping windows of MAX_TEXT, so that a long text is checked whole."""
    if len(text) <= MAX_TEXT:
        return [text]
    step = MAX_TEXT - 1024
    return [text[i: i + MAX_TEXT] for i in range(0, len(text), step)]


def _load(path: str) -> Callable[[str], Any]:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"detector {path}: {exc}") from None
