"""The stages of one sample inside the sandbox, timed: `setup` (prepares its folder and
environment), `eval` (the model or agent), `score`, `cleanup` (its artifacts reported for
the host's scan). A failure names the stage it happened in."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proctor.harness.scorers import Score


@dataclass
class SampleStages:
    seconds: dict[str, float] = field(default_factory=dict)
    failed: str | None = None

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.monotonic() - started, 6)

    def fail(self, stage: str, errors: list[str], message: str) -> dict[str, Score]:
        """Record `message` as the sample's error in `stage` (the first failing stage is
        the one named); returns the scores a failed stage leaves: none."""
        errors.append(message)
        self.failed = self.failed or stage
        return {}
