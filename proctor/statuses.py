"""The statuses of evaluations and shards: defined here once, read everywhere.

`queued → scheduled → running → succeeded | failed | cancelled | safety_stopped`; an
evaluation is `interrupted` only while the platform recovers from a crash. The transition
table itself lives with the state store (`cluster/state/models.py`), built from these names.
"""

from __future__ import annotations

from typing import Literal, get_args

Status = Literal["queued", "scheduled", "running", "succeeded", "failed", "cancelled", "safety_stopped",
                 "interrupted"]
FinalStatus = Literal["succeeded", "failed", "cancelled", "safety_stopped"]

STATUSES: tuple[str, ...] = get_args(Status)
"""Every status an evaluation can have, in the order a run goes through them."""
SHARD_STATUSES: tuple[str, ...] = tuple(s for s in STATUSES if s != "interrupted")
TERMINAL: frozenset[str] = frozenset(get_args(FinalStatus))
"""Final: nothing changes an evaluation or a shard after one of these."""
UNSUCCESSFUL: frozenset[str] = TERMINAL - {"succeeded"}
"""The ends a run can be cut short to, from any status before its last."""
