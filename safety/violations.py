"""What a monitor reports: a `Violation` (a rule broken, with bounded evidence).

Evidence comes from the sandbox, so it is untrusted text: it is cut to a bound here, once,
whatever the monitor passes in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["stop", "alert", "record"]
MAX_EVIDENCE_ITEMS = 20
MAX_EVIDENCE_CHARS = 2000
SEVERITY = {"stop": "critical", "alert": "warning", "record": "info"}


def clip(text: Any, limit: int = MAX_EVIDENCE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Violation:
    """One broken rule. `monitor` names the monitor (resources, syscalls, canaries, rules,
    usage, watchdog); `rule` the rule within it (e.g. `memory`, `connect`, `exfiltration`)."""

    monitor: str
    rule: str
    action: Action
    message: str
    evidence: tuple[str, ...] = ()
    at: float = field(default_factory=time.time)  # wall clock, for the timeline
    detected: float = field(default_factory=time.monotonic)  # for measuring time to kill

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", clip(self.message, 500))
        object.__setattr__(self, "evidence", tuple(clip(e) for e in self.evidence[:MAX_EVIDENCE_ITEMS]))

    @property
    def severity(self) -> str:
        return SEVERITY[self.action]

    def as_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "rule": self.rule, "action": self.action, "severity": self.severity,
                "message": self.message, "evidence": list(self.evidence), "at": self.at}
